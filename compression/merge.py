"""`trimvlm merge`: a student between its starting weights and a fine-tuned continuation, chosen on
validation (weight-space interpolation, as in WiSE-FT and model soups).

Continuing the distillation from a published student gains VQA and loses some image-text ranking;
the straight line between the two weight sets often keeps most of both. `interpolate` mixes two
folders of one architecture; `merge` evaluates each mixing weight on the validation splits and keeps
the one whose weakest metric, as a fraction of the teacher's, is highest (the targets are all
"at least X% of the teacher", so the weakest one binds). Trimmers are mixed like every other weight;
compute levels are not carried over (they describe the old weights): re-calibrate the result."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from compression.artifacts import LoadedModel, load_model_dir, save_model_dir
from compression.modeling import check_top_level_modules
from compression.training import TrainConfig, load_training_splits

# what `merge` compares with the teacher (flat keys of compression.evaluate.evaluate_validation)
SELECTION_METRICS = (
    "scenes_val.accuracy",
    "scenes_val.r1_i2t",
    "scenes_val.r1_t2i",
    "scenes_val.r1_i2t_rerank",
    "scenes_val.r1_t2i_rerank",
    "scenes_val.cider",
    "easy_vqa_val.accuracy",
)


def interpolate(
    base: torch.nn.Module, tuned: torch.nn.Module, alpha: float, modules: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * base + alpha * tuned, weight by weight; non-float buffers come from `tuned`.
    Both must have the same weights with the same shapes (one architecture, e.g. a run that
    continued from `base`). modules: only the weights of these top-level modules (e.g.
    "fusion_encoder", "itm_head") are mixed; every other weight stays `base`'s. None: all."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    a, b = base.state_dict(), tuned.state_dict()
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(f"the two models have different weights ({len(only)} not in both, e.g. {only[0]})")
    if modules is not None:
        check_top_level_modules(a, modules, "modules to mix")
    out = {}
    for name, wa in a.items():
        wb = b[name]
        if wa.shape != wb.shape:
            raise ValueError(f"{name}: shape {tuple(wa.shape)} vs {tuple(wb.shape)}: not the same architecture")
        if modules is not None and name.split(".")[0] not in modules:
            out[name] = wa.clone()
        elif wa.is_floating_point():
            out[name] = torch.lerp(wa.float(), wb.float(), alpha).to(wa.dtype)
        else:
            out[name] = wb.clone()
    return out


def retention(metrics: dict, teacher: dict, keys=SELECTION_METRICS) -> dict[str, float]:
    """metric / teacher's, for every key both have (and the teacher's is above zero)."""
    return {k: metrics[k] / teacher[k] for k in keys if k in metrics and teacher.get(k)}


def pick(candidates: dict[float, dict], teacher: dict) -> float:
    """The mixing weight whose smallest retention is largest (ties: the larger weight, more training)."""
    if not candidates:
        raise ValueError("no candidates to pick from")
    return max(candidates, key=lambda a: (min(retention(candidates[a], teacher).values(), default=0.0), a))


def validation_splits(spec, cfg: TrainConfig | None = None):
    """The distillation runs' validation splits (compression.training.load_training_splits: easy-VQA
    val held out of train, scenes val) with captions and retrieval on every scenes-val image."""
    _, vqa, _, captions = load_training_splits(cfg or TrainConfig(), spec)
    return vqa, captions[0]


def merge(
    base_dir: str | Path,
    tuned_dir: str | Path,
    teacher_dir: str | Path,
    alphas: list[float],
    out: str | Path,
    device: str = "cpu",
    rerank_k: int = 16,
    teacher_metrics: str | Path | None = None,
    modules: tuple[str, ...] | None = None,
    log=print,
) -> dict:
    """Evaluate each mixing weight on validation, save the picked one to `out` (fp32, with TUNED's
    config: a continuation may add a head's use, e.g. decoder answers) and merge.json: every
    candidate's metrics, the teacher's, and the pick. modules: mix only these (see interpolate)."""
    from compression.evaluate import evaluate_validation

    out = Path(out)
    base, tuned = load_model_dir(base_dir, device), load_model_dir(tuned_dir, device)
    interpolate(base.model, tuned.model, 0.0, modules)  # one architecture, or a clear error before any evaluation
    vqa, captions = validation_splits(base.preprocessing.image)
    splits = [f"{s.name} ({len(s.samples)} questions)" for s in vqa] + [f"{captions.name} ({len(captions.images)} images)"]
    log(f"validation: {', '.join(splits)}")
    if teacher_metrics is not None:  # an earlier merge.json on the same splits: the teacher is the slow part
        teacher = json.loads(Path(teacher_metrics).read_text())["teacher_metrics"]
    else:
        teacher = evaluate_validation(load_model_dir(teacher_dir, device), vqa, captions, device, rerank_k)
    log(f"teacher: {_brief(teacher)}")
    work = LoadedModel(copy.deepcopy(tuned.model), tuned.tokenizer, tuned.preprocessing)  # base, tuned stay as loaded
    candidates = {}
    for alpha in sorted(set(alphas)):
        work.model.load_state_dict(interpolate(base.model, tuned.model, alpha, modules))
        work.model.eval()
        candidates[alpha] = evaluate_validation(work, vqa, captions, device, rerank_k)
        kept = retention(candidates[alpha], teacher)
        weakest = min(kept, key=kept.get)
        log(f"alpha {alpha}: {_brief(candidates[alpha])}; weakest {weakest} at {kept[weakest]:.1%} of the teacher")
    best = pick(candidates, teacher)
    work.model.load_state_dict(interpolate(base.model, tuned.model, best, modules))
    save_model_dir(out, work.model, work.tokenizer, work.preprocessing, extra_metadata={"merge_alpha": best})
    record = {
        "base": str(base_dir),
        "tuned": str(tuned_dir),
        "teacher": str(teacher_dir),
        "rule": "mixing weight whose smallest metric / teacher's on validation is largest",
        "alpha": best,
        "modules": list(modules) if modules is not None else "all",
        "teacher_metrics": teacher,
        "candidates": {str(a): {"metrics": m, "retention": retention(m, teacher)} for a, m in candidates.items()},
    }
    (out / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"picked alpha {best} ((1 - alpha) x {base_dir} + alpha x {tuned_dir}) -> {out}")
    return record


def _brief(m: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1] if k.startswith('scenes') else k} {m[k]:.4f}" for k in SELECTION_METRICS if k in m)
