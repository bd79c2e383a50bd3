"""benchmarks/h2load.py: the rate schedule h2load is given and the parsing of its per-request log."""

from __future__ import annotations

import pytest

from benchmarks import h2load


@pytest.mark.parametrize("rate", [7.0, 95.0, 415.3, 460.0, 1800.0])
def test_rate_schedule_is_close_to_the_rate(rate):
    per_period, period_ms = h2load.rate_schedule(rate)
    assert per_period >= 1 and period_ms >= 5
    assert abs(1000 * per_period / period_ms - rate) / rate < 0.03


def test_parse_log_statuses_latencies_and_failures():
    log = "1700000000000000\t200\t5000\n1700000000010000\t429\t300\n1700000000020000\t-1\t100\n"
    rows = h2load.parse_log(log)
    assert [r.status for r in rows] == [200, 429, 0]
    assert [r.started_s for r in rows] == [0.0, 0.01, 0.02]
    assert rows[0].latency_s == pytest.approx(0.005) and rows[2].error == "h2load"
    assert h2load.parse_log("") == []


def test_summary_line_is_recognised():
    text = "requests: 15209 total, 15209 started, 15209 done, 3304 succeeded, 11905 failed, 0 errored, 0 timeout\n"
    assert h2load.SUMMARY.search(text).groups() == ("15209", "15209", "15209", "3304", "11905", "0", "0")
