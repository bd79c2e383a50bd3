"""The metric-vs-steps report of a distillation run."""

import json

import pytest

from compression.distill_report import build


def test_report_reads_the_last_row_of_a_resumed_step_and_compares_with_the_teacher(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    rows = [
        {"step": 0, "eval": {"scenes_val.accuracy": 0.70, "scenes_val.r1_t2i": 0.30, "scenes_val.vqa_shape": 0.6}},
        {"step": 0, "lr": 1e-4, "total": 3.0, "task": 2.0, "kd": 2.5},
        {"step": 100, "eval": {"scenes_val.accuracy": 0.60, "scenes_val.r1_t2i": 0.10, "scenes_val.vqa_shape": 0.5}},
        # the run was killed after step 100's eval and resumed from an earlier checkpoint: step 100 again
        {"step": 100, "eval": {"scenes_val.accuracy": 0.74, "scenes_val.r1_t2i": 0.32, "scenes_val.vqa_shape": 0.7}},
        {"step": 110, "lr": 1e-4, "total": 2.0, "task": 1.5, "kd": 1.2},
    ]
    (run / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    teacher = {"scenes_val.accuracy": 0.80, "scenes_val.r1_t2i": 0.40, "scenes_val.vqa_shape": 0.9}
    (run / "teacher_eval.json").write_text(json.dumps(teacher))
    r = build(run, out, "scripts/distill_long.sh")
    by_key = {m["key"]: m for m in r["metrics"]}
    acc = by_key["scenes_val.accuracy"]
    assert (acc["initial"], acc["latest"], acc["best_step"]) == (0.70, 0.74, 100)
    assert acc["latest_kept"] == pytest.approx(0.74 / 0.80)
    assert r["eval_steps"] == [0, 100] and r["last_logged_step"] == 110
    assert list(by_key)[:2] == ["scenes_val.accuracy", "scenes_val.r1_t2i"]  # unsaturated metrics first
    md = (out / "REPORT.md").read_text()
    assert "| scenes val VQA accuracy | 0.8000 | 0.7000 | 0.7400 | 87.5% | 92.5% | 0.7400 (100) |" in md
    assert "scripts/distill_long.sh" in md and (out / "curves.png").stat().st_size > 0


def test_report_without_eval_rows_says_so(tmp_path):
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 0, "total": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no eval rows"):
        build(tmp_path, tmp_path / "out", "x")


def test_report_before_the_first_eval_shows_the_starting_points(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    (run / "train_log.jsonl").write_text("")
    ic = {
        "teacher": {"params": 20_000_000, "scenes_val.accuracy": 0.8},
        "existing:models/x": {"params": 7_000_000, "params_vs_teacher": 0.35, "scenes_val.accuracy": 0.7},
        "settings": {"vqa_limit": 2000, "caption_images": 200},
    }
    (out / "init_compare.json").write_text(json.dumps(ic))
    r = build(run, out, "scripts/distill_long.sh")
    md = (out / "REPORT.md").read_text()
    assert r["eval_steps"] == [] and "not reached its first evaluation" in md
    assert "| scenes val VQA accuracy | 0.8000 | 0.7000 (88%) |" in md
    assert "| parameters | 20.00M | 7.00M (35.0%) |" in md
