"""`trimvlm bench scale` at CI size: the fixture maker builds a tiny random BLIP (same code as the
BLIP-base fixtures, `size="tiny"`) through the normal import and export, and the bench writes its
report from it with minimal repeats. Checks the schema and the mechanics (keep fractions driven
exactly, captions forced to length, stages measured in their own process), not timings: the
full-size figures are reports/scale (`make scale-report`)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from benchmarks import scale, scale_fixtures  # noqa: E402

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BLIP built by every stage of the fixture maker, in this process."""
    return scale_fixtures.build(tmp_path_factory.mktemp("scale"), "tiny", IMAGE_SIZE)


def test_base_size_is_blip_base_with_berts_vocabulary_layout():
    """The base fixture's config and tokenizer, without building the 360 M-parameter model."""
    vocab = scale_fixtures.vocabulary("base")
    assert len(vocab) == scale_fixtures.BASE_VOCAB == 30522
    assert (vocab[0], vocab[100], vocab[101], vocab[102], vocab[103]) == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert vocab.index("picture") < 2000 and len(set(vocab)) == len(vocab)
    cfg = scale_fixtures.blip_config("base", 224)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == (224, 16, 768, 12)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.bos_token_id, t.sep_token_id) == (768, 12, 30524, 30522, 102)
    assert v.initializer_range == scale_fixtures.VISION_INIT_STD  # not BLIP's 1e-10: tokens must differ
    with pytest.raises(ValueError, match="size"):
        scale_fixtures.blip_config("large", 224)


