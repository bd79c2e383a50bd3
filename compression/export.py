"""ONNX export: every graph the service runs, written into a model-repository folder.

Graphs (names are the contract with `service/`, see `graph_modules`):
  vision            pixel_values -> image_states, image_embeds (ITC projection, normalised)
  text              input_ids, attention_mask -> text_states (fusion input), text_embeds (ITC)
  fusion            text_states, attention_mask, image_states -> vqa_logits, itm_logits (+ fused_states
                    when the decoder can answer from them: generative VQA, as BLIP's VQA models)
  vqa_trimmed       batch-1 gather graph, thresholds as inputs (below)
  decoder_*         caption / answer decoder with a KV cache (compression/export_decoder.py)
Each is a `GraphModule` traced by `export_graph` (compression/export_graphs.py, the exporters' base).

The VQA path (untrimmed, or trimmed in mask / batch-1 gather mode):

The trimmed graphs take the keep thresholds as scalar inputs, so one graph serves every compute
level: the service picks a level per request and feeds its thresholds. Gather mode exports
NonZero + Gather on the token axis (data-dependent lengths, real savings at batch 1); heads are
gated rather than skipped (per-request head sets save nothing in a dense kernel).

Outputs: logits [B, answers] and, for trimmed graphs, the image tokens kept per sample (for
metrics). The FLOPs ratio is left out of the graph: its hundred small nodes cost more at batch 1
than they are worth; levels.json carries the calibrated ratio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from compression.export_decoder import KV_LAYOUT, decoder_graph_modules
from compression.export_graphs import OPSET, GraphModule, export_graph
from compression.modeling import TrimVLM
from compression.trimmed import Trim, trimmed_vqa_forward


class VisionGraph(nn.Module):
    def __init__(self, model: TrimVLM):
        super().__init__()
        self.model = model.eval()

    def forward(self, pixel_values):
        states = self.model.encode_image(pixel_values).last_hidden_state
        return states, self.model.image_embeds(states)


class TextGraph(nn.Module):
    """Text encoder states feed fusion; the ITC embedding may come from a fusion text-only pass
    (config.itc_text_through_fusion), exactly as `TrimVLM.encode_text` does."""

    def __init__(self, model: TrimVLM):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids, attention_mask):
        states = self.model.text_encoder(input_ids, attention_mask).last_hidden_state
        itc = states
        if self.model.config.itc_text_through_fusion:
            itc = self.model.fusion_encoder(states, attention_mask).last_hidden_state
        return states, self.model.text_embeds(itc, attention_mask)


class FusionGraph(nn.Module):
    """VQA and ITM logits; with `states`, also the fused question states a generative answer
    decoder cross-attends to (BLIP's VQA)."""

    def __init__(self, model: TrimVLM, states: bool = False):
        super().__init__()
        self.model, self.states = model.eval(), states

    def forward(self, text_states, attention_mask, image_states):
        fused = self.model.fuse(text_states, attention_mask, image_states).last_hidden_state
        out = (self.model.vqa_logits(fused), self.model.itm_logits(fused, attention_mask))
        return (*out, fused) if self.states else out


class VQAGraph(nn.Module):
    """The VQA forward as one exportable module. mode: full | mask | gather."""

    def __init__(self, model: TrimVLM, mode: str = "full"):
        super().__init__()
        if mode not in ("full", "mask", "gather"):
            raise ValueError(f"unknown VQA graph mode {mode!r} (full | mask | gather)")
        if mode != "full" and model.trimmers is None:
            raise ValueError("a trimmed graph needs a model with trimmers (run `trimvlm trim`)")
        self.model, self.mode = model.eval(), mode

    def forward(self, pixels, input_ids, attention_mask, token_threshold=None, head_threshold=None):
        if self.mode == "full":
            return self.model.vqa_forward(pixels, input_ids, attention_mask)[0]
        trim = Trim(mode=self.mode, token_threshold=token_threshold, head_threshold=head_threshold, skip_heads=False)
        logits, trace = trimmed_vqa_forward(self.model, pixels, input_ids, attention_mask, trim)
        return logits, trace.image_kv


def _pixels(cfg, b):
    return torch.randn(b, 3, cfg.image_size, cfg.image_size)


def _text(cfg, b, t):
    ids = torch.full((b, t), 5, dtype=torch.long)
    ids[:, 0] = cfg.cls_token_id
    return ids, torch.ones(b, t, dtype=torch.long)


def graph_modules(model: TrimVLM) -> dict[str, GraphModule]:
    """Every graph the service can run, by name (decoder graphs included)."""
    cfg = model.config
    n_img = (cfg.image_size // cfg.patch_size) ** 2 + 1
    batch, text = {0: "batch"}, {0: "batch", 1: "text"}
    graphs = {
        "vision": GraphModule(
            VisionGraph(model),
            ["pixel_values"],
            ["image_states", "image_embeds"],
            lambda b, t: (_pixels(cfg, b),),
            {"pixel_values": batch, "image_states": batch, "image_embeds": batch},
        ),
        "text": GraphModule(
            TextGraph(model),
            ["input_ids", "attention_mask"],
            ["text_states", "text_embeds"],
            lambda b, t: _text(cfg, b, t),
            {"input_ids": text, "attention_mask": text, "text_states": text, "text_embeds": batch},
        ),
        "fusion": GraphModule(
            FusionGraph(model, states=cfg.generative_vqa),
            ["text_states", "attention_mask", "image_states"],
            ["vqa_logits", "itm_logits", *(["fused_states"] if cfg.generative_vqa else [])],
            lambda b, t: (torch.randn(b, t, cfg.text_width), _text(cfg, b, t)[1], torch.randn(b, n_img, cfg.vision_width)),
            {
                "text_states": text,
                "attention_mask": text,
                "image_states": batch,
                "vqa_logits": batch,
                "itm_logits": batch,
                **({"fused_states": text} if cfg.generative_vqa else {}),
            },
        ),
    }
    if model.trimmers is not None:
        graphs["vqa_trimmed"] = vqa_graph_module(model, "gather")
    graphs.update(decoder_graph_modules(model))
    return graphs


def vqa_graph_module(model: TrimVLM, mode: str = "gather", logits: str = "vqa_logits") -> GraphModule:
    """The end-to-end VQA graph (full | mask | gather); trimmed modes take the thresholds as
    inputs and also return the image tokens kept. Gather is baked for batch 1."""
    cfg = model.config
    graph = VQAGraph(model, mode)
    b = 1 if mode == "gather" else None
    names = ["pixel_values", "input_ids", "attention_mask"]
    outputs = [logits]
    axes = {"input_ids": {1: "text"}, "attention_mask": {1: "text"}}
    if mode != "gather":
        axes = {k: {0: "batch", **v} for k, v in axes.items()} | {"pixel_values": {0: "batch"}, logits: {0: "batch"}}
    if mode != "full":
        names += ["token_threshold", "head_threshold"]
        outputs += ["image_tokens_kept"]

    def sample(batch: int, t: int) -> tuple:
        n = b or batch
        extra = (torch.tensor(0.5), torch.tensor(0.5)) if mode != "full" else ()
        return (_pixels(cfg, n), *_text(cfg, n, t), *extra)

    return GraphModule(graph, names, outputs, sample, axes, batch_one=mode == "gather")


def export_vqa(model: TrimVLM, path: str | Path, mode: str = "full") -> Path:
    """Write the VQA graph to `path` (batch and question length dynamic; gather: batch 1)."""
    return export_graph(vqa_graph_module(model, mode, logits="logits"), path)


# ----------------------------------------------------------------------------------------------
# A whole model folder -> a model-repository version folder with manifest.json
# ----------------------------------------------------------------------------------------------


def vqa_kind(cfg) -> str | None:
    """How the exported model answers: from its closed answer list (a classifier), by generating
    with its decoder from the fused question states (BLIP's VQA models), or not at all."""
    if cfg.answers:
        return "classifier"
    return "generative" if cfg.generative_vqa else None


def _spec(name: str, array: np.ndarray, axes: dict[int, str]):
    from service.repository import TensorInfo

    return TensorInfo(name=name, dtype=str(array.dtype), shape=[axes.get(i, d) for i, d in enumerate(array.shape)])


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy()


def export_model(
    model_dir: str | Path,
    out: str | Path,
    precisions: tuple[str, ...] = ("fp32", "int8"),
    name: str | None = None,
    version: str = "1",
    command: str = "",
    keep_fp32: bool = True,
    description: str | None = None,
    known_words: list[str] | None = None,
) -> Path:
    """Export every graph of a model folder to `out` (a `<name>/<version>` folder): fp32 ONNX,
    then the requested variants (int8: ONNX Runtime dynamic quantisation; fp16: for GPUs), the
    tokenizer, reference inputs/outputs and manifest.json. fp32 parity against torch is measured
    for every graph and recorded; keep_fp32=False drops the fp32 files after the variants are
    made (a small committed artifact). `description` (what the model knows) and `known_words`
    (the words of its training texts, see `compression.training.training_words`) go into the manifest as they are."""
    import datetime
    import shutil

    import onnxruntime as ort

    from compression.artifacts import load_model_dir
    from compression.quantize import quantize_dynamic_int8, to_fp16
    from service.levels import load_levels
    from service.repository import GraphInfo, Manifest, Tokens, reference_key, write_manifest

    unknown = set(precisions) - {"fp32", "int8", "fp16"}
    if unknown:
        raise ValueError(f"unknown precision(s) {sorted(unknown)} (fp32 | int8 | fp16)")
    lm = load_model_dir(model_dir)
    model, cfg = lm.model, lm.model.config
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    graphs = graph_modules(model)
    torch.manual_seed(0)
    reference: dict[str, np.ndarray] = {}
    infos: dict[str, GraphInfo] = {}
    for gname, graph in graphs.items():
        fp32 = export_graph(graph, out / f"{gname}.onnx")
        sample = graph.sample(1 if graph.batch_one else 2, 8)
        feeds = {n: _numpy(x) for n, x in zip(graph.inputs, sample, strict=True)}
        for n, x in feeds.items():
            reference[reference_key(gname, "", n, "in")] = x
        with torch.no_grad():
            expected = graph.module(*sample)
        expected = expected if isinstance(expected, tuple) else (expected,)
        files = {"fp32": fp32.name}
        if "int8" in precisions:
            files["int8"] = quantize_dynamic_int8(fp32, out / f"{gname}.int8.onnx").name
        if "fp16" in precisions:
            files["fp16"] = to_fp16(fp32, out / f"{gname}.fp16.onnx").name
        parity = {}
        outputs = None
        for precision, rel in files.items():
            if precision == "fp16":
                continue  # CPU ONNX Runtime lacks many fp16 kernels; checked on GPUs (models verify)
            sess = ort.InferenceSession(str(out / rel), providers=["CPUExecutionProvider"])
            got = sess.run(graph.outputs, feeds)
            parity[precision] = max(float(np.max(np.abs(g - _numpy(e)), initial=0.0)) for g, e in zip(got, expected, strict=True))
            for n, g in zip(graph.outputs, got, strict=True):
                reference[reference_key(gname, precision, n, "out")] = g
            outputs = got
        axes = graph.dynamic_axes
        infos[gname] = GraphInfo(
            inputs=[_spec(n, x, axes.get(n, {})) for n, x in feeds.items()],
            outputs=[_spec(n, g, axes.get(n, {})) for n, g in zip(graph.outputs, outputs, strict=True)],
            files=files,
            batch_one=graph.batch_one,
            parity=parity,
        )
        if parity.get("fp32", 0.0) > 1e-4:
            raise RuntimeError(f"graph {gname}: ONNX Runtime differs from torch by {parity['fp32']:.3g} (> 1e-4)")
    if not keep_fp32 and precisions != ("fp32",):
        for gname, info in infos.items():
            (out / info.files.pop("fp32")).unlink()
            for key in [k for k in reference if k.startswith(f"out/{gname}/fp32/")]:
                del reference[key]
    np.savez_compressed(out / "reference.npz", **reference)
    # reference_key(..., "in") ignores precision; verify feeds the same inputs to every variant
    shutil.copy(Path(model_dir) / "tokenizer.json", out / "tokenizer.json")
    for extra in ("MODEL_CARD.md", "eval.json"):
        if (Path(model_dir) / extra).is_file():
            shutil.copy(Path(model_dir) / extra, out / f"source_{extra}")
    manifest = Manifest(
        name=name or cfg.name,
        version=version,
        tasks=["vqa", "caption", "retrieval"],
        graphs=infos,
        preprocessing=lm.preprocessing,
        tokens=Tokens(pad=cfg.pad_token_id, cls=cfg.cls_token_id, sep=cfg.sep_token_id, bos=cfg.bos_token_id),
        answers=list(cfg.answers),
        vqa=vqa_kind(cfg),
        decoder_kv_layout=KV_LAYOUT,
        # what `serve` loads when no precision is asked for: only precisions this export wrote
        default_precision={
            "cpu": "int8" if "int8" in precisions else "fp32",
            "cuda": "fp16" if "fp16" in precisions else "fp32",
        },
        itc_temperature=float(model.temp.detach().clamp(0.001, 0.5)),
        rerank_itc_weight=lm.rerank_itc_weight,
        levels=load_levels(model_dir) if model.trimmers is not None else None,
        description=description,
        known_words=sorted(set(known_words)) if known_words is not None else None,
        produced_by={
            "command": command or f"trimvlm export {model_dir} --out {out}",
            "source_model": str(model_dir),
            "source_config": cfg.name,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "opset": OPSET,
            "git_commit": _git_commit(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )
    write_manifest(out, manifest)
    return out


def _git_commit() -> str | None:
    import subprocess

    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return None
    return res.stdout.strip() or None
