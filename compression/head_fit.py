"""The loop shared by the fits that train a few modules of an otherwise frozen model
(compression/text_pool.py, compression/itm_fit.py): one-cycle AdamW on those modules only, an
evaluation every `eval_every` steps with step 0 (the model as it was) included, and the weights of
the evaluation `keep` chooses restored at the end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def fit_frozen(
    model: nn.Module,
    trainable: dict[str, nn.Module],
    loss: Callable[[], torch.Tensor],
    evaluate: Callable[[], dict],
    keep: Callable[[list[dict]], dict],
    history: list,
    steps: int,
    lr: float,
    weight_decay: float,
    eval_every: int,
) -> nn.Module:
    """Train the modules of `trainable` (top-level names -> modules of `model`) on `loss()` (one
    batch per call); `evaluate()` returns the metrics appended to `history` with their step."""
    params = [p for module in trainable.values() for p in module.parameters()]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    kept: dict = {}

    def record(step: int) -> None:
        history.append({"step": step, **evaluate()})
        if keep(history) is history[-1]:
            kept.clear()
            for name, module in trainable.items():
                kept.update({k: v.clone() for k, v in module.state_dict(prefix=f"{name}.").items()})

    record(0)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            record(step)
    model.load_state_dict(kept, strict=False)
    model.requires_grad_(False)
    return model


def copy_levels(src_dir: str | Path, out: str | Path) -> None:
    """Carry a model folder's calibrated levels to a fit's output: the fits leave the VQA path
    the levels calibrate unchanged."""
    src = Path(src_dir) / "levels.json"
    if src.is_file():
        (Path(out) / "levels.json").write_text(src.read_text())
