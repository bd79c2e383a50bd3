"""The benchmark harness itself (benchmarks/): percentile math, interleaving, headline ratios, the
run-to-run comparison and the docs/README rendering. No timing assertions."""

import json

import numpy as np
import pytest

from benchmarks import bench_docs, model_bench, service_bench
from benchmarks.loadgen import Result, RunStats, percentile


def test_percentiles_match_numpy_linear_interpolation():
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile([3.0], 99) == 3.0
    stats = model_bench.percentiles([4.0, 1.0, 3.0, 2.0])
    assert stats == {"p50_ms": 2.5, "p95_ms": pytest.approx(3.85), "mean_ms": 2.5, "n": 4}


def test_run_stats_summary_counts_statuses_levels_and_misses():
    stats = RunStats(
        [Result(0.010, 200, "full"), Result(0.020, 200, "fast", late=True), Result(0.001, 503), Result(0.030, 429)], 2.0
    )
    s = stats.summary()
    assert s["ok"] == 2 and s["requests"] == 4
    assert s["throughput_rps"] == 1.0  # answered requests per second only
    assert s["p50_ms"] == pytest.approx(15.0)
    assert s["statuses"] == {"200": 2, "429": 1, "503": 1}
    assert s["levels"] == {"full": 1, "fast": 1}
    assert s["deadline_misses"] == 2  # the late answer and the 503


def test_interleave_order_rotates_so_no_runner_is_always_first():
    names = ["a", "b", "c"]
    assert model_bench.interleave_order(names, 0) == ["a", "b", "c"]
    assert model_bench.interleave_order(names, 1) == ["b", "c", "a"]
    assert model_bench.interleave_order(names, 5) == ["c", "a", "b"]
    assert {model_bench.interleave_order(names, i)[0] for i in range(3)} == set(names)


def test_measure_interleaved_alternates_runners_input_by_input():
    log = []
    now = [0.0]

    def clock():
        return now[0]

    def runner(name, cost):
        def call(x):
            log.append((name, x))
            now[0] += cost

        return call

    calls = {"A": runner("A", 0.002), "B": runner("B", 0.010)}
    inputs = {"A": [0, 1, 2], "B": [0, 1, 2]}
    times = model_bench.measure_interleaved(calls, inputs, rounds=2, warmup=1, clock=clock)
    timed = log[2:]  # one warm-up call each first
    assert log[:2] == [("A", 0), ("B", 0)]
    assert len(timed) == 2 * 3 * 2
    # every input is run by both runners before the next input starts
    for k in range(0, len(timed), 2):
        assert {timed[k][0], timed[k + 1][0]} == {"A", "B"}
        assert timed[k][1] == timed[k + 1][1]
    assert [n for n, _ in timed[:4]] == ["A", "B", "B", "A"]  # order rotates per input
    assert times["A"] == pytest.approx([2.0] * 6) and times["B"] == pytest.approx([10.0] * 6)


def _row(artifact, backend, precision, level, p50_b1, b32_items, accuracy, flops_ratio=1.0, frac=None):
    row = {
        "artifact": artifact,
        "backend": backend,
        "precision": precision,
        "level": level,
        "accuracy": accuracy,
        "flops_ratio": flops_ratio,
        "batch1": {"p50_ms": p50_b1},
        "batch32": {"items_per_s": b32_items},
    }
    if frac is not None:
        row["batch1"]["flops_fraction_of_gemm"] = frac / 4
        row["batch32"]["flops_fraction_of_gemm"] = frac
    return row


def test_model_headline_ratios_from_the_runner_rows():
    rows = {
        "teacher torch fp32": _row("teacher", "torch", "fp32", "full", 12.0, 100.0, 0.99, frac=0.2),
        "exported onnxruntime int8 full": _row("exported", "onnxruntime", "int8", "full", 2.0, 400.0, 0.98, frac=0.5),
        "exported onnxruntime int8 balanced": _row("exported", "onnxruntime", "int8", "balanced", 1.5, 600.0, 0.97, 0.4),
        "exported onnxruntime fp32 balanced": _row("exported", "onnxruntime", "fp32", "balanced", 9.0, 1.0, 0.1, 0.4),
    }
    h = model_bench.headline({"runners": rows})
    assert h["student_full_vs_teacher_latency_b1"] == 6.0
    assert h["student_balanced_vs_teacher_latency_b1"] == 8.0
    assert h["student_balanced_vs_teacher_throughput_b32"] == 6.0
    assert h["student_full_accuracy_fraction_of_teacher"] == pytest.approx(0.9899, abs=1e-4)
    assert h["level_balanced_latency_speedup_b1"] == pytest.approx(1.333, abs=1e-3)
    assert h["level_balanced_flops_reduction"] == 2.5
    assert h["level_balanced_accuracy_drop_points"] == 1.0
    assert h["teacher_flops_fraction_of_gemm_b32"] == 0.2 and h["student_full_flops_fraction_of_gemm_b1"] == 0.125
    assert model_bench.headline({"runners": {}}) == {}


