"""ONNX export of the text decoder (captions, generative answers) as four small graphs with a KV cache.

- `decoder_cross_kv`: image_states [B, N, D] -> `cross_key.{i}`, `cross_value.{i}` [B, H_i, N, d]
  (run once per image; every later graph takes them as inputs).
- `decoder_prefill`: the first step, no past: input_ids [B, T] ([BOS] + prompt), attention_mask
  [B, T], cross K/V -> logits [B, T, V], `present_key.{i}`, `present_value.{i}` [B, H_i, T, d].
- `decoder_step`: input_ids [B, T] (new tokens, T = 1 when decoding), attention_mask [B, P+T],
  `past_key.{i}`/`past_value.{i}` [B, H_i, P, d], cross K/V -> logits [B, T, V] and the presents
  [B, H_i, P+T, d].
- `decoder_nocache`: input_ids [B, T] (the whole prefix), attention_mask [B, T], cross K/V ->
  logits [B, T, V]: the reference path, and the scorer of whole sequences.

The decoder cross-attends to image tokens for captions and, in a model that answers VQA
generatively (BLIP's VQA), to the fused question states. Those are padded in a batch, so such a
model's prefill / step / nocache graphs take `cross_attention_mask` [B, N] (1: attend) after
attention_mask; `decoder_cross_kv` projects either kind of states.

K/V are kept split into heads, [B, heads, tokens, head_dim] (KV_LAYOUT = "heads", recorded in the
manifest as `decoder_kv_layout`): attention reads them as they are, so a step copies nothing of
the cache. Exports before this kept [B, tokens, heads * head_dim] (`tokens`), and every step
transposed all of the cross K/V (577 image tokens x 12 layers at 384 px) back into heads: 16-22%
of a BLIP-base step. Callers need not know the layout: the token axis is -2 in both, batch is axis
0 (reordering beams is one `take` on it), and the prefill graph makes the first cache.

Why a prefill graph: ONNX Runtime runs the step graph with a zero-length past (P = 0), but the
caller would have to make empty past arrays of the right widths, and TensorRT rejects zero-sized
dimensions. Logits cover every new position (not only the last): at T = 1 that costs nothing, and
prefill logits of a prompt are then available for scoring.

Speed (`python -m compression.export_decoder MODEL_DIR --batch B`): the cache pays off with
batching. On the committed student (one 384-wide decoder layer, 1.5 M weights) at batch 1 a
step costs about what reading the weights and ~150 small ORT nodes cost, whatever the prefix
length, so the uncached path is only ~1.5x slower over a 23-token caption; at batch 10 it is ~3x.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compression.export_graphs import GraphModule, export_graph
from compression.modeling import TextDecoder, TrimVLM

STEP_TRACE_TOKENS = 3  # new tokens in the step graph's tracing example (not 1: keep T generic)
KV_LAYOUT = "heads"  # of the graphs exported now; see the module docstring
KV_LAYOUTS = ("tokens", "heads")


def kv_names(prefix: str, n_layers: int) -> list[str]:
    """[`{prefix}_key.0`, `{prefix}_value.0`, `{prefix}_key.1`, ...]: one K/V pair per layer."""
    return [f"{prefix}_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[j], flat[j + 1]) for j in range(0, len(flat), 2)]


class CrossKVGraph(nn.Module):
    def __init__(self, decoder: TextDecoder, heads: bool = True):
        super().__init__()
        self.decoder, self.heads = decoder, heads

    def forward(self, image_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for kv in self.decoder.cross_kv(image_states, self.heads) for t in kv)


def _split_mask(masked: bool, rest: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """(cross_attention_mask or None, the K/V tensors) from a graph's trailing inputs."""
    return (rest[0].bool(), rest[1:]) if masked else (None, rest)


class StepGraph(nn.Module):
    """Prefill (with_past=False) or one cached step: logits and the grown self-attention cache.
    `masked`: a cross_attention_mask input follows attention_mask (padded question states)."""

    def __init__(self, decoder: TextDecoder, with_past: bool, masked: bool = False):
        super().__init__()
        self.decoder, self.with_past, self.masked = decoder, with_past, masked
        self.n_layers = len(decoder.bert.encoder.layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor):
        cross_mask, kv = _split_mask(self.masked, rest)
        n = 2 * self.n_layers
        past = _pairs(kv[:n]) if self.with_past else None
        cross = _pairs(kv[n:] if self.with_past else kv)
        logits, out = self.decoder(
            input_ids, attention_mask, encoder_mask=cross_mask, cross_kv=cross, past_key_values=past, use_cache=True
        )
        return (logits, *(t for pair in out.past_key_values for t in pair))


