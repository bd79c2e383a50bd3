"""Overload and soak, shortened for CI; the full runs are commands:
`trimvlm bench overload` (60 s at 4x capacity) and `trimvlm bench soak --minutes 5`, whose
reports are in reports/reliability/. Here: the same code, a few seconds, checks not timings."""

from __future__ import annotations

import json

import pytest

from benchmarks import h2load, overload, soak
from tests.e2e.conftest import DEFAULT_MODEL, MODELS


@pytest.mark.parametrize("client", ["python", "h2load"])
def test_overload_short(tmp_path, client):
    """4x the measured capacity for 8 s: every request answered, 200 or 429/503 with Retry-After,
    no connection errors, the server alive and serving after; RSS growth reported. h2load (the C
    client of `nghttp2-client`, installed by .ci/run) sends most arrivals when present."""
    if client == "h2load" and not h2load.available():
        pytest.skip("h2load not installed (apt-get install nghttp2-client; .ci/run installs it)")
    report = overload.run(MODELS / DEFAULT_MODEL, tmp_path, duration_s=8.0, factor=4.0, capacity_s=3.0, client=client)
    o = report["overload"]
    print(json.dumps({k: o[k] for k in ("offered_rps", "sent", "ok", "refused", "connection_errors")}), report["rss"])
    assert report["checks"] == {
        "every_request_answered": True,
        "refusals_carry_retry_after": True,
        "no_connection_errors": True,
        "server_alive_and_serving": True,
    }, json.dumps(report, indent=1)
    assert report["passed"] and o["ok"] > 0 and o["sent"] >= 4 * report["capacity"]["throughput_rps"]  # really offered
    assert {"start_mib", "peak_mib", "end_mib", "growth_mib"} <= set(report["rss"])
    assert (tmp_path / "REPORT.md").read_text().startswith("# Overload")
    assert o["refusals_checked_for_retry_after"] > 0  # the Retry-After check saw refusals
    if client == "h2load":
        assert report["client"]["h2load"]["command"].startswith("h2load --h1")
        assert o["refusals_checked_for_retry_after"] < o["refused"]  # h2load sent the rest


def test_soak_short_report_schema(tmp_path):
    """A 15 s soak: the report has what the full one has (windows, RSS series and plot, drift), no errors."""
    report = soak.run(MODELS / DEFAULT_MODEL, tmp_path, minutes=0.25, clients=4)
    assert {"command", "machine", "models", "runs", "checks", "passed"} <= set(report)
    [(name, r)] = report["runs"].items()
    assert name == "arena on (default)"
    assert {"summary", "statuses", "errors", "windows", "p99_first_ms", "p99_last_ms", "p99_drift", "rss", "rss_series"} <= set(r)
    assert len(r["windows"]) == soak.WINDOWS and all(w["ok"] > 0 for w in r["windows"])
    assert {"start_mib", "peak_mib", "end_mib", "growth_after_first_window_mib", "slope_second_half_mib_per_min"} <= set(r["rss"])
    assert len(r["rss_series"]) >= 10
    assert r["errors"] == 0 and report["passed"], r["statuses"]
    png = (tmp_path / "rss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((tmp_path / "report.json").read_text())["runs"][name]["p99_drift"] == r["p99_drift"]