def test_fixture_maker_imports_attaches_trimmers_and_exports(tiny):
    hf = json.loads((tiny.hf / "config.json").read_text())
    assert hf["architectures"] == ["BlipForQuestionAnswering"]
    record = json.loads((tiny.imported / "blip_import.json").read_text())
    assert record["parts"] == ["vision", "text_encoder", "text_decoder"]
    timing = json.loads((tiny.trimmed / "timing.json").read_text())
    points = timing["points"]
    assert [p["keep_fraction"] for p in points] == list(scale_fixtures.KEEP_FRACTIONS)
    ratios = [p["flops_ratio"] for p in points]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < 1.0  # fewer tokens, fewer FLOPs
    assert points[0]["image_tokens_kept"] == points[0]["image_tokens"] == (IMAGE_SIZE // 8) ** 2 + 1

    from service.tasks import TaskModel

    manifest = json.loads((tiny.export / "manifest.json").read_text())
    assert {"vision", "text", "fusion", "vqa_trimmed", "decoder_step", "decoder_nocache"} <= set(manifest["graphs"])
    assert manifest["answers"] == scale_fixtures.DUMMY_ANSWERS
    inputs = dict(np.load(tiny.trimmed / "timing_input.npz"))
    task = TaskModel(tiny.export, precision="fp32")
    for p in points:  # the exported graph keeps exactly what torch kept at the same threshold
        out = task.runtime.run("vqa_trimmed", scale._trimmed_feeds(inputs, p))
        assert int(np.asarray(out["image_tokens_kept"]).reshape(-1)[0]) == p["image_tokens_kept"]


def test_stage_runner_reads_time_rss_and_result(tmp_path):
    code = "import json; x = bytearray(50 * 2**20); print('noise'); print('RESULT ' + json.dumps({'stage': 'demo', 'n': 3}))"
    row = scale.run_stage([sys.executable, "-c", code])
    assert row["stage"] == "demo" and row["n"] == 3 and row["wall_s"] > 0
    assert row["peak_rss_mib"] >= 50  # the child's own peak, from wait4
    with pytest.raises(RuntimeError, match="stage failed"):
        scale.run_stage([sys.executable, "-c", "raise SystemExit(3)"])


def test_sep_masked_runner_forces_the_caption_length():
    from service.generation import greedy_decode

    vocab, sep = 6, 2

    def run(graph, feeds):  # a decoder that always prefers [SEP]
        if graph == "decoder_cross_kv":
            return {"cross_key.0": feeds["image_states"], "cross_value.0": feeds["image_states"]}
        ids = feeds["input_ids"]
        logits = np.zeros((*ids.shape, vocab), np.float32)
        logits[..., sep] = 5.0
        return {"logits": logits}

    states = np.zeros((2, 3, 4), np.float32)
    assert greedy_decode(run, states, 1, sep, 0, max_length=5, use_cache=False).shape == (2, 1)
    out = greedy_decode(scale.sep_masked(run, sep), states, 1, sep, 0, max_length=5, use_cache=False)
    assert out.shape == (2, 5) and not (out == sep).any()


def test_scale_bench_report_schema(tiny, tmp_path):
    opts = scale.Options(
        root=tiny.root,
        out=tmp_path / "report",
        size="tiny",
        image_sizes=(IMAGE_SIZE,),
        repeats=1,
        graph_batches=(1, 2),
        batching_batches=(1, 2),
        decode_lengths=(3,),
        decode_batches=(1, 2),
        clients=2,
        service_requests=4,
        service_rounds=1,
        overhead_requests=2,
        profile="always",
    )
    report = scale.run(opts)
    assert {
        "machine",
        "options",
        "load_before",
        "load_after",
        "wall_s",
        "fixtures",
        "sizes",
        "service",
        "checks",
        "headline",
    } <= set(report)
    stages = report["fixtures"][str(IMAGE_SIZE)]
    assert set(stages) == set(scale_fixtures.STAGES) and all(s["reused"] for s in stages.values())
    sec = report["sizes"][str(IMAGE_SIZE)]
    trim = sec["trimming"]["precisions"]
    assert set(trim) == {"fp32", "int8"}
    assert [p["keep_fraction"] for p in trim["fp32"]["points"]] == list(scale_fixtures.KEEP_FRACTIONS)
    assert all(p["image_tokens_kept"] == p["image_tokens_kept_torch"] for p in trim["fp32"]["points"])
    graphs = sec["graphs"]["graphs"]
    assert {"vision", "fusion", "decoder_step", "vqa_trimmed"} <= set(graphs) and "int8_speedup" in graphs["vision"]["b2"]
    assert set(sec["graphs"]["batching"]["int8"]["per_item_ms"]) == {"vision", "text", "fusion", "vqa_path"}
    kv = sec["kv_cache"]
    row = kv["precisions"]["fp32"]["L3/b2"]
    assert row["generated_tokens"] == 3 and row["speedup"] > 0 and row["same_tokens_every_mode"]
    assert row["no_cache_p50_ms"] > 0 and row["cross_only_p50_ms"] > 0 and kv["step_floor"]["fp32"]["weight_stream_ms"] > 0
    assert 0.0 <= kv["int8_agreement"]["teacher_forced_top1_agreement"] <= 1.0
    svc = report["service"]
    assert svc["batching"]["gain_kept"] > 0 and svc["overhead"]["samples"] >= 2
    assert svc["ready_s"]["batching"] > 0 and svc["peak_rss_mib"]["batching"] > 0
    names = {c["name"].split("/")[0] for c in report["checks"]}
    assert names == set(scale.TARGETS)
    prof = report["profiles"][f"{IMAGE_SIZE}/fp32"]
    assert prof["trim"]["trimmed"]["by_op_type"] and len(prof["kv"]["step_curve"]["cached_step_ms"]) == 5
    md = (opts.out / "REPORT.md").read_text()
    assert md.startswith("# Scale benchmark") and "## Checks" in md and "KV cache" in md
    assert json.loads((opts.out / "report.json").read_text())["checks"] == report["checks"]
    assert (opts.out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parts_kv_measures_only_the_kv_cache(tiny, tmp_path):
    """`--parts kv`: the KV cache part (and its profile) alone; the exported decoder keeps its K/V
    head-split and says so in the manifest."""
    assert json.loads((tiny.export / "manifest.json").read_text())["decoder_kv_layout"] == "heads"
    opts = scale.Options(
        root=tiny.root,
        out=tmp_path / "report",
        size="tiny",
        image_sizes=(IMAGE_SIZE,),
        repeats=1,
        decode_lengths=(3,),
        decode_batches=(1,),
        profile="always",
        parts=("kv",),
    )
    report = scale.run(opts)
    sec = report["sizes"][str(IMAGE_SIZE)]
    assert "trimming" not in sec and "graphs" not in sec and sec["kv_cache"]["kv_layout"] == "heads"
    assert {c["name"].split("/")[0] for c in report["checks"]} == {"kv_cache_speedup"}
    assert "skipped" in report["service"]
    curve = report["profiles"][f"{IMAGE_SIZE}/fp32"]["kv"]["step_curve"]
    assert "trim" not in report["profiles"][f"{IMAGE_SIZE}/fp32"] and curve["cross_kv_ms"] > 0
    md = (opts.out / "REPORT.md").read_text()
    assert "KV cache vs none" in md and "Trimming, batch 1" not in md and "`heads`" in md


def test_compression_smoke_yamls_and_step_times(tmp_path):
    from benchmarks import compression_smoke
    from compression.distill import DistillConfig
    from compression.prune import PruneConfig
    from compression.trim import TrimConfig

    yamls = compression_smoke.stage_yamls(tmp_path, 384, 2, 3)
    d, p = DistillConfig.from_yaml(yamls["distill"]), PruneConfig.from_yaml(yamls["prune"])
    t = TrimConfig.from_yaml(yamls["trim"])
    assert (d.image_size, d.batch_size, d.steps, d.easy_vqa, d.scenes) == (384, 2, 3, False, True)
    assert (p.prune_steps, p.finetune_steps, t.steps, t.calibration_limit) == (3, 3, 3, 4)
    log = tmp_path / "log.jsonl"
    rows = [{"step": 0, "elapsed_s": 50.0}, {"step": 1, "elapsed_s": 60.0}, {"val": 1}, {"step": 2, "elapsed_s": 72.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert compression_smoke.step_seconds(log) == {"steps": 3, "first_step_s": 50.0, "s_per_step": 11.0, "timed_steps": 2}


def test_resume_keeps_only_a_run_with_the_same_measurement_options(tmp_path):
    from dataclasses import asdict

    opts = scale.Options(out=tmp_path, size="tiny", image_sizes=(IMAGE_SIZE,), resume=True)
    assert scale._previous(opts) is None  # nothing to resume
    options = json.loads(json.dumps(asdict(opts), default=str))
    (tmp_path / "report.json").write_text(json.dumps({"options": options, "sizes": {"32": {}}}))
    assert scale._previous(opts)["sizes"] == {"32": {}}
    (tmp_path / "report.json").write_text(json.dumps({"options": options | {"repeats": 7}, "sizes": {}}))
    with pytest.raises(ValueError, match="other options"):
        scale._previous(opts)
