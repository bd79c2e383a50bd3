"""Which student to start a long distillation from: the candidates' parameters and validation
metrics before any training, on the validation data the run evaluates on.

    python -m benchmarks.distill_init --out reports/distill-long/init_compare.json

Candidates: `teacher` (configs/distill.yaml's init: half the teacher's layers, copied from teacher
layers 1, 3, ...) and a model folder (default models/trimvlm-student/6, the served student's torch
source). Parameters are counted without the SmartTrim trimmer modules (they are not on the
untrimmed path). On a shared machine, pause other CPU work (background training) while it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    from compression import data as D
    from compression.artifacts import LoadedModel, load_model_dir
    from compression.distill import DistillConfig, build_student
    from compression.evaluate import evaluate_validation
    from compression.training import load_training_splits, preprocessing_for

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="models/trimvlm-teacher/1")
    ap.add_argument("--existing", default="models/trimvlm-student/6")
    ap.add_argument("--caption-images", type=int, default=200)
    ap.add_argument("--vqa-limit", type=int, default=2000, help="first N questions of each VQA val split")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t = load_model_dir(args.teacher)
    spec = t.preprocessing.image
    cfg = DistillConfig(teacher=args.teacher)
    _, vqa_val, _, _ = load_training_splits(cfg, spec)
    vqa_val = [s.limit(args.vqa_limit) for s in vqa_val]
    captions = D.load_scenes_captions(D.ensure_scenes(), "val", spec).limit(args.caption_images)
    pre = preprocessing_for(cfg, spec)

    def params(m) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if not n.startswith("trimmers."))

    t_params = params(t.model)
    result = {"teacher": {"params": t_params, **evaluate_validation(t, vqa_val, captions, "cpu")}}
    for name, init in (("teacher_init_half_depth", "teacher"), ("existing:" + args.existing, args.existing)):
        student = build_student(DistillConfig(teacher=args.teacher, init=init), t.model, t.tokenizer).eval()
        n = params(student)
        metrics = evaluate_validation(LoadedModel(student, t.tokenizer, pre), vqa_val, captions, "cpu")
        result[name] = {"params": n, "params_vs_teacher": round(n / t_params, 4), **metrics}
        print(name, json.dumps(result[name]), flush=True)
    result["settings"] = vars(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
