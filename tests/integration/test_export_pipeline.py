"""The offline pipeline on a tiny model: teacher (trained here) -> trim -> export -> evaluate ->
report via `trimvlm pipeline run`; then the exported folder: manifest, `models verify` (passes,
then fails clearly on an altered file), and evaluation through the service runtime equal to
torch's."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("onnxruntime")


def _cli(*args, cwd=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the whole pipeline once on a tiny teacher (reused by every test here)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    tiny = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    teacher_yaml = tmp / "teacher.yaml"
    teacher_yaml.write_text(yaml.safe_dump(tiny | {"steps": 12, "checkpoint_every": 0}))
    trim_yaml = tmp / "trim.yaml"
    trim_yaml.write_text(
        yaml.safe_dump(
            {k: v for k, v in tiny.items() if k != "model"}
            | {"steps": 6, "log_every": 1, "hidden": 8, "thresholds": [0.3, 0.5, 0.7], "calibration_limit": 30, "lr": 1e-4}
            | {"checkpoint_every": 0}
        )
    )
    config = tmp / "pipeline.yaml"
    export_dir = tmp / "models" / "tiny-default" / "1"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-default",
                "version": "1",
                "work": str(tmp / "work"),
                "teacher": {"config": str(teacher_yaml)},
                "trim": {"config": str(trim_yaml)},
                "export": {
                    "out": str(export_dir),
                    "precisions": ["int8"],
                    "description": "A tiny test model: shapes only.",
                    "known_words_from": str(teacher_yaml),
                    "rerank": {"limit": 30},
                },
                "evaluate": {"limit": 12, "precision": "fp32", "teacher": False},
                "report": {},
            }
        )
    )
    proc = _cli("pipeline", "run", str(config))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "config": config, "export": export_dir, "trim_yaml": trim_yaml, "first": proc}


def test_pipeline_exports_a_complete_model_folder(pipeline):
    from service.repository import load_manifest

    m = load_manifest(pipeline["export"])
    assert {"vision", "text", "fusion", "vqa_trimmed", "decoder_cross_kv", "decoder_step", "decoder_nocache"} <= set(m.graphs)
    for name, graph in m.graphs.items():
        assert set(graph.files) == {"fp32", "int8"}, name
        assert graph.parity["fp32"] <= 1e-4, (name, graph.parity)
    assert m.levels is not None and {"full", "balanced", "fast"} <= set(m.levels.levels)
    assert m.metrics["onnxruntime/fp32"]["easy_vqa.accuracy"] >= 0.0
    card = (pipeline["export"] / "MODEL_CARD.md").read_text()
    assert "trimvlm pipeline run" in card
    assert all(rel in m.files for rel in ("MODEL_CARD.md", "tokenizer.json", "reference.npz", "vision.int8.onnx"))
    # what the model knows: the config's description, and the words of the teacher config's training texts
    assert m.description == "A tiny test model: shapes only."
    assert m.known_words and {"what", "shape"} <= set(m.known_words) and m.known_words == sorted(set(m.known_words))
    assert "## What it knows" in card and "A tiny test model: shapes only." in card
    # the trained model's re-ranking weight, calibrated on val by the export stage, is in the manifest
    calibrated = json.loads((pipeline["tmp"] / "work" / "trim" / "model" / "rerank.json").read_text())
    assert calibrated["limit"] == 30 and m.rerank_itc_weight == calibrated["itc_weight"]


def test_pipeline_skips_current_stages_and_reruns_after_a_change(pipeline):
    proc = _cli("pipeline", "run", str(pipeline["config"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("teacher", "trim", "export", "evaluate", "report"):
        assert f"{stage}: up to date" in proc.stdout, proc.stdout


def test_exported_fp32_evaluates_like_torch(pipeline):
    """Exported and torch models go through the same evaluation loops; fp32 ONNX Runtime gives
    the torch model's metrics."""
    from compression.evaluate import evaluate

    work = pipeline["tmp"] / "work"
    exported = evaluate(pipeline["export"], limit=12, precision="fp32", include_scenes=False)
    torch_res = evaluate(work / "trim" / "model", limit=12, device="cpu", include_scenes=False)
    assert exported["runtime"]["precision"] == "fp32"
    assert exported["easy_vqa"]["accuracy"] == torch_res["easy_vqa"]["accuracy"]


def test_per_item_results_pair_an_exported_model_with_its_torch_source(pipeline, tmp_path):
    """`evaluate(..., items=)` of the exported fp32 graphs and of the torch model they came from:
    the same 12 questions, item for item the same answers, so the paired comparison finds nothing
    lost or won and nothing worse."""
    from compression.eval_compare import compare, save_items
    from compression.evaluate import evaluate

    runs = {
        "exported": (pipeline["export"], {"precision": "fp32"}),
        "torch": (pipeline["tmp"] / "work" / "trim" / "model", {"device": "cpu"}),
    }
    for name, (folder, kwargs) in runs.items():
        items: dict = {}
        results = evaluate(folder, limit=12, include_scenes=False, items=items, **kwargs)
        assert items["easy_vqa.accuracy"].shape == (12,) and items["easy_vqa.accuracy"].mean() == pytest.approx(
            results["easy_vqa"]["accuracy"]
        )
        (tmp_path / f"{name}.json").write_text(json.dumps(results))
        save_items(tmp_path / f"{name}.json", items)
    result = compare(tmp_path / "torch.json", tmp_path / "exported.json")
    (row,) = result.metrics
    assert (row.metric, row.lost, row.won, row.worse) == ("easy_vqa.accuracy", 0, 0, False)


