"""Random-weight BLIP checkpoints at BLIP-base size (or tiny, for tests), taken through the normal
import and export code, for `trimvlm bench scale` (benchmarks/scale.py).

Stages, each a function and a subcommand (`python -m benchmarks.scale_fixtures STAGE ...`, so the
bench can run each in its own process and read its wall time and peak RSS):

  checkpoint  transformers' BlipForQuestionAnswering(BlipConfig()) with random weights (vision,
              text encoder and decoder: every part the importer maps), a BERT WordPiece tokenizer
              with BLIP's special tokens ([DEC] = bos 30522, [ENC] 30523; 30522 WordPiece entries,
              BERT's special-token layout, a few hundred real words, fillers) and BLIP's image
              processor at the chosen resolution, saved as a Hugging Face folder.
  import      `trimvlm import blip` (compression/blip_import.py) with a small dummy closed answer
              list (DUMMY_ANSWERS): BLIP answers generatively; the service's /vqa and the trimmed
              VQA graph run the closed classifier, so the timing fixture gets one (untrained).
  trimmers    token and head trimmers attached as `trimvlm trim` attaches them (config.trimming,
              compression.modeling.Trimmers), untrained, then set for timing (`timing_trimmers`):
              every trimmer keeps everything except the token trimmer of one vision layer
              (TRIM_LAYER), whose keep-logits are rescaled to spread over the image tokens. The
              keep threshold (a graph input) then sets the image-token keep fraction exactly; the
              thresholds for KEEP_FRACTIONS on the timing input are found here from the torch model
              and written to timing.json with the FLOPs ratio of each (compression.trimmed's
              formula, the one compute levels use) and the timing input itself (timing_input.npz).
  export      compression.export.export_model (fp32 + int8, manifest.json), timed per phase:
              tracing (fp32 ONNX), INT8 quantisation, the rest (ORT parity checks, references).

Layout under ROOT (runs/scale by default, git-ignored; nothing here is committed):
  ROOT/<size>-<px>/hf/            Hugging Face folder
  ROOT/<size>-<px>/imported/      `trimvlm import blip` output
  ROOT/<size>-<px>/trimmed/       + trimmers, timing.json, timing_input.npz
  ROOT/<size>-<px>/models/blip-<size>-<px>/1/   the exported model-repository version
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZES = ("base", "tiny")
KEEP_FRACTIONS = (1.0, 0.7, 0.5, 0.35, 0.2)
TRIM_LAYER = 0  # the one vision layer whose token trimmer drops tokens (see timing_trimmers)
TIMING_QUESTION = "what is the man on the left side of the picture holding in his hand"
DUMMY_ANSWERS = ["yes", "no", "0", "1", "2", "3", "4", "red", "blue", "green", "white", "black", "dog", "cat", "man", "woman"]
BASE_VOCAB = 30522  # BERT-base WordPiece entries; [DEC] and [ENC] follow (BlipTextConfig vocab_size 30524)
KEEP_ALL_LOGIT = 20.0  # sigmoid(20) rounds to 1.0 in fp32: above every threshold used here
SPREAD_STD = 2.0  # std of the rescaled keep-logits of the dropping layer
# BlipVisionConfig's initializer_range is 1e-10 (its weights come from pretraining): at that scale
# every image token is the same vector and the vision tower is all but zero, so the fixture uses the
# text side's 0.02 for vision too (timing does not depend on values; trimming and INT8 need variety)
VISION_INIT_STD = 0.02

# Real words first (after BERT's special tokens), as a real vocabulary has them; fillers after.
WORDS = """
the a an of in on at to with and or is are was were be this that there these those it its
what which who where when how why many much color colour shape kind type number
man woman person people boy girl child children baby player men women
dog cat horse cow sheep bird elephant bear zebra giraffe animal animals
car bus truck train bike bicycle motorcycle boat plane airplane street road sign traffic light
table chair bed couch room kitchen bathroom window door wall floor building house city
food pizza sandwich cake plate bowl cup glass bottle banana apple orange fruit
red blue green yellow white black brown gray grey orange pink purple
one two three four five six seven eight nine ten zero yes no
left right top bottom front back side middle near next inside outside under over above behind
holding hand hands wearing sitting standing walking riding playing eating looking
picture image photo photograph shown view scene small large big little tall long short
water grass tree trees sky snow beach field park ocean sea river mountain hill
ball frisbee kite umbrella bag hat shirt tennis racket skateboard surfboard skis phone laptop
""".split()


@dataclass(frozen=True)
class Fixture:
    """Where one fixture's folders are."""

    root: Path
    size: str
    image_size: int

    @property
    def name(self) -> str:
        return f"blip-{self.size}-{self.image_size}"

    @property
    def dir(self) -> Path:
        return self.root / f"{self.size}-{self.image_size}"

    @property
    def hf(self) -> Path:
        return self.dir / "hf"

    @property
    def imported(self) -> Path:
        return self.dir / "imported"

    @property
    def trimmed(self) -> Path:
        return self.dir / "trimmed"

    @property
    def export(self) -> Path:
        return self.dir / "models" / self.name / "1"

    @property
    def answers_file(self) -> Path:
        return self.dir / "answers.json"