def test_service_headline_ratios():
    closed = {
        "trimvlm": {"1": {"throughput_rps": 100.0, "p50_ms": 8.0}, "16": {"throughput_rps": 300.0, "p50_ms": 50.0}},
        "trimvlm, no batching": {"1": {"throughput_rps": 90.0, "p50_ms": 9.0}, "16": {"throughput_rps": 150.0, "p50_ms": 90.0}},
        "naive": {"1": {"throughput_rps": 25.0, "p50_ms": 40.0}, "16": {"throughput_rps": 30.0, "p50_ms": 500.0}},
    }
    r = {"batching": {"speedup": 1.2}, "http_overhead": {"overhead_p50_ms": 3.5}, "sweep": {"closed_loop": closed}}
    h = service_bench.service_headline(r)
    assert h == {
        "batching_vs_none_vqa_throughput": 1.2,
        "batching_vs_none_mixed_best_throughput": 2.0,
        "service_vs_naive_best_throughput": 10.0,
        "service_vs_naive_p50_latency_c1": 5.0,
        "http_overhead_p50_ms": 3.5,
    }


def test_mixed_requests_are_deterministic_and_follow_the_mix():
    items = [("aW1n", "what colour?", ["red"])] * 3
    a, b = service_bench.mixed_requests(items), service_bench.mixed_requests(items)
    paths = [a(i)[0] for i in range(2000)]
    assert paths == [b(i)[0] for i in range(2000)]
    share = {p: paths.count(p) / len(paths) for p in set(paths)}
    assert share["/vqa"] == pytest.approx(0.7, abs=0.04)
    assert share["/caption"] == pytest.approx(0.15, abs=0.03)
    assert share["/retrieval/rank"] == pytest.approx(0.15, abs=0.03)
    path, body, deadline = a(paths.index("/retrieval/rank"))
    assert body["texts"] == service_bench.RANK_TEXTS and deadline is None


def test_compare_gates_timing_ratios_only():
    before = {"level_fast_latency_speedup_b1": 1.50, "service_vs_naive_best_throughput": 4.0, "http_overhead_p50_ms": 3.0}
    ok = bench_docs.compare(before, {**before, "level_fast_latency_speedup_b1": 1.60, "http_overhead_p50_ms": 9.0})
    assert ok["all_within"] and ok["gated"] == 2
    assert ok["rows"]["http_overhead_p50_ms"]["within"] is None  # absolute ms: shown, not gated
    moved = bench_docs.compare(before, {**before, "service_vs_naive_best_throughput": 3.0})
    assert not moved["all_within"]
    assert moved["rows"]["service_vs_naive_best_throughput"]["change"] == -0.25


