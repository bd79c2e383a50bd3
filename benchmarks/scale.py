"""`trimvlm bench scale`: what trimming, the KV cache, INT8 and batching buy at BLIP-base size.

Random-weight BLIP-base checkpoints (benchmarks/scale_fixtures.py: transformers' BlipConfig()
defaults, BlipForQuestionAnswering) at each image size go through the normal `trimvlm import blip`
and export code, each stage in its own process (wall time, peak RSS from wait4). Then, per image
size, every figure is a ratio of measurements taken side by side in one run, calls interleaved
(A B C A B C ..., order rotated per round) so background load lands on all of them alike:

- trimming: the batch-1 `vqa_trimmed` gather graph at image-token keep fractions vs the untrimmed
  path the service's `full` level runs (vision + text + fusion graphs), with the FLOPs ratio of the
  same keep (compression.trimmed.flops_ratio, the formula compute levels use);
- graphs: every exported graph in fp32 and INT8 at batch 1 and 8 (vision, text and fusion also at
  32): INT8 speed-ups, and the runtime's per-item time by batch size;
- KV cache: service.generation.greedy_decode with the whole cache, with the cross K/V cached only, and
  with no cache (benchmarks/kv_modes.py) over the exported decoder
  graphs, lengths forced by a runner that masks [SEP] (random weights stop anywhere), batch 1 and 8;
  INT8's top-1 agreement with fp32 on the generated tokens;
- service (one size and precision): /vqa throughput at 16 closed-loop clients with dynamic batching
  vs without (the share of the runtime's own per-item gain it keeps), and the serving overhead at one
  client against the bare runtime on the same request; server start-to-ready time and peak RSS.

A target not met gets a profile (ONNX Runtime's per-op profile, a per-step decode curve, the
server's own latency split) in the report. Writes report.json, REPORT.md and scale.png.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.scale_fixtures import STAGES, TIMING_QUESTION, Fixture, import_argv
from service.generation import kv_shape
from service.machine import machine_info

TARGETS = {
    "trim_latency_speedup": 2.0,  # untrimmed / trimmed batch-1 latency at ~2.5x fewer FLOPs, 384 px
    "kv_cache_speedup": 3.0,  # no cache / cache, 40 new tokens, batch 1
    "batching_gain_kept": 0.9,  # service's throughput gain / runtime's per-item gain
    "serving_overhead_share": 0.05,  # (HTTP p50 - bare p50) / HTTP p50, 384 px, 1 client
}
FLOPS_REDUCTION_TARGET = 2.5  # "the keep fraction that gives about 2.5x fewer FLOPs"
STEP_PAST = 20  # cached tokens in the decoder_step timing (midway through a 40-token caption)
NOCACHE_TOKENS = 20
WARMUP_REQUESTS = 2  # sequential requests before each throughput round (the servers warm up before ready)
REQUEST_TIMEOUT_S = 600.0  # a 384 px batch of 16 takes ~30 s on 2 cores: the load generator's 60 s is too tight


PARTS = ("trimming", "graphs", "kv")


@dataclass
class Options:
    root: Path = Path("runs/scale")
    out: Path = Path("reports/scale")
    size: str = "base"  # base | tiny
    image_sizes: tuple[int, ...] = (224, 384)
    precisions: tuple[str, ...] = ("fp32", "int8")
    repeats: int = 3
    graph_batches: tuple[int, ...] = (1, 8)  # every graph, INT8 vs fp32
    batching_batches: tuple[int, ...] = (1, 8, 16, 32)  # vision, text, fusion: per-item time (16: the service's max)
    decode_lengths: tuple[int, ...] = (20, 40)
    decode_batches: tuple[int, ...] = (1, 8)
    service: bool = True
    service_size: int | None = None  # default: the largest image size
    service_precision: str = "int8"
    clients: int = 16
    service_requests: int = 32  # per round and server
    service_rounds: int = 2
    overhead_requests: int = 12  # per round
    rebuild: bool = False
    fixtures_only: bool = False  # build (or check) the fixtures, record their stages, measure nothing
    resume: bool = False  # keep the image sizes (and service part) an interrupted run of OUT/report.json finished
    profile: str = "unmet"  # unmet | always | never
    parts: tuple[str, ...] = PARTS  # which measurements per size (the service needs `graphs`)


def log(msg: str, t0: list[float] = [time.perf_counter()]) -> None:  # noqa: B006 (the start time, on purpose)
    print(f"[scale {time.perf_counter() - t0[0]:7.1f}s] {msg}", flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------------------------
# Fixtures: each stage in its own process
# ----------------------------------------------------------------------------------------------


def run_stage(argv: list[str]) -> dict:
    """Run one stage command; its wall time, peak RSS (wait4's ru_maxrss of that child) and the
    JSON it printed on its `RESULT` line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"stage failed ({proc.returncode}): {shlex.join(argv)}\n{out[-3000:]}")
    result = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    return {
        **result,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "command": shlex.join(argv),
    }


def _stage_done(fx: Fixture, stage: str) -> bool:
    marker = {
        "checkpoint": fx.hf / "config.json",
        "import": fx.imported / "model.safetensors",
        "trimmers": fx.trimmed / "timing.json",
        "export": fx.export / "manifest.json",
    }[stage]
    return marker.is_file()


def build_fixture(fx: Fixture, rebuild: bool = False) -> dict:
    """Every stage of one fixture, each in a subprocess; stages whose outputs exist are reused
    (their earlier measurements from stages.json, marked reused) unless `rebuild`."""
    record_path = fx.dir / "stages.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() and not rebuild else {}
    fx.dir.mkdir(parents=True, exist_ok=True)
    stages = {}
    stale = rebuild
    for stage in STAGES:
        if not stale and _stage_done(fx, stage):
            stages[stage] = {**record.get(stage, {"measured": False}), "reused": True}
            continue
        stale = True  # every later stage depends on this one
        if stage == "import":
            argv = [sys.executable, "-m", "service", *import_argv(fx)]  # the real `trimvlm import blip`
        else:
            argv = [sys.executable, "-m", "benchmarks.scale_fixtures", stage, "--root", str(fx.root), "--size", fx.size]
            argv += ["--image-size", str(fx.image_size)]
        log(f"{fx.name}: stage {stage} ...")
        stages[stage] = run_stage(argv) | {"reused": False, "load_before": load()}
        log(f"{fx.name}: stage {stage} took {stages[stage]['wall_s']} s, peak RSS {stages[stage]['peak_rss_mib']} MiB")
        record[stage] = stages[stage]
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return stages


