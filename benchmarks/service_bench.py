"""`trimvlm bench service`: the service on loopback, measured in one run on one machine.

- batching: /vqa throughput with 32 concurrent closed-loop clients, dynamic batching on vs off
  (two servers on the same models, driven one at a time, rounds interleaved A B A B);
- HTTP overhead at batch 1: p50 of sequential POST /vqa round trips minus p50 of the bare
  runtime (TaskModel.vqa on the same inputs in this process), interleaved in rounds;
- adaptive compute: each level's server-side latency at concurrency 1, then `auto` under a
  deadline between `full`'s and the fastest trimmed level's: the level mix and the miss rate.

Writes JSON + Markdown (reports/service by default).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import closed_loop, percentile

TARGETS = {"batching_speedup": 4.0, "http_overhead_ms": 2.0, "deadline_miss_rate": 0.01}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`trimvlm serve` in a subprocess with TRIMVLM_* overrides; waits for /readyz."""

    def __init__(self, models: Path, env: dict[str, str] | None = None, timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "TRIMVLM_LOG_JSON": "true", "TRIMVLM_LOG_LEVEL": "warning", **(env or {})}
        cmd = [sys.executable, "-m", "compression.cli", "serve", "--port", str(self.port), "--models", str(models)]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server on {self.url} not ready after {timeout_s}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def easy_vqa_requests(n: int, seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """(image as base64 PNG, question, answers) from the easy-VQA test split."""
    from PIL import Image

    from compression import data as D
    from service.preprocess import ImageSpec

    split = D.load_easy_vqa("test", ImageSpec())
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(split.samples), size=n, replace=False):
        s = split.samples[int(i)]
        buf = io.BytesIO()
        Image.fromarray(split.images[s.image]).save(buf, "PNG")
        out.append((base64.b64encode(buf.getvalue()).decode(), s.question, s.answers))
    return out


def _vqa(items, compute="full", deadline_ms=None):
    def make(i):
        image, question, _ = items[i % len(items)]
        body = {"image": image, "question": question, "compute": compute}
        if deadline_ms is not None:
            body["deadline_ms"] = deadline_ms
        return "/vqa", body, deadline_ms

    return make


def _sequential_server_latency(url: str, items, compute: str, n: int) -> list[float]:
    """Server-reported latency_ms of n sequential requests (keep-alive client)."""
    out = []
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for i in range(n):
            image, question, _ = items[i % len(items)]
            r = c.post("/vqa", json={"image": image, "question": question, "compute": compute})
            r.raise_for_status()
            out.append(r.json()["latency_ms"])
    return out


