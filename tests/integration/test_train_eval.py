"""A short training run on the tiny config, resume, evaluation through the CLI, and the
committed teacher's sanity on a few items (the full figures live in its model card)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compression.train import TrainConfig, train
from tests.conftest import REPO, TEACHER_DIR


def tiny(tmp_path: Path, **kw) -> TrainConfig:
    cfg = TrainConfig.from_yaml(REPO / "configs" / "tiny.yaml", out=str(tmp_path / "run"))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["total"] for r in rows if "total" in r]


def test_short_training_run_lowers_the_loss(tmp_path):
    cfg = tiny(tmp_path, steps=60, log_every=1, checkpoint_every=0)
    final = train(cfg, resume=False)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()


def test_training_resumes_from_its_checkpoint(tmp_path):
    train(tiny(tmp_path, steps=10, checkpoint_every=5), resume=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert ckpt.is_file()
    import torch

    assert torch.load(ckpt, weights_only=False)["step"] == 10
    train(tiny(tmp_path, steps=16, checkpoint_every=5, log_every=1), resume=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    resumed_steps = [r["step"] for r in rows if "total" in r][-6:]
    assert resumed_steps == list(range(10, 16))


def test_eval_cli_writes_the_contracted_json_keys(tmp_path):
    final = train(tiny(tmp_path, steps=5, checkpoint_every=0), resume=False)
    out = tmp_path / "eval.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "service", "eval", str(final), "--limit", "20", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for section, key in [
        ("easy_vqa", "accuracy"),
        ("scenes", "vqa_accuracy"),
        ("scenes", "bleu4"),
        ("scenes", "cider"),
        ("scenes", "r1_i2t"),
        ("scenes", "r1_t2i"),
        ("scenes", "r1_i2t_rerank"),  # the ITC top-16 re-ranked by ITM
        ("scenes", "r1_t2i_rerank"),
    ]:
        value = res[section][key]
        assert 0.0 <= value <= 10.0, (section, key, value)
    assert res["easy_vqa"]["n"] == 20 and res["scenes"]["vqa_n"] == 20
    assert "easy-VQA test accuracy" in proc.stdout


def test_training_runs_under_torchrun_with_ddp(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "compression.cli",
        "train",
        str(REPO / "configs" / "tiny.yaml"),
        "--steps",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-resume",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("model written to") == 1  # only rank 0 writes
    assert (out / "model" / "model.safetensors").is_file()


def test_train_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_yaml(bad)


def test_committed_teacher_loads_and_answers(tmp_path):
    from compression.evaluate import evaluate

    cfg = json.loads((TEACHER_DIR / "config.json").read_text())
    assert cfg["role"] == "teacher"
    res = evaluate(TEACHER_DIR, limit=200, include_scenes=False)
    assert res["easy_vqa"]["accuracy"] >= 0.97
    card = (TEACHER_DIR / "MODEL_CARD.md").read_text()
    assert "trimvlm train configs/teacher.yaml" in card


def test_committed_student_is_a_pruned_smaller_model_that_answers():
    from compression.artifacts import load_model_dir
    from compression.evaluate import evaluate
    from compression.flops import count_params

    student_dir = REPO / "models" / "trimvlm-student" / "6"
    student, teacher = load_model_dir(student_dir).model, load_model_dir(TEACHER_DIR).model
    assert student.config.role == "student"
    assert count_params(student)["total"] <= 0.35 * count_params(teacher)["total"]
    assert max(student.config.vision_mlp) < teacher.config.vision_mlp[0]  # sliced, not masked
    res = evaluate(student_dir, limit=200, include_scenes=False)
    assert res["easy_vqa"]["accuracy"] >= 0.97


def test_distill_prune_and_eval_a_tiny_teacher(tmp_path):
    """The whole offline compression path on a 2-layer tiny teacher: distil to 1 layer per stack,
    prune with the Lagrangian, slice, fine-tune, and evaluate the result through the CLI."""
    import dataclasses

    import torch

    from compression.artifacts import load_model_dir
    from compression.distill import DistillConfig, distill
    from compression.flops import count_params
    from compression.prune import PruneConfig, prune

    two = {k: [2, 2] for k in ("vision_heads", "text_heads", "fusion_self_heads", "fusion_cross_heads")}
    two |= {k: [2, 2] for k in ("decoder_self_heads", "decoder_cross_heads")}
    two |= {k: [64, 64] for k in ("vision_mlp", "text_mlp", "fusion_mlp", "decoder_mlp")}
    base = tiny(tmp_path, steps=20, checkpoint_every=0)
    base.model = {**base.model, **two}
    teacher = train(base, resume=False)
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig)} | {"model": {}}
    student = distill(DistillConfig(**common | {"out": str(tmp_path / "distill"), "teacher": str(teacher), "steps": 8}))
    s_cfg = load_model_dir(student).model.config
    assert s_cfg.layer_counts == {"vision": 1, "text": 1, "fusion": 1, "decoder": 1} and s_cfg.role == "student"
    rows = [json.loads(line) for line in (tmp_path / "distill" / "train_log.jsonl").read_text().splitlines()]
    assert "kl_vqa" in rows[0] and "fusion_cross_attn" in rows[0]

    # continuing it with train_modules moves only the named module's weights
    only_itm = {"out": str(tmp_path / "itm-only"), "teacher": str(teacher), "init": str(student), "steps": 3}
    tuned = distill(DistillConfig(**common | only_itm | {"train_modules": ["itm_head"], "lr": 1e-2}))
    before, after = load_model_dir(student).model.state_dict(), load_model_dir(tuned).model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"itm_head"}

    pcfg = PruneConfig(
        **common
        | {"out": str(tmp_path / "prune"), "teacher": str(teacher), "student": str(student), "log_every": 1}
        | {"target_sparsity": 0.5, "prune_steps": 40, "finetune_steps": 4, "reg_lr": 0.2, "head_init": 2.0}
    )
    pruned = prune(pcfg, resume=False)
    masks = json.loads((tmp_path / "prune" / "masks.json").read_text())
    assert masks["mask_sparsity"] > 0.2
    assert count_params(load_model_dir(pruned).model)["total"] < count_params(load_model_dir(student).model)["total"]
    out = tmp_path / "eval.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "service", "eval", str(pruned), "--limit", "10", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert 0.0 <= json.loads(out.read_text())["easy_vqa"]["accuracy"] <= 1.0

    from compression.compression_report import write_report

    report = write_report({"teacher": teacher, "distilled": student, "pruned": pruned}, tmp_path / "report", limit=10, rounds=2)
    for name in ("teacher", "distilled", "pruned"):
        row = report["models"][name]
        assert row["latency"]["vqa_ms"]["n"] == 10 and row["latency"]["vqa_ms"]["p50"] > 0
        assert set(row["meets_targets"]) == {"params", "easy_vqa", "cider", "r1", "latency"}
    assert report["models"]["teacher"]["vs_teacher"]["params"] == 1.0
    assert report["models"]["pruned"]["allocation"]["vision_ffn"] != report["models"]["distilled"]["allocation"]["vision_ffn"]
    for f in ("report.json", "REPORT.md", "allocation.png", "pareto.png"):
        assert (tmp_path / "report" / f).stat().st_size > 0

    # SmartTrim on the pruned student: train the trimmers briefly, calibrate levels, report.
    from compression.trim import TrimConfig, trim
    from compression.trim_report import write_report as write_trim_report

    tcfg = TrimConfig(
        **common
        | {"out": str(tmp_path / "trim"), "student": str(pruned), "steps": 6, "log_every": 1, "hidden": 8}
        | {"thresholds": [0.3, 0.5, 0.7], "calibration_limit": 30, "lr": 1e-4}
    )
    trimmed = trim(tcfg, resume=False)
    levels = json.loads((trimmed / "levels.json").read_text())
    assert set(levels["levels"]) == {"full", "balanced", "fast"} and len(levels["curve"]) == 3
    assert levels["levels"]["full"]["flops_ratio"] == 1.0
    assert all(0 < p["flops_ratio"] < 1.1 for p in levels["curve"])
    # calibration only (configs/calibrate-levels.yaml): no steps, the weights as they were, levels re-measured
    recal_cfg = common | {"out": str(tmp_path / "recal"), "student": str(trimmed), "steps": 0, "lr": 0.0}
    recal_cfg |= {"trimmer_lr": 0.0, "head_trimmer_lr": 0.0, "thresholds": [0.5], "calibration_limit": 30}
    recal = trim(TrimConfig(**recal_cfg), resume=False)
    assert [p["token_threshold"] for p in json.loads((recal / "levels.json").read_text())["curve"]] == [0.5]
    before, after = load_model_dir(trimmed).model.state_dict(), load_model_dir(recal).model.state_dict()
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    rows = [json.loads(line) for line in (trimmed / "trim_log.jsonl").read_text().splitlines()]
    assert {"self_distill", "cost", "flops_ratio", "beta"} <= set(rows[-1])
    rep = write_trim_report(trimmed, tmp_path / "trim_report", limit=20, latency_samples=4, rounds=1)
    assert rep["latency_batch1"]["balanced"]["p50_ms"] > 0
    ort_rows = rep["latency_batch1_onnxruntime"]
    for precision in ("", "int8 "):
        assert {f"{precision}{r}" for r in ("untrimmed", "balanced", "fast", "all trimmed")} <= set(ort_rows)
    assert rep["checks"]["max_latency_speedup_batch1"] > 0 and rep["checks"]["max_latency_speedup_batch1_int8"] > 0
    assert rep["parity"]["mask_vs_gather_batch1_max_abs"] <= 1e-4
    for f in ("report.json", "REPORT.md", "accuracy_vs_flops.png", "kept_tokens_balanced.png", "most_trimmed.png"):
        assert (tmp_path / "trim_report" / f).stat().st_size > 0
