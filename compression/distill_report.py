"""Metric-vs-steps report of a distillation run that logs full validation metrics (eval_full):

    python -m compression.distill_report --run runs/distil-long --out reports/distill-long

reads <run>/train_log.jsonl (rows {"step", "eval": {...}}; a resumed run may log a step twice:
the last row wins), <run>/teacher_eval.json (the teacher on the same validation data) and, when
present, <out>/step_cost.json (benchmarks/distill_step.py), and writes <out>/REPORT.md,
<out>/curves.png and <out>/report.json. The step-0 row is the initial student: for a run
initialised from the served default's torch source, the current default (before INT8 export).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (key in the eval rows, label), the unsaturated metrics first
METRICS = [
    ("scenes_val.accuracy", "scenes val VQA accuracy"),
    ("scenes_val.r1_i2t", "R@1 image->text (ITC)"),
    ("scenes_val.r1_t2i", "R@1 text->image (ITC)"),
    ("scenes_val.r1_i2t_rerank", "R@1 image->text (ITM re-ranked)"),
    ("scenes_val.r1_t2i_rerank", "R@1 text->image (ITM re-ranked)"),
    ("scenes_val.cider", "CIDEr"),
    ("easy_vqa_val.accuracy", "easy-VQA val accuracy"),
]
TYPES = ["color", "count", "existence", "relation", "shape"]


def read_log(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Eval rows and loss rows by step (a step logged again after a resume keeps its last row)."""
    evals, losses = {}, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "eval" in row:
            evals[row["step"]] = row["eval"]
        elif "total" in row:
            losses[row["step"]] = row
    return dict(sorted(evals.items())), dict(sorted(losses.items()))


def run_progress(run: Path) -> dict:
    """Where the run is: the last checkpointed step, the teacher cache's filled fractions."""
    import numpy as np

    progress: dict = {"checkpoint_step": None, "cache_filled": {}}
    ckpt = run / "checkpoint.pt"
    if ckpt.is_file():
        import torch

        progress["checkpoint_step"] = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
    for flags in sorted((run / "teacher_cache").glob("*.filled.npy")) if (run / "teacher_cache").is_dir() else []:
        progress["cache_filled"][flags.name.split(".")[0]] = round(float(np.load(flags).mean()), 4)
    return progress


