"""Calibrating the re-ranking weight: the sweep re-ranks the same candidates under each weight, the
pick maximises R@1 both ways (the smaller weight on a tie), and bad input is refused in one line."""

import json

import numpy as np
import pytest

from compression import data as D
from compression.evaluate import encode_split, evaluate_retrieval, rerank_candidates
from compression.rerank import calibrate, parse_grid, pick, sweep, sweep_table
from tests.unit.test_evaluate import _Unsure


def _split(n=6):
    image_emb = np.eye(n, dtype=np.float32)
    text_emb = (np.eye(n) + 0.3 * np.roll(np.eye(n), 1, axis=1)).astype(np.float32)
    texts = [f"caption {j}" for j in range(n)]
    images = np.zeros((n, 1, 1, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return _Unsure(image_emb, text_emb, texts), D.CaptionSplit("blend", images, list(range(n)), [[t] for t in texts])


def test_the_sweep_agrees_with_the_evaluation_at_every_weight_and_picks_the_best():
    tasks, split = _split()
    cand = rerank_candidates(tasks, encode_split(tasks, split), 2)
    rows = sweep(cand, (0.0, 0.1, 1.0, 5.0))
    for row in rows:
        direct = evaluate_retrieval(tasks, split, rerank_k=2, rerank_itc_weight=row["itc_weight"])
        assert row["r1_t2i"] == round(direct["r1_t2i_rerank"], 4) and row["r1_i2t"] == round(direct["r1_i2t_rerank"], 4)
    assert rows[0]["r1_t2i"] < 1.0 and pick(rows)["itc_weight"] == 1.0  # 0.1 is too little, 1 and 5 both fix it: the smaller wins
    table = sweep_table({"itc_weight": 1.0, "itc_only": rows[-1], "sweep": rows})
    assert "| **1** |" in table and "(ITM alone)" in table


def test_pick_prefers_the_highest_sum_then_the_smallest_weight():
    rows = [
        {"itc_weight": 0.0, "r1_i2t": 0.6, "r1_t2i": 0.30},
        {"itc_weight": 2.0, "r1_i2t": 0.6, "r1_t2i": 0.32},
        {"itc_weight": 5.0, "r1_i2t": 0.59, "r1_t2i": 0.33},
        {"itc_weight": 10.0, "r1_i2t": 0.58, "r1_t2i": 0.33},
    ]
    assert pick(rows)["itc_weight"] == 2.0


@pytest.mark.parametrize("text", ["", "a,b", "1,-2", "nan", "1,inf"])
def test_bad_grids_are_refused(text):
    with pytest.raises(ValueError, match="--grid"):
        parse_grid(text)
    assert parse_grid("0, 0.5,2") == (0.0, 0.5, 2.0)


def test_calibrate_refuses_exported_folders_and_tiny_k(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="exported folder"):
        calibrate(tmp_path)
    with pytest.raises(ValueError, match="rerank_k"):
        calibrate(tmp_path / "nowhere", rerank_k=1)


def test_a_bad_rerank_json_is_a_clear_error(tmp_path):
    from compression.artifacts import load_rerank_weight
    from compression.config_file import ConfigError

    assert load_rerank_weight(tmp_path) == 0.0  # none: the ITM head alone
    (tmp_path / "rerank.json").write_text(json.dumps({"itc_weight": 2.5}))
    assert load_rerank_weight(tmp_path) == 2.5
    for bad in ({"itc_weight": -1}, {"itc_weight": "2"}, {"itc_weight": True}, {}, [2.0]):
        (tmp_path / "rerank.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="itc_weight"):
            load_rerank_weight(tmp_path)
    (tmp_path / "rerank.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON object"):
        load_rerank_weight(tmp_path)


def test_pick_keeps_both_directions_at_or_above_itc_alone_when_it_can():
    rows = [
        {"itc_weight": 5.0, "r1_i2t": 0.86, "r1_t2i": 0.439},  # highest sum, but text->image below ITC alone
        {"itc_weight": 20.0, "r1_i2t": 0.834, "r1_t2i": 0.4464},
        {"itc_weight": 50.0, "r1_i2t": 0.82, "r1_t2i": 0.4476},  # image->text below ITC alone
    ]
    itc_only = {"r1_i2t": 0.824, "r1_t2i": 0.4456}
    assert pick(rows)["itc_weight"] == 5.0
    assert pick(rows, itc_only)["itc_weight"] == 20.0
    assert pick(rows, {"r1_i2t": 0.9, "r1_t2i": 0.5})["itc_weight"] == 5.0  # no weight reaches it: the sum decides
