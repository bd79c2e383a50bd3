"""`trimvlm bench model`: every artifact of the compression chain on VQA, measured in one run on
one machine (JSON + Markdown + Pareto PNG).

Runners (whichever exist): the torch fp32 teacher, the distilled and pruned students, the trimmed
student at each compute level (torch eager, gather mode), the exported model in ONNX Runtime INT8
and fp32 at each level, and TensorRT when it can run here. For each: batch-1 latency p50/p95,
throughput at batch 8 and 32, easy-VQA test accuracy, parameters, FLOPs per sample, and the
achieved FLOP/s as a fraction of a plain fp32 GEMM (torch.mm, same threads) timed in the same
rounds. Calls are interleaved input by input across all runners (A B C A B C ...) with the order
rotated per input, so machine noise lands on every runner alike and the ratios hold.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.machine import machine_info

BATCH_SIZES = (1, 8, 32)
GEMM_N = 1024  # square fp32 GEMM: big enough to reach the BLAS's steady rate on a few cores
GEMM_NAME = "fp32 GEMM"  # timed among the runners, input by input like them

# The artifacts of the default chain (Makefile: teacher, compress, trim, default-model). Those under
# runs/ are not committed: a fresh clone benches what it has and lists the rest as missing.
DEFAULT_ARTIFACTS = {
    "teacher": "models/trimvlm-teacher/1",
    "distilled": "runs/distill/model",
    "pruned": "runs/prune-flops-0.55/model",
    "trimmed": "models/trimvlm-student/6",
}
DEFAULT_EXPORTED = "models/trimvlm-default/1"
# fp32 graphs of the same export (not committed; `make export-report` writes them)
DEFAULT_EXPORTED_FP32 = "runs/export-fp32/trimvlm-default/1"


@dataclass
class Runner:
    """One thing to time: a model at one backend, precision and compute level."""

    name: str
    artifact: str  # teacher | distilled | pruned | trimmed | exported
    backend: str  # torch | onnxruntime | tensorrt
    precision: str
    level: str
    call: Callable[[tuple], object]  # runs one prepared batch
    prepare: Callable[[np.ndarray, list[str]], tuple]  # (uint8 images, questions) -> (pixels, ids, mask)
    accuracy: Callable[[object], tuple[float, float | None]]  # split -> (accuracy, measured FLOPs ratio)
    params: int | None = None
    config: object | None = None  # the ModelConfig FLOPs are counted from (None: unknown)
    info: dict = field(default_factory=dict)


def percentiles(times_ms: list[float]) -> dict:
    a = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p95_ms": round(float(np.percentile(a, 95)), 3),
        "mean_ms": round(float(a.mean()), 3),
        "n": len(times_ms),
    }


def interleave_order(names: list[str], index: int) -> list[str]:
    """Runner order for input `index`: rotated by one each time, so no runner always runs first
    (after a sleep) or right after the heaviest one."""
    k = index % len(names) if names else 0
    return names[k:] + names[:k]


def measure_interleaved(
    calls: dict[str, Callable[[object], object]],
    inputs: dict[str, list],
    rounds: int,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Milliseconds per call for every runner over its own prepared copy of the same inputs
    (inputs[name][i] is input i for that runner), interleaved input by input."""
    names = list(calls)
    n = min(len(v) for v in inputs.values())
    for name in names:
        for x in inputs[name][:warmup]:
            calls[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(n):
            for name in interleave_order(names, i + r):
                t0 = clock()
                calls[name](inputs[name][i])
                times[name].append((clock() - t0) * 1000)
    return times


def gemm_runner(n: int = GEMM_N) -> tuple[Callable[[object], object], tuple]:
    """A plain fp32 GEMM (torch.mm, torch's thread setting) to time among the runners: the
    practical compute ceiling, exposed to the same noise as the models it is compared with."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda x: torch.mm(*x)), (a, b)


# Runners ----------------------------------------------------------------------------------------


def _torch_runners(label: str, path: Path) -> list[Runner]:
    import torch

    from compression.artifacts import load_model_dir
    from compression.flops import count_params
    from compression.training import normalize_on_device
    from compression.trim import evaluate_trimmed
    from compression.trimmed import Trim, trimmed_vqa_forward
    from service.levels import FULL, load_levels
    from service.preprocess import encode_texts

    lm = load_model_dir(path)
    model = lm.model.float().eval()
    cfg = model.config
    pre = lm.preprocessing

    def prepare(images: np.ndarray, questions: list[str]):
        ids, mask = encode_texts(lm.tokenizer, questions, pre.max_text_length)
        n = int(mask.sum(1).max())
        pixels = normalize_on_device(torch.from_numpy(images), pre.image)
        return pixels, torch.from_numpy(ids[:, :n]), torch.from_numpy(mask[:, :n]).bool()

    params = count_params(model)["total"]
    stored = load_levels(path) if cfg.trimming else None
    levels = stored.levels if stored else {"full": FULL}
    out = []
    for level, point in levels.items():
        if not point.trimmed:
            trim = Trim(mode="gather", enabled=False)

            def call(x, _m=model):
                with torch.no_grad():
                    _m.vqa_forward(*x)
        else:
            trim = Trim(mode="gather", token_threshold=point.token_threshold, head_threshold=point.head_threshold)

            def call(x, _m=model, _t=trim):
                with torch.no_grad():
                    trimmed_vqa_forward(_m, *x, _t)

        def accuracy(split, _t=trim):
            ev = evaluate_trimmed(model, split, lm.tokenizer, pre, "cpu", _t)
            return ev.accuracy, ev.flops_ratio

        out.append(
            Runner(
                name=f"{label} torch fp32" + ("" if level == "full" and len(levels) == 1 else f" {level}"),
                artifact=label,
                backend="torch",
                precision="fp32",
                level=level,
                call=call,
                prepare=prepare,
                accuracy=accuracy,
                params=params,
                config=cfg,
                info={"path": str(path), "layers": cfg.layer_counts},
            )
        )
    return out


def _exported_runners(path: Path, backend: str, precision: str) -> list[Runner]:
    from service.runtime import RuntimeOptions
    from service.tasks import TaskModel

    # No spin-waiting: spinning ORT threads would steal the cores from the torch runner timed next
    # (the service's default too, TRIMVLM_ORT_SPINNING=false).
    options = RuntimeOptions(extra={"allow_spinning": False})
    tasks = TaskModel(path, backend, precision=precision, options=options, fallback=False)
    params, cfg = _source_config(tasks)

    def prepare(images: np.ndarray, questions: list[str]):
        ids, mask = tasks.tokenize(questions)
        n = int(mask.sum(1).max())
        return tasks.pixels(images), ids[:, :n], mask[:, :n]

    out = []
    for level in tasks.level_names:
        name, point = tasks.resolve_level(level)

        def call(x, _n=name, _p=point):
            tasks.vqa(*x, level=_n, point=_p)

        def accuracy(split, _level=level):
            from compression.export_report import _accuracy

            return _accuracy(tasks, split, _level), None

        out.append(
            Runner(
                name=f"exported {backend} {precision} {level}",
                artifact="exported",
                backend=backend,
                precision=precision,
                level=level,
                call=call,
                prepare=prepare,
                accuracy=accuracy,
                params=params,
                config=cfg,
                info={"path": str(path), "runtime": tasks.runtime.describe(), "calibrated_flops_ratio": point.flops_ratio},
            )
        )
    return out


def _source_config(tasks):
    """Parameters and config of the torch model an export came from (its manifest names it)."""
    from compression.config import ModelConfig

    source = (tasks.manifest.produced_by or {}).get("source_model")
    cfg_path = Path(source) / "config.json" if source else None
    if not cfg_path or not cfg_path.is_file():
        return None, None
    import torch

    from compression.flops import count_params
    from compression.modeling import TrimVLM

    cfg = ModelConfig.load(cfg_path)
    with torch.device("meta"):
        params = count_params(TrimVLM(cfg))["total"]
    return params, cfg


# The run ----------------------------------------------------------------------------------------


def collect_runners(artifacts: dict[str, Path], exported: list[tuple[Path, str, str]]) -> tuple[list[Runner], dict[str, str]]:
    """Runners for what exists; `skipped` says why anything asked for is missing."""
    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    for label, path in artifacts.items():
        if not (Path(path) / "config.json").is_file():
            skipped[label] = f"{path} not found (rebuild it with the Makefile's chain: make compress / make trim)"
            continue
        runners += _torch_runners(label, Path(path))
    for path, backend, precision in exported:
        key = f"exported {backend} {precision}"
        if not (Path(path) / "manifest.json").is_file():
            skipped[key] = f"{path} not found (`make export-report` exports the fp32 graphs there)"
            continue
        if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            skipped[key] = "TensorRT is not installed here (it needs an NVIDIA GPU and the gpu extra, plus an fp16 export)"
            continue
        try:
            runners += _exported_runners(Path(path), backend, precision)
        except Exception as e:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
            skipped[key] = f"{type(e).__name__}: {e}"
    return runners, skipped


def run(*args, **kwargs) -> dict:
    """The benchmark (see _run), without gradients; the caller's grad mode is left as it was."""
    import torch

    with torch.no_grad():
        return _run(*args, **kwargs)


def _run(
    out: Path,
    artifacts: dict[str, Path] | None = None,
    exported: list[tuple[Path, str, str]] | None = None,
    limit: int | None = None,
    latency_samples: int = 48,
    throughput_batches: int = 6,
    rounds: int = 3,
    split_name: str = "test",
    reuse_accuracy: bool = True,
) -> dict:
    import torch

    from compression import data as D
    from compression.flops import TokenCounts, flops_per_sample
    from service.preprocess import ImageSpec

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {k: Path(v) for k, v in (DEFAULT_ARTIFACTS if artifacts is None else artifacts).items()}
    if exported is None:
        exported = [
            (Path(DEFAULT_EXPORTED), "onnxruntime", "int8"),
            (Path(DEFAULT_EXPORTED_FP32), "onnxruntime", "fp32"),
            (Path(DEFAULT_EXPORTED), "tensorrt", "fp16"),
        ]

    split = D.load_easy_vqa(split_name, ImageSpec())  # uint8 images; each runner normalises its own way
    samples = split.samples[: max(latency_samples, 32 * throughput_batches)]
    runners, skipped = collect_runners(artifacts, exported)
    if not runners:
        raise SystemExit(f"no artifacts to benchmark: {skipped}")

    # Inputs: the same questions and images for every runner, prepared once in its own format.
    def batches(size: int, count: int):
        return [samples[i * size : (i + 1) * size] for i in range(count)]

    plan = {1: batches(1, latency_samples), 8: batches(8, throughput_batches * 4), 32: batches(32, throughput_batches)}
    prepared = {
        bs: {r.name: [r.prepare(split.images[[s.image for s in b]], [s.question for s in b]) for b in bl] for r in runners}
        for bs, bl in plan.items()
    }
    gemm_call, gemm_input = gemm_runner()
    calls = {**{r.name: r.call for r in runners}, GEMM_NAME: gemm_call}
    timings, gemm_rate = {}, {}
    for bs in BATCH_SIZES:
        prepared[bs][GEMM_NAME] = [gemm_input] * len(plan[bs])
        timings[bs] = measure_interleaved(calls, prepared[bs], rounds)
        gemm_rate[bs] = 2 * GEMM_N**3 / (statistics.median(timings[bs].pop(GEMM_NAME)) / 1000)

    eval_split = split.limit(limit)
    cache_path = out / "accuracy_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() and reuse_accuracy else {}
    rows = {}
    for r in runners:
        # accuracy is deterministic for the same files, level and questions: reuse it across runs
        key = f"{r.name}|{r.level}|{folder_digest(Path(r.info['path']))}|{split_name}|{len(eval_split.samples)}"
        reused = key in cache
        if not reused:
            cache[key] = list(r.accuracy(eval_split))
            cache_path.write_text(json.dumps(cache, indent=1) + "\n")
        acc, ratio = cache[key]
        rows[r.name] = {
            "artifact": r.artifact,
            "backend": r.backend,
            "precision": r.precision,
            "level": r.level,
            "params": r.params,
            "accuracy": round(acc, 4),
            "measured_flops_ratio": None if ratio is None else round(ratio, 4),
            "accuracy_reused": reused,
            **r.info,
        }
    _fill_exported_flops_ratios(rows)
    for r in runners:
        row = rows[r.name]
        # FLOPs at the batch-1 inputs' own question lengths (each runner's tokenizer)
        text_len = float(np.mean([float(x[2].sum()) for x in prepared[1][r.name]]))
        flops_full = None if r.config is None else flops_per_sample(r.config, TokenCounts(text=round(text_len)), "vqa")["total"]
        ratio = row["measured_flops_ratio"] if row["measured_flops_ratio"] is not None else row.get("calibrated_flops_ratio")
        row["flops_ratio"] = 1.0 if r.level == "full" else ratio
        row["flops_per_sample"] = (
            None if flops_full is None or row["flops_ratio"] is None else round(flops_full * row["flops_ratio"])
        )
        for bs in BATCH_SIZES:
            stats = percentiles(timings[bs][r.name])
            stats["items_per_s"] = round(bs * 1000 / stats["p50_ms"], 1)
            if row["flops_per_sample"]:
                stats["flops_fraction_of_gemm"] = float(f"{row['flops_per_sample'] * stats['items_per_s'] / gemm_rate[bs]:.4g}")
            row[f"batch{bs}"] = stats

    report = {
        "command": "trimvlm bench model",
        "machine": machine_info("cpu", "cores", "torch_threads=threads", "python", "torch", "onnxruntime", "numpy"),
        "split": f"easy_vqa_{split_name}",
        "n_questions": len(eval_split.samples),
        "protocol": (
            "accuracy (and the measured FLOPs ratio) is computed once per model folder content (sha256), level and "
            "question set, then reused from accuracy_cache.json (--no-reuse-accuracy recomputes); "
            f"batch 1: {latency_samples} questions, unpadded; batch 8 and 32: {throughput_batches * 4} and {throughput_batches} "
            f"batches padded to their longest question; {rounds} rounds, every input run by every runner in turn "
            "(order rotated per input); ONNX Runtime without spin-waiting (the service default); "
            "throughput = batch size / p50 batch time; FLOPs per sample from the model "
            "config at the inputs' mean question length times the measured trimmed/full ratio; GEMM: "
            f"{GEMM_N}x{GEMM_N} fp32 torch.mm timed as one more interleaved runner at every batch size (p50), and each "
            "batch size's fraction taken against the GEMM rate measured alongside it"
        ),
        "gemm_gflops": round(statistics.median(gemm_rate.values()) / 1e9, 2),
        "gemm_gflops_per_batch_size": {str(bs): round(v / 1e9, 2) for bs, v in gemm_rate.items()},
        "runners": rows,
        "skipped": skipped,
    }
    report["headline"] = headline(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(report))
    plot_pareto(report, out / "pareto.png")
    return report


def folder_digest(folder: Path) -> str:
    """sha256 over a model folder's files (names and bytes): what an accuracy figure depends on."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(folder)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _fill_exported_flops_ratios(rows: dict) -> None:
    """An export at a level runs the same thresholds on the same weights as its torch source, so
    it gets the torch trimmed runner's measured ratio for that level (when that runner ran)."""
    measured = {r["level"]: r["measured_flops_ratio"] for r in rows.values() if r["artifact"] == "trimmed"}
    for r in rows.values():
        if r["artifact"] == "exported" and r["measured_flops_ratio"] is None and r["level"] in measured:
            r["measured_flops_ratio"] = measured[r["level"]]


# Headline ratios (what README and docs/BENCHMARKS.md quote) ------------------------------------


def _pick(rows: dict, **want) -> dict | None:
    for row in rows.values():
        if all(row.get(k) == v for k, v in want.items()):
            return row
    return None


def headline(report: dict) -> dict:
    rows = report["runners"]
    teacher = _pick(rows, artifact="teacher")
    out: dict = {}
    if teacher is None:
        return out
    default_backend = {"backend": "onnxruntime", "precision": "int8"}
    for level in ("full", "balanced"):
        row = _pick(rows, artifact="exported", level=level, **default_backend)
        if row is None:
            continue
        out[f"student_{level}_vs_teacher_latency_b1"] = round(teacher["batch1"]["p50_ms"] / row["batch1"]["p50_ms"], 3)
        out[f"student_{level}_vs_teacher_throughput_b32"] = round(
            row["batch32"]["items_per_s"] / teacher["batch32"]["items_per_s"], 3
        )
        out[f"student_{level}_accuracy_fraction_of_teacher"] = round(row["accuracy"] / teacher["accuracy"], 4)
    full = _pick(rows, artifact="exported", level="full", **default_backend)
    if full is not None:
        for row in rows.values():
            if (
                row["artifact"] == "exported"
                and row["level"] != "full"
                and row["backend"] == "onnxruntime"
                and row["precision"] == "int8"
            ):
                lv = row["level"]
                out[f"level_{lv}_latency_speedup_b1"] = round(full["batch1"]["p50_ms"] / row["batch1"]["p50_ms"], 3)
                if row.get("flops_ratio"):
                    out[f"level_{lv}_flops_reduction"] = round(1 / row["flops_ratio"], 3)
                out[f"level_{lv}_accuracy_drop_points"] = round(100 * (full["accuracy"] - row["accuracy"]), 2)
    for key, row in (("teacher", teacher), ("student_full", full)):
        if row is not None and "flops_fraction_of_gemm" in row["batch32"]:
            out[f"{key}_flops_fraction_of_gemm_b32"] = row["batch32"]["flops_fraction_of_gemm"]
            out[f"{key}_flops_fraction_of_gemm_b1"] = row["batch1"]["flops_fraction_of_gemm"]
    return out


# Output -----------------------------------------------------------------------------------------


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


TABLE_HEAD = (
    "| runner | params (M) | MFLOPs / sample | easy-VQA % | b1 p50 ms | b1 p95 ms | b1 vs teacher | b8 items/s | b32 items/s "
    "| b32 % of GEMM |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown(r: dict) -> str:
    m = r["machine"]
    teacher = _pick(r["runners"], artifact="teacher")
    lines = []
    for name, row in r["runners"].items():
        b1, b8, b32 = row["batch1"], row["batch8"], row["batch32"]
        vs = _fmt(teacher["batch1"]["p50_ms"] / b1["p50_ms"], ".2f") + "x" if teacher else "—"
        lines.append(
            f"| {name} | {_fmt(row['params'] and row['params'] / 1e6, '.2f')} | "
            f"{_fmt(row['flops_per_sample'] and row['flops_per_sample'] / 1e6, '.1f')} | {100 * row['accuracy']:.2f} | "
            f"{b1['p50_ms']:.2f} | {b1['p95_ms']:.2f} | {vs} | {b8['items_per_s']:.0f} | {b32['items_per_s']:.0f} | "
            f"{_fmt(b32.get('flops_fraction_of_gemm') and 100 * b32['flops_fraction_of_gemm'], '.1f')} |"
        )
    head = "\n".join(f"| {k} | {v} |" for k, v in r["headline"].items())
    skipped = "\n".join(f"- {k}: {v}" for k, v in r["skipped"].items()) or "- none"
    return f"""# Model benchmark: VQA across the compression chain

`{r["command"]}` on {m["cpu"]} ({m["cores"]} cores, torch threads {m["torch_threads"]}), torch {m["torch"]},
ONNX Runtime {m["onnxruntime"]}, Python {m["python"]}. One run; {r["n_questions"]} {r["split"]} questions for accuracy.
fp32 GEMM reference (torch.mm {GEMM_N}², interleaved with the runners, median over batch sizes):
**{r["gemm_gflops"]} GFLOP/s**.

{TABLE_HEAD}
{chr(10).join(lines)}

![accuracy vs batch-1 latency](pareto.png)

## Headline ratios
| ratio | value |
|---|---:|
{head}

## Not measured in this run
{skipped}

Protocol: {r["protocol"]}.
"""


def plot_pareto(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"torch": "tab:blue", "onnxruntime": "tab:green", "tensorrt": "tab:red"}
    pts = []
    for i, (name, row) in enumerate(sorted(r["runners"].items(), key=lambda kv: kv[1]["batch1"]["p50_ms"])):
        x, y = row["batch1"]["p50_ms"], 100 * row["accuracy"]
        pts.append((x, y))
        ax.scatter(x, y, color=colours.get(row["backend"], "grey"), s=28, zorder=3)
        short = name.replace("exported onnxruntime ", "ORT ").replace("exported tensorrt ", "TRT ").replace(" torch fp32", "")
        # alternate label sides so neighbouring points stay readable
        ax.annotate(short, (x, y), fontsize=6.5, xytext=(5, 4 if i % 2 else -9), textcoords="offset points")
    frontier, best = [], -1.0
    for x, y in sorted(pts):
        if y > best:
            frontier.append((x, y))
            best = y
    ax.plot(*zip(*frontier, strict=True), color="black", lw=0.8, ls="--", label="Pareto frontier", zorder=2)
    for backend, c in colours.items():
        ax.scatter([], [], color=c, label=backend)
    ax.set_xscale("log")
    ax.set_xlabel("VQA batch-1 latency p50 (ms, log)")
    ax.set_ylabel(f"{r['split']} accuracy (%)")
    ax.set_title(f"Accuracy vs latency ({r['machine']['cpu']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