def run(models: Path, out: Path, clients: int = 32, requests: int = 640, rounds: int = 3, overhead_samples: int = 200) -> dict:
    from service.tasks import TaskModel

    out.mkdir(parents=True, exist_ok=True)
    items = easy_vqa_requests(256)
    report: dict = {
        "machine": _machine(),
        "models": str(models),
        "clients": clients,
        "requests_per_round": requests,
        "rounds": rounds,
    }

    # 1. batching on vs off, interleaved
    batched = ServerProcess(models, {"TRIMVLM_BATCHING": "true"})
    unbatched = ServerProcess(models, {"TRIMVLM_BATCHING": "false"})
    rows = {"batching": [], "no_batching": []}
    try:
        for _ in range(rounds):
            for name, srv in (("batching", batched), ("no_batching", unbatched)):
                stats = asyncio.run(closed_loop(srv.url, _vqa(items), clients, requests, warmup=clients))
                rows[name].append(stats.summary())
        batch_metrics = httpx.get(batched.url + "/metrics").text
    finally:
        unbatched.stop()
    tput = {k: statistics.median(r["throughput_rps"] for r in v) for k, v in rows.items()}
    report["batching"] = {
        "rounds": rows,
        "median_throughput_rps": tput,
        "speedup": round(tput["batching"] / tput["no_batching"], 3),
    }
    report["batching"]["mean_batch_size"] = _mean_batch(batch_metrics, "vqa/full")

    # 2. HTTP overhead at batch 1: round trip vs the bare runtime, same inputs, interleaved
    try:
        # the bare runtime with the server's own runtime settings (threads, spinning), so the
        # difference is HTTP and Python work, not a different ONNX Runtime configuration
        from service.runtime import RuntimeOptions
        from service.settings import Settings

        s = Settings()
        options = RuntimeOptions(device=s.device, intra_op_threads=s.intra_op_threads, extra={"allow_spinning": s.ort_spinning})
        tasks = TaskModel(models if (models / "manifest.json").is_file() else _first_model(models), options=options)
        pre = []
        for image, question, _ in items[:overhead_samples]:
            from service.images import ImageLimits, load_request_image

            arr = load_request_image(image, ImageLimits(), tasks.image_spec).array
            ids, mask = tasks.tokenize([question])
            pre.append((tasks.pixels(arr[None]), ids, mask))
        report["http_overhead"] = _overhead(batched.url, tasks, items[:overhead_samples], pre, rounds)
        # the same with ONNX Runtime's threads spin-waiting (lower latency at low load, see README)
        spin_tasks = TaskModel(tasks.folder, options=RuntimeOptions(device=s.device, intra_op_threads=s.intra_op_threads))
        with ServerProcess(models, {"TRIMVLM_ORT_SPINNING": "true"}) as spinning:
            report["http_overhead_spinning"] = _overhead(spinning.url, spin_tasks, items[:overhead_samples], pre, rounds)

        # 3. adaptive compute under a deadline full cannot meet
        levels = {}
        for level in tasks.level_names:
            lat = sorted(_sequential_server_latency(batched.url, items, level, 150))
            levels[level] = {"p50_ms": round(percentile(lat, 50), 3), "p95_ms": round(percentile(lat, 95), 3)}
        report["levels_server_latency"] = levels
        trimmed = {k: v for k, v in levels.items() if k != "full"}
        if trimmed:
            fastest = min(trimmed, key=lambda k: trimmed[k]["p95_ms"])
            deadline = round((levels["full"]["p50_ms"] + trimmed[fastest]["p95_ms"]) / 2, 3)
            full_miss = float(np.mean([x > deadline for x in _sequential_server_latency(batched.url, items, "full", 200)]))
            auto_lat, auto_levels, statuses = [], {}, {}
            with httpx.Client(base_url=batched.url, timeout=30.0) as c:
                for i in range(400):
                    image, question, _ = items[i % len(items)]
                    r = c.post("/vqa", json={"image": image, "question": question, "compute": "auto", "deadline_ms": deadline})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        data = r.json()
                        auto_lat.append(data["latency_ms"])
                        auto_levels[data["compute"]["level"]] = auto_levels.get(data["compute"]["level"], 0) + 1
            misses = sum(x > deadline for x in auto_lat) + statuses.get(504, 0)
            report["adaptive"] = {
                "deadline_ms": deadline,
                "full_miss_rate_at_this_deadline": round(full_miss, 4),
                "auto_levels": auto_levels,
                "auto_statuses": {str(k): v for k, v in statuses.items()},
                "auto_miss_rate": round(misses / max(1, sum(statuses.values())), 4),
                "auto_p50_ms": round(percentile(sorted(auto_lat), 50), 3) if auto_lat else None,
                "how": "server-side latency_ms (arrival in the app to response) against deadline_ms; "
                "misses = late answers + 504s; "
                "503 (refused early) counted separately",
            }
    finally:
        batched.stop()

    checks = {"batching_speedup": report["batching"]["speedup"], "http_overhead_ms": report["http_overhead"]["overhead_p50_ms"]}
    if "adaptive" in report:
        checks["deadline_miss_rate"] = report["adaptive"]["auto_miss_rate"]
    report["checks"] = checks
    report["passed"] = {k: (v >= TARGETS[k] if k == "batching_speedup" else v <= TARGETS[k]) for k, v in checks.items()}
    report["targets"] = TARGETS
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(_markdown(report))
    return report


