"""Per-step cost of distillation with and without the teacher cache, side by side on the same batches.

    python -m benchmarks.distill_step --config configs/distill-long.yaml --steps 6 --out reports/distill-long/step_cost.json

Each of `--steps` batches is drawn once; the cache is filled for it first (untimed), then, in
alternating order, one uncached step (teacher forward with states) and one cached step (teacher
outputs read from the cache plus the teacher's ITM fusion on the batch's pairs) are timed, each
followed by the same student forward + KD losses and backward, each phase timed separately.
The losses of both steps are compared (they differ only by the cache's fp16 rounding).
On a shared machine, pause other CPU work (background training) while it runs. The cache goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


class _Fixed:
    """Stands in for the cache: hands the objective teacher outputs computed (and timed) before."""

    def __init__(self, t_out):
        self.t_out = t_out

    def teacher_outputs(self, vqa, cap):
        return self.t_out


def main(argv: list[str] | None = None) -> dict:
    from compression.artifacts import load_model_dir
    from compression.distill import DistillConfig, Distiller, build_student, open_teacher_cache
    from compression.training import adopt_image_spec, load_data_for, sample_batches, start_run, task_forward

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/distill-long.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="distill-step-")
    cfg = DistillConfig.from_yaml(args.config, out=tmp, teacher_cache=f"{tmp}/cache", device="cpu", batch_size=args.batch_size)
    cfg.hard_negative_k = 0  # timing only: random batches
    ctx = start_run(cfg)
    t = load_model_dir(cfg.teacher, ctx.device)
    adopt_image_spec(ctx, cfg, t.preprocessing.image, "teacher")
    student = build_student(cfg, t.model, t.tokenizer)
    obj = Distiller(student, t.model, cfg).train()
    data, _ = load_data_for(cfg, ctx, t.tokenizer, student.config.answers, student.config.bos_token_id)
    cache = open_teacher_cache(cfg, obj, data, t.model)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for i in range(args.steps):
        vqa, cap = sample_batches(data, ctx.spec, 0, student.config.bos_token_id, cfg.batch_size, gen)
        cache.teacher_outputs(vqa, cap)  # fill (untimed)
        timing = {}
        losses = {}
        for mode in ("uncached", "cached") if i % 2 == 0 else ("cached", "uncached"):
            torch.manual_seed(1000 + i)  # the same ITM negatives in both modes
            t0 = time.perf_counter()
            with torch.no_grad():
                if mode == "cached":
                    t_out = cache.teacher_outputs(vqa, cap)
                else:
                    t_out = task_forward(t.model, vqa, cap, states=True)
            t1 = time.perf_counter()
            obj.cache = _Fixed(t_out)  # the objective takes these teacher outputs as they are
            out = obj(vqa, cap)
            t2 = time.perf_counter()
            obj.zero_grad(set_to_none=True)
            out["total"].backward()
            t3 = time.perf_counter()
            timing[mode] = {"teacher_s": t1 - t0, "student_forward_s": t2 - t1, "backward_s": t3 - t2, "step_s": t3 - t0}
            losses[mode] = {k: float(v.detach()) for k, v in out.items()}
        ref = losses["uncached"]
        rel = {k: abs(losses["cached"][k] - v) / max(1e-6, abs(v)) for k, v in ref.items()}
        rows.append({"batch": i, **timing, "max_rel_loss_diff": max(rel.values()), "worst_term": max(rel, key=rel.get)})
        print(json.dumps(rows[-1]), flush=True)
    med = {
        mode: {k: statistics.median(r[mode][k] for r in rows[1:] or rows) for k in rows[0][mode]}
        for mode in ("uncached", "cached")
    }
    result = {
        "config": args.config,
        "batch_size": cfg.batch_size,
        "steps_timed": len(rows),
        "median_excluding_first": med,
        "speedup_step": med["uncached"]["step_s"] / med["cached"]["step_s"],
        "teacher_share_uncached": med["uncached"]["teacher_s"] / med["uncached"]["step_s"],
        "rows": rows,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python -m benchmarks.distill_step " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
