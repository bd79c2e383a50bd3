"""The compression report: teacher -> distilled student -> pruned students (and the
from-scratch baseline), side by side in one run on one machine.

For every model: parameters and FLOPs per module, torch batch-1 latency (VQA forward and greedy
captioning) measured interleaved (A B C A B C ...) so the ratios hold on a noisy machine, and
every task metric of `trimvlm eval`. Plots: heads and FFN neurons left per layer and modality
(the evidence that pruning allocates modal-adaptively) and accuracy vs latency (Pareto).
Writes report.json, REPORT.md, allocation.png and pareto.png.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from compression import data as D
from compression.artifacts import load_model_dir
from compression.evaluate import evaluate, flat_metrics
from compression.flops import TokenCounts, count_params, flops_per_sample
from compression.prune import GROUPS, remaining_units
from compression.training import normalize_on_device
from service.machine import machine_info
from service.preprocess import encode_texts

# The bars the pruned student must clear, relative to the teacher.
TARGETS = {
    "params_ratio_max": 0.35,
    "easy_vqa_ratio_min": 0.985,
    "cider_ratio_min": 0.96,
    "r1_ratio_min": 0.96,
    "latency_speedup_min": 2.5,
}


def _vqa_inputs(lm, image: np.ndarray, question: str):
    pre = lm.preprocessing
    ids, mask = encode_texts(lm.tokenizer, [question], pre.max_text_length)
    n = int(mask.sum())  # batch 1: no padding
    pixels = normalize_on_device(torch.from_numpy(image[None]), pre.image)
    return pixels, torch.from_numpy(ids[:, :n]), torch.from_numpy(mask[:, :n]).bool()


@torch.inference_mode()
def measure_latency(
    models: dict, image: np.ndarray, question: str, rounds: int = 20, per_round: int = 5, caption_every: int = 4
) -> dict:
    """Batch-1 torch latency (ms) of the VQA forward and of greedy captioning, interleaved
    across models round by round. Returns p50/p95 per model."""
    inputs = {name: _vqa_inputs(lm, image, question) for name, lm in models.items()}
    vqa_times = {name: [] for name in models}
    cap_times = {name: [] for name in models}
    for name, lm in models.items():  # warm-up
        for _ in range(3):
            lm.model.vqa_forward(*inputs[name])
        lm.model.generate(lm.model.encode_image(inputs[name][0]).last_hidden_state, max_new_tokens=4)
    for r in range(rounds):
        for name, lm in models.items():
            m = lm.model
            pixels, ids, mask = inputs[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                m.vqa_forward(pixels, ids, mask)
                vqa_times[name].append((time.perf_counter() - t0) * 1e3)
            if r % caption_every == 0:
                t0 = time.perf_counter()
                m.generate(m.encode_image(pixels).last_hidden_state, max_new_tokens=lm.preprocessing.max_caption_length)
                cap_times[name].append((time.perf_counter() - t0) * 1e3)

    def stats(xs):
        xs = sorted(xs)
        return {"p50": statistics.median(xs), "p95": xs[min(len(xs) - 1, int(0.95 * len(xs)))], "n": len(xs)}

    return {name: {"vqa_ms": stats(vqa_times[name]), "caption_ms": stats(cap_times[name])} for name in models}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # undefined when the teacher scores 0 (tiny test models)


def _at_least(x: float | None, bound: float) -> bool:
    return x is not None and x >= bound


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def build_report(models: dict[str, Path], teacher: str = "teacher", limit: int | None = None, rounds: int = 20) -> dict:
    """models: display name -> model folder (the teacher among them under `teacher`)."""
    loaded = {name: load_model_dir(path) for name, path in models.items()}
    root = D.ensure_scenes()
    spec = loaded[teacher].preprocessing.image
    ev = D.load_easy_vqa("test", spec)
    sample = ev.samples[0]
    torch.manual_seed(0)
    latency = measure_latency(loaded, ev.images[sample.image], sample.question, rounds=rounds)
    rows = {}
    for name, path in models.items():
        lm = loaded[name]
        cfg = lm.model.config
        results = evaluate(path, limit=limit, device="cpu", scenes_root=root)
        rows[name] = {
            "path": str(path),
            "role": cfg.role,
            "layers": cfg.layer_counts,
            "params": count_params(lm.model),
            "flops": {t: flops_per_sample(cfg, TokenCounts(), t) for t in ("vqa", "caption", "itc")},
            "latency": latency[name],
            "metrics": flat_metrics(results),
            "allocation": remaining_units(cfg),
        }
    t = rows[teacher]
    for row in rows.values():
        m, tm = row["metrics"], t["metrics"]
        row["vs_teacher"] = {
            "params": _ratio(row["params"]["total"], t["params"]["total"]),
            "vqa_flops": _ratio(row["flops"]["vqa"]["total"], t["flops"]["vqa"]["total"]),
            "vqa_latency_speedup": _ratio(t["latency"]["vqa_ms"]["p50"], row["latency"]["vqa_ms"]["p50"]),
            "caption_latency_speedup": _ratio(t["latency"]["caption_ms"]["p50"], row["latency"]["caption_ms"]["p50"]),
            "easy_vqa": _ratio(m["easy_vqa.accuracy"], tm["easy_vqa.accuracy"]),
            "scenes_vqa": _ratio(m["scenes.vqa_accuracy"], tm["scenes.vqa_accuracy"]),
            "cider": _ratio(m["scenes.cider"], tm["scenes.cider"]),
            "r1_i2t": _ratio(m["scenes.r1_i2t"], tm["scenes.r1_i2t"]),
            "r1_t2i": _ratio(m["scenes.r1_t2i"], tm["scenes.r1_t2i"]),
        }
        v = row["vs_teacher"]
        row["meets_targets"] = {
            "params": v["params"] <= TARGETS["params_ratio_max"],
            "easy_vqa": _at_least(v["easy_vqa"], TARGETS["easy_vqa_ratio_min"]),
            "cider": _at_least(v["cider"], TARGETS["cider_ratio_min"]),
            "r1": _at_least(v["r1_i2t"], TARGETS["r1_ratio_min"]) and _at_least(v["r1_t2i"], TARGETS["r1_ratio_min"]),
            "latency": _at_least(v["vqa_latency_speedup"], TARGETS["latency_speedup_min"]),
        }
    return {
        "machine": machine_info("platform", "processor=cpu", "cpu_count=cores", "torch", "threads"),
        "latency_protocol": f"batch 1, torch eager fp32 CPU, {rounds} interleaved rounds; VQA forward x5 per round, "
        "greedy captioning (up to max caption length) every 4th round; p50 over all samples",
        "targets": TARGETS,
        "teacher": teacher,
        "models": rows,
    }


# What each metric keeps of the teacher, the unsaturated first: easy-VQA near 1.0 hides what is lost
RETENTION = [
    ("scenes VQA", "scenes.vqa_accuracy"),
    *[(f"scenes VQA: {t}", f"scenes.vqa_{t}") for t in ("color", "count", "existence", "relation", "shape")],
    ("R@1 image->text, ITC top-16 re-ranked by ITM + w x ITC", "scenes.r1_i2t_rerank"),
    ("R@1 text->image, ITC top-16 re-ranked by ITM + w x ITC", "scenes.r1_t2i_rerank"),
    ("R@1 image->text, ITC only", "scenes.r1_i2t"),
    ("R@1 text->image, ITC only", "scenes.r1_t2i"),
    ("CIDEr", "scenes.cider"),
    ("easy-VQA (saturated)", "easy_vqa.accuracy"),
]


def retention_table(rows: dict, teacher: str) -> list[str]:
    """Markdown lines: each metric of each model over the teacher's (metrics a report lacks are left out)."""
    names = [n for n in rows if n != teacher]
    tm = rows[teacher]["metrics"]
    lines = [
        "## Retention: each metric over the teacher's",
        "",
        f"| metric | {teacher} | " + " | ".join(f"{n} | kept" for n in names) + " |",
        "|---|---:|" + "---:|---:|" * len(names),
    ]
    for label, key in RETENTION:
        if key not in tm or not all(key in rows[n]["metrics"] for n in names):
            continue
        cells = [f"{rows[n]['metrics'][key]:.3f} | {_f(_ratio(rows[n]['metrics'][key], tm[key]), '.1%')}" for n in names]
        lines.append(f"| {label} | {tm[key]:.3f} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    rows = report["models"]
    lines = [
        "# Compression report: teacher -> distilled -> pruned",
        "",
        f"Machine: {report['machine']['processor']} ({report['machine']['cpu_count']} cores), "
        f"{report['machine']['threads']} torch threads, "
        f"torch {report['machine']['torch']} ({report['machine']['platform']}).",
        f"Latency: {report['latency_protocol']}.",
        "",
        "| model | params | vs teacher | VQA GFLOPs | VQA p50 ms | speed-up | caption p50 ms | easy-VQA | scenes VQA "
        "| CIDEr | R@1 i2t | R@1 t2i |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        m, v = r["metrics"], r["vs_teacher"]
        lines.append(
            f"| {name} | {r['params']['total'] / 1e6:.2f}M | {v['params']:.1%} | {r['flops']['vqa']['total'] / 1e9:.3f} "
            f"| {r['latency']['vqa_ms']['p50']:.2f} | {v['vqa_latency_speedup']:.2f}x | {r['latency']['caption_ms']['p50']:.1f} "
            f"| {m['easy_vqa.accuracy']:.4f} | {m['scenes.vqa_accuracy']:.4f} | {m['scenes.cider']:.3f} "
            f"| {m['scenes.r1_i2t']:.3f} | {m['scenes.r1_t2i']:.3f} |"
        )
    lines += ["", "## Against the teacher (ratios) and the targets", ""]
    lines += [
        "| model | params | easy-VQA | CIDEr | R@1 i2t | R@1 t2i | VQA speed-up | all targets met |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        v, ok = r["vs_teacher"], r["meets_targets"]
        verdict = "yes" if all(ok.values()) else "no: " + ", ".join(k for k, x in ok.items() if not x)
        lines.append(
            f"| {name} | {v['params']:.3f} | {_f(v['easy_vqa'], '.4f')} | {_f(v['cider'], '.4f')} | {_f(v['r1_i2t'], '.4f')} "
            f"| {_f(v['r1_t2i'], '.4f')} | {_f(v['vqa_latency_speedup'], '.2f')}x | {verdict} |"
        )
    lines += ["", *retention_table(rows, report["teacher"])]
    t = report["targets"]
    lines += [
        "",
        f"Targets: params <= {t['params_ratio_max']:.0%} of the teacher, easy-VQA >= {t['easy_vqa_ratio_min']:.1%}, CIDEr and "
        f"R@1 >= {t['cider_ratio_min']:.0%}, VQA batch-1 latency >= {t['latency_speedup_min']}x lower.",
        "",
        "## Heads and FFN neurons left per layer",
        "",
        "| model | " + " | ".join(f"{s} {k}" for s, k in GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for name, r in rows.items():
        a = r["allocation"]
        lines.append(f"| {name} | " + " | ".join(str(a[f"{s}_{k}"]) for s, k in GROUPS) + " |")
    lines += ["", "![allocation](allocation.png)", "", "![pareto](pareto.png)", ""]
    return "\n".join(lines)


def plot_allocation(report: dict, path: Path, names: list[str]) -> None:
    """Kept fraction of heads / neurons per layer, grouped by modality, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = report["models"][names[0]]["allocation"]
    labels, ref_sizes = [], []
    for s, k in GROUPS:
        for i, n in enumerate(ref[f"{s}_{k}"]):
            labels.append(f"{s}\n{k} L{i}")
            ref_sizes.append(n)
    fig, ax = plt.subplots(figsize=(max(10, 0.6 * len(labels) * max(1, len(names) - 1)), 4.5))
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(names) - 1)
    for j, name in enumerate(names[1:]):
        a = report["models"][name]["allocation"]
        kept = [n for s, k in GROUPS for n in a[f"{s}_{k}"]]
        ax.bar(x + j * width, [k / r if r else 0 for k, r in zip(kept, ref_sizes, strict=True)], width, label=name)
    ax.set_xticks(x + width * (len(names) - 2) / 2, labels, fontsize=7)
    ax.set_ylabel(f"kept fraction (of {names[0]})")
    ax.set_ylim(0, 1.05)
    ax.set_title("Heads and FFN neurons kept per layer and modality")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in (
        (axes[0], "easy_vqa.accuracy", "easy-VQA test accuracy"),
        (axes[1], "scenes.cider", "scenes caption CIDEr"),
    ):
        for name, r in report["models"].items():
            x = r["latency"]["vqa_ms"]["p50"] if metric.startswith("easy") else r["latency"]["caption_ms"]["p50"]
            ax.scatter(x, r["metrics"][metric], s=40)
            ax.annotate(name, (x, r["metrics"][metric]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(("VQA" if metric.startswith("easy") else "captioning") + " batch-1 latency p50 (ms, torch CPU)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    models: dict[str, Path], out: Path, teacher: str = "teacher", limit: int | None = None, rounds: int = 20
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(models, teacher, limit, rounds)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(report))
    plot_allocation(report, out / "allocation.png", _alloc_names(report, models, teacher))
    plot_pareto(report, out / "pareto.png")
    return report


def _alloc_names(report: dict, models: dict, teacher: str) -> list[str]:
    """The reference (first unpruned student, else the teacher) then every model of the same depth."""
    rows = report["models"]
    students = [n for n in models if n != teacher]
    ref = next((n for n in students if rows[n]["layers"] != rows[teacher]["layers"]), teacher)
    same = [n for n in students if rows[n]["layers"] == rows[ref]["layers"] and rows[n]["allocation"] != rows[ref]["allocation"]]
    return [ref, *same]