# ----------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, heavy_s: float = 10.0, heavy_repeats: int = 2
) -> dict[str, list[float]]:
    """Milliseconds per timed call of every runner: one warm-up call each, then `repeats` rounds
    with the runner order rotated each round. A heavy runner (warm-up call over `heavy_s`) counts
    its first call and gets `heavy_repeats` calls in all: allocation and jitter are negligible in a
    call that long, and such calls are most of the run's wall time. A runner's timed calls are its
    last len(times[name]) calls."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    want = {}
    for name in names:
        t0 = time.perf_counter()
        calls[name]()
        first = time.perf_counter() - t0
        if first > heavy_s:
            times[name].append(first * 1000)
            want[name] = max(1, heavy_repeats)
        else:
            want[name] = repeats
    for r in range(max(want.values(), default=0)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if len(times[name]) < want[name]:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - t0) * 1000)
    return times


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _rel_spread(values: list[float]) -> float | None:
    """(max - min) / median: how much the repeats of one runner moved."""
    if len(values) < 2:
        return None
    return round((max(values) - min(values)) / statistics.median(values), 3)


def ort_profile(path: Path, feeds: dict[str, np.ndarray], runs: int = 2, top: int = 8) -> dict:
    """ONNX Runtime's own profile of `runs` calls (after one warm-up): time by op type and the
    slowest nodes, as shares of the summed node time."""
    import onnxruntime as ort

    from service.settings import Settings

    so = ort.SessionOptions()
    so.intra_op_num_threads = Settings().intra_op_threads
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="trimvlm-profile-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "p")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t0) / runs * 1000
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    nodes = nodes[len(nodes) // (runs + 1) :]  # drop the warm-up run's nodes
    by_type: dict[str, float] = {}
    by_node: dict[str, float] = {}
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] = by_type.get(op, 0.0) + e["dur"]
        node = e["name"].removesuffix("_kernel_time")
        by_node[node] = by_node.get(node, 0.0) + e["dur"]
    total = sum(by_type.values()) or 1.0
    return {
        "graph": path.name,
        "wall_ms_per_call": round(wall, 2),
        "node_ms_per_call": round(total / runs / 1000, 2),
        "by_op_type": {k: round(v / total, 3) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])[:top]},
        "slowest_nodes": {k: round(v / total, 3) for k, v in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]},
    }


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def images(size: int, n: int) -> np.ndarray:
    from benchmarks.scale_fixtures import timing_image

    return np.stack([timing_image(size, seed) for seed in range(n)])


class Graphs:
    """Some of an exported model's graphs at one precision in ONNX Runtime, with the service's
    runtime settings. Each part of the bench loads only the graphs it times and closes them after:
    every graph of both precisions at once holds 13+ GB at 384 px (weights plus one ORT arena per
    session), more than a shared 24 GB machine spares."""

    def __init__(self, folder: Path, precision: str, names, options):
        from service.repository import load_manifest
        from service.runtime import load_runtime

        self.folder, self.precision = Path(folder), precision
        self.manifest = load_manifest(self.folder)
        files = {g: self.folder / self.manifest.graph_file(g, precision) for g in names}
        self.runtime = load_runtime("onnxruntime", files, options, fallback=False, model_dir=self.folder)
        self.run = self.runtime.run

    def pixels(self, images_u8: np.ndarray) -> np.ndarray:
        from service.preprocess import normalize_uint8

        return normalize_uint8(images_u8, self.manifest.preprocessing.image)

    def untrimmed_vqa(self, px: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """What TaskModel.vqa(level="full") runs: vision, text and fusion graphs."""
        image_states = self.run("vision", {"pixel_values": px})["image_states"]
        text_states = self.run("text", {"input_ids": ids, "attention_mask": mask})["text_states"]
        return self.run("fusion", {"text_states": text_states, "attention_mask": mask, "image_states": image_states})[
            "vqa_logits"
        ]

    def close(self) -> None:
        self.runtime.close()


def open_graphs(folder: Path, precisions, names, options) -> dict[str, Graphs]:
    return {p: Graphs(folder, p, names, options) for p in precisions}


def close_all(graphs: dict[str, Graphs]) -> None:
    for g in graphs.values():
        g.close()
    gc.collect()


DECODER = ("decoder_cross_kv", "decoder_prefill", "decoder_step", "decoder_nocache")


def graph_inputs(folder: Path, batches, inputs: dict, decoder_batches, options) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """Inputs for every graph at each batch size, the same arrays for every precision: image and
    text states from the fp32 vision and text graphs on up to 8 images, tiled to larger batches
    (values do not change the time), cross K/V from fp32 decoder_cross_kv, random past K/V.
    Decoder graphs only at `decoder_batches`; vqa_trimmed is timed in the trimming part."""
    g = Graphs(folder, "fp32", ["vision", "text", "decoder_cross_kv"], options)
    m = g.manifest
    n0 = min(8, max(batches))
    px0 = g.pixels(images(m.preprocessing.image.size, n0))
    img0 = g.run("vision", {"pixel_values": px0})["image_states"]
    ids0, mask0 = np.repeat(inputs["input_ids"], n0, 0), np.repeat(inputs["attention_mask"], n0, 0)
    txt0 = g.run("text", {"input_ids": ids0, "attention_mask": mask0})["text_states"]

    def tile(x: np.ndarray, b: int) -> np.ndarray:
        return np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))

    bos = m.tokens.bos
    token = 1000 % bos  # any ordinary token id
    rng = np.random.default_rng(0)
    out = {}
    for b in batches:
        px, img, ids, mask, txt = tile(px0, b), tile(img0, b), tile(ids0, b), tile(mask0, b), tile(txt0, b)
        feeds = {
            "vision": {"pixel_values": px},
            "text": {"input_ids": ids, "attention_mask": mask},
            "fusion": {"text_states": txt, "attention_mask": mask, "image_states": img},
        }
        if b in decoder_batches:
            cross = g.run("decoder_cross_kv", {"image_states": img})
            n_layers = len(cross) // 2
            # decoders that can answer VQA take the cross-attention mask (graphs without it drop the feed)
            cross["cross_attention_mask"] = np.ones(img.shape[:2], np.int64)
            shape = kv_shape(cross["cross_key.0"], b, STEP_PAST)
            past = {
                f"past_{k}.{i}": rng.normal(0, 1, shape).astype(np.float32) for i in range(n_layers) for k in ("key", "value")
            }
            feeds["decoder_cross_kv"] = {"image_states": img}
            feeds["decoder_prefill"] = {
                "input_ids": np.full((b, 1), bos, np.int64),
                "attention_mask": np.ones((b, 1), np.int64),
                **cross,
            }
            feeds["decoder_step"] = {
                "input_ids": np.full((b, 1), token, np.int64),
                "attention_mask": np.ones((b, STEP_PAST + 1), np.int64),
                **past,
                **cross,
            }
            feeds["decoder_nocache"] = {
                "input_ids": np.full((b, NOCACHE_TOKENS), token, np.int64),
                "attention_mask": np.ones((b, NOCACHE_TOKENS), np.int64),
                **cross,
            }
        out[b] = feeds
    g.close()
    return out


def _trimmed_feeds(inputs: dict, point: dict) -> dict[str, np.ndarray]:
    return {
        "pixel_values": inputs["pixel_values"],
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "token_threshold": np.array(point["token_threshold"], np.float32),
        "head_threshold": np.array(point.get("head_threshold", 0.5), np.float32),
    }


# ----------------------------------------------------------------------------------------------
# Sections (one image size)
# ----------------------------------------------------------------------------------------------


def calibrated_points(folder: Path, precision: str, timing: dict, inputs: dict) -> list[dict]:
    """timing.json's keep fractions with thresholds recomputed from this precision's own graph (the
    same kept counts as torch's, up to ties): INT8 quantises the trimmer, which moves its logits."""
    from benchmarks.scale_fixtures import graph_keep_logits, threshold_for
    from service.repository import load_manifest

    path = folder / load_manifest(folder).graph_file("vqa_trimmed", precision)
    logits = graph_keep_logits(path, inputs, timing["trim_layer"])
    gc.collect()
    return [pt | {"token_threshold": threshold_for(logits[1:], pt["image_tokens_kept"] - 1)} for pt in timing["points"]]


def trimming_section(folder: Path, points: dict[str, list[dict]], inputs: dict, repeats: int, options) -> dict:
    """Batch-1 latency of the trimmed graph at each keep fraction vs the untrimmed `full` path.
    points: per precision, timing.json's points with that precision's calibrated thresholds."""
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    graphs = open_graphs(folder, points, ["vision", "text", "fusion", "vqa_trimmed"], options)
    calls, kept = {}, {}
    for p, g in graphs.items():
        calls[f"{p}/untrimmed"] = lambda g=g: g.untrimmed_vqa(px, ids, mask)
        for pt in points[p]:
            feeds = _trimmed_feeds(inputs, pt)
            name = f"{p}/keep {pt['keep_fraction']}"
            calls[name] = lambda g=g, feeds=feeds: g.run("vqa_trimmed", feeds)
            kept[name] = int(np.asarray(g.run("vqa_trimmed", feeds)["image_tokens_kept"]).reshape(-1)[0])
    times = interleaved(calls, repeats)
    close_all(graphs)
    rows = {}
    for p in points:
        base = p50(times[f"{p}/untrimmed"])
        keep1 = p50(times[f"{p}/keep 1.0"]) if f"{p}/keep 1.0" in times else None
        pts = []
        for pt in points[p]:
            name = f"{p}/keep {pt['keep_fraction']}"
            ms = p50(times[name])
            pts.append(
                {
                    "keep_fraction": pt["keep_fraction"],
                    "token_threshold": round(pt["token_threshold"], 6),
                    "image_tokens_kept": kept[name],
                    "image_tokens_kept_torch": pt["image_tokens_kept"],
                    "flops_ratio": pt["flops_ratio"],
                    "flops_reduction": round(1 / pt["flops_ratio"], 3),
                    "p50_ms": ms,
                    "spread": _rel_spread(times[name]),
                    "latency_speedup": round(base / ms, 3),
                    "latency_speedup_vs_keep1": round(keep1 / ms, 3) if keep1 else None,
                }
            )
        rows[p] = {"untrimmed_p50_ms": base, "untrimmed_spread": _rel_spread(times[f"{p}/untrimmed"]), "points": pts}
    return {
        "precisions": rows,
        "repeats": repeats,
        "how": "batch 1, one timing input (timing_input.npz), calls interleaved across precisions and keep fractions; "
        "untrimmed = the vision, text and fusion graphs TaskModel.vqa(level='full') runs (the service's `full`); each "
        "precision's thresholds from its own graph's trimmer logits (the graph cut at the trimmer), so it keeps the "
        "counts torch kept; FLOPs ratio = torch's trace at that count",
    }


def graphs_section(folder: Path, precisions, feeds: dict[int, dict], repeats: int, batching_batches, options) -> dict:
    """Each graph in every precision at each batch size: one graph at a time (its fp32 and INT8
    sessions loaded together), its batch sizes and precisions interleaved."""
    names = list(dict.fromkeys(g for by_graph in feeds.values() for g in by_graph))
    times: dict[str, list[float]] = {}
    for gname in names:
        graphs = open_graphs(folder, precisions, [gname], options)
        calls = {
            f"{gname}/b{b}/{p}": (lambda g=g, f=by_graph[gname], n=gname: g.run(n, f))
            for b, by_graph in feeds.items()
            if gname in by_graph
            for p, g in graphs.items()
        }
        log(f"  {gname}: {len(calls)} runners")
        times |= interleaved(calls, repeats)
        close_all(graphs)
    rows: dict[str, dict] = {}
    for name, ts in times.items():
        g, b, p = name.split("/")
        rows.setdefault(g, {}).setdefault(b, {})[p] = {
            "p50_ms": p50(ts),
            "per_item_ms": round(p50(ts) / int(b[1:]), 3),
            "spread": _rel_spread(ts),
        }
    for by_b in rows.values():
        for by_p in by_b.values():
            if "fp32" in by_p and "int8" in by_p:
                by_p["int8_speedup"] = round(by_p["fp32"]["p50_ms"] / by_p["int8"]["p50_ms"], 3)
    batching = {}
    for p in precisions:
        per = {}
        for g in ("vision", "text", "fusion"):
            per[g] = {b: rows[g][f"b{b}"][p]["per_item_ms"] for b in batching_batches if f"b{b}" in rows.get(g, {})}
        per["vqa_path"] = {b: round(sum(per[g][b] for g in ("vision", "text", "fusion")), 3) for b in per["vision"]}
        gains = {g: {b: round(v[1] / v[b], 3) for b in v} for g, v in per.items() if 1 in v}
        batching[p] = {"per_item_ms": per, "gain_vs_batch1": gains}
    return {
        "graphs": rows,
        "batching": batching,
        "repeats": repeats,
        "how": f"runtime.run per graph on fixed feeds (made from fp32 outputs; decoder_step with {STEP_PAST} cached "
        f"tokens and one new, decoder_nocache with {NOCACHE_TOKENS} tokens); one graph at a time, its batch sizes and "
        "precisions interleaved (vqa_trimmed: batch 1 at keep 1.0, from the trimming part). vqa_path = vision + text + "
        "fusion per item (what TaskModel.vqa(full) runs), summed from their own parts",
    }


def sep_masked(run, sep_id: int, stamps: list[float] | None = None):
    """A runner whose logits can never pick [SEP]: random weights stop captions anywhere, this
    forces every caption to max_length (the mask is one write into the last position's row).
    `stamps` gets the time after every call that returns logits (one per generated token)."""

    def masked(graph: str, feeds: dict) -> dict:
        out = run(graph, feeds)
        if "logits" in out:
            logits = np.asarray(out["logits"])
            if not logits.flags.writeable:
                logits = logits.copy()
            logits[:, -1, sep_id] = -np.inf
            out["logits"] = logits
            if stamps is not None:
                stamps.append(time.perf_counter())
        return out

    return masked


KV_MODES = {  # mode -> what is cached; greedy_decode's use_cache
    "cache": True,  # cross K/V once per image, self-attention K/V grown per token (the service's path)
    "cross_only": False,  # cross K/V once per image, the whole prefix run again at every step
    "none": False,  # nothing cached: the cross K/V projected again at every step too (transformers, use_cache=False)
}


def kv_section(folder: Path, precisions, lengths, batches, repeats: int, options) -> dict:
    """Greedy captions with the whole KV cache, with the cross K/V cached only, and with no cache, at
    each batch, both precisions (benchmarks/kv_modes.py). One run per call decodes max(lengths)
    tokens; the time to the L-th token is read from per-token timestamps, so shorter lengths come
    from the same calls (greedy decoding is the same up to there)."""
    from benchmarks.kv_modes import recomputing_cross, weight_stream_ms
    from service.generation import greedy_decode

    graphs = open_graphs(folder, precisions, ["vision", *DECODER], options)
    n, longest = max(batches), max(lengths)
    states, runners, stamps, tok = {}, {}, {}, None
    for p, g in graphs.items():
        tok = g.manifest.tokens
        px = g.pixels(images(g.manifest.preprocessing.image.size, n))
        states[p] = g.run("vision", {"pixel_values": px})["image_states"]
        stamps[p] = []
        runners[p] = {
            mode: sep_masked(recomputing_cross(g.run, states[p]) if mode == "none" else g.run, tok.sep, stamps[p])
            for mode in KV_MODES
        }
    outputs: dict[str, np.ndarray] = {}
    samples: dict[str, list[dict[int, float]]] = {}

    def call(p, b, mode):
        key = f"{p}/b{b}/{mode}"

        def go():
            stamps[p].clear()
            t0 = time.perf_counter()
            outputs[key] = greedy_decode(
                runners[p][mode], states[p][:b], tok.bos, tok.sep, tok.pad, max_length=longest, use_cache=KV_MODES[mode]
            )
            samples.setdefault(key, []).append({length: (stamps[p][length - 1] - t0) * 1000 for length in lengths})

        return key, go

    calls = dict(call(p, b, mode) for b in batches for p in graphs for mode in KV_MODES)
    times = interleaved(calls, repeats)
    rows: dict = {}
    for p in graphs:
        for b in batches:
            timed = {m: samples[f"{p}/b{b}/{m}"][-len(times[f"{p}/b{b}/{m}"]) :] for m in KV_MODES}
            got = outputs[f"{p}/b{b}/cache"]
            for length in lengths:
                ms = {m: p50([s[length] for s in timed[m]]) for m in KV_MODES}
                rows.setdefault(p, {})[f"L{length}/b{b}"] = {
                    "new_tokens": length,
                    "batch": b,
                    "generated_tokens": int(got.shape[1]),
                    "cache_p50_ms": ms["cache"],
                    "cross_only_p50_ms": ms["cross_only"],
                    "no_cache_p50_ms": ms["none"],
                    "speedup": round(ms["none"] / ms["cache"], 3),
                    "speedup_vs_cross_only": round(ms["cross_only"] / ms["cache"], 3),
                    "cache_ms_per_token": round(ms["cache"] / length, 2),
                    "timed_calls": len(timed["cache"]),
                    "same_tokens_every_mode": all(np.array_equal(got, outputs[f"{p}/b{b}/{m}"]) for m in KV_MODES),
                }
    step_bytes = {p: (folder / g.manifest.graph_file("decoder_step", p)).stat().st_size for p, g in graphs.items()}
    layout = next(iter(graphs.values())).manifest.decoder_kv_layout
    agreement = int8_agreement(graphs, states, runners, tok, longest, n) if {"fp32", "int8"} <= set(graphs) else None
    close_all(graphs)
    stream = weight_stream_ms(step_bytes, options)
    out = {
        "precisions": rows,
        "repeats": repeats,
        "kv_layout": layout,
        "step_floor": {p: {"decoder_step_mib": round(step_bytes[p] / 2**20, 1), "weight_stream_ms": stream[p]} for p in graphs},
        "how": "service.generation.greedy_decode, image states from the same precision's vision graph: cache = "
        "decoder_cross_kv once, then decoder_prefill/decoder_step (the service's path); cross K/V only = decoder_cross_kv "
        "once, then decoder_nocache over the whole prefix per token; no cache = decoder_nocache per token with the cross "
        "K/V projected again per token (transformers' BLIP decoder with use_cache=False). [SEP] masked to -inf in the "
        f"last position's logits by the runner so every caption runs to {longest} tokens; the time to token L (from the "
        "call's start: cross K/V included) read from per-token timestamps of the same call; all modes interleaved. "
        "Step floor: ONNX Runtime's batch-1 MatMul over fp32 weights of decoder_step's file size",
    }
    if agreement:
        out["int8_agreement"] = agreement
    return out


def int8_agreement(graphs: dict, states: dict, runners: dict, tok, length: int, n: int) -> dict:
    """INT8 against fp32 on the generated tokens: free-running (each its own greedy caption) and
    teacher-forced (INT8's top-1 at every position of fp32's caption, through INT8's own vision,
    cross K/V and decoder graphs)."""
    from service.generation import greedy_decode

    ref = greedy_decode(runners["fp32"]["cache"], states["fp32"][:n], tok.bos, tok.sep, tok.pad, length, use_cache=True)
    free = greedy_decode(runners["int8"]["cache"], states["int8"][:n], tok.bos, tok.sep, tok.pad, length, use_cache=True)
    run = graphs["int8"].run
    cross = run("decoder_cross_kv", {"image_states": states["int8"][:n]})
    cross["cross_attention_mask"] = np.ones(states["int8"][:n].shape[:2], np.int64)  # dropped by graphs without it
    ids = np.concatenate([np.full((n, 1), tok.bos, np.int64), ref[:, :-1]], 1)
    logits = run("decoder_nocache", {"input_ids": ids, "attention_mask": np.ones_like(ids), **cross})["logits"]
    logits[..., tok.sep] = -np.inf
    forced = logits.argmax(-1)
    first_diff = [int(np.argmax(r != f)) if (r != f).any() else length for r, f in zip(ref, free, strict=True)]
    return {
        "tokens": int(ref.size),
        "teacher_forced_top1_agreement": round(float((forced == ref).mean()), 4),
        "free_running_position_agreement": round(float((free == ref).mean()), 4),
        "free_running_identical_captions": int(sum(np.array_equal(r, f) for r, f in zip(ref, free, strict=True))),
        "free_running_first_divergence": first_diff,
        "how": f"{n} images, {length} tokens each ([SEP] masked); fp32 = fp32 vision + decoder graphs, INT8 = INT8 ones",
    }


# ----------------------------------------------------------------------------------------------
# Service
# ----------------------------------------------------------------------------------------------


def jpeg_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def vmhwm_mib(pid: int) -> float | None:
    """A process's peak RSS (VmHWM) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


STAGE_METRICS = {
    "request": "vlm_request_duration_seconds",
    "preprocess": "vlm_preprocess_duration_seconds",
    "queue": "vlm_request_queue_duration_seconds",
    "inference_per_batch": "vlm_inference_duration_seconds",
    "postprocess": "vlm_postprocess_duration_seconds",
}


def _histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each STAGE_METRICS histogram, all label sets added, from /metrics text."""
    out = {k: [0.0, 0.0] for k in STAGE_METRICS}
    for line in text.splitlines():
        for key, name in STAGE_METRICS.items():
            for suffix, i in (("_sum", 0), ("_count", 1)):
                if line.startswith(name + suffix + "{") or line.startswith(name + suffix + " "):
                    out[key][i] += float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_split(before: str, after: str) -> dict:
    """Mean seconds per observation of each server stage between two /metrics scrapes (the
    server's own account of where a request's time goes), with the observation counts."""
    a, b = _histogram_totals(before), _histogram_totals(after)
    out = {}
    for k in STAGE_METRICS:
        total, count = b[k][0] - a[k][0], b[k][1] - a[k][1]
        out[k] = {"mean_ms": round(1000 * total / count, 2) if count else None, "count": int(count)}
    return out


def per_item_at(per_item: dict[int, float], b: float) -> float:
    """Per-item time at batch b, interpolated linearly between the measured batch sizes (the
    nearest one outside their range)."""
    xs = sorted(per_item)
    return float(np.interp(b, xs, [per_item[x] for x in xs]))


def service_section(fx: Fixture, precision: str, opts: Options, runtime_batching: dict) -> dict:
    """/vqa with batching vs without at `clients` concurrent clients, and the overhead at one client."""
    items = [(jpeg_b64(im), TIMING_QUESTION, []) for im in images(fx.image_size, 8)]
    with tempfile.TemporaryDirectory(prefix="trimvlm-scale-gallery-") as gallery:
        return _service_section(fx, precision, opts, runtime_batching, items, gallery)


def _service_section(fx: Fixture, precision: str, opts: Options, runtime_batching: dict, items: list, gallery: str) -> dict:
    from benchmarks.loadgen import closed_loop
    from benchmarks.service_bench import ServerProcess, _mean_batch, _overhead
    from service.settings import Settings
    from service.tasks import TaskModel

    size = fx.image_size

    def make(i):
        image, q, _ = items[i % len(items)]
        return "/vqa", {"image": image, "question": q, "compute": "full"}, None

    env = {
        "TRIMVLM_PRECISION": precision,
        # one batch at a time on every core: BLIP-base on few cores is latency-bound (README, "Server layout")
        "TRIMVLM_BATCH_CONCURRENCY": "1",
        "TRIMVLM_MAX_BATCH_SIZE": str(opts.clients),
        "TRIMVLM_GALLERY_DIR": gallery,
    }
    servers, ready_s, out = {}, {}, {}
    try:
        for name, batching in (("batching", "true"), ("no_batching", "false")):
            log(f"service: starting the {name} server ({fx.name}, {precision}) ...")
            t0 = time.perf_counter()
            servers[name] = ServerProcess(fx.export, {**env, "TRIMVLM_BATCHING": batching}, timeout_s=1800)
            ready_s[name] = round(time.perf_counter() - t0, 2)
            log(f"service: {name} server ready after {ready_s[name]} s")
        import httpx

        rows = {k: [] for k in servers}
        before = {k: httpx.get(srv.url + "/metrics", timeout=30).text for k, srv in servers.items()}
        for r in range(opts.service_rounds):
            for name, srv in servers.items():
                stats = asyncio.run(
                    closed_loop(
                        srv.url, make, opts.clients, opts.service_requests, warmup=WARMUP_REQUESTS, timeout_s=REQUEST_TIMEOUT_S
                    )
                )
                rows[name].append(stats.summary())
                log(f"service: round {r + 1} {name}: {rows[name][-1]['throughput_rps']} req/s, p50 {rows[name][-1]['p50_ms']} ms")
        after = {k: httpx.get(srv.url + "/metrics", timeout=30).text for k, srv in servers.items()}
        metrics = after["batching"]
        tput = {k: statistics.median(x["throughput_rps"] for x in v) for k, v in rows.items()}
        mean_batch = _mean_batch(metrics, "vqa/full") or 1.0
        per_item = {int(k): v for k, v in runtime_batching["per_item_ms"]["vqa_path"].items()}
        runtime_gain = per_item[1] / per_item_at(per_item, mean_batch)
        service_gain = tput["batching"] / tput["no_batching"]
        out["batching"] = {
            "clients": opts.clients,
            "rounds": rows,
            "median_throughput_rps": tput,
            "service_gain": round(service_gain, 3),
            "mean_batch_size": mean_batch,
            "runtime_per_item_ms": per_item,
            "runtime_gain_at_mean_batch": round(runtime_gain, 3),
            "gain_kept": round(service_gain / runtime_gain, 3),
            "server_stages": {k: stage_split(before[k], after[k]) for k in servers},
            "how": f"/vqa compute=full, {opts.clients} closed-loop clients, {opts.service_requests} requests per round and "
            f"server (after {WARMUP_REQUESTS} sequential warm-up requests), servers alternated per round; runtime gain = the "
            "bare runtime's per-item VQA-path time (vision + text + fusion) at batch 1 over that at the server's mean "
            "executed batch size (interpolated linearly between the measured batch sizes)",
        }
        peak_rss = {"no_batching": vmhwm_mib(servers["no_batching"].proc.pid)}
        servers["no_batching"].stop()  # its memory back before the bare runtime loads
        log("service: overhead at one client ...")
        options = Settings(batch_concurrency=1).runtime_options()
        tasks = TaskModel(fx.export, precision=precision, options=options)
        from service.images import ImageLimits, load_request_image

        pre = []
        for image, q, _ in items:
            arr = load_request_image(image, ImageLimits(), tasks.image_spec).array
            ids, mask = tasks.tokenize([q])
            pre.append((tasks.pixels(arr[None]), ids, mask))
        rounds = max(1, opts.overhead_requests // len(items))
        n = min(len(items), opts.overhead_requests)
        ov = _overhead(servers["batching"].url, tasks, items[:n], pre[:n], rounds)
        ov["how"] = ov["how"].replace("base64 PNG", f"base64 JPEG, {size} px")
        ov["overhead_share"] = round(ov["overhead_p50_ms"] / ov["http_round_trip_p50_ms"], 4)
        ov["app_share"] = round((ov["server_latency_p50_ms"] - ov["bare_runtime_p50_ms"]) / ov["http_round_trip_p50_ms"], 4)
        out["overhead"] = ov
        tasks.close()
        out["ready_s"] = ready_s
        out["peak_rss_mib"] = {"batching": vmhwm_mib(servers["batching"].proc.pid), **peak_rss}
    finally:
        for s in servers.values():
            s.stop()
    out["model"] = fx.name
    out["precision"] = precision
    out["image_size"] = size
    out["env"] = env | {"TRIMVLM_BATCHING": "true / false"}
    return out


# ----------------------------------------------------------------------------------------------
# Profiles for unmet targets
# ----------------------------------------------------------------------------------------------


def decode_step_curve(g: Graphs, lengths=(1, 10, 20, 30, 40), repeats: int = 3) -> dict:
    """Batch-1 time of one cached step (decoder_step after n-1 tokens) vs one uncached step
    (decoder_nocache over n tokens): where the cache's saving comes from, length by length."""
    run, m = g.run, g.manifest
    px = g.pixels(images(m.preprocessing.image.size, 1))
    image_states = run("vision", {"pixel_values": px})["image_states"]
    cross = run("decoder_cross_kv", {"image_states": image_states})
    layers = len(cross) // 2
    cross["cross_attention_mask"] = np.ones(image_states.shape[:2], np.int64)  # dropped by graphs without it
    rng = np.random.default_rng(0)
    tok = np.full((1, 1), 1000 % m.tokens.bos, np.int64)
    calls = {"cross_kv": lambda: run("decoder_cross_kv", {"image_states": image_states})}
    for n in lengths:
        if n > 1:
            past = {
                f"past_{k}.{i}": rng.normal(0, 1, kv_shape(cross["cross_key.0"], 1, n - 1)).astype(np.float32)
                for i in range(layers)
                for k in ("key", "value")
            }
            step = {"input_ids": tok, "attention_mask": np.ones((1, n), np.int64), **past, **cross}
            calls[f"step/{n}"] = lambda step=step: run("decoder_step", step)
        else:
            step = {"input_ids": tok, "attention_mask": np.ones((1, 1), np.int64), **cross}
            calls[f"step/{n}"] = lambda step=step: run("decoder_prefill", step)
        nc = {"input_ids": np.full((1, n), 1000 % m.tokens.bos, np.int64), "attention_mask": np.ones((1, n), np.int64), **cross}
        calls[f"nocache/{n}"] = lambda nc=nc: run("decoder_nocache", nc)
    times = interleaved(calls, repeats)
    return {
        "tokens": list(lengths),
        "cached_step_ms": [p50(times[f"step/{n}"]) for n in lengths],
        "uncached_step_ms": [p50(times[f"nocache/{n}"]) for n in lengths],
        "cross_kv_ms": p50(times["cross_kv"]),
        "kv_layout": m.decoder_kv_layout,
        "how": "batch 1; cached = decoder_step with n-1 cached tokens + 1 new (prefill at n=1); uncached = decoder_nocache "
        "over n tokens with the cross K/V given (the cross-K/V-only path; with no cache a step also pays cross_kv_ms), "
        "logits for all n positions, as greedy_decode runs it",
    }


def profiles(folder: Path, precision: str, points: list[dict], inputs: dict, which: set[str], options) -> dict:
    """points: the trimming section's rows of this precision (thresholds calibrated on its graph)."""
    from service.repository import load_manifest

    out = {}
    m = load_manifest(folder)
    if "trim" in which:
        pt = _closest_point(points)
        out["trim"] = {
            "keep_fraction": pt["keep_fraction"],
            "trimmed": ort_profile(folder / m.graph_file("vqa_trimmed", precision), _trimmed_feeds(inputs, pt)),
            "untrimmed_vision": ort_profile(folder / m.graph_file("vision", precision), {"pixel_values": inputs["pixel_values"]}),
        }
        gc.collect()
    if "kv" in which:
        f = graph_inputs(folder, [1], inputs, {1}, options)[1]
        g = Graphs(folder, precision, ["vision", *DECODER], options)
        curve = decode_step_curve(g)
        g.close()
        out["kv"] = {
            "step_curve": curve,
            "decoder_step": ort_profile(folder / m.graph_file("decoder_step", precision), f["decoder_step"]),
            "decoder_nocache": ort_profile(folder / m.graph_file("decoder_nocache", precision), f["decoder_nocache"]),
        }
        gc.collect()
    return out


def _closest_point(points: list[dict]) -> dict:
    """The keep fraction whose FLOPs reduction is closest to FLOPS_REDUCTION_TARGET (in log ratio)."""
    return min(points, key=lambda p: abs(np.log(1 / p["flops_ratio"]) - np.log(FLOPS_REDUCTION_TARGET)))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(opts: Options) -> dict:
    from service.settings import Settings

    t_start = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "command": "trimvlm bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else shlex.join(sys.argv),
        "machine": machine_info("cpu", "cores", "python", "onnxruntime", "torch"),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "load_before": load(),
        "targets": TARGETS,
        "fixtures": {},
        "sizes": {},
    }
    log(f"load before: {report['load_before']}")
    previous = _previous(opts) if opts.resume else None
    if previous:
        report["pieces"] = previous.get("pieces") or [
            {k: previous.get(k) for k in ("started", "wall_s", "load_before", "load_after")} | {"sizes": list(previous["sizes"])}
        ]
    report["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    service_size = opts.service_size or max(opts.image_sizes)
    runtime_options = Settings(batch_concurrency=1).runtime_options()
    profile_at: dict = {}
    for size in opts.image_sizes:
        fx = Fixture(opts.root, opts.size, size)
        if previous and str(size) in previous["sizes"]:
            log(f"{fx.name}: kept from the interrupted run ({previous['sizes'][str(size)].get('finished', '?')})")
            report["fixtures"][str(size)] = previous["fixtures"][str(size)]
            report["sizes"][str(size)] = previous["sizes"][str(size)] | {"resumed": True}
            for key, prof in (previous.get("profiles") or {}).items():
                if key.startswith(f"{size}/"):
                    profile_at[key] = prof
            continue
        report["fixtures"][str(size)] = build_fixture(fx, opts.rebuild)
        if opts.fixtures_only:
            continue
        timing = json.loads((fx.trimmed / "timing.json").read_text())
        inputs = dict(np.load(fx.trimmed / "timing_input.npz"))
        sec: dict = {"model": fx.name, "image_tokens": timing["points"][0]["image_tokens"], "timing_fixture": timing}
        seconds, t = {}, time.perf_counter()
        if "trimming" in opts.parts:
            log(f"{fx.name}: trimming: thresholds from each precision's graph ...")
            points = {p: calibrated_points(fx.export, p, timing, inputs) for p in opts.precisions}
            log(f"{fx.name}: trimming ({len(opts.precisions) * (1 + len(timing['points']))} runners x {opts.repeats}) ...")
            sec["trimming"] = trimming_section(fx.export, points, inputs, opts.repeats, runtime_options)
            seconds["trimming"], t = round(time.perf_counter() - t, 1), time.perf_counter()
        if "graphs" in opts.parts:
            batches = sorted(set(opts.graph_batches) | set(opts.batching_batches))
            log(f"{fx.name}: graphs, INT8 vs fp32, batch sizes {batches} ...")
            feeds = graph_inputs(fx.export, batches, inputs, set(opts.graph_batches), runtime_options)
            sec["graphs"] = graphs_section(
                fx.export, opts.precisions, feeds, opts.repeats, opts.batching_batches, runtime_options
            )
            del feeds
            keep1 = {
                p: next(pt for pt in row["points"] if pt["keep_fraction"] == 1.0)
                for p, row in sec.get("trimming", {}).get("precisions", {}).items()
                if any(pt["keep_fraction"] == 1.0 for pt in row["points"])
            }
            if keep1:  # batch 1 only (gather graph); timed in the trimming part at keep 1.0
                row = {
                    p: {"p50_ms": pt["p50_ms"], "per_item_ms": pt["p50_ms"], "spread": pt["spread"]} for p, pt in keep1.items()
                }
                if "fp32" in row and "int8" in row:
                    row["int8_speedup"] = round(row["fp32"]["p50_ms"] / row["int8"]["p50_ms"], 3)
                sec["graphs"]["graphs"]["vqa_trimmed"] = {"b1": row}
            seconds["graphs"], t = round(time.perf_counter() - t, 1), time.perf_counter()
        if "kv" in opts.parts:
            log(f"{fx.name}: caption decoding, KV cache vs none ...")
            sec["kv_cache"] = kv_section(
                fx.export, opts.precisions, opts.decode_lengths, opts.decode_batches, opts.repeats, runtime_options
            )
            seconds["kv_cache"] = round(time.perf_counter() - t, 1)
        sec["seconds"] = seconds
        sec["bench_peak_rss_mib"] = vmhwm_mib(os.getpid())
        sec["finished"], sec["load_after"] = time.strftime("%Y-%m-%d %H:%M:%S"), load()
        report["sizes"][str(size)] = sec
        checks_now = size_checks(sec, size)
        unmet = {c["name"].split("/")[0] for c in checks_now if not c["passed"]}
        which = {w for w, part in (("trim", "trimming"), ("kv", "kv")) if part in opts.parts}
        want = set(which) if opts.profile == "always" else {w for w in which if opts.profile == "unmet" and _unmet(unmet, w)}
        if want and size == max(opts.image_sizes):
            t = time.perf_counter()
            for p in opts.precisions:
                log(f"{fx.name}: profiles {sorted(want)} ({p}) ...")
                pts = sec["trimming"]["precisions"][p]["points"] if "trimming" in sec else []
                profile_at[f"{size}/{p}"] = profiles(fx.export, p, pts, inputs, want, runtime_options)
            seconds["profiles"] = round(time.perf_counter() - t, 1)
        report["profiles"] = profile_at
        _write(report, opts, t_start)  # a partial report after each size (--resume continues from it)
    report["profiles"] = profile_at
    if opts.fixtures_only:
        report["service"] = {"skipped": "--fixtures-only"}
    elif opts.service and "graphs" not in opts.parts:
        report["service"] = {"skipped": f"--parts {','.join(opts.parts)} (the service part needs `graphs`)"}
    elif opts.service:
        fx = Fixture(opts.root, opts.size, service_size)
        batching = report["sizes"][str(service_size)]["graphs"]["batching"][opts.service_precision]
        t = time.perf_counter()
        report["service"] = service_section(fx, opts.service_precision, opts, batching)
        report["service"]["seconds"] = round(time.perf_counter() - t, 1)
    else:
        report["service"] = {"skipped": "--skip-service"}
    report["load_after"] = load()
    log(f"load after: {report['load_after']}")
    return _write(report, opts, t_start)


RESUME_KEYS = (
    "size",
    "precisions",
    "repeats",
    "graph_batches",
    "batching_batches",
    "decode_lengths",
    "decode_batches",
    "parts",
)


def _previous(opts: Options) -> dict | None:
    """The report an interrupted run left in OUT, if its measurement options match these."""
    path = opts.out / "report.json"
    if not path.is_file():
        return None
    prev = json.loads(path.read_text())
    ours = {k: v for k, v in asdict(opts).items() if k in RESUME_KEYS}
    theirs = {k: prev.get("options", {}).get(k) for k in RESUME_KEYS}
    if json.loads(json.dumps(ours)) != theirs:
        raise ValueError(f"--resume: {path} was measured with other options {theirs}, not {ours}")
    return prev


def _unmet(unmet: set[str], what: str) -> bool:
    return {"trim": "trim_latency_speedup", "kv": "kv_cache_speedup"}[what] in unmet


def _write(report: dict, opts: Options, t_start: float) -> dict:
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["checks"] = checks(report)
    report["headline"] = headline(report)
    (opts.out / "report.json").write_text(json.dumps(report, indent=2, default=_json) + "\n")
    try:
        plot(report, opts.out / "scale.png")
        report["plot"] = "scale.png"
    except ImportError:
        report["plot"] = None  # matplotlib is in the train extra
    (opts.out / "REPORT.md").write_text(markdown(report))
    (opts.out / "report.json").write_text(json.dumps(report, indent=2, default=_json) + "\n")
    return report


def render(out: Path) -> None:
    """REPORT.md and scale.png again from OUT/report.json (report.json itself untouched)."""
    report = json.loads((out / "report.json").read_text())
    plot(report, out / "scale.png")
    (out / "REPORT.md").write_text(markdown(report))


def _json(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


# ----------------------------------------------------------------------------------------------
# Checks, headline, report
# ----------------------------------------------------------------------------------------------


def size_checks(sec: dict, size: int) -> list[dict]:
    out = []
    for p, row in sec.get("trimming", {}).get("precisions", {}).items():
        pt = _closest_point(row["points"])
        out.append(
            _check(
                f"trim_latency_speedup/{size}/{p}",
                pt["latency_speedup"],
                ">=",
                f"keep {pt['keep_fraction']} ({pt['flops_reduction']}x fewer FLOPs), batch 1",
            )
        )
    for p, rows in sec.get("kv_cache", {}).get("precisions", {}).items():
        longest = max(r["new_tokens"] for r in rows.values())
        r = rows.get(f"L{longest}/b1")
        if r:
            out.append(_check(f"kv_cache_speedup/{size}/{p}", r["speedup"], ">=", f"{longest} new tokens, batch 1"))
    return out


def _check(name: str, value: float, op: str, where: str) -> dict:
    target = TARGETS[name.split("/")[0]]
    passed = value >= target if op == ">=" else value <= target
    return {"name": name, "value": value, "target": f"{op} {target}", "passed": bool(passed), "where": where}


def checks(report: dict) -> list[dict]:
    out = []
    for size, sec in report["sizes"].items():
        out += size_checks(sec, int(size))
    s = report.get("service", {})
    if "batching" in s:
        b = s["batching"]
        where = f"{s['image_size']} px {s['precision']}, {b['clients']} clients, mean batch {b['mean_batch_size']}"
        out.append(_check(f"batching_gain_kept/{s['image_size']}/{s['precision']}", b["gain_kept"], ">=", where))
    if "overhead" in s:
        o = s["overhead"]
        where = (
            f"{s['image_size']} px {s['precision']}, /vqa, 1 client ({o['overhead_p50_ms']} of {o['http_round_trip_p50_ms']} ms)"
        )
        out.append(_check(f"serving_overhead_share/{s['image_size']}/{s['precision']}", o["overhead_share"], "<=", where))
    return out


def headline(report: dict) -> dict:
    """One line per figure the docs quote (ratios only)."""
    h = {}
    for size, sec in report["sizes"].items():
        for p, row in sec.get("trimming", {}).get("precisions", {}).items():
            pt = _closest_point(row["points"])
            h[f"trim_{size}_{p}"] = (
                f"keep {pt['keep_fraction']}: {pt['flops_reduction']}x fewer FLOPs, {pt['latency_speedup']}x lower latency"
            )
        for p, rows in sec.get("kv_cache", {}).get("precisions", {}).items():
            for k, r in rows.items():
                h[f"kv_{size}_{p}_{k}"] = r["speedup"]
        for g, by_b in sec.get("graphs", {}).get("graphs", {}).items():
            for b, by_p in by_b.items():
                if "int8_speedup" in by_p:
                    h[f"int8_{size}_{g}_{b}"] = by_p["int8_speedup"]
    s = report.get("service", {})
    if "batching" in s:
        h["service_batching_gain"] = s["batching"]["service_gain"]
        h["runtime_batching_gain"] = s["batching"]["runtime_gain_at_mean_batch"]
    if "overhead" in s:
        h["serving_overhead_share"] = s["overhead"]["overhead_share"]
    return h


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    for i, (size, sec) in enumerate(report["sizes"].items()):
        for j, (p, row) in enumerate(sec.get("trimming", {}).get("precisions", {}).items()):
            pts = row["points"]
            x = [pt["keep_fraction"] for pt in pts]
            ax.plot(
                x,
                [pt["latency_speedup"] for pt in pts],
                "o-" if p == "fp32" else "s--",
                color=f"C{i}",
                label=f"{size} px {p}: latency",
            )
            if j == 0:
                ax.plot(x, [pt["flops_reduction"] for pt in pts], ":", color=f"C{i}", alpha=0.7, label=f"{size} px: FLOPs")
    ax.set_xlabel("image-token keep fraction")
    ax.set_ylabel("untrimmed / trimmed (x)")
    ax.set_title("Trimming, batch 1: latency vs FLOPs reduction", fontsize=9)
    ax.axhline(TARGETS["trim_latency_speedup"], color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    labels, vals, colours = [], [], []
    for i, (size, sec) in enumerate(report["sizes"].items()):
        for p, rows in sec.get("kv_cache", {}).get("precisions", {}).items():
            for k, r in rows.items():
                labels.append(f"{size} {p}\n{k}")
                vals.append(r["speedup"])
                colours.append(f"C{i}")
    ax.bar(range(len(vals)), vals, color=colours)
    ax.set_xticks(range(len(vals)), labels, fontsize=6, rotation=90)
    ax.axhline(TARGETS["kv_cache_speedup"], color="grey", lw=0.8, ls="--")
    ax.set_ylabel("no cache / cache (x)")
    ax.set_title("Caption decoding: KV cache speed-up (L = new tokens, b = batch)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1][0]
    labels, vals, colours = [], [], []
    for i, (size, sec) in enumerate(report["sizes"].items()):
        for g, by_b in sec.get("graphs", {}).get("graphs", {}).items():
            for b, by_p in by_b.items():
                if "int8_speedup" in by_p and b in ("b1", "b8"):
                    labels.append(f"{size} {g.replace('decoder_', 'dec_')} {b}")
                    vals.append(by_p["int8_speedup"])
                    colours.append(f"C{i}")
    ax.bar(range(len(vals)), vals, color=colours)
    ax.set_xticks(range(len(vals)), labels, fontsize=6, rotation=90)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("fp32 / INT8 time (x)")
    ax.set_title("INT8 vs fp32 per graph", fontsize=9)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1][1]
    for i, (size, sec) in enumerate(report["sizes"].items()):
        for p, row in sec.get("graphs", {}).get("batching", {}).items():
            for g, style in (("vision", "o-"), ("vqa_path", "s--")):
                per = row["per_item_ms"][g]
                xs = sorted(int(b) for b in per)
                ax.plot(
                    xs,
                    [per[b] if b in per else per[str(b)] for b in xs],
                    style,
                    color=f"C{i}",
                    alpha=1 if p == "fp32" else 0.5,
                    label=f"{size} px {p} {g}",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("per-item ms (log)")
    ax.set_title("Bare runtime: per-item time by batch size", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.suptitle(
        f"trimvlm bench scale: random-weight BLIP-{report['options']['size']} "
        f"({report['machine']['cpu']}, {report['machine']['cores']} cores)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_stage(name: str, st: dict) -> str:
    if not st.get("wall_s"):
        return f"| {name} | reused, not measured | | | |"
    extra = ""
    if name == "export":
        ph = st.get("phases_s", {})
        extra = (
            f"trace fp32 {ph.get('trace_fp32')} s, INT8 quantisation {ph.get('quantize_int8')} s, "
            f"parity/references {ph.get('other')} s"
        )
        peaks = st.get("peak_rss_mib_by_phase", {})
        if peaks:
            extra += f"; peak RSS while quantising {peaks.get('quantize_int8')} MiB"
    elif name == "checkpoint":
        extra = f"{st.get('parameters', 0) / 1e6:.1f} M parameters, {st.get('bytes', 0) / 2**20:.0f} MiB"
    elif name == "trimmers":
        extra = "thresholds + FLOPs ratios on the timing input"
    reused = " (reused from an earlier run)" if st.get("reused") else ""
    return f"| {name}{reused} | {st['wall_s']} | {st['peak_rss_mib']} | {st.get('cpu_s', '')} | {extra} |"


def markdown(r: dict) -> str:
    m = r["machine"]
    o = r["options"]
    lines = [
        f"# Scale benchmark: random-weight BLIP-{o['size']}",
        "",
        f"`{r['command']}` on {m['cpu']} ({m['cores']} cores), onnxruntime {m.get('onnxruntime')}, one run of "
        f"{r['wall_s'] / 60:.1f} min. Load average (1/5/15 min) before {r['load_before']}, after {r.get('load_after', '—')}: "
        "the machine is shared, so the figures are ratios of runs interleaved call by call, not absolute times.",
        "",
        *_pieces_markdown(r),
        *[f"**Later:** {note}\n" for note in r.get("notes", [])],  # added to report.json by hand, e.g. a re-measured part
        "Weights are random (transformers' BlipConfig() defaults, BlipForQuestionAnswering; see "
        "benchmarks/scale_fixtures.py): speed is what is measured, answers mean nothing.",
        "",
        "## Checks",
        "| check | value | target | where | |",
        "|---|---:|---|---|---|",
    ]
    for c in r["checks"]:
        lines.append(f"| {c['name']} | **{c['value']}** | {c['target']} | {c['where']} | {'met' if c['passed'] else 'NOT MET'} |")
    lines += _fixtures_markdown(r["fixtures"])
    for size, sec in r["sizes"].items():
        lines += _size_markdown(size, sec)
    lines += _service_markdown(r.get("service", {}))
    lines += _profiles_markdown(r.get("profiles", {}), r.get("sizes", {}))
    if r.get("plot"):
        lines += ["", f"![scale]({r['plot']})"]
    return "\n".join(lines) + "\n"


def _pieces_markdown(r: dict) -> list[str]:
    if not r.get("pieces"):
        return []
    lines = []
    for p in r["pieces"]:
        lines.append(
            f"Resumed (`--resume`): sizes {p.get('sizes')} px come from an earlier, interrupted run of the same command "
            f"(started {p.get('started') or '?'}, {(p.get('wall_s') or 0) / 60:.1f} min until its last partial report, load "
            f"before {p.get('load_before')}); this run measured the rest. A full run takes the sum: "
            f"{(r['wall_s'] + sum(x.get('wall_s') or 0 for x in r['pieces'])) / 60:.1f} min."
        )
    return [*lines, ""]


def _fixtures_markdown(fixtures: dict) -> list[str]:
    out = [
        "",
        "## Fixtures: checkpoint, import, trimmers, export (each stage its own process; peak RSS = wait4's ru_maxrss)",
    ]
    total = 0.0
    for size, stages in fixtures.items():
        out += ["", f"### {size} px", "| stage | wall s | peak RSS MiB | CPU s | |", "|---|---:|---:|---:|---|"]
        out += [_fmt_stage(k, v) for k, v in stages.items()]
        total += sum(v.get("wall_s") or 0 for v in stages.values())
        when = sorted({v["finished"] for v in stages.values() if v.get("reused") and v.get("finished")})
        if when:
            out += ["", f"Reused stages were measured by an earlier run of this bench (finished {when[0]} .. {when[-1]})."]
        art = (stages.get("export") or {}).get("artifacts")
        if art:
            out += [
                "",
                f"Artifacts: {', '.join(f'{k} {v} MiB' for k, v in art['mib_by_precision'].items())} "
                f"(folder {art['folder_mib']} MiB).",
                "",
                "| graph | " + " | ".join(art["mib_by_precision"]) + " |",
                "|---|" + "---:|" * len(art["mib_by_precision"]),
            ]
            for g, by in art["mib_by_graph"].items():
                out.append(f"| {g} | " + " | ".join(str(by.get(p, "")) for p in art["mib_by_precision"]) + " |")
    out += ["", f"Building every fixture above takes {total / 60:.1f} min (sum of the stages' wall times)."]
    return out


def _size_markdown(size: str, sec: dict) -> list[str]:
    out = [
        "",
        f"## {size} px ({sec['image_tokens']} image tokens), {sec['model']}",
        "",
        f"Section wall times (s): {sec.get('seconds')}.",
    ]
    if "trimming" in sec:
        out += _trimming_markdown(sec)
    if "graphs" in sec:
        out += _graphs_markdown(sec["graphs"])
    if "kv_cache" in sec:
        step = (sec.get("graphs") or {}).get("graphs", {}).get("decoder_step", {}).get("b1", {})
        out += _kv_markdown(sec["kv_cache"], {p: v["p50_ms"] for p, v in step.items() if isinstance(v, dict)})
    out += [
        "",
        f"Peak RSS of the bench process so far (VmHWM; each part loads only the graphs it times): "
        f"{sec.get('bench_peak_rss_mib')} MiB.",
    ]
    return out


def _trimming_markdown(sec: dict) -> list[str]:
    tf = sec["timing_fixture"]
    out = [
        "",
        "### Trimming, batch 1",
        f"Untrimmed FLOPs {tf['full_gflops']} GFLOPs for a {tf['question_tokens']}-token question. How the keep fraction is "
        f"driven: {tf['how']}.",
        "",
        "| precision | keep | image tokens kept (graph / torch) | FLOPs ratio | FLOPs reduction | p50 ms "
        "| latency speed-up vs untrimmed | vs keep 1.0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, row in sec["trimming"]["precisions"].items():
        out.append(f"| {p} | untrimmed | all | 1.0 | 1.0 | {row['untrimmed_p50_ms']} | 1.0 | |")
        for pt in row["points"]:
            out.append(
                f"| {p} | {pt['keep_fraction']} | {pt['image_tokens_kept']} / {pt['image_tokens_kept_torch']} "
                f"| {pt['flops_ratio']} | {pt['flops_reduction']}x | {pt['p50_ms']} | **{pt['latency_speedup']}x** "
                f"| {pt['latency_speedup_vs_keep1']}x |"
            )
    out += ["", f"How: {sec['trimming']['how']}; {sec['trimming']['repeats']} repeats."]
    return out


def _graphs_markdown(g: dict) -> list[str]:
    out = [
        "",
        "### INT8 vs fp32 per graph",
        "| graph | batch | fp32 p50 ms | INT8 p50 ms | INT8 speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, by_b in g["graphs"].items():
        for b, by_p in by_b.items():
            if "fp32" in by_p and "int8" in by_p:
                out.append(
                    f"| {name} | {b[1:]} | {by_p['fp32']['p50_ms']} | {by_p['int8']['p50_ms']} | **{by_p['int8_speedup']}x** |"
                )
    out += ["", f"How: {g['how']}; {g['repeats']} repeats."]
    out += [
        "",
        "### Batching in the bare runtime: per-item ms (gain vs batch 1)",
        "| precision | path | "
        + " | ".join(f"batch {b}" for b in next(iter(g["batching"].values()))["per_item_ms"]["vision"])
        + " |",
    ]
    out.append("|---|---|" + "---:|" * len(next(iter(g["batching"].values()))["per_item_ms"]["vision"]))
    for p, row in g["batching"].items():
        for path, per in row["per_item_ms"].items():
            gains = row["gain_vs_batch1"].get(path, {})
            out.append(f"| {p} | {path} | " + " | ".join(f"{v} ({gains.get(b, '')}x)" for b, v in per.items()) + " |")
    return out


def _kv_markdown(kv: dict, step_ms: dict[str, float] | None = None) -> list[str]:
    """step_ms: each precision's batch-1 decoder_step time from the graphs part, when it ran."""
    out = [
        "",
        "### Caption decoding: KV cache vs none",
        "| precision | new tokens | batch | cache p50 ms | cross K/V only p50 ms | no cache p50 ms | speed-up vs no cache "
        "| speed-up vs cross K/V only | cache ms/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, rows in kv["precisions"].items():
        for r in rows.values():
            out.append(
                f"| {p} | {r['new_tokens']} | {r['batch']} | {r['cache_p50_ms']} | {r['cross_only_p50_ms']} "
                f"| {r['no_cache_p50_ms']} | **{r['speedup']}x** | {r['speedup_vs_cross_only']}x | {r['cache_ms_per_token']} |"
            )
    layout = KV_LAYOUT_WORDS[kv.get("kv_layout", "tokens")]
    out += ["", f"How: {kv['how']}; {kv['repeats']} repeats. Decoder K/V layout of these graphs: {layout}."]
    for p, f in kv.get("step_floor", {}).items():
        step = (step_ms or {}).get(p)
        took = (
            f"one batch-1 decoder_step (graphs part, {STEP_PAST} cached tokens) takes {step} ms, "
            f"{f['weight_stream_ms'] / step:.0%} of it the floor"
            if step
            else "decoder_step was not timed alone (graphs part not run)"
        )
        out.append(
            f"- {p}: streaming decoder_step's {f['decoder_step_mib']} MiB of weights through one batch-1 MatMul takes "
            f"{f['weight_stream_ms']} ms on this machine; {took}."
        )
    a = kv.get("int8_agreement")
    if a:
        out += [
            "",
            f"INT8 vs fp32 on the generated tokens ({a['how']}): teacher-forced top-1 agreement "
            f"**{a['teacher_forced_top1_agreement']}**, "
            f"free-running position agreement {a['free_running_position_agreement']}, identical captions "
            f"{a['free_running_identical_captions']}, first divergence per caption {a['free_running_first_divergence']}.",
        ]
    return out


def _service_markdown(s: dict) -> list[str]:
    if not s or "skipped" in s:
        return ["", "## Service", f"Skipped ({s.get('skipped', 'not run')})."]
    b, o = s["batching"], s["overhead"]
    rounds = "\n".join(
        f"| {name} | {i + 1} | {row['throughput_rps']} | {row['p50_ms']} | {row['p99_ms']} | {row['statuses']} |"
        for name, rs in b["rounds"].items()
        for i, row in enumerate(rs)
    )
    return [
        "",
        f"## Service: {s['model']}, {s['precision']}",
        f"Start to ready (load + warm-up): batching server {s['ready_s'].get('batching')} s, no-batching server "
        f"{s['ready_s'].get('no_batching')} s. Peak RSS (VmHWM): {s['peak_rss_mib']} MiB.",
        "",
        f"### Batching, {b['clients']} concurrent clients",
        f"Median throughput: batching {b['median_throughput_rps']['batching']:.3g} req/s, "
        f"none {b['median_throughput_rps']['no_batching']:.3g} "
        f"req/s: service gain **{b['service_gain']}x** at a mean executed batch of {b['mean_batch_size']}; the bare runtime's "
        f"per-item gain at that batch size {b['runtime_gain_at_mean_batch']}x (per-item VQA path ms by batch "
        f"{b['runtime_per_item_ms']}): the service keeps **{b['gain_kept']}** of it.",
        "",
        "| server | round | req/s | p50 ms | p99 ms | statuses |",
        "|---|---:|---:|---:|---:|---|",
        rounds,
        "",
        f"How: {b['how']}.",
        "",
        "Where the time goes, by the servers' own /metrics over the throughput rounds (mean ms per observation, observations):",
        "",
        "| server | " + " | ".join(STAGE_METRICS) + " | request - queue - inference |",
        "|---|" + "---:|" * (len(STAGE_METRICS) + 1),
        *(
            f"| {name} | " + " | ".join(f"{st[k]['mean_ms']} ({st[k]['count']})" for k in STAGE_METRICS) + f" | {_rest_ms(st)} |"
            for name, st in b.get("server_stages", {}).items()
        ),
        "",
        "(queue = enqueue to the start of the item's batch, inference = one batch's run; the last column is a request's "
        "time outside those two: reading, decoding, admission, hand-offs between the event loop and the pools.)",
        *_batching_note(b),
        "",
        "### Serving overhead, one client",
        f"Bare runtime p50 {o['bare_runtime_p50_ms']} ms, HTTP round trip p50 {o['http_round_trip_p50_ms']} ms (the app's own "
        f"latency_ms p50 {o['server_latency_p50_ms']} ms): overhead **{o['overhead_p50_ms']} ms = "
        f"{100 * o['overhead_share']:.2f}%** of the request over {o['samples']} requests.",
        f"How: {o['how']}.",
    ]


KV_LAYOUT_WORDS = {
    "tokens": "`tokens`, [B, tokens, heads x head_dim] (exports before the head-split cache)",
    "heads": "`heads`, [B, heads, tokens, head_dim] (no transpose of the cache per step)",
}
TRANSPOSE_WHY = {
    "tokens": "the cached K/V are kept as [B, tokens, heads x dim] and split into heads again at every step, the cross "
    "K/V over every image token included",
    "heads": "the K/V are kept head-split, so only the new token's q, k, v and the context are transposed",
}


def _kv_diagnosis(k: dict, sec: dict, precision: str) -> list[str]:
    """What the cached path would have to cost for the target, and where a cached step's time goes."""
    rows = (sec.get("kv_cache") or {}).get("precisions", {}).get(precision, {})
    longest = max((r["new_tokens"] for r in rows.values()), default=None)
    row = rows.get(f"L{longest}/b1")
    graphs = (sec.get("graphs") or {}).get("graphs", {})
    cross = graphs.get("decoder_cross_kv", {}).get("b1", {}).get(precision, {}).get("p50_ms")
    cross = cross if cross is not None else k["step_curve"].get("cross_kv_ms")
    if not row or cross is None:
        return []
    step = k["decoder_step"]
    by_type = step["by_op_type"]
    lm_head = sum(v for n, v in step["slowest_nodes"].items() if "predictions/decoder" in n)
    need = row["no_cache_p50_ms"] / TARGETS["kv_cache_speedup"]
    per_step_now = (row["cache_p50_ms"] - cross) / longest
    per_step_need = (need - cross) / longest
    matmul = sum(by_type.get(op, 0) for op in ("MatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"))
    if row["speedup"] >= TARGETS["kv_cache_speedup"]:
        verdict = (
            f"met here ({row['speedup']}x): a cached token costs {per_step_now:.1f} ms, under the {per_step_need:.1f} ms it may"
        )
    else:
        verdict = (
            f"for {TARGETS['kv_cache_speedup']}x the cached path would have to take {need:.0f} ms: with the cross K/V "
            f"projection ({cross:.0f} ms, once per image in the cached path) that is {per_step_need:.1f} ms per token "
            f"instead of {per_step_now:.1f}"
        )
    return [
        "",
        f"Reading: {longest} tokens at batch 1 took {row['cache_p50_ms']:.0f} ms with the cache and "
        f"{row['no_cache_p50_ms']:.0f} ms without; {verdict}. A cached step costs the same at every length (the weights "
        "are read once per token, memory-bound at batch 1), an uncached one grows with the prefix, so the ratio grows "
        f"with length and batch. In the cached step ONNX Runtime spends {100 * matmul:.0f}% in MatMul nodes (weights "
        f"and attention), "
        f"{100 * by_type.get('Transpose', 0):.0f}% in Transpose ({TRANSPOSE_WHY[k['step_curve'].get('kv_layout', 'tokens')]}) "
        f"and {100 * lm_head:.0f}% in the LM head (30524-word vocabulary).",
    ]


def _rest_ms(st: dict) -> float | None:
    parts = [st.get(k, {}).get("mean_ms") for k in ("request", "queue", "inference_per_batch")]
    return None if None in parts else round(parts[0] - parts[1] - parts[2], 1)


def _batching_note(b: dict) -> list[str]:
    per = {int(k): v for k, v in b["runtime_per_item_ms"].items()}
    gains = [per[min(per)] / v for v in per.values()]
    if max(gains) >= 1.05:
        return []
    return [
        "",
        "At this size the bare runtime gains nothing from batching the VQA path (per-item time within "
        f"{100 * max(abs(1 - g) for g in gains):.0f}% of batch 1 at every measured batch size: one image's matrix "
        "products already keep both cores busy), so this check shows only that the service loses nothing by batching.",
    ]


def _profiles_markdown(p: dict, sizes: dict | None = None) -> list[str]:
    sizes = sizes or {}
    if not p:
        return []
    out = ["", "## Profiles (targets not met, largest image size)"]
    for key, prof in p.items():
        if "trim" in prof:
            t = prof["trim"]
            out += ["", f"### Trimming at keep {t['keep_fraction']} ({key})"]
            for label in ("trimmed", "untrimmed_vision"):
                x = t[label]
                out.append(
                    f"- {label} ({x['graph']}): {x['wall_ms_per_call']} ms/call; by op type {x['by_op_type']}; "
                    f"slowest nodes {x['slowest_nodes']}"
                )
        if "kv" in prof:
            k = prof["kv"]
            c = k["step_curve"]
            out += ["", f"### Decoding ({key})", "| tokens | cached step ms | uncached step ms |", "|---:|---:|---:|"]
            out += [
                f"| {n} | {a} | {b} |" for n, a, b in zip(c["tokens"], c["cached_step_ms"], c["uncached_step_ms"], strict=True)
            ]
            out.append(f"How: {c['how']}.")
            out += _kv_diagnosis(k, sizes.get(key.split("/")[0], {}), key.split("/")[1])
            for label in ("decoder_step", "decoder_nocache"):
                x = k[label]
                out.append(
                    f"- {label}: {x['wall_ms_per_call']} ms/call; by op type {x['by_op_type']}; "
                    f"slowest nodes {x['slowest_nodes']}"
                )
    return out


if __name__ == "__main__":  # python -m benchmarks.scale render reports/scale
    if sys.argv[1:2] != ["render"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m benchmarks.scale render REPORT_DIR   (the bench itself: trimvlm bench scale)")
    render(Path(sys.argv[2]))