def build(run: Path, out: Path, resume_command: str, notes: list[str] | None = None) -> dict:
    log = run / "train_log.jsonl"
    evals, losses = read_log(log) if log.is_file() else ({}, {})
    init_compare = json.loads((out / "init_compare.json").read_text()) if (out / "init_compare.json").is_file() else None
    if not evals and init_compare is None:
        raise ValueError(f"{log} has no eval rows (was eval_full on?) and there is no {out}/init_compare.json")
    teacher_path = run / "teacher_eval.json"
    teacher = json.loads(teacher_path.read_text()) if teacher_path.is_file() else {}
    steps = list(evals)
    initial, latest = (evals[steps[0]], evals[steps[-1]]) if steps else ({}, {})
    rows = []
    for key, label in [*METRICS, *[(f"scenes_val.vqa_{t}", f"&nbsp;&nbsp;VQA {t}") for t in TYPES]]:
        if key not in latest or key not in teacher:
            continue
        series = [(s, e[key]) for s, e in evals.items() if key in e]
        best_step, best = max(series, key=lambda kv: kv[1])
        rows.append(
            {
                "key": key,
                "label": label,
                "teacher": teacher[key],
                "initial": initial.get(key),
                "latest": latest[key],
                "best": best,
                "best_step": best_step,
                "latest_kept": latest[key] / teacher[key] if teacher[key] else None,
                "initial_kept": initial[key] / teacher[key] if initial.get(key) is not None and teacher[key] else None,
            }
        )
    step_cost = None
    if (out / "step_cost.json").is_file():
        step_cost = json.loads((out / "step_cost.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    if evals:
        plot(evals, losses, teacher, out / "curves.png")
    report = {
        "run": str(run),
        "progress": run_progress(run),
        "init_compare": init_compare,
        "eval_steps": steps,
        "latest_step": steps[-1] if steps else None,
        "last_logged_step": max(losses) if losses else None,
        "metrics": rows,
        "evals": {str(s): e for s, e in evals.items()},
        "teacher": teacher,
        "step_cost": _cost_summary(step_cost),
        "resume_command": resume_command,
        "notes": notes or [],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(report))
    return report


def _cost_summary(step_cost: dict | None) -> dict | None:
    if not step_cost:
        return None
    summary = {k: v for k, v in step_cost.items() if k != "rows"}
    summary["max_rel_loss_diff"] = max(r["max_rel_loss_diff"] for r in step_cost["rows"])
    return summary


def plot(evals: dict, losses: dict, teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label in METRICS if any(k in e for e in evals.values())]
    n = len(keys) + 1
    cols = 4
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)))
    axes = axes.flatten()
    steps = list(evals)
    for ax, (k, label) in zip(axes, keys, strict=False):
        xs = [s for s in steps if k in evals[s]]
        ax.plot(xs, [evals[s][k] for s in xs], "o-", label="student")
        if k in teacher:
            ax.axhline(teacher[k], color="k", ls="--", lw=1, label="teacher")
            ax.axhline(0.95 * teacher[k], color="gray", ls=":", lw=1, label="95% of teacher")
        if xs:
            ax.axhline(evals[xs[0]][k], color="tab:red", ls="-.", lw=1, label="initial (current default)")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    ax = axes[len(keys)]
    if losses:
        xs = list(losses)
        for k in ("total", "task", "kd"):
            if k in losses[xs[0]]:
                ax.plot(xs, [losses[s].get(k) for s in xs], label=k)
        ax.set_title("training losses", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes[len(keys) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def init_table(ic: dict) -> list[str]:
    """The candidates for the run's starting point, before any training (benchmarks/distill_init.py)."""
    names = [k for k in ic if k not in ("settings", "teacher")]
    keys = [(k, label) for k, label in METRICS] + [(f"scenes_val.vqa_{t}", f"&nbsp;&nbsp;VQA {t}") for t in TYPES]
    head = "| metric (val, before training) | teacher | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * (len(names) + 1)]
    t = ic["teacher"]
    lines.append(
        "| parameters | "
        + f"{t['params'] / 1e6:.2f}M | "
        + " | ".join(f"{ic[n]['params'] / 1e6:.2f}M ({100 * ic[n]['params_vs_teacher']:.1f}%)" for n in names)
        + " |"
    )
    for k, label in keys:
        if k in t:
            cells = []
            for n in names:
                v = ic[n].get(k)
                cells.append("-" if v is None else f"{v:.4f} ({100 * v / t[k]:.0f}%)" if t[k] else f"{v:.4f}")
            lines.append(f"| {label} | {t[k]:.4f} | " + " | ".join(cells) + " |")
    return lines


def markdown(r: dict) -> str:
    lines = ["# Long distillation: metrics vs steps", ""]
    p = r["progress"]
    lines += [
        f"Run folder `{r['run']}` (outside the repository). Last checkpoint: step {p['checkpoint_step']}; "
        f"teacher cache filled (fraction of rows): {p['cache_filled'] or 'none yet'}.",
        "",
    ]
    if r.get("init_compare"):
        ic = r["init_compare"]
        s = ic.get("settings", {})
        lines += [
            "## Where the run starts",
            "",
            f"`python -m benchmarks.distill_init` (first {s.get('vqa_limit')} questions of each VQA val split, "
            f"captions and retrieval on the first {s.get('caption_images')} scenes val images, ITM re-ranking of the "
            "ITC top 16; kept = share of the teacher's value):",
            "",
            *init_table(ic),
            "",
        ]
    if not r["eval_steps"]:
        lines += ["The run has not reached its first evaluation yet.", ""]
        lines += _cost_lines(r) + ["## Continue the run", "", "```", r["resume_command"], "```", ""]
        return "\n".join(lines)
    lines += [
        f"Evaluated at steps {', '.join(map(str, r['eval_steps']))}; "
        f"the last logged training step is {r['last_logged_step']}. Validation data: scenes val (VQA on all its "
        "questions; captions and retrieval on the run's `eval_caption_images` images, ITM re-ranking of the ITC top 16) "
        "and easy-VQA val. The initial row (step 0) is the student the run starts from.",
        "",
        "| metric (val) | teacher | initial (step 0) | latest | kept: initial | kept: latest | best (step) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in r["metrics"]:
        kept_i = "-" if m["initial_kept"] is None else f"{100 * m['initial_kept']:.1f}%"
        kept_l = "-" if m["latest_kept"] is None else f"{100 * m['latest_kept']:.1f}%"
        lines.append(
            f"| {m['label']} | {_f(m['teacher'])} | {_f(m['initial'])} | {_f(m['latest'])} | {kept_i} | {kept_l} | "
            f"{_f(m['best'])} ({m['best_step']}) |"
        )
    lines += ["", "![metrics vs steps](curves.png)", ""]
    lines += _cost_lines(r)
    lines += ["## Continue the run", "", "```", r["resume_command"], "```", ""]
    return "\n".join(lines)


def _cost_lines(r: dict) -> list[str]:
    lines: list[str] = []
    if r.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in r["notes"]], ""]
    sc = r.get("step_cost")
    if sc:
        u, c = sc["median_excluding_first"]["uncached"], sc["median_excluding_first"]["cached"]
        lines += [
            "## Per-step cost with and without the teacher cache",
            "",
            f"`{sc['command']}` (batch {sc['batch_size']}, {sc['steps_timed']} batches, medians without the first; "
            f"{sc['machine']}):",
            "",
            "| seconds per step | teacher part | student forward + KD losses | backward | whole step |",
            "|---|---:|---:|---:|---:|",
            f"| uncached (teacher forward) | {u['teacher_s']:.2f} | {u['student_forward_s']:.2f} | {u['backward_s']:.2f} | "
            f"{u['step_s']:.2f} |",
            f"| cached (read + teacher ITM fusion) | {c['teacher_s']:.2f} | {c['student_forward_s']:.2f} | "
            f"{c['backward_s']:.2f} | {c['step_s']:.2f} |",
            "",
            f"Step speed-up {sc['speedup_step']:.2f}x; the teacher forward was {100 * sc['teacher_share_uncached']:.0f}% "
            "of an uncached step. Both steps' losses agree within the fp16 rounding of the cache "
            f"(largest relative difference of any loss term {sc['max_rel_loss_diff']:.1e}).",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Metric-vs-steps report of a distillation run.")
    ap.add_argument("--run", default="runs/distil-long")
    ap.add_argument("--out", default="reports/distill-long")
    ap.add_argument(
        "--resume-command", default="scripts/distill_long.sh   # or STEPS=N scripts/distill_long.sh for a longer schedule"
    )
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    args = ap.parse_args(argv)
    r = build(Path(args.run), Path(args.out), args.resume_command, args.note)
    print(f"{args.out}/REPORT.md: steps {r['eval_steps']}")


if __name__ == "__main__":
    main()