# ----------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------


def vocabulary(size: str) -> list[str]:
    """WordPiece entries: BERT's layout of special tokens ([PAD] 0, [unused0-98], [UNK] 100,
    [CLS] 101, [SEP] 102, [MASK] 103), then characters, the word list, '##' pieces and, at base
    size, fillers up to BERT's 30522 entries."""
    letters = list("abcdefghijklmnopqrstuvwxyz")
    if size == "tiny":
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *WORDS[:60], *("##" + c for c in letters)]
        return list(dict.fromkeys(vocab))
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [*"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", *"0123456789", *letters]
    vocab += [*WORDS, *("##" + c for c in letters + list("0123456789"))]
    vocab = list(dict.fromkeys(vocab))
    vocab += [f"[unused{i}]" for i in range(99, 99 + BASE_VOCAB - len(vocab))]
    assert len(vocab) == BASE_VOCAB and vocab[102] == "[SEP]" and vocab[0] == "[PAD]"
    return vocab


def make_tokenizer(size: str):
    """transformers' BertTokenizerFast over `vocabulary(size)`, with BLIP's [DEC] (bos) and [ENC]."""
    import transformers

    vocab = vocabulary(size)
    tok = transformers.BertTokenizerFast(
        vocab={t: i for i, t in enumerate(vocab)}, bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    assert tok.convert_tokens_to_ids("[DEC]") == len(vocab) and len(tok) == len(vocab) + 2
    return tok


def blip_config(size: str, image_size: int, tok=None):
    """BlipConfig() (BLIP-base: ViT-B/16, 12-layer BERT-base text encoder and decoder) at
    image_size, or a tiny config of the same shape for tests."""
    import transformers

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "base":
        cfg = transformers.BlipConfig()
        cfg.vision_config.image_size = image_size
        cfg.vision_config.initializer_range = VISION_INIT_STD
        return cfg
    tok = tok or make_tokenizer("tiny")
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        initializer_range=VISION_INIT_STD,
    )
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def save_checkpoint(fx: Fixture, seed: int = 0) -> dict:
    """A random-weight BlipForQuestionAnswering with its tokenizer and image processor, saved as a
    Hugging Face folder (safetensors). Returns the parameter count and folder size."""
    import torch
    import transformers

    tok = make_tokenizer(fx.size)
    cfg = blip_config(fx.size, fx.image_size, tok)
    if fx.size == "base":
        assert (cfg.text_config.bos_token_id, cfg.text_config.sep_token_id, cfg.text_config.pad_token_id) == (
            tok.convert_tokens_to_ids("[DEC]"),
            tok.sep_token_id,
            tok.pad_token_id,
        ), "BlipConfig's special ids no longer match BERT's layout"
    processor = transformers.BlipProcessor(
        transformers.BlipImageProcessor(size={"height": fx.image_size, "width": fx.image_size}), tok
    )
    torch.manual_seed(seed)
    model = transformers.BlipForQuestionAnswering(cfg).eval()  # transformers' own random init
    fx.hf.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(fx.hf)
    processor.save_pretrained(fx.hf)
    fx.answers_file.write_text(json.dumps(DUMMY_ANSWERS) + "\n")
    return {"parameters": sum(p.numel() for p in model.parameters()), "bytes": folder_bytes(fx.hf)}


# ----------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------


def import_argv(fx: Fixture) -> list[str]:
    """`trimvlm import blip` as the bench runs it (python -m service ...)."""
    return ["import", "blip", str(fx.hf), "--out", str(fx.imported), "--name", fx.name, "--answers", str(fx.answers_file)]


