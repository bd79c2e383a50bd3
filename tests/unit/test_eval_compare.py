"""Paired comparison of two evaluations (compression/eval_compare.py, `trimvlm eval-compare`): per-item
results line up with the metrics, the sign test, both verdict rules, and evaluations that cannot
be paired."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from compression.config_file import ConfigError
from compression.eval_compare import compare, comparison_table, items_path, save_items, sign_test
from compression.evaluate import caption_scores, metric_items
from tests.conftest import REPO


def _write(tmp_path, name, easy, r1, extra=None):
    """An evaluation JSON (as trimvlm eval writes it) with per-item results behind two metrics."""
    easy, r1 = np.asarray(easy, np.float32), np.asarray(r1, np.float32)
    results = {
        "model": name,
        "limit": None,
        "easy_vqa": {"accuracy": float(easy.mean()), "n": len(easy)},
        "scenes": {"r1_i2t": float(r1.mean()), "n_images": len(r1), "chance_r1_i2t": 0.01, **(extra or {})},
        "eval_seconds": 1.0,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(results))
    save_items(path, {"easy_vqa.accuracy": easy, "scenes.r1_i2t": r1})
    return path


def test_sign_test_is_the_exact_binomial_tail():
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # all five one way: 2 x (1/2)^5
    assert sign_test(9, 6) == pytest.approx(2 * sum(math.comb(15, k) for k in range(7)) / 2**15)
    assert sign_test(4, 13) == sign_test(13, 4) < 0.05


def test_items_count_lost_and_won_and_the_rules_differ_on_noise(tmp_path):
    base = _write(tmp_path, "base", [1] * 1000, [1, 0] * 50)
    # easy-VQA: 3 items lost, none won -> lower but within noise; R@1: 20 images lost, none won
    easy = [1] * 1000
    easy[0] = easy[1] = easy[2] = 0
    r1 = [1, 0] * 50
    for i in range(0, 40, 2):
        r1[i] = 0
    cand = _write(tmp_path, "cand", easy, r1)
    strict = compare(base, cand)
    rows = {m.metric: m for m in strict.metrics}
    assert set(rows) == {"easy_vqa.accuracy", "scenes.r1_i2t"}  # counts, timings, chance are not compared
    assert (rows["easy_vqa.accuracy"].lost, rows["easy_vqa.accuracy"].won) == (3, 0)
    assert (rows["scenes.r1_i2t"].lost, rows["scenes.r1_i2t"].won) == (20, 0)
    assert {m.metric for m in strict.worse} == {"easy_vqa.accuracy", "scenes.r1_i2t"}
    tested = compare(base, cand, alpha=0.05)
    assert [m.metric for m in tested.worse] == ["scenes.r1_i2t"]  # 3 / 0: p = 0.25
    table = comparison_table(tested)
    assert "| easy_vqa.accuracy |" in table and "lower, within noise" in table and "worse: scenes.r1_i2t" in table


def test_a_better_candidate_is_not_worse_under_either_rule(tmp_path):
    base = _write(tmp_path, "base", [1, 0] * 10, [0] * 10)
    cand = _write(tmp_path, "cand", [1, 1] * 10, [1] * 10)
    assert not compare(base, cand).worse and not compare(base, cand, 0.05).worse
    assert "no metric is worse" in comparison_table(compare(base, cand))


def test_without_items_drops_count_under_both_rules(tmp_path):
    base = _write(tmp_path, "base", [1] * 10, [1] * 10)
    cand = _write(tmp_path, "cand", [1] * 9 + [0], [1] * 10)
    items_path(cand).unlink()
    row = next(m for m in compare(base, cand, alpha=0.05).metrics if m.metric == "easy_vqa.accuracy")
    assert row.lost is None and row.p is None and row.worse


def test_evaluations_of_different_items_are_refused(tmp_path):
    base = _write(tmp_path, "base", [1] * 10, [1] * 10)
    shorter = _write(tmp_path, "short", [1] * 9, [1] * 10)
    with pytest.raises(ConfigError, match="not the same test set"):
        compare(base, shorter)
    limited = tmp_path / "limited.json"
    limited.write_text(json.dumps({**json.loads(base.read_text()), "limit": 5}))
    with pytest.raises(ConfigError, match="different items"):
        compare(base, limited)
    with pytest.raises(ConfigError, match="no such evaluation"):
        compare(base, tmp_path / "missing.json")
    broken = _write(tmp_path, "broken", [1] * 10, [1] * 10)
    items_path(broken).write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="unreadable per-item results"):
        compare(base, broken)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        compare(base, tmp_path / "bad.json")
    other = _write(tmp_path, "other", [1] * 10, [1] * 10)
    for path, digest in ((base, "a1"), (other, "b2")):
        with np.load(items_path(path)) as data:
            save_items(path, {**{k: data[k] for k in data.files}, "easy_vqa.items_digest": np.array(digest)})
    with pytest.raises(ConfigError, match="different test items"):
        compare(base, other)
    with pytest.raises(ConfigError, match="alpha"):
        compare(base, base, alpha=1.5)


def test_metric_items_average_to_the_metrics():
    """The per-item arrays are what each metric averages: per question, per type, per query."""
    ranks = np.array([0, 3, 7, 12])
    items = metric_items(
        {
            "accuracy": np.array([1.0, 0.0, 1.0, 1.0], np.float32),
            "generative_accuracy": np.array([1.0, 0.0, 0.0, 1.0], np.float32),
            "question_type": np.array(["all"] * 4),
        },
        {
            "accuracy": np.array([1.0, 0.0, 1.0], np.float32),
            "question_type": np.array(["color", "shape", "color"]),
            "rank_i2t": ranks,
            "rank_t2i_rerank": ranks,
        },
    )
    assert items["easy_vqa.accuracy"].mean() == 0.75 and items["easy_vqa.generative_accuracy"].mean() == 0.5
    assert "scenes.vqa_generative_accuracy" not in items  # not measured there
    assert items["scenes.vqa_accuracy"].mean() == pytest.approx(2 / 3)
    assert list(items["scenes.vqa_color"]) == [1.0, 1.0] and list(items["scenes.vqa_shape"]) == [0.0]
    assert [items[f"scenes.r{k}_i2t"].mean() for k in (1, 5, 10)] == [0.25, 0.5, 0.75]
    assert items["scenes.r1_t2i_rerank"].mean() == 0.25


def test_per_image_cider_averages_to_the_corpus_score():
    refs = {0: ["a red circle", "a red round circle"], 1: ["a blue square"], 2: ["two green triangles"]}
    preds = {0: "a red circle", 1: "a green square", 2: "two triangles"}
    items: dict = {}
    scores = caption_scores(preds, refs, items)
    assert items["cider"].shape == (3,) and items["cider"].mean() == pytest.approx(scores["cider"], rel=1e-5)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_exit_codes_follow_the_verdict(tmp_path):
    base = _write(tmp_path, "base", [1] * 100, [1] * 100)
    cand = _write(tmp_path, "cand", [1] * 99 + [0], [1] * 100)
    strict = _cli("eval-compare", str(base), str(cand), "--json", str(tmp_path / "cmp.json"))
    assert strict.returncode == 1, strict.stderr
    assert json.loads((tmp_path / "cmp.json").read_text())["worse"] == ["easy_vqa.accuracy"]
    tested = _cli("eval-compare", str(base), str(cand), "--alpha", "0.05")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    missing = _cli("eval-compare", str(base), str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "no such evaluation" in missing.stderr and "Traceback" not in missing.stderr