class NoCacheGraph(nn.Module):
    def __init__(self, decoder: TextDecoder, masked: bool = False):
        super().__init__()
        self.decoder, self.masked = decoder, masked

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        cross_mask, cross = _split_mask(self.masked, rest)
        return self.decoder(input_ids, attention_mask, encoder_mask=cross_mask, cross_kv=_pairs(cross))[0]


def _dynamic_axes(name: str, kv_layout: str = KV_LAYOUT) -> dict[int, str]:
    """Axis names by tensor name: batch everywhere, then the token axis each tensor has (K/V in
    the `heads` layout: axis 2)."""
    kv_tokens = 2 if kv_layout == "heads" and name.split("_")[0] in ("cross", "past", "present") else 1
    if name == "cross_attention_mask":
        kv_tokens = 1
    if name == "image_states" or name.startswith("cross_"):  # cross_key/value.i and cross_attention_mask
        return {0: "batch", kv_tokens: "image_tokens"}
    if name.startswith("past_"):
        return {0: "batch", kv_tokens: "past_tokens"}
    if name in ("input_ids", "logits"):
        return {0: "batch", 1: "new_tokens"}
    return {0: "batch", kv_tokens: "total_tokens"}  # attention_mask, present_*


@torch.no_grad()
def example_inputs(
    model: TrimVLM,
    batch: int = 2,
    new: int = 3,
    past: int = 0,
    image_tokens: int | None = None,
    kv_layout: str = KV_LAYOUT,
) -> dict[str, torch.Tensor]:
    """Example tensors by input name for the decoder graphs: `new` input ids after `past` cached
    tokens (attention_mask covers both; past_* hold `past` tokens, possibly none, in kv_layout)."""
    cfg, dec = model.config, model.text_decoder
    g = torch.Generator().manual_seed(0)
    states = torch.randn(batch, image_tokens or cfg.num_image_tokens, cfg.vision_width, generator=g)
    ids = torch.randint(4, cfg.vocab_size, (batch, new), generator=g)
    ex = {"image_states": states, "input_ids": ids, "attention_mask": torch.ones(batch, past + new, dtype=torch.long)}
    cross_mask = torch.ones(batch, states.shape[1], dtype=torch.long)
    cross_mask[0, states.shape[1] // 2 :] = 0  # a padded row: the trace must keep the mask
    ex["cross_attention_mask"] = cross_mask
    n = len(dec.bert.encoder.layer)
    cross = dec.cross_kv(states, heads=kv_layout == "heads")
    ex |= dict(zip(kv_names("cross", n), (t for kv in cross for t in kv), strict=True))
    prefix = torch.randint(4, cfg.vocab_size, (batch, max(past, 1)), generator=g)
    _, out = dec(prefix, torch.ones_like(prefix), cross_kv=cross, use_cache=True)
    ex |= dict(zip(kv_names("past", n), (t[..., :past, :] for kv in out.past_key_values for t in kv), strict=True))
    return ex


def decoder_graph_modules(model: TrimVLM, kv_layout: str = KV_LAYOUT) -> dict[str, GraphModule]:
    """The four decoder graphs of `model` (see the module docstring for names and shapes), their
    K/V in kv_layout (`heads`; `tokens`: the layout of earlier exports, for comparisons).

    sample(b, t): prefill / nocache trace t tokens; the step graph traces STEP_TRACE_TOKENS new
    tokens after t cached ones."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    dec = model.eval().text_decoder
    n = len(dec.bert.encoder.layer)
    # a decoder that can answer from fused question states (padded, unlike image tokens) takes their mask
    masked = model.config.generative_vqa
    text, cross = ["input_ids", "attention_mask", *(["cross_attention_mask"] if masked else [])], kv_names("cross", n)
    present = ["logits", *kv_names("present", n)]
    specs = {
        "decoder_cross_kv": (CrossKVGraph(dec, heads=kv_layout == "heads"), ["image_states"], cross),
        "decoder_prefill": (StepGraph(dec, with_past=False, masked=masked), text + cross, present),
        "decoder_step": (StepGraph(dec, with_past=True, masked=masked), text + kv_names("past", n) + cross, present),
        "decoder_nocache": (NoCacheGraph(dec, masked=masked), text + cross, ["logits"]),
    }

    def sampler(name: str, inputs: list[str]) -> Callable[[int, int], tuple]:
        def sample(b: int, t: int) -> tuple:
            new, past = (STEP_TRACE_TOKENS, t) if name == "decoder_step" else (t, 0)
            ex = example_inputs(model, b, new, past, kv_layout=kv_layout)
            return tuple(ex[k] for k in inputs)

        return sample

    return {
        name: GraphModule(
            module, inputs, outputs, sampler(name, inputs), {k: _dynamic_axes(k, kv_layout) for k in inputs + outputs}
        )
        for name, (module, inputs, outputs) in specs.items()
    }


def export_decoder(model: TrimVLM, out_dir: str | Path, kv_layout: str = KV_LAYOUT) -> dict[str, Path]:
    """Write and check `{name}.onnx` for every decoder graph in out_dir; returns name -> path."""
    out_dir = Path(out_dir)
    graphs = decoder_graph_modules(model, kv_layout)
    return {name: export_graph(gm, out_dir / f"{name}.onnx") for name, gm in graphs.items()}


# ----------------------------------------------------------------------------------------------
# Speed: cached vs uncached greedy decoding through ONNX Runtime
# ----------------------------------------------------------------------------------------------


def ort_runner(graphs: dict[str, Path], threads: int = 1) -> Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A plain `run(graph, feeds) -> outputs` over ORT CPU sessions (the shape of Runtime.run)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    inputs = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}

    def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in inputs[graph]}  # as Runtime.run: feeds a graph lacks are dropped
        return dict(zip(names[graph], sessions[graph].run(None, feeds), strict=True))

    return run


def measure_caption_speed(
    model_dir_or_graphs: str | Path | dict[str, Path],
    image_states: np.ndarray,
    max_length: int | None = None,
    rounds: int = 3,
    threads: int = 1,
    special_ids: tuple[int, int, int] | None = None,
    batch: int = 1,
) -> dict:
    """p50 latency of greedy captioning per batch of `batch` images with and without the KV cache.

    model_dir_or_graphs: a model folder (its decoder is exported to a temporary folder; max_length
    and the special ids come from it) or the paths `export_decoder` returned (then pass max_length
    and special_ids = (bos, sep, pad)). image_states: [n, N, D] vision encoder outputs. The two
    paths alternate batch by batch so background load hits both alike.
    """
    from service.generation import greedy_decode

    if isinstance(model_dir_or_graphs, dict):
        graphs = model_dir_or_graphs
        if max_length is None or special_ids is None:
            raise ValueError("max_length and special_ids are required with graph paths")
    else:
        from compression.artifacts import load_model_dir

        lm = load_model_dir(model_dir_or_graphs)
        cfg = lm.model.config
        max_length = max_length or lm.preprocessing.max_caption_length
        special_ids = (cfg.bos_token_id, cfg.sep_token_id, cfg.pad_token_id)
        with tempfile.TemporaryDirectory(prefix="trimvlm-decoder-") as tmp:  # sessions hold the graphs
            return measure_caption_speed(
                export_decoder(lm.model, tmp), image_states, max_length, rounds, threads, special_ids, batch
            )
    run = ort_runner(graphs, threads)
    times: dict[bool, list[float]] = {True: [], False: []}
    lengths = []
    for r in range(rounds + 1):  # round 0 warms up (allocations, first-run kernels)
        for i in range(0, len(image_states) - batch + 1, batch):
            states = image_states[i : i + batch]
            for use_cache in (True, False):
                t0 = time.perf_counter()
                out = greedy_decode(run, states, *special_ids, max_length=max_length, use_cache=use_cache)
                if r:
                    times[use_cache].append((time.perf_counter() - t0) * 1e3)
            if r:
                lengths += (out != special_ids[2]).sum(1).tolist()
    cache, nocache = statistics.median(times[True]), statistics.median(times[False])
    return {
        "cache_p50_ms": cache,
        "nocache_p50_ms": nocache,
        "speedup": nocache / cache,
        "images": len(image_states),
        "batch": batch,
        "rounds": rounds,
        "max_length": max_length,
        "mean_generated_tokens": float(np.mean(lengths)),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m compression.export_decoder MODEL_DIR`: cached vs uncached caption speed as JSON."""
    import argparse
    import json

    from compression import data as D
    from compression.artifacts import load_model_dir
    from service.preprocess import normalize_uint8

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model_dir")
    p.add_argument("--images", type=int, default=20, help="scenes test images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="ORT and torch intra-op threads")
    p.add_argument("--max-length", type=int, default=None, help="default: preprocess.json max_caption_length")
    p.add_argument("--batch", type=int, default=1, help="images decoded together")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load_model_dir(a.model_dir)
    split = D.load_scenes_captions(D.ensure_scenes(), "test", lm.preprocessing.image)
    with torch.no_grad():  # image states from torch: this measures the decoder only
        pixels = torch.from_numpy(normalize_uint8(split.images[: a.images], lm.preprocessing.image))
        states = lm.model.encode_image(pixels).last_hidden_state.numpy()
    result = measure_caption_speed(a.model_dir, states, a.max_length, a.rounds, a.threads, batch=a.batch)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
