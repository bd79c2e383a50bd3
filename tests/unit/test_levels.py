"""Compute levels (service/levels.py): typed from calibration to the manifest, one rule for names
and FLOPs budgets, and levels.json's format kept."""

import json
from pathlib import Path

import pytest

from service.levels import FULL, Level, LevelError, Levels, choose_levels, load_levels, resolve, save_levels

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "models" / "trimvlm-default" / "1"


def levels_fixture() -> tuple[Level, list[Level]]:
    full = Level(token_threshold=None, flops_ratio=1.0, accuracy={"a": 0.90, "b": 0.80}, min_accuracy=0.80)
    curve = [
        Level(token_threshold=0.3, head_threshold=0.3, flops_ratio=0.6, accuracy={"a": 0.90, "b": 0.80}, min_accuracy=0.80),
        Level(token_threshold=0.5, head_threshold=0.5, flops_ratio=0.4, accuracy={"a": 0.899, "b": 0.797}, min_accuracy=0.797),
        Level(token_threshold=0.7, head_threshold=0.7, flops_ratio=0.3, accuracy={"a": 0.90, "b": 0.77}, min_accuracy=0.77),
        Level(token_threshold=0.9, head_threshold=0.9, flops_ratio=0.2, accuracy={"a": 0.85, "b": 0.70}, min_accuracy=0.70),
    ]
    return full, curve


def test_levels_keep_their_accuracy_promise_on_every_split():
    full, curve = levels_fixture()
    levels = choose_levels(curve, full, {"balanced": 0.005, "fast": 0.05})
    assert levels["balanced"].token_threshold == 0.5  # 0.7 is fine on "a" but drops 3 points on "b"
    assert levels["fast"].token_threshold == 0.7
    assert levels["full"].flops_ratio == 1.0
    assert (levels["fast"].max_drop, levels["fast"].drop_on) == (0.05, ["a", "b"])
    with pytest.raises(LevelError):
        choose_levels(curve, full, {"fast": 0.05}, ["c"])


def test_resolve_by_name_or_flops_budget():
    full, curve = levels_fixture()
    levels = choose_levels(curve, full, {"balanced": 0.005, "fast": 0.05})
    assert resolve(levels)[0] == "balanced"
    assert resolve({"full": FULL})[0] == "full"  # an untrimmed model's only level
    assert resolve(levels, "fast")[1].token_threshold == 0.7
    # a budget picks among the named levels (each has its own batcher): the most compute within it
    assert resolve(levels, max_flops_ratio=0.45) == ("balanced", levels["balanced"])
    assert resolve(levels, max_flops_ratio=0.35)[0] == "fast"
    assert resolve(levels, max_flops_ratio=1.0)[0] == "full"
    for name, budget in (("turbo", None), ("", None), (None, 0.1), (None, 0), (None, 1.5)):
        with pytest.raises(LevelError) as e:
            resolve(levels, name, budget)
        assert (e.value.code, e.value.status, e.value.field) == ("invalid_compute", 422, "compute")


def test_the_server_and_the_model_resolve_alike():
    """ModelServer.pick_level (the service) and TaskModel.resolve_level (eval, benchmarks) are one rule."""
    from service.server import ModelServer

    full, curve = levels_fixture()
    srv = ModelServer.__new__(ModelServer)
    srv.levels = choose_levels(curve, full, {"balanced": 0.005, "fast": 0.05})
    for budget in (0.2, 0.3, 0.35, 0.45, 0.99, 1.0):
        try:
            expected = resolve(srv.levels, max_flops_ratio=budget)[0]
        except LevelError:
            with pytest.raises(LevelError):
                srv.pick_level({"max_flops_ratio": budget}, None)
            continue
        assert srv.pick_level({"max_flops_ratio": budget}, None) == (expected, "max_flops_ratio")
    assert srv.pick_level("fast", 1.0) == ("fast", "requested")


def test_committed_levels_load_typed_and_write_back_unchanged(tmp_path):
    from service.repository import load_manifest

    m = load_manifest(DEFAULT)
    assert isinstance(m.levels, Levels) and all(isinstance(lv, Level) for lv in m.levels.levels.values())
    stored = json.loads((DEFAULT / "manifest.json").read_text())["levels"]
    assert m.levels.model_dump(mode="json") == stored  # no keys added (max_drop/drop_on only where chosen)
    save_levels(tmp_path, m.levels)
    assert json.loads((tmp_path / "levels.json").read_text()) == stored
    assert load_levels(tmp_path) == m.levels
    assert load_levels(tmp_path / "nowhere") is None
