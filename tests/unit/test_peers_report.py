"""`trimvlm bench peers`' arithmetic and rendering on made-up figures: the targets' verdicts, the serving
layer's share, the report and the README's `peers:` rows (the measuring itself: tests/integration)."""

from __future__ import annotations

import pytest

from benchmarks import bench_docs, peers


def _row(rps, p50, p99):
    return {"throughput_rps": rps, "p50_ms": p50, "p90_ms": p99, "p99_ms": p99, "errors": 0, "requests": 100,
            "server_cores": 1.5, "server_cpu_ms_per_request": 2.0, "client_cpu_s": 0.1, "rounds": []}  # fmt: skip


FIGURES = {  # server -> clients -> (req/s, p50, p99)
    "trimvlm": {1: (240, 4.0, 6.0), 32: (840, 35.0, 80.0), 64: (850, 70.0, 95.0)},
    "litserve": {1: (180, 5.5, 8.0), 32: (547, 55.0, 120.0), 64: (546, 110.0, 165.0)},
    "mosec": {1: (150, 6.5, 9.0), 32: (757, 40.0, 70.0), 64: (779, 80.0, 98.0)},
    "ray": {1: (70, 14.0, 20.0), 32: (203, 150.0, 300.0), 64: (224, 280.0, 378.0)},
}
BARE = {"batch1_p50_ms": 3.2, "batchN_ms": 33.7, "batchN_items_per_s": 950.0, "batch": 32}


def _results():
    return {s: {str(c): _row(*v) for c, v in rows.items()} for s, rows in FIGURES.items()}


def test_targets_judged_from_the_measured_ratios():
    t = peers.targets(_results(), BARE, (1, 32, 64))
    assert t["throughput_vs_mosec_c32"]["value"] == pytest.approx(840 / 757, abs=1e-4)
    assert t["throughput_vs_mosec_c32"]["met"]  # 1.11 >= 1.1
    assert not t["throughput_vs_mosec_c64"]["met"]  # 1.09 < 1.1
    assert t["p99_vs_mosec_c64"]["met"]  # 95 <= 98
    assert t["p50_vs_litserve_c1"]["value"] == pytest.approx(4.0 / 5.5, abs=1e-4) and t["p50_vs_litserve_c1"]["met"]
    assert t["throughput_c64_fraction_of_ceiling"]["value"] == pytest.approx(850 / 950, abs=1e-4)
    assert t["throughput_c64_fraction_of_ceiling"]["met"]
    without_mosec = {k: v for k, v in _results().items() if k != "mosec"}
    assert peers.targets(without_mosec, BARE, (1, 32, 64))["p99_vs_mosec_c64"]["met"] is None


def test_serving_share_and_report_rendering(tmp_path, monkeypatch):
    share = peers.serving_share(_results(), BARE, (1, 32, 64))
    assert share["trimvlm"]["latency_c1"] == pytest.approx(1 - 3.2 / 4.0, abs=1e-4)
    assert share["ray"]["throughput_c64"] == pytest.approx(1 - 224 / 950, abs=1e-4)
    tg = peers.targets(_results(), BARE, (1, 32, 64))
    report = {
        "title": "t",
        "machine": {"cpu": "Test CPU", "cores": 2, "note": "n", "python": "3.11", "onnxruntime": "1"},
        "model": {
            "folder": "models/trimvlm-default/1",
            "id": "trimvlm-default/1",
            "image_size": 64,
            "precision": "int8",
            "backend": "onnxruntime",
        },  # fmt: skip
        "config": {
            "servers": list(FIGURES),
            "clients": [1, 32, 64],
            "duration_s": 8,
            "rounds": 3,
            "warmup_s": 2,
            "max_batch": 32,
            "batch_wait_ms": 2,
            "load_generator": "wrk",
        },  # fmt: skip
        "servers": {s: {"label": peers.LABELS[s], "version": "1.0", "ready_s": [1.0]} for s in FIGURES},
        "answer_check": {
            "requests": 8,
            "score_tolerance": 1e-4,
            "identical": True,
            "checked_starts": {s: 3 for s in FIGURES},
            "max_score_diff": {s: 0.0 for s in FIGURES},
        },  # fmt: skip
        "bare_runtime": BARE,
        "results": _results(),
        "targets": tg,
        "serving_share": share,
        "headline": peers.headline(tg),
        "wall_s": 500.0,
    }
    peers.write_report(report, tmp_path / "peers")
    md = (tmp_path / "peers" / "REPORT.md").read_text()
    assert "| trimvlm serve (defaults) | 4.0 ms | 840 | 850 | 95.0 ms |" in md
    assert "| bare runtime (no HTTP) | 3.20 ms (batch 1) |  950 items/s (batch 32) |" in md
    assert "**not met**" in md and "**met**" in md
    assert "Disturbed run" not in md  # no other load recorded
    report["results"]["mosec"]["64"]["other_cores"] = 0.9  # another process took most of a core meanwhile
    assert "**Disturbed run:** other processes on this shared machine used up to 0.90 of its 2 cores" in peers.markdown(report)
    # the README block shows the peers' ratios from reports/peers/report.json
    monkeypatch.chdir(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"{bench_docs.README_BEGIN}\n{bench_docs.README_END}\n")
    bench_docs.write_docs("m", "s", None, docs=tmp_path / "BENCHMARKS.md", readme=readme, peers_dir="peers")
    assert "| peers: TrimVLM vs mosec, /vqa throughput at 64 clients (target >= 1.1x) | **1.09x** |" in readme.read_text()
    docs = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Peer benchmark (`peers/`)" in docs and "](../peers/latency_vs_throughput.png)" in docs
    assert "89.5%" in docs  # 850 / 950 as the README's fraction format
