"""`trimvlm bench service` end to end on a shortened schedule: real servers on loopback (TrimVLM
with and without batching, and the naive torch baseline), the report's schema and plot. No timing
assertions: the figures themselves come from `make bench`."""

import json

import pytest

from benchmarks import service_bench
from tests.conftest import REPO, TEACHER_DIR

pytestmark = pytest.mark.slow


def test_bench_service_report_schema(tmp_path):
    out = tmp_path / "service"
    r = service_bench.run(
        REPO / "models" / "trimvlm-default" / "1",
        out,
        clients=4,
        requests=24,
        rounds=1,
        overhead_samples=10,
        baseline=TEACHER_DIR,
        concurrency=(1, 4),
        fractions=(0.5,),
        sweep_seconds=1.5,
        adaptive_requests=(10, 10),
    )
    sweep = r["sweep"]
    assert list(sweep["closed_loop"]) == ["trimvlm", "trimvlm, no batching", "naive torch baseline (trimvlm-teacher)"]
    for mode, points in (("closed_loop", {"1", "4"}), ("open_loop", None)):
        for server, rows in sweep[mode].items():
            assert points is None or set(rows) == points
            for row in rows.values():
                assert row["statuses"] == {"200": row["requests"]}, (server, row)  # every request answered
                assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    # the mixed workload reached every endpoint kind; VQA answers report their level
    assert sum(sweep["closed_loop"]["trimvlm"]["4"]["levels"].values()) < sweep["closed_loop"]["trimvlm"]["4"]["ok"]
    assert set(r["headline"]) >= {
        "batching_vs_none_vqa_throughput",
        "batching_vs_none_mixed_best_throughput",
        "service_vs_naive_best_throughput",
        "service_vs_naive_p50_latency_c1",
        "http_overhead_p50_ms",
    }
    # adaptive compute: every level timed; auto's sweep covers the case deadline (balanced's p99)
    a = r["adaptive"]
    assert set(r["levels_server_latency"]) >= {"full", "balanced", "fast"}
    assert a["deadline_ms"] == r["levels_server_latency"]["balanced"]["p99_ms"]
    assert a["deadline_ms"] in [row["deadline_ms"] for row in a["sweep"]]
    for row in a["sweep"]:
        assert sum(row["statuses"].values()) == 10
        assert set(row["statuses"]) <= {"200", "503", "504"}, row  # refused or late, never an error
        assert row["answered_rate"] + row["refused_rate"] <= 1.0
        assert 0.0 <= row["miss_rate"] <= 1.0 and 0.0 <= row["full_only_miss_rate"] <= 1.0
    assert r["checks"]["deadline_miss_rate"] == a["miss_rate"]
    assert json.loads((out / "report.json").read_text())["headline"] == r["headline"]
    assert (out / "latency_vs_throughput.png").stat().st_size > 1000
    md = (out / "REPORT.md").read_text()
    assert "naive torch baseline" in md and "## Mixed workload" in md and "## Adaptive compute under deadlines" in md