def test_docs_and_readme_block_rendered_from_the_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    machine = {"cpu": "Test CPU", "cores": 2, "python": "3.11"}
    (tmp_path / "m").mkdir()
    (tmp_path / "s").mkdir()
    (tmp_path / "m" / "report.json").write_text(
        json.dumps({"machine": machine, "headline": {"level_balanced_latency_speedup_b1": 1.5}})
    )
    (tmp_path / "m" / "REPORT.md").write_text("# Model\n\n## Table\n![p](pareto.png)\n")
    (tmp_path / "s" / "report.json").write_text(json.dumps({"machine": machine, "headline": {"http_overhead_p50_ms": 3.25}}))
    (tmp_path / "s" / "REPORT.md").write_text("# Service\nbody\n")
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "model.json").write_text(
        json.dumps({"machine": machine, "headline": {"level_balanced_latency_speedup_b1": 1.4}})
    )
    other = {"cpu": "Other CPU", "cores": 2}  # a previous service run elsewhere: shown, but not called reproducibility
    (tmp_path / "prev" / "service.json").write_text(json.dumps({"machine": other, "headline": {"http_overhead_p50_ms": 3.0}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_docs.README_BEGIN}\nstale figures\n{bench_docs.README_END}\noutro\n")
    repro = bench_docs.write_docs("m", "s", "prev", docs=tmp_path / "docs" / "BENCHMARKS.md", readme=readme)
    assert repro["model"]["rows"]["level_balanced_latency_speedup_b1"]["change"] == pytest.approx(0.0714, abs=1e-4)
    assert repro["model"]["same_machine"] and not repro["service"]["same_machine"]
    text = readme.read_text()
    assert "stale figures" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "1.50x" in text and "Test CPU" in text
    docs = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "3.25 ms" in docs and "### Table" in docs and "](../m/pareto.png)" in docs
    assert "+7.1%" in docs
    assert "**Model benchmark:** the previous run against this one, same machine (Test CPU (2 cores))" in docs
    assert "**different machines** (previous: Other CPU (2 cores)" in docs


def test_gemm_runner_multiplies():
    call, (a, b) = model_bench.gemm_runner(n=8)
    assert np.allclose(call((a, b)).numpy(), a.numpy() @ b.numpy(), atol=1e-5)


def test_folder_digest_changes_with_any_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    first = model_bench.folder_digest(tmp_path)
    assert model_bench.folder_digest(tmp_path) == first
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x00" * 9 + b"\x01")
    assert model_bench.folder_digest(tmp_path) != first


def test_raw_client_keeps_connections_alive_and_reads_every_response_kind():
    """The load generator's HTTP/1.1 client against a scripted server on loopback: keep-alive reuse,
    `Connection: close`, a server that drops an idle connection (resent once on a new one), and a
    response it cannot read (a status-0 result, not an exception)."""
    import asyncio

    from benchmarks.loadgen import RawClient, _one, closed_loop

    connections = []

    async def handle(reader, writer):
        connections.append(writer)
        while True:
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
            except asyncio.IncompleteReadError:
                break
            length = int(next(h for h in head.split("\r\n") if h.lower().startswith("content-length")).split(":")[1])
            body = json.loads(await reader.readexactly(length))
            if body.get("kind") == "chunked":  # no Content-Length: unreadable for this client
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                continue
            out = json.dumps({"compute": {"level": "fast"}, "echo": body}).encode()
            close = body.get("kind") == "close"
            extra = b"Connection: close\r\n" if close else b"Retry-After: 3\r\n"
            status = b"429 Too Many Requests" if body.get("kind") == "refuse" else b"200 OK"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(out) + extra + b"\r\n" + out)
            await writer.drain()
            if close or body.get("kind") == "drop-after":  # drop-after: closes without saying so
                break
        writer.close()

    async def go():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with RawClient(url, timeout_s=5) as c:
            r1 = await _one(c, "/vqa", {"i": 1}, deadline_ms=None)
            r2 = await _one(c, "/vqa", {"i": 2}, deadline_ms=0.0)  # answered, but after its deadline
            assert (r1.status, r1.level, r2.late) == (200, "fast", True)
            assert len(connections) == 1  # kept alive
            refused = await _one(c, "/vqa", {"kind": "refuse"}, None)
            assert (refused.status, refused.retry_after) == (429, "3")
            await _one(c, "/vqa", {"kind": "close"}, None)  # the server closes after this answer
            assert (await _one(c, "/vqa", {"i": 3}, None)).status == 200 and len(connections) == 2
            await _one(c, "/vqa", {"kind": "drop-after"}, None)  # then the server drops the idle connection
            await asyncio.sleep(0.05)
            assert (await _one(c, "/vqa", {"i": 4}, None)).status == 200  # resent on a new connection
            assert len(connections) == 3
            bad = await _one(c, "/vqa", {"kind": "chunked"}, None)
            assert (bad.status, bad.error) == (0, "ProtocolError")
        stats = await closed_loop(url, lambda i: ("/vqa", {"i": i}, None), concurrency=4, requests=40)
        server.close()
        return stats.summary()

    summary = asyncio.run(go())
    assert summary["statuses"] == {"200": 40} and summary["levels"] == {"fast": 40}