def test_models_verify_passes_then_fails_clearly_on_an_altered_file(pipeline, tmp_path):
    import shutil

    proc = _cli("models", "verify", "--models", str(pipeline["export"]))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
    listing = _cli("models", "list", "--models", str(pipeline["export"].parents[1]), "--json")
    assert listing.returncode == 0 and [m["model"] for m in json.loads(listing.stdout)] == ["tiny-default/1"]

    copy = tmp_path / "m" / "tiny-default" / "1"
    shutil.copytree(pipeline["export"], copy)
    graph = copy / "fusion.int8.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    proc = _cli("models", "verify", "--models", str(copy))
    assert proc.returncode == 1
    assert "fusion.int8.onnx: checksum mismatch" in proc.stdout

    (copy / "tokenizer.json").unlink()
    proc = _cli("models", "verify", "--models", str(copy))
    assert proc.returncode == 1 and "tokenizer.json: missing" in proc.stdout


def test_verify_catches_outputs_that_no_longer_match(pipeline, tmp_path):
    """A graph replaced by a different one with a re-signed file table still fails: its outputs
    differ from the recorded reference."""
    import shutil

    from service.repository import load_manifest, verify, write_manifest

    copy = tmp_path / "tiny-default" / "1"
    shutil.copytree(pipeline["export"], copy)
    ref = dict(np.load(copy / "reference.npz"))
    key = next(k for k in ref if k.startswith("out/fusion/fp32/vqa_logits"))
    ref[key] = ref[key] + 1.0
    np.savez_compressed(copy / "reference.npz", **ref)
    write_manifest(copy, load_manifest(copy))
    problems = verify(copy)
    assert any("fusion (fp32): output vqa_logits differs" in p for p in problems), problems


def test_manifest_is_the_documented_json(pipeline):
    data = json.loads((pipeline["export"] / "manifest.json").read_text())
    assert data["schema_version"] == 1 and data["name"] == "tiny-default" and data["version"] == "1"
    assert data["preprocessing"]["image"]["size"] > 0 and data["tokens"]["bos"] >= 0
    for rel, info in data["files"].items():
        assert len(info["sha256"]) == 64 and (pipeline["export"] / rel).stat().st_size == info["bytes"]


def test_trimmed_vqa_runs_per_level_through_the_task_model(pipeline):
    from service.tasks import TaskModel

    tasks = TaskModel(pipeline["export"], precision="fp32")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, tasks.image_spec.size, tasks.image_spec.size, 3), dtype=np.uint8)
    ids, mask = tasks.tokenize(["what shape is it?", "what color is the shape?", "is it red?"])
    full = tasks.vqa(tasks.pixels(images), ids, mask, level="full")
    fast = tasks.vqa(tasks.pixels(images), ids, mask, level="fast")
    assert full.logits.shape == fast.logits.shape == (3, len(tasks.manifest.answers))
    n_tokens = tasks.manifest.graphs["vision"].outputs[0].shape[1]
    assert fast.flops_ratio == tasks.levels["fast"].flops_ratio and full.flops_ratio == 1.0
    assert fast.image_tokens_kept is not None and all(1 <= k <= n_tokens for k in fast.image_tokens_kept)
    captions = tasks.captions(tasks.encode_images(tasks.pixels(images))[0], max_length=6)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_committed_default_verifies_and_matches_its_recorded_metrics():
    """The embedded default: intact, its graphs reproduce their reference outputs, and its
    manifest carries the measured metrics and compute levels the service needs."""
    from service.repository import load_manifest, verify

    default = REPO / "models" / "trimvlm-default" / "1"
    assert verify(default) == []
    m = load_manifest(default)
    assert m.precisions() == ["int8"] and m.levels is not None
    assert {"full", "balanced", "fast"} <= set(m.levels.levels)
    assert m.metrics["onnxruntime/int8"]["easy_vqa.accuracy"] >= 0.97
    assert "trimvlm pipeline run configs/pipeline-default.yaml" in (default / "MODEL_CARD.md").read_text()


