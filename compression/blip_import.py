"""Import a Hugging Face BLIP checkpoint folder into a TrimVLM model folder, without transformers.

Reads config.json, the weights (model.safetensors, a sharded safetensors index, or
pytorch_model.bin), the tokenizer (tokenizer.json, or vocab.txt + tokenizer_config.json) and
preprocessor_config.json, and writes config.json, model.safetensors, tokenizer.json and
preprocess.json (compression/artifacts.py) plus blip_import.json, a record of what was mapped.

Keys are mapped explicitly and shapes asserted (nanoGPT's from_pretrained style):

    BLIP (transformers)                       TrimVLM
    vision_model.*                        ->  vision_model.*                (same names)
    text_encoder.embeddings.*             ->  text_encoder.embeddings.*     (0 text-only layers)
    text_encoder.encoder.layer.N.*        ->  fusion_encoder.layer.N.*      (self + cross-attention)
    text_decoder.*                        ->  text_decoder.*                (LM head tied to embeddings)
    vision_proj, text_proj, itm_head      ->  same

BLIP's text encoder is one stack run text-only for ITC and with cross-attention to the image
for ITM/VQA, so it becomes our fusion encoder with `itc_text_through_fusion` set and an empty
unimodal text stack. A checkpoint key we do not map is an error, as is a key missing from a part
the checkpoint has; the only keys read but not copied are tied duplicates (checked equal), the
position-id buffers (checked to be 0..n-1) and the unused text pooler, and they are listed.
Parts the checkpoint's class lacks (a captioning model has no text encoder or ITM head; no
BLIP has our closed-vocabulary VQA classifier or the ITC temperature) keep their fresh
initialisation and are listed in blip_import.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compression.artifacts import save_model_dir
from compression.config import ModelConfig
from compression.modeling import TrimVLM
from service.preprocess import ImageSpec, Preprocessing

# transformers' BlipTextConfig / BlipVisionConfig / BlipConfig defaults: config.json files written
# by older versions omit fields left at their default.
TEXT_DEFAULTS = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "bos_token_id": 30522,
    "pad_token_id": 0,
    "sep_token_id": 102,
}
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 384,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
TOP_DEFAULTS = {"image_text_hidden_size": 256}

# Which parts each BLIP class has (a part = a group of checkpoint keys imported all or nothing).
ARCHITECTURES = {
    "BlipForQuestionAnswering": ("vision", "text_encoder", "text_decoder"),
    "BlipForConditionalGeneration": ("vision", "text_decoder"),
    "BlipForImageTextRetrieval": ("vision", "text_encoder", "itc", "itm"),
}
PART_PREFIXES = {
    "vision": ("vision_model.",),
    "text_encoder": ("text_encoder.",),
    "text_decoder": ("text_decoder.",),
    "itc": ("vision_proj.", "text_proj."),
    "itm": ("itm_head.",),
}

_VISION_LAYER = ["self_attn.qkv", "self_attn.projection", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"]
_ATTENTION = ["self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"]
_BERT_LAYER = [
    *(f"attention.{p}" for p in _ATTENTION),
    *(f"crossattention.{p}" for p in _ATTENTION),
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
]
_TEXT_EMBEDDINGS = ["word_embeddings", "position_embeddings", "LayerNorm"]
# Read, checked, not copied: tied duplicates of a mapped tensor (must be equal to it).
TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}
POSITION_ID_BUFFERS = ("text_encoder.embeddings.position_ids", "text_decoder.bert.embeddings.position_ids")
UNUSED = ("text_encoder.pooler.dense.weight", "text_encoder.pooler.dense.bias")  # no BLIP head reads the pooler

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", "nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}


class BlipImportError(ValueError):
    """The folder is not a BLIP checkpoint we can import exactly (the message says why)."""


@dataclass
class ImportReport:
    architecture: str
    parts: list[str]
    mapped: dict[str, str]  # our parameter -> checkpoint key
    fresh: list[str]  # our parameters left at their fresh initialisation
    ignored: list[str]  # checkpoint keys read and checked but not copied (tied duplicates, buffers)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        by_module: dict[str, int] = {}
        for name in self.fresh:
            top = name.split(".")[0]
            by_module[top] = by_module.get(top, 0) + 1
        return {
            "source": "huggingface-blip",
            "architecture": self.architecture,
            "parts": self.parts,
            "mapped_tensors": len(self.mapped),
            "fresh_modules": by_module,
            "fresh": self.fresh,
            "ignored": self.ignored,
            "notes": self.notes,
            "mapping": self.mapped,
        }


# ----------------------------------------------------------------------------------------------
# Reading the folder
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise BlipImportError(f"{path.parent} is not a BLIP checkpoint folder: {path.name} is missing")
    return _json_object(path)


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is a one-line BlipImportError."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlipImportError(f"{path} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise BlipImportError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _weights_file(path: Path, load):
    """load(path), with a clear one-line error for a file that is not weights: a Git LFS pointer (a
    clone without git-lfs), a truncated download, or another format under the expected name."""
    if not path.is_file():
        raise BlipImportError(f"{path} is missing")
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        raise BlipImportError(f"{path} is a Git LFS pointer, not the weights: fetch them (git lfs pull) and import again")
    try:
        return load(path)
    except Exception as e:  # safetensors, pickle and zip errors have no common base
        raise BlipImportError(f"{path} cannot be read as weights ({type(e).__name__}: {_first_line(e)})") from None


def read_hf_config(src: Path) -> tuple[dict, dict, dict]:
    """(top-level, text, vision) config dicts with transformers' defaults filled in."""
    top = _read_json(src / "config.json")
    if top.get("model_type") != "blip":
        raise BlipImportError(f"{src}/config.json: model_type is {top.get('model_type')!r}, expected 'blip' (BLIP-1)")
    text = {**TEXT_DEFAULTS, **(top.get("text_config") or {})}
    vision = {**VISION_DEFAULTS, **(top.get("vision_config") or {})}
    top = {**TOP_DEFAULTS, **top}
    for side, c in (("text", text), ("vision", vision)):
        if c["hidden_act"] != "gelu":
            raise BlipImportError(f"{side}_config.hidden_act is {c['hidden_act']!r}; TrimVLM layers use exact GELU ('gelu')")
        if c["hidden_size"] % c["num_attention_heads"]:
            raise BlipImportError(f"{side}_config: hidden_size {c['hidden_size']} is not a multiple of the head count")
    for k in ("image_size", "patch_size"):  # the fusion cross-attention width is the vision width (shapes asserted)
        if isinstance(vision[k], (list, tuple)):
            if len(set(vision[k])) != 1:
                raise BlipImportError(f"vision_config.{k} {vision[k]}: only square images are supported")
            vision[k] = vision[k][0]
    return top, text, vision


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as fp32, from safetensors (single or sharded) or a torch .bin."""
    from safetensors.torch import load_file

    def safetensors(path: Path) -> dict[str, torch.Tensor]:
        return _weights_file(path, lambda p: load_file(str(p)))

    if (src / "model.safetensors").is_file():
        state = safetensors(src / "model.safetensors")
    elif (src / "model.safetensors.index.json").is_file():
        index = _read_json(src / "model.safetensors.index.json").get("weight_map")
        if not isinstance(index, dict) or not index:
            raise BlipImportError(f"{src}/model.safetensors.index.json has no weight_map")
        state = {}
        for shard in sorted(set(index.values())):
            state.update(safetensors(src / shard))
    elif (src / "pytorch_model.bin").is_file():
        state = _weights_file(src / "pytorch_model.bin", lambda p: torch.load(p, map_location="cpu", weights_only=True))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BlipImportError(f"{src}/pytorch_model.bin is not a flat state dict of tensors")
    else:
        raise BlipImportError(f"{src}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def read_tokenizer(src: Path):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer`, without padding or truncation."""
    from tokenizers import Tokenizer

    if (src / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise BlipImportError(f"{src}/tokenizer.json cannot be read: {_first_line(e)}") from None
    elif (src / "vocab.txt").is_file():
        from tokenizers import AddedToken
        from tokenizers.implementations import BertWordPieceTokenizer

        tcfg = _json_object(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
        smap = _json_object(src / "special_tokens_map.json") if (src / "special_tokens_map.json").is_file() else {}
        bert = BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=tcfg.get("do_lower_case", True))
        tok = Tokenizer.from_str(bert.to_str())
        extra = []
        for d in (tcfg, smap):
            for key in ("bos_token", "additional_special_tokens"):
                vals = d.get(key) or []
                for v in vals if isinstance(vals, list) else [vals]:
                    content = v["content"] if isinstance(v, dict) else v
                    if content not in extra:
                        extra.append(content)
        tok.add_special_tokens([AddedToken(t, special=True) for t in extra])
    else:
        raise BlipImportError(f"{src}: no tokenizer (tokenizer.json or vocab.txt)")
    tok.no_padding()
    tok.no_truncation()
    return tok


def read_image_spec(src: Path, image_size: int) -> ImageSpec:
    """Resolution, mean/std and resampling of BlipImageProcessor: preprocessor_config.json (the
    hub's checkpoints), or the `image_processor` entry of processor_config.json (transformers 5)."""
    if (src / "preprocessor_config.json").is_file() or not (src / "processor_config.json").is_file():
        p = _read_json(src / "preprocessor_config.json")
    else:
        p = _read_json(src / "processor_config.json").get("image_processor") or {}
        if not p:
            raise BlipImportError(f"{src}/processor_config.json has no image_processor entry")
    size = p.get("size", image_size)
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise BlipImportError(f"preprocessor size {size}: only square images are supported")
            size = size["height"]
        elif "shortest_edge" in size:
            size = size["shortest_edge"]
        else:
            raise BlipImportError(f"preprocessor size {size} not understood")
    if int(size) != image_size:
        raise BlipImportError(f"preprocessor resizes to {size}px but the vision encoder expects {image_size}px")
    if p.get("do_rescale", True) and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise BlipImportError(f"rescale_factor {p['rescale_factor']}: only 1/255 is supported")
    if p.get("do_normalize", True):
        mean, std = tuple(float(x) for x in p["image_mean"]), tuple(float(x) for x in p["image_std"])
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = _RESAMPLE.get(p.get("resample", 3))
    if resample is None:
        raise BlipImportError(f"resample {p.get('resample')!r} not supported (nearest, bilinear, bicubic)")
    return ImageSpec(size=int(size), mean=mean, std=std, resample=resample)


# ----------------------------------------------------------------------------------------------
# Config and key map
# ----------------------------------------------------------------------------------------------


def detect_parts(top: dict, keys: set[str]) -> tuple[str, list[str]]:
    """The checkpoint class and which parts it holds; the keys must agree with the class."""
    present = [p for p, prefixes in PART_PREFIXES.items() if any(k.startswith(prefixes) for k in keys)]
    arch = next((a for a in top.get("architectures") or [] if a in ARCHITECTURES), None)
    if arch is None:
        named = top.get("architectures")
        if named:
            raise BlipImportError(f"architecture {named} is not supported; supported: {sorted(ARCHITECTURES)}")
        arch = next((a for a, parts in ARCHITECTURES.items() if set(parts) == set(present)), None)
        if arch is None:
            raise BlipImportError(f"cannot tell the BLIP class from the checkpoint's parts {present}")
    expected = ARCHITECTURES[arch]
    missing = [p for p in expected if p not in present]
    if missing:
        raise BlipImportError(f"{arch} checkpoint has no weights for {missing} (prefixes {[PART_PREFIXES[p] for p in missing]})")
    return arch, list(expected)


def blip_model_config(
    top: dict, text: dict, vision: dict, cls_token_id: int, name: str, answers: list[str], decoder_cross_width: int | None = None
) -> ModelConfig:
    """Our config for a BLIP: its text encoder becomes the fusion stack (no text-only layers).
    decoder_cross_width: width the decoder cross-attends to, when not the vision width (BLIP's
    VQA decoders attend to question states: the same width in base models, not in large ones)."""
    vl, tl = int(vision["num_hidden_layers"]), int(text["num_hidden_layers"])
    vh, th = int(vision["num_attention_heads"]), int(text["num_attention_heads"])
    return ModelConfig(
        name=name,
        role="teacher",
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        vision_width=int(vision["hidden_size"]),
        vision_head_dim=int(vision["hidden_size"]) // vh,
        vision_heads=[vh] * vl,
        vision_mlp=[int(vision["intermediate_size"])] * vl,
        vision_layer_norm_eps=float(vision["layer_norm_eps"]),
        text_width=int(text["hidden_size"]),
        text_head_dim=int(text["hidden_size"]) // th,
        vocab_size=int(text["vocab_size"]),
        max_position_embeddings=int(text["max_position_embeddings"]),
        text_layer_norm_eps=float(text["layer_norm_eps"]),
        pad_token_id=int(text["pad_token_id"]),
        cls_token_id=cls_token_id,
        sep_token_id=int(text["sep_token_id"]),
        bos_token_id=int(text["bos_token_id"]),
        text_heads=[],
        text_mlp=[],
        fusion_self_heads=[th] * tl,
        fusion_cross_heads=[th] * tl,
        fusion_mlp=[int(text["intermediate_size"])] * tl,
        decoder_self_heads=[th] * tl,
        decoder_cross_heads=[th] * tl,
        decoder_mlp=[int(text["intermediate_size"])] * tl,
        decoder_cross_width=None if decoder_cross_width in (None, int(vision["hidden_size"])) else decoder_cross_width,
        embed_dim=int(top["image_text_hidden_size"]),
        answers=list(answers),
        itc_text_through_fusion=True,
    )


def _wb(module: str) -> list[str]:
    return [f"{module}.weight", f"{module}.bias"]


def key_map(cfg: ModelConfig, parts: list[str]) -> dict[str, str]:
    """Our parameter name -> checkpoint key, for the parts the checkpoint has."""
    m: dict[str, str] = {}

    def same(*names: str) -> None:
        m.update({n: n for n in names})

    if "vision" in parts:
        e = "vision_model.embeddings"
        same(f"{e}.class_embedding", f"{e}.position_embedding", *_wb(f"{e}.patch_embedding"), *_wb("vision_model.post_layernorm"))
        for i in range(cfg.layer_counts["vision"]):
            for part in _VISION_LAYER:
                same(*_wb(f"vision_model.encoder.layers.{i}.{part}"))
    if "text_encoder" in parts:
        same(*(f"text_encoder.embeddings.{p}.weight" for p in _TEXT_EMBEDDINGS), "text_encoder.embeddings.LayerNorm.bias")
        for i in range(cfg.layer_counts["fusion"]):
            for part in _BERT_LAYER:
                for ours, theirs in zip(
                    _wb(f"fusion_encoder.layer.{i}.{part}"), _wb(f"text_encoder.encoder.layer.{i}.{part}"), strict=True
                ):
                    m[ours] = theirs
    if "text_decoder" in parts:
        e = "text_decoder.bert.embeddings"
        same(*(f"{e}.{p}.weight" for p in _TEXT_EMBEDDINGS), f"{e}.LayerNorm.bias")
        for i in range(cfg.layer_counts["decoder"]):
            for part in _BERT_LAYER:
                same(*_wb(f"text_decoder.bert.encoder.layer.{i}.{part}"))
        t = "text_decoder.cls.predictions"
        same(*_wb(f"{t}.transform.dense"), *_wb(f"{t}.transform.LayerNorm"), f"{t}.bias")
    if "itc" in parts:
        same(*_wb("vision_proj"), *_wb("text_proj"))
    if "itm" in parts:
        same(*_wb("itm_head"))
    return m


def load_blip_weights(model: TrimVLM, state: dict[str, torch.Tensor], parts: list[str]) -> tuple[dict[str, str], list[str]]:
    """Copy the checkpoint into the model. Every checkpoint key must be mapped or a checked
    duplicate; every mapped key must exist with the same shape. Returns (mapping, ignored keys)."""
    mapping = key_map(model.config, parts)
    used = set(mapping.values())
    ignored = []
    for key, source in TIED.items():
        if key in state:
            if source not in state or not torch.equal(state[key], state[source]):
                raise BlipImportError(f"{key} is not tied to {source}: untied LM heads are not supported")
            ignored.append(key)
    for key in POSITION_ID_BUFFERS:
        if key in state:
            ids = state[key].reshape(-1)
            if not torch.equal(ids, torch.arange(ids.numel(), dtype=ids.dtype)):
                raise BlipImportError(f"{key} is not 0..n-1: custom position ids are not supported")
            ignored.append(key)
    ignored += [k for k in UNUSED if k in state]
    unknown = sorted(set(state) - used - set(ignored))
    if unknown:
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise BlipImportError(f"checkpoint keys with no place in the model: {unknown[:10]}{more}")
    missing = sorted(k for k in used if k not in state)
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise BlipImportError(f"checkpoint lacks keys its parts {parts} need: {missing[:10]}{more}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if ours not in params:
                raise BlipImportError(f"model has no parameter {ours} (mapped from {theirs})")
            value = state[theirs]
            if params[ours].shape != value.shape:
                raise BlipImportError(
                    f"{theirs}: checkpoint shape {tuple(value.shape)} != model {ours} {tuple(params[ours].shape)}"
                )
            params[ours].copy_(value)
    return mapping, sorted(ignored)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _check_tokenizer(tok, cfg_text: dict) -> int:
    """The tokenizer must agree with the config's special ids; returns the [CLS] id."""
    ids = {name: tok.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
    if None in ids.values():
        raise BlipImportError(f"tokenizer lacks special tokens: {[k for k, v in ids.items() if v is None]}")
    if ids["[SEP]"] != cfg_text["sep_token_id"] or ids["[PAD]"] != cfg_text["pad_token_id"]:
        raise BlipImportError(
            f"tokenizer ids [SEP]={ids['[SEP]']} [PAD]={ids['[PAD]']} differ from the config's "
            f"sep_token_id={cfg_text['sep_token_id']} pad_token_id={cfg_text['pad_token_id']}"
        )
    if tok.id_to_token(int(cfg_text["bos_token_id"])) is None:
        raise BlipImportError(f"decoder start token id {cfg_text['bos_token_id']} is not in the tokenizer")
    if tok.get_vocab_size() > int(cfg_text["vocab_size"]):
        raise BlipImportError(f"tokenizer has {tok.get_vocab_size()} tokens, the model only {cfg_text['vocab_size']}")
    return ids["[CLS]"]


def build_from_blip(
    src: str | Path, name: str | None = None, answers: list[str] | None = None, seed: int = 0
) -> tuple[TrimVLM, object, ImageSpec, ImportReport]:
    """(model, tokenizer, image spec, report) from a Hugging Face BLIP folder."""
    src = Path(src)
    if not src.is_dir():
        raise BlipImportError(f"{src} is not a folder")
    top, text, vision = read_hf_config(src)
    state = read_weights(src)
    arch, parts = detect_parts(top, set(state))
    tok = read_tokenizer(src)
    cls_id = _check_tokenizer(tok, text)
    spec = read_image_spec(src, int(vision["image_size"]))
    cross_key = state.get("text_decoder.bert.encoder.layer.0.crossattention.self.key.weight")
    cross_width = int(cross_key.shape[1]) if cross_key is not None else None
    cfg = blip_model_config(top, text, vision, cls_id, name or src.resolve().name, answers or [], cross_width)
    cfg.decoder_answers = arch == "BlipForQuestionAnswering"  # a captioning decoder reads image tokens only
    torch.manual_seed(seed)  # the parts the checkpoint lacks start from a reproducible initialisation
    model = TrimVLM(cfg)
    mapping, ignored = load_blip_weights(model, state, parts)
    fresh = sorted(set(dict(model.named_parameters())) - set(mapping))
    notes = []
    if "text_encoder" not in parts:
        notes.append("no text encoder in the checkpoint: ITC, ITM and VQA start untrained (captioning is the imported task)")
    if "text_decoder" not in parts:
        notes.append("no text decoder in the checkpoint: captioning and generative answers start untrained")
    notes.append("ITC temperature and the closed-vocabulary VQA classifier are not part of BLIP: freshly initialised")
    return model.eval(), tok, spec, ImportReport(arch, parts, mapping, fresh, ignored, notes)


def import_blip(
    src: str | Path,
    out: str | Path,
    name: str | None = None,
    answers: list[str] | None = None,
    max_text_length: int = 32,
    max_answer_length: int = 10,
    max_caption_length: int = 20,
    dtype: str = "fp32",
) -> ImportReport:
    """Write a TrimVLM model folder for the BLIP checkpoint in `src` and return what was mapped."""
    model, tok, spec, report = build_from_blip(src, name, answers)
    positions = model.config.max_position_embeddings
    if max_text_length > positions:
        raise BlipImportError(f"max_text_length {max_text_length} exceeds {positions} positions")
    if max_caption_length > positions:  # [DEC] at position 0, a caption of n tokens feeds positions 0..n-1
        raise BlipImportError(f"max_caption_length {max_caption_length} exceeds the decoder's {positions} positions")
    pre = Preprocessing(
        image=spec,
        max_text_length=max_text_length,
        max_answer_length=max_answer_length,
        max_caption_length=max_caption_length,
    )
    out = Path(out)
    save_model_dir(
        out, model, tok, pre, dtype=dtype, extra_metadata={"source": "huggingface-blip", "architecture": report.architecture}
    )
    (out / "blip_import.json").write_text(json.dumps({"from": str(Path(src).resolve()), **report.to_dict()}, indent=2) + "\n")
    return report


def read_answers(path: str | Path) -> list[str]:
    """A closed answer vocabulary: a JSON list, a JSON object with an "answers" list, or one answer a line."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    answers = data.get("answers") if isinstance(data, dict) else data
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise BlipImportError(f"{path}: expected a JSON list of answers (or {{'answers': [...]}})")
    return answers


def answers_for_config(yaml_path: str | Path) -> list[str]:
    """The closed answer vocabulary of the VQA training splits a training / distill / prune YAML
    names (easy-VQA, scenes), as `trimvlm train` builds it, so the imported model can be the
    teacher of those runs."""
    from compression import data as D
    from compression.config_file import load_yaml
    from compression.training import TrainConfig, load_training_splits

    raw = load_yaml(yaml_path)
    keys = ("easy_vqa", "easy_vqa_val_images", "scenes", "scenes_seed", "scenes_counts", "limit")
    cfg = TrainConfig(**{k: raw[k] for k in keys if k in raw})
    vqa_train, _, _, _ = load_training_splits(cfg, ImageSpec(size=cfg.image_size))
    return D.answer_vocabulary(*vqa_train)
