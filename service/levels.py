"""Compute levels of a trimmed model: named thresholds calibrated offline (`trimvlm trim`), stored
in the model folder as levels.json (and in its manifest), chosen per request by name or by a
maximum FLOPs ratio.

Torch-free so the service can read it. levels.json:

    {"levels": {"full": {...}, "balanced": {...}, "fast": {...}},
     "curve": [{"token_threshold", "head_threshold", "flops_ratio", "accuracy", ...}, ...],
     "calibration": {"splits": [...], "questions": N, "rule": "..."}}

Each level and curve point is a Level, from calibration (compression/trim.py) through the
manifest to the response's `compute`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from service.errors import ServiceError

LEVELS_FILE = "levels.json"
DEFAULT_LEVEL = "balanced"


class LevelError(ServiceError, ValueError):
    """An unknown level name or an unsatisfiable FLOPs budget (422 `invalid_compute`)."""

    field = "compute"

    def __init__(self, message: str):
        super().__init__("invalid_compute", 422, message)


class Level(BaseModel):
    """One compute level, or one point of the calibration curve."""

    model_config = ConfigDict(frozen=True)

    token_threshold: float | None = None  # None: untrimmed
    head_threshold: float | None = None
    flops_ratio: float = 1.0  # measured mean trimmed/full FLOPs
    accuracy: dict[str, float] = Field(default_factory=dict)  # per calibration split
    min_accuracy: float | None = None  # the lowest of `accuracy`
    max_drop: float | None = None  # named trimmed levels: the accuracy drop from full it was chosen within
    drop_on: list[str] | None = None  # ... on these splits

    @property
    def trimmed(self) -> bool:
        return self.token_threshold is not None

    @model_serializer(mode="wrap")
    def _as_stored(self, handler):
        """levels.json's format: a point without a drop (full, the curve) has no max_drop/drop_on keys."""
        out = handler(self)
        for key in ("min_accuracy", "max_drop", "drop_on"):
            if out.get(key, 0) is None:
                del out[key]
        return out


FULL = Level()  # an untrimmed model's only level


class Levels(BaseModel):
    """levels.json: the named levels, the calibration curve they were chosen from, and how."""

    levels: dict[str, Level]
    curve: list[Level] = Field(default_factory=list)
    calibration: dict = Field(default_factory=dict)


def load_levels(model_dir: str | Path) -> Levels | None:
    path = Path(model_dir) / LEVELS_FILE
    return Levels.model_validate_json(path.read_text()) if path.is_file() else None


def save_levels(model_dir: str | Path, levels: Levels) -> Path:
    path = Path(model_dir) / LEVELS_FILE
    path.write_text(json.dumps(levels.model_dump(mode="json"), indent=2) + "\n")
    return path


def choose_levels(
    curve: list[Level], full: Level, max_drop: dict[str, float], splits: list[str] | None = None
) -> dict[str, Level]:
    """Named levels from a calibration curve: `full` is the untrimmed model; every other name
    takes the cheapest curve point whose accuracy on every split in `splits` (default: every
    calibration split) is within that name's allowed drop of full's. A name no point satisfies
    falls back to the most accurate point that is still trimmed."""
    levels = {"full": full}
    splits = splits or list(full.accuracy)
    unknown = set(splits) - set(full.accuracy)
    if unknown:
        raise LevelError(f"no calibration split {sorted(unknown)}; the curve has {sorted(full.accuracy)}")
    for name, drop in sorted(max_drop.items(), key=lambda kv: kv[1]):
        ok = [p for p in curve if all(p.accuracy[s] >= full.accuracy[s] - drop for s in splits)]
        pick = min(ok, key=lambda p: p.flops_ratio) if ok else max(curve, key=lambda p: p.min_accuracy or 0.0)
        levels[name] = pick.model_copy(update={"max_drop": drop, "drop_on": splits})
    return levels


def resolve(levels: dict[str, Level], name: str | None = None, max_flops_ratio: float | None = None) -> tuple[str, Level]:
    """The one rule for which named level runs: `name` (default: balanced where there is one, else
    full), or, for a FLOPs budget, the named level with the most compute within it (levels are
    calibrated so that more compute is at least as accurate; ties go to the more accurate).
    Only named levels: each runs through its own batcher in the service."""
    if max_flops_ratio is not None:
        if not 0 < max_flops_ratio <= 1:
            raise LevelError(f"max_flops_ratio must be in (0, 1], got {max_flops_ratio}")
        within = [n for n, lv in levels.items() if lv.flops_ratio <= max_flops_ratio]
        if not within:
            cheapest = min(lv.flops_ratio for lv in levels.values())
            raise LevelError(f"no compute level runs within {max_flops_ratio:g} of full FLOPs (the cheapest: {cheapest:.3f})")
        best = max(within, key=lambda n: (levels[n].flops_ratio, levels[n].min_accuracy or 0.0))
        return best, levels[best]
    if name is None:
        name = DEFAULT_LEVEL if DEFAULT_LEVEL in levels else "full"
    if name not in levels:
        raise LevelError(f"unknown compute level {name!r}; this model has {sorted(levels)}")
    return name, levels[name]