def import_checkpoint(fx: Fixture) -> dict:
    """The same import in this process (tests)."""
    from compression.blip_import import import_blip, read_answers

    report = import_blip(fx.hf, fx.imported, fx.name, read_answers(fx.answers_file))
    return {"architecture": report.architecture, "parts": report.parts, "bytes": folder_bytes(fx.imported)}


# ----------------------------------------------------------------------------------------------
# trimmers
# ----------------------------------------------------------------------------------------------


def timing_image(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like uint8 image [size, size, 3]: smooth colour gradients, a few
    filled shapes and mild noise (compresses like a photo, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([150 + 80 * x, 100 + 90 * y, 120 + 60 * (1 - x * y)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.2)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def timing_input(lm, seed: int = 0) -> dict[str, np.ndarray]:
    """The batch-1 VQA input every trimming measurement uses: pixels, question ids and mask (unpadded)."""
    from service.preprocess import encode_texts, normalize_uint8

    image = timing_image(lm.preprocessing.image.size, seed)
    ids, mask = encode_texts(lm.tokenizer, [TIMING_QUESTION], lm.preprocessing.max_text_length)
    return {
        "image": image,
        "pixel_values": normalize_uint8(image[None], lm.preprocessing.image),
        "input_ids": ids,
        "attention_mask": mask,
    }


def timing_trimmers(model, trim_layer: int = TRIM_LAYER, hidden: int = 32, seed: int = 0):
    """Attach untrained trimmers as `trimvlm trim` does, then set them for timing: every head
    trimmer and every token trimmer keeps everything (output weight 0, bias KEEP_ALL_LOGIT) except
    the vision token trimmer before layer `trim_layer`, whose random keep-logits are shifted and
    scaled to mean 0, std SPREAD_STD on the timing input (set by `spread_logits`)."""
    import torch

    from compression.modeling import HeadTrimmer, Trimmers

    torch.manual_seed(seed)
    model.config.trimming = {"hidden": hidden}
    model.trimmers = Trimmers(model.config)
    with torch.no_grad():
        for m in model.trimmers.modules():
            if isinstance(m, HeadTrimmer):
                m.proj.weight.zero_()
                m.proj.bias.fill_(KEEP_ALL_LOGIT)
        for i, m in enumerate([*model.trimmers.vision_tokens, *model.trimmers.text_tokens, *model.trimmers.fusion_tokens]):
            if not (i == trim_layer and i < len(model.trimmers.vision_tokens)):
                m.out.weight.zero_()
                m.out.bias.fill_(KEEP_ALL_LOGIT)
    model.eval()
    return model.trimmers.vision_tokens[trim_layer]


def _layer_logits(model, trimmer, inputs) -> np.ndarray:
    """The dropping trimmer's keep-logits over the image tokens on `inputs` (every token present:
    the layers before it keep all)."""
    import torch

    from compression.trimmed import Trim, trimmed_vqa_forward

    seen = []
    handle = trimmer.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            trimmed_vqa_forward(model, *_torch_inputs(inputs), Trim(mode="mask", token_threshold=0.0, head_threshold=0.5))
    finally:
        handle.remove()
    return seen[0][0].numpy().astype(np.float64)


def _torch_inputs(inputs):
    import torch

    return (
        torch.from_numpy(inputs["pixel_values"]),
        torch.from_numpy(inputs["input_ids"]),
        torch.from_numpy(inputs["attention_mask"]).bool(),
    )


def spread_logits(model, trimmer, inputs) -> dict:
    """Shift and scale the trimmer's output layer so its keep-logits on `inputs` have mean 0 and
    std SPREAD_STD (thresholds then separate tokens by ~0.01 in logit, robust to INT8 noise)."""
    import torch

    logits = _layer_logits(model, trimmer, inputs)[1:]  # [CLS] is always kept
    mean, std = float(logits.mean()), float(logits.std())
    scale = SPREAD_STD / max(std, 1e-12)
    with torch.no_grad():
        trimmer.out.weight.mul_(scale)
        trimmer.out.bias.sub_(mean).mul_(scale)
    return {"raw_logit_mean": mean, "raw_logit_std": std, "scale": scale}


def threshold_for(patch_logits: np.ndarray, keep: int) -> float:
    """The token threshold (on sigmoid(logit)) that keeps the `keep` highest-scoring patches:
    midway, in logit, between the last kept and the first dropped ([CLS] is kept regardless)."""
    order = np.sort(np.asarray(patch_logits, np.float64))[::-1]
    if keep >= len(order):
        return 0.0
    return float(1 / (1 + np.exp(-(order[keep - 1] + order[keep]) / 2)))


def thresholds_for(model, trimmer, inputs, fractions=KEEP_FRACTIONS) -> list[dict]:
    """For each keep fraction: the token threshold keeping round(f * patches) image patches (plus
    [CLS]) on `inputs`, checked by a mask-mode forward, and the FLOPs ratio of that trace."""
    import torch

    from compression.trimmed import Trim, flops_ratio, trimmed_vqa_forward

    logits = _layer_logits(model, trimmer, inputs)[1:]
    n = len(logits)
    rows = []
    for f in fractions:
        keep = max(1, min(n, round(f * n)))
        threshold = threshold_for(logits, keep)
        trim = Trim(mode="mask", token_threshold=threshold, head_threshold=0.5)
        with torch.no_grad():
            _, trace = trimmed_vqa_forward(model, *_torch_inputs(inputs), trim)
        kept = int(trace.image_kv[0])
        if kept != keep + 1:
            raise RuntimeError(f"threshold {threshold} kept {kept} image tokens, expected {keep + 1}")
        rows.append(
            {
                "keep_fraction": f,
                "token_threshold": threshold,
                "head_threshold": 0.5,
                "image_tokens_kept": kept,
                "image_tokens": n + 1,
                "actual_keep_fraction": round(keep / n, 4),
                "flops_ratio": round(float(flops_ratio(model.config, trace)[0]), 4),
            }
        )
    return rows


def graph_keep_logits(path: Path, inputs: dict, layer: int = TRIM_LAYER) -> np.ndarray:
    """The keep-logits of vision token trimmer `layer` over the image tokens, as an exported
    `vqa_trimmed` graph computes them (INT8 graphs quantise the trimmer too, so their logits, and
    the threshold that keeps a given count, differ a little from torch's): the graph cut at that
    trimmer's output (onnx.utils.Extractor) and run on `inputs`."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    name = f"/vision_tokens.{layer}/Squeeze_output_0"  # TokenTrimmer.forward's .squeeze(-1), as the exporter names it
    if not any(name in n.output for n in model.graph.node):
        raise RuntimeError(f"{path.name}: no tensor {name} (the trimmer's keep-logits); was the graph exported differently?")
    if not any(v.name == name for v in model.graph.value_info):  # shape inference does not always reach it
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sub = Extractor(model).extract_model(["pixel_values", "input_ids", "attention_mask"], [name])
    del model
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name] for i in sess.get_inputs()}
    return np.asarray(sess.run(None, feeds)[0]).reshape(-1)


def attach_trimmers(fx: Fixture, fractions=KEEP_FRACTIONS, trim_layer: int = TRIM_LAYER) -> dict:
    """imported/ -> trimmed/: timing trimmers, timing.json (thresholds, FLOPs ratios), timing_input.npz."""
    from compression.artifacts import load_model_dir, save_model_dir
    from compression.trimmed import Trim, trimmed_flops, trimmed_vqa_forward

    lm = load_model_dir(fx.imported)
    inputs = timing_input(lm)
    trimmer = timing_trimmers(lm.model, trim_layer)
    spread = spread_logits(lm.model, trimmer, inputs)
    rows = thresholds_for(lm.model, trimmer, inputs, fractions)
    import torch

    with torch.no_grad():
        _, full_trace = trimmed_vqa_forward(lm.model, *_torch_inputs(inputs), Trim(enabled=False))
    save_model_dir(fx.trimmed, lm.model, lm.tokenizer, lm.preprocessing)
    np.savez(fx.trimmed / "timing_input.npz", **inputs)
    timing = {
        "question": TIMING_QUESTION,
        "question_tokens": int(inputs["attention_mask"].sum()),
        "trim_layer": trim_layer,
        "full_gflops": round(float(trimmed_flops(lm.model.config, full_trace)[0]) / 1e9, 3),
        "spread": spread,
        "points": rows,
        "how": f"token trimmers of every layer but vision layer {trim_layer}, and every head trimmer, keep all "
        f"(logit {KEEP_ALL_LOGIT:g}); vision layer {trim_layer}'s untrained trimmer, its logits rescaled to mean 0 "
        f"std {SPREAD_STD:g} on the timing input, drops the tokens under the threshold for the rest of the stack; "
        "thresholds chosen midway between neighbouring logits, FLOPs ratio = compression.trimmed.flops_ratio of "
        "the mask-mode trace (trimmers included)",
    }
    (fx.trimmed / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return {"points": rows, "bytes": folder_bytes(fx.trimmed)}


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------


class RssSampler:
    """This process's RSS every `period_s`, its peak per phase (the phase a label set by the caller)."""

    def __init__(self, period_s: float = 0.05):
        import psutil

        self.proc, self.period_s = psutil.Process(), period_s
        self.phase, self.peaks = "start", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def export_fixture(fx: Fixture, precisions: tuple[str, ...] = ("fp32", "int8")) -> dict:
    """compression.export.export_model on trimmed/, with the time and RSS of each phase: tracing
    every graph to fp32 ONNX (`export_graph`), INT8 quantisation (`quantize_dynamic_int8`), and the
    rest (ORT parity runs, reference outputs, checksums). Artifact sizes per precision."""
    import compression.export as export
    import compression.quantize as quantize

    phases: dict[str, float] = {"trace_fp32": 0.0, "quantize_int8": 0.0}
    per_graph: dict[str, dict[str, float]] = {}
    sampler = RssSampler()
    trace, quant = export.export_graph, quantize.quantize_dynamic_int8

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            name = Path(args[1] if len(args) > 1 else kwargs.get("path") or kwargs.get("dst")).name.split(".")[0]
            sampler.phase = phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                phases[phase] += dt
                per_graph.setdefault(name, {})[phase] = round(dt, 3)
                sampler.phase = "other"

        return wrapper

    export.export_graph, quantize.quantize_dynamic_int8 = timed(trace, "trace_fp32"), timed(quant, "quantize_int8")
    t0 = time.perf_counter()
    try:
        with sampler:
            export.export_model(
                fx.trimmed,
                fx.export,
                precisions,
                name=fx.name,
                version="1",
                command=f"benchmarks.scale_fixtures export ({fx.name})",
            )
    finally:
        export.export_graph, quantize.quantize_dynamic_int8 = trace, quant
    total = time.perf_counter() - t0
    return {
        "seconds": round(total, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()} | {"other": round(total - sum(phases.values()), 2)},
        "per_graph_s": per_graph,
        "peak_rss_mib_by_phase": {k: round(v / 2**20, 1) for k, v in sampler.peaks.items()},
        "artifacts": artifact_sizes(fx.export),
    }


def artifact_sizes(folder: Path) -> dict:
    """MiB per precision (graph files named in the manifest), per graph, and of the whole folder."""
    from service.repository import load_manifest

    m = load_manifest(folder)
    by_precision: dict[str, float] = {}
    by_graph: dict[str, dict[str, float]] = {}
    for g, info in m.graphs.items():
        for precision, rel in info.files.items():
            mib = (folder / rel).stat().st_size / 2**20
            by_precision[precision] = by_precision.get(precision, 0.0) + mib
            by_graph.setdefault(g, {})[precision] = round(mib, 2)
    return {
        "mib_by_precision": {k: round(v, 1) for k, v in by_precision.items()},
        "mib_by_graph": by_graph,
        "folder_mib": round(folder_bytes(folder) / 2**20, 1),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# All stages in one process (tests, small configs) and the per-stage command line
# ----------------------------------------------------------------------------------------------


def build(root: Path, size: str, image_size: int, precisions: tuple[str, ...] = ("fp32", "int8")) -> Fixture:
    """Every stage in this process (fine for tiny; the bench runs base-size stages as subprocesses)."""
    fx = Fixture(Path(root), size, image_size)
    save_checkpoint(fx)
    import_checkpoint(fx)
    attach_trimmers(fx)
    export_fixture(fx, precisions)
    return fx


STAGES = {"checkpoint": save_checkpoint, "import": import_checkpoint, "trimmers": attach_trimmers, "export": export_fixture}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One stage of a scale fixture; prints its result as one JSON line.")
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--root", type=Path, default=Path("runs/scale"))
    p.add_argument("--size", choices=SIZES, default="base")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    fx = Fixture(a.root, a.size, a.image_size)
    t0 = time.perf_counter()
    result = STAGES[a.stage](fx)
    result = {"stage": a.stage, "seconds": round(time.perf_counter() - t0, 2), **result}
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
