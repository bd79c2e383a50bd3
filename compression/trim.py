"""`trimvlm trim`: train token and head trimmers on a student (task loss on the trimmed pass,
self-distillation from the untrimmed pass, a FLOPs-ratio cost with a curriculum), then evaluate
trim settings and calibrate the named compute levels (levels.json).

The trimmed forward pass and its FLOPs count are compression/trimmed.py.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from compression import data as D
from compression.artifacts import load_model_dir
from compression.distill import kl_logits
from compression.modeling import Trimmers, TrimVLM
from compression.training import (
    TrainConfig,
    adopt_image_spec,
    end_run,
    fit,
    load_data_for,
    normalize_on_device,
    save_run,
    start_run,
    task_forward,
    task_losses,
    weighted_sum,
)
from compression.trimmed import Trim, flops_ratio, trimmed_vqa_forward
from service.levels import Level, Levels, choose_levels, save_levels
from service.preprocess import encode_texts

# ----------------------------------------------------------------------------------------------
# Training: `trimvlm trim`
# ----------------------------------------------------------------------------------------------


@dataclass
class TrimConfig(TrainConfig):
    out: str = "runs/trim"
    student: str = "runs/prune-flops-0.55/model"  # the pruned student `make compress` writes
    hidden: int = 32  # trimmer MLP width (d' ; keeps the trimmers under 2% of the FLOPs)
    target_flops: float = 0.3  # beta: the trimmed / full FLOPs ratio the cost drives towards
    curriculum_fraction: float = 0.3  # beta anneals 1 -> target over this part of training
    cost_weight: float = 10.0  # lambda_c in lambda_c * (mean ratio - beta)^2
    sd_weight: float = 1.0  # self-distillation KL(full || trimmed) on the VQA classifier
    task_weight: float = 1.0
    # task loss on the untrimmed pass too, when the backbone trains: it must stay a good full
    # model (the `full` level) while it learns to work trimmed
    full_task_weight: float = 1.0
    # which task losses the untrimmed pass carries: vqa, or all (VQA, ITC, ITM, captioning on the
    # caption batch, with loss_weights) so joint training cannot drift the other tasks' weights
    full_tasks: str = "vqa"
    temperature: float = 1.0
    tau_start: float = 1.0  # Gumbel temperature, annealed geometrically
    tau_end: float = 0.1
    trimmer_lr: float = 1e-3  # the token trimmers' own rate; `lr` is the backbone's (0 freezes it)
    # head trimmers learn slower: one vision head costs as much as a dozen image tokens, so the
    # FLOPs cost pulls hardest on heads, whose loss hurts accuracy most
    head_trimmer_lr: float = 1e-5
    # initial keep-logits: tokens start near the decision boundary so Gumbel sampling explores
    # dropping them early; heads start firmly kept (sigmoid(3) = 0.95)
    token_keep_init: float = 1.0
    head_keep_init: float = 3.0
    # a student that already has trimmers (an earlier `trimvlm trim` output) keeps them and goes on
    # training them, unless this is set
    reinit_trimmers: bool = False
    # calibration of compute levels on the validation splits
    thresholds: list = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    level_drops: dict = field(default_factory=lambda: {"balanced": 0.005, "fast": 0.02})
    calibration_limit: int | None = None  # questions per validation split (tests)


class TrimObjective(nn.Module):
    """Task loss on the trimmed pass + self-distillation from the untrimmed pass of the same
    weights + the FLOPs-ratio cost against the curriculum target."""

    def __init__(self, model: TrimVLM, trimmers: nn.Module, cfg: TrimConfig):
        super().__init__()
        if cfg.full_tasks not in ("vqa", "all"):
            raise ValueError(f"full_tasks must be vqa or all, got {cfg.full_tasks!r}")
        self.model, self.trimmers, self.cfg = model, trimmers, cfg

    def schedule(self, step: int) -> tuple[float, float]:
        c = self.cfg
        frac = step / max(1, c.steps - 1)
        tau = c.tau_start * (c.tau_end / c.tau_start) ** frac
        beta = 1 - (1 - c.target_flops) * min(1.0, step / max(1, c.curriculum_fraction * c.steps))
        return tau, beta

    def forward(self, vqa: dict, cap: dict, step: int = 0) -> dict[str, torch.Tensor]:
        c = self.cfg
        tau, beta = self.schedule(step)
        args = (vqa["pixels"], vqa["q_ids"], vqa["q_mask"])
        train_full = c.lr > 0 and c.full_task_weight > 0
        with torch.set_grad_enabled(train_full):
            if train_full and c.full_tasks == "all":
                out = task_forward(self.model, vqa, cap)
                full = out.vqa_logits
                full_task = weighted_sum(task_losses(out, vqa, cap), c.loss_weights)
            else:
                full, _ = trimmed_vqa_forward(self.model, *args, Trim(enabled=False))
                full_task = F.cross_entropy(full.float(), vqa["answer"]) if train_full else full.new_zeros(())
        full = full.detach()
        logits, trace = trimmed_vqa_forward(self.model, *args, Trim(mode="train", tau=tau), self.trimmers)
        ratio = flops_ratio(self.model.config, trace)
        task = F.cross_entropy(logits.float(), vqa["answer"])
        sd = kl_logits(logits, full, c.temperature)
        cost = (ratio.mean() - beta) ** 2
        total = c.task_weight * task + c.sd_weight * sd + c.cost_weight * cost + c.full_task_weight * full_task
        image = torch.stack(trace.vision_tokens).mean(0).mean() / self.model.config.num_image_tokens
        return {
            "total": total,
            "vqa": task,
            "vqa_full": full_task.detach(),
            "self_distill": sd,
            "cost": cost,
            "flops_ratio": ratio.mean().detach(),
            "beta": torch.tensor(beta),
            "tau": torch.tensor(tau),
            "image_kept": image.detach(),
        }


# ----------------------------------------------------------------------------------------------
# Evaluation and calibration of compute levels
# ----------------------------------------------------------------------------------------------


@dataclass
class TrimEval:
    accuracy: float
    flops_ratio: float  # mean over questions of trimmed / full FLOPs
    ratios: np.ndarray  # per question
    image_kept: np.ndarray  # image tokens reaching the fusion encoder, per question
    text_kept: np.ndarray  # question tokens reaching the classifier, per question
    image_keep: np.ndarray  # [Q, N_img] kept-image-token masks (original positions)
    correct: np.ndarray
    predictions: list[str]  # the classifier's answer per question

    def summary(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "flops_ratio": round(self.flops_ratio, 4), "n": len(self.correct)}


@torch.no_grad()
def evaluate_trimmed(model: TrimVLM, split, tok, pre, device, trim: Trim, batch: int = 256) -> TrimEval:
    """VQA accuracy (VQAv2 metric) and measured FLOPs of one trim setting on a split."""
    model.eval()
    answers = model.config.answers
    ratios, img, txt, keeps, correct, predictions = [], [], [], [], [], []
    for start in range(0, len(split.samples), batch):
        chunk = split.samples[start : start + batch]
        ids, mask = encode_texts(tok, [s.question for s in chunk], pre.max_text_length)
        ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device).bool()
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length], mask[:, :length]
        pixels = normalize_on_device(torch.from_numpy(split.images[[s.image for s in chunk]]).to(device), pre.image)
        logits, trace = trimmed_vqa_forward(model, pixels, ids, mask, trim)
        ratios.append(flops_ratio(model.config, trace).cpu())
        n_text = trace.text_len
        img.append((trace.image_kv if trim.enabled else torch.full_like(n_text, model.config.num_image_tokens)).cpu())
        txt.append((trace.fusion_tokens[-1] if trim.enabled else n_text).cpu())
        keeps.append(trace.image_keep.cpu())
        for s, p in zip(chunk, logits.argmax(-1).tolist(), strict=True):
            predictions.append(answers[p])
            correct.append(D.vqa_accuracy(answers[p], s.answers))
    ratio = torch.cat(ratios).numpy()
    return TrimEval(
        accuracy=float(np.mean(correct)),
        flops_ratio=float(ratio.mean()),
        ratios=ratio,
        image_kept=torch.cat(img).numpy(),
        text_kept=torch.cat(txt).numpy(),
        image_keep=torch.cat(keeps).numpy().astype(bool),
        correct=np.array(correct),
        predictions=predictions,
    )


def sweep_point(model, splits, tok, pre, device, threshold: float | None) -> Level:
    """One calibration point: accuracy per split and FLOPs ratio over all their questions.
    threshold None = untrimmed. Bucketed gather: the mask-mode results, faster."""
    trim = Trim(mode="gather", token_threshold=threshold or 0.5, head_threshold=threshold or 0.5, enabled=threshold is not None)
    evals = {s.name: evaluate_trimmed(model, s, tok, pre, device, trim) for s in splits}
    all_ratios = np.concatenate([e.ratios for e in evals.values()])
    acc = {k: round(e.accuracy, 4) for k, e in evals.items()}
    return Level(
        token_threshold=threshold,
        head_threshold=threshold,
        flops_ratio=round(float(all_ratios.mean()), 4),
        accuracy=acc,
        min_accuracy=min(acc.values()),
    )


def calibrate(model, splits, tok, pre, device, thresholds, level_drops: dict) -> Levels:
    """Compute levels on validation splits: sweep the thresholds, then name levels (levels.py)."""
    full = sweep_point(model, splits, tok, pre, device, None).model_copy(update={"flops_ratio": 1.0})
    curve = [sweep_point(model, splits, tok, pre, device, t) for t in thresholds]
    rule = "cheapest threshold whose accuracy on every calibration split is within the level's max_drop of full"
    return Levels(
        levels=choose_levels(curve, full, level_drops),
        curve=curve,
        calibration={"splits": [s.name for s in splits], "questions": sum(len(s.samples) for s in splits), "rule": rule},
    )


def trim(cfg: TrimConfig, resume: bool = True) -> Path:
    """Train trimmers on a student, calibrate compute levels, save under <out>/model."""
    ctx = start_run(cfg)
    lm = load_model_dir(cfg.student, ctx.device)
    model = lm.model
    adopt_image_spec(ctx, cfg, lm.preprocessing.image, "student")
    if model.trimmers is not None and not cfg.reinit_trimmers:
        trimmers, model.trimmers = model.trimmers, None  # continue an earlier trimming run
    else:
        model.config.trimming = {"hidden": cfg.hidden}
        model.trimmers = None
        trimmers = Trimmers(model.config).to(ctx.device)
        trimmers.set_keep_init(cfg.token_keep_init, cfg.head_keep_init)
    if cfg.lr == 0:
        model.requires_grad_(False)
    objective = TrimObjective(model, trimmers, cfg)
    data, vqa_val = load_data_for(cfg, ctx, lm.tokenizer, model.config.answers, model.config.bos_token_id)
    heads = [p for n, p in trimmers.named_parameters() if "_heads." in n]
    tokens = [p for n, p in trimmers.named_parameters() if "_heads." not in n]
    group = [
        {"params": tokens, "lr": cfg.trimmer_lr, "weight_decay": 0.0},
        {"params": heads, "lr": cfg.head_trimmer_lr, "weight_decay": 0.0},
    ]
    fit(cfg, ctx, model, objective, data, lm.tokenizer, vqa_val, resume, group, log_name="trim_log.jsonl")
    model.trimmers = trimmers
    model.eval()
    splits = [s.limit(cfg.calibration_limit) for s in vqa_val] if cfg.calibration_limit else vqa_val
    levels = calibrate(model, splits, lm.tokenizer, lm.preprocessing, ctx.device, cfg.thresholds, cfg.level_drops)
    final = save_run(cfg, ctx, model, lm.tokenizer)
    if ctx.is_main:
        save_levels(final, levels)
        (ctx.out / "trim_config.yaml").write_text(yaml.safe_dump(cfg.__dict__, sort_keys=False))
        if (ctx.out / "trim_log.jsonl").is_file():  # none when steps is 0 (calibration only)
            shutil.copy(ctx.out / "trim_log.jsonl", final / "trim_log.jsonl")
    end_run(ctx)
    return final
