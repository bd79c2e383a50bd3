"""Compute levels of a trimmed model: named thresholds calibrated offline (`trimvlm trim`), stored
in the model folder as levels.json, chosen per request by name or by a maximum FLOPs ratio.

Torch-free so the service can read it. levels.json:

    {"levels": {"full": {...}, "balanced": {...}, "fast": {...}},
     "curve": [{"token_threshold", "head_threshold", "flops_ratio", "accuracy", ...}, ...],
     "calibration": {"splits": [...], "questions": N, "rule": "..."}}

A level: {"token_threshold": float | null (null = untrimmed), "head_threshold": float | null,
"flops_ratio": measured mean trimmed/full FLOPs, "accuracy": {split: accuracy}, "min_accuracy"}.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.errors import ServiceError

LEVELS_FILE = "levels.json"
DEFAULT_LEVEL = "balanced"


class LevelError(ServiceError, ValueError):
    """An unknown level name or an unsatisfiable FLOPs budget (422 `invalid_compute`)."""

    field = "compute"

    def __init__(self, message: str):
        super().__init__("invalid_compute", 422, message)


def load_levels(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / LEVELS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def choose_levels(curve: list[dict], full: dict, max_drop: dict[str, float], splits: list[str] | None = None) -> dict[str, dict]:
    """Named levels from a calibration curve: `full` is the untrimmed model; every other name
    takes the cheapest curve point whose accuracy on every split in `splits` (default: every
    calibration split) is within that name's allowed drop of full's. A name no point satisfies
    falls back to the most accurate point that is still trimmed."""
    levels = {"full": full}
    splits = splits or list(full["accuracy"])
    unknown = set(splits) - set(full["accuracy"])
    if unknown:
        raise LevelError(f"no calibration split {sorted(unknown)}; the curve has {sorted(full['accuracy'])}")
    for name, drop in sorted(max_drop.items(), key=lambda kv: kv[1]):
        ok = [p for p in curve if all(p["accuracy"][s] >= full["accuracy"][s] - drop for s in splits)]
        pick = min(ok, key=lambda p: p["flops_ratio"]) if ok else max(curve, key=lambda p: p["min_accuracy"])
        levels[name] = {**pick, "max_drop": drop, "drop_on": splits}
    return levels


def resolve(levels: dict, name: str | None = None, max_flops_ratio: float | None = None) -> tuple[str, dict]:
    """The level to run: by name, or the most accurate calibrated point within a FLOPs budget."""
    if max_flops_ratio is not None:
        if not 0 < max_flops_ratio <= 1:
            raise LevelError(f"max_flops_ratio must be in (0, 1], got {max_flops_ratio}")
        points = [("full", levels["levels"]["full"])] + [(f"ratio<={max_flops_ratio:g}", p) for p in levels["curve"]]
        within = [(n, p) for n, p in points if p["flops_ratio"] <= max_flops_ratio]
        if not within:
            cheapest = min(p["flops_ratio"] for _, p in points)
            raise LevelError(f"no calibrated level runs within {max_flops_ratio:g} of full FLOPs (cheapest: {cheapest:.3f})")
        return max(within, key=lambda np_: (np_[1]["min_accuracy"], -np_[1]["flops_ratio"]))
    name = name or DEFAULT_LEVEL
    if name not in levels["levels"]:
        raise LevelError(f"unknown level {name!r}; this model has {sorted(levels['levels'])}")
    return name, levels["levels"][name]