def _overhead(url: str, tasks, items, pre, rounds: int) -> dict:
    """p50 HTTP round trip minus p50 bare runtime call, alternated request by request."""
    bare, http = [], []
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for _ in range(rounds):
            for (image, question, _), (px, ids, mask) in zip(items, pre, strict=True):
                t0 = time.perf_counter()
                tasks.vqa(px, ids, mask, level="full")
                bare.append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                r = c.post("/vqa", json={"image": image, "question": question, "compute": "full"})
                http.append(1000 * (time.perf_counter() - t0))
                r.raise_for_status()
    return {
        "bare_runtime_p50_ms": round(statistics.median(bare), 3),
        "http_round_trip_p50_ms": round(statistics.median(http), 3),
        "overhead_p50_ms": round(statistics.median(http) - statistics.median(bare), 3),
        "samples": len(http),
        "how": "sequential keep-alive POST /vqa (base64 PNG, compute=full) round trips from a client in the bench process, "
        "minus TaskModel.vqa(full) on the same pre-decoded inputs in the same process with the server's runtime settings "
        "(threads, spinning); alternated request by request",
    }


def _first_model(root: Path) -> Path:
    from service.repository import find_models

    return find_models(root)[0]


def _mean_batch(metrics_text: str, component: str) -> float | None:
    total = count = None
    for line in metrics_text.splitlines():
        if line.startswith("vlm_batch_size_sum") and f'component="{component}"' in line:
            total = float(line.rsplit(" ", 1)[1])
        if line.startswith("vlm_batch_size_count") and f'component="{component}"' in line:
            count = float(line.rsplit(" ", 1)[1])
    return round(total / count, 2) if total is not None and count else None


def _machine() -> dict:
    from compression.compression_report import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}


def _markdown(r: dict) -> str:
    b, h, hs = r["batching"], r["http_overhead"], r["http_overhead_spinning"]
    checks = "\n".join(
        f"- {k}: **{v}** (target {'>=' if k == 'batching_speedup' else '<='} {r['targets'][k]}): "
        f"{'pass' if r['passed'][k] else 'FAIL'}"
        for k, v in r["checks"].items()
    )
    rounds = "\n".join(
        f"| {name} | {i + 1} | {row['throughput_rps']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} "
        f"| {row['statuses']} |"
        for name, rs in b["rounds"].items()
        for i, row in enumerate(rs)
    )
    lv = "\n".join(f"| {k} | {v['p50_ms']} | {v['p95_ms']} |" for k, v in r.get("levels_server_latency", {}).items())
    a = r.get("adaptive")
    adaptive = (
        f"""## Adaptive compute under a deadline
Deadline {a["deadline_ms"]} ms (between `full`'s p50 and the fastest trimmed level's p95, server-side).
`full` alone misses it on {100 * a["full_miss_rate_at_this_deadline"]:.1f}% of requests. With `compute: auto`:
levels chosen {a["auto_levels"]}, statuses {a["auto_statuses"]},
miss rate **{100 * a["auto_miss_rate"]:.2f}%**, p50 {a["auto_p50_ms"]} ms.
({a["how"]}.)
"""
        if a
        else "No trimmed levels in this model: the adaptive check needs one.\n"
    )
    return f"""# Service benchmark

`trimvlm bench service --models {r["models"]}` on {r["machine"]["cpu"]} ({r["machine"]["cores"]} cores), loopback, one run.
Load generator and servers share the machine.

## Checks
{checks}

## Dynamic batching: /vqa, {r["clients"]} concurrent clients, {r["requests_per_round"]} requests per round
Median throughput: batching {b["median_throughput_rps"]["batching"]} req/s,
no batching {b["median_throughput_rps"]["no_batching"]} req/s
(**{b["speedup"]}x**); mean executed batch size with batching: {b["mean_batch_size"]}.

| server | round | req/s | p50 ms | p95 ms | p99 ms | statuses |
|---|---|---:|---:|---:|---:|---|
{rounds}

## HTTP overhead at batch 1
Default settings: bare runtime p50 {h["bare_runtime_p50_ms"]} ms, HTTP round trip p50 {h["http_round_trip_p50_ms"]} ms:
overhead **{h["overhead_p50_ms"]} ms** over {h["samples"]} requests.
With `TRIMVLM_ORT_SPINNING=true` (server and bare runtime): bare {hs["bare_runtime_p50_ms"]} ms, round trip
{hs["http_round_trip_p50_ms"]} ms: overhead **{hs["overhead_p50_ms"]} ms**.
How: {h["how"]}.

## Server-side latency per level (sequential requests)
| level | p50 ms | p95 ms |
|---|---:|---:|
{lv}

{adaptive}"""