def test_bench_model_report_schema_on_the_tiny_pipeline(pipeline, tmp_path):
    """`trimvlm bench model` on the tiny chain: every runner measured at every batch size, the
    headline ratios, the Pareto plot, and missing artifacts/backends listed with a reason."""
    from benchmarks.model_bench import BATCH_SIZES, run

    work = pipeline["tmp"] / "work"
    artifacts = {"teacher": work / "teacher" / "model", "trimmed": work / "trim" / "model", "pruned": tmp_path / "absent"}
    exported = [(pipeline["export"], "onnxruntime", "int8"), (pipeline["export"], "tensorrt", "fp16")]
    r = run(tmp_path / "bench", artifacts, exported, limit=16, latency_samples=3, throughput_batches=1, rounds=1)
    import torch

    assert torch.is_grad_enabled()  # the benchmark must not switch gradients off for the rest of the process
    levels = set(json.loads((work / "trim" / "model" / "levels.json").read_text())["levels"])
    names = set(r["runners"])
    assert "teacher torch fp32" in names
    assert {f"trimmed torch fp32 {lv}" for lv in levels} <= names
    assert {f"exported onnxruntime int8 {lv}" for lv in levels} <= names
    assert "pruned" in r["skipped"] and "exported tensorrt fp16" in r["skipped"]
    for name, row in r["runners"].items():
        assert 0.0 <= row["accuracy"] <= 1.0, name
        assert row["params"] > 0 and row["flops_per_sample"] > 0, name
        for bs in BATCH_SIZES:
            b = row[f"batch{bs}"]
            assert 0 < b["p50_ms"] <= b["p95_ms"] and b["items_per_s"] > 0 and b["flops_fraction_of_gemm"] > 0, (name, bs)
    trimmed_levels = [row for row in r["runners"].values() if row["artifact"] == "trimmed" and row["level"] != "full"]
    assert trimmed_levels and all(row["measured_flops_ratio"] > 0 for row in trimmed_levels)  # measured, not copied
    assert r["headline"]["student_full_vs_teacher_latency_b1"] > 0 and r["gemm_gflops"] > 0
    saved = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert saved["headline"] == r["headline"] and saved["machine"]["cpu"]
    assert (tmp_path / "bench" / "pareto.png").stat().st_size > 1000
    assert "| teacher torch fp32 |" in (tmp_path / "bench" / "REPORT.md").read_text()


def test_export_report_schema_on_the_tiny_pipeline(pipeline, tmp_path):
    """`trimvlm report export` on the tiny chain: every level timed against the teacher, each
    speed check names the level it used (one keeping the accuracy target, else `full`), and the
    ORT runtime runs with the service's settings."""
    from compression.export_report import TARGETS, write_report

    teacher = pipeline["tmp"] / "work" / "teacher" / "model"
    r = write_report(pipeline["export"], teacher, tmp_path / "export", limit=64, latency_samples=3, rounds=1, caption_images=2)
    import torch

    assert torch.is_grad_enabled()  # the report must not switch gradients off for the rest of the process
    levels = set(r["per_level"])
    assert "full" in levels and len(levels) >= 2
    for key in ("latency_speedup", "throughput_speedup"):
        lv = r["level_for"][key]
        assert lv in levels and r["checks"][key] == pytest.approx(r["per_level"][lv][key], rel=1e-3)
        ok = [x for x in levels if r["per_level"][x]["accuracy_fraction"] >= TARGETS["teacher_accuracy_fraction"]]
        assert lv in ok if ok else lv == "full"
    assert r["runtime_settings"] == {"intra_op_threads": 0, "allow_spinning": False}
    assert set(r["passed"]) == set(TARGETS) - {"int8_max_drop_points"}
    assert "| full |" in (tmp_path / "export" / "REPORT.md").read_text()


def test_the_calibrated_rerank_weight_travels_from_the_torch_folder_into_export_and_evaluation(pipeline, tmp_path):
    """`trimvlm calibrate-rerank` writes rerank.json (the sweep's pick); load_model_dir, publish's
    copy and the export's manifest carry it, and `evaluate` re-ranks by it on torch and exported
    folders alike unless told otherwise."""
    import shutil

    from compression.artifacts import load_model_dir
    from compression.evaluate import evaluate
    from compression.export import export_model
    from compression.rerank import calibrate
    from service.repository import load_manifest

    src = tmp_path / "model"
    shutil.copytree(pipeline["tmp"] / "work" / "trim" / "model", src)
    result = calibrate(src, limit=12, grid=(0.0, 1.0, 5.0), device="cpu")
    stored = json.loads((src / "rerank.json").read_text())
    assert stored["itc_weight"] == result["itc_weight"] in (0.0, 1.0, 5.0) and len(stored["sweep"]) == 3
    assert stored["split"] == "scenes_val" and stored["rerank_k"] == 16
    assert load_model_dir(src).rerank_itc_weight == result["itc_weight"]

    stored["itc_weight"] = 1.5  # a weight the grid did not hold: what the export copies is the file's
    (src / "rerank.json").write_text(json.dumps(stored))
    out = export_model(src, tmp_path / "export" / "1", ("fp32",), name="tiny-rerank")
    assert load_manifest(out).rerank_itc_weight == 1.5
    for folder, kwargs in ((out, {"precision": "fp32"}), (src, {"device": "cpu"})):
        res = evaluate(folder, limit=12, include_easy_vqa=False, **kwargs)
        assert res["scenes"]["rerank_itc_weight"] == 1.5
        alone = evaluate(folder, limit=12, include_easy_vqa=False, rerank_itc_weight=0.0, **kwargs)
        assert alone["scenes"]["rerank_itc_weight"] == 0.0
