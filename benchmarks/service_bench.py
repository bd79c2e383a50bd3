"""`trimvlm bench service`: the service on loopback, measured in one run on one machine.

- batching: /vqa throughput with 32 concurrent closed-loop clients, dynamic batching on vs off
  (two servers on the same models, driven one at a time, rounds interleaved A B A B);
- HTTP overhead at batch 1: p50 of sequential POST /vqa round trips minus p50 of the bare
  runtime (TaskModel.vqa on the same inputs in this process), interleaved in rounds;
- adaptive compute: each level's server-side latency at concurrency 1, then `auto` under
  `balanced`'s p99 as the deadline (the issue's case) and a sweep of deadlines: level mix,
  answered, refused early and missed shares.

Writes JSON + Markdown (reports/service by default).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from benchmarks.loadgen import RawClient, closed_loop, open_loop, percentile
from service.machine import machine_info

TARGETS = {"batching_speedup": 4.0, "http_overhead_ms": 2.0, "deadline_miss_rate": 0.01}
# The mixed workload of the sweeps: share of requests per endpoint (a VQA-heavy product).
MIX = {"vqa": 0.7, "caption": 0.15, "rank": 0.15}
RANK_TEXTS = ["a red circle", "a blue square", "a green triangle", "a yellow rectangle"]
CONCURRENCY = (1, 4, 16, 64)
OPEN_LOOP_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the batching server's closed-loop capacity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_200(proc: subprocess.Popen, url: str, timeout_s: float, exited: Callable[[], str], every_s: float = 0.2) -> None:
    """Poll GET url until it answers 200. RuntimeError(exited()) if proc ends first, TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(exited())
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f} s")


class ServerProcess:
    """`trimvlm serve` in a subprocess with TRIMVLM_* overrides; waits for /readyz."""

    def __init__(self, models: Path, env: dict[str, str] | None = None, timeout_s: float = 120.0, naive_baseline: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "TRIMVLM_LOG_JSON": "true", "TRIMVLM_LOG_LEVEL": "warning", **(env or {})}
        if naive_baseline:  # benchmarks/baselines/naive_app.py: the torch model per request (`models` is its folder)
            full_env["NAIVE_MODEL"] = str(models)
            app = "benchmarks.baselines.naive_app:app"
            cmd = [sys.executable, "-m", "uvicorn", app, "--port", str(self.port), "--log-level", "warning"]
        else:
            cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--models", str(models)]
        ready = "/healthz" if naive_baseline else "/readyz"
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_200(self.proc, self.url + ready, timeout_s, lambda: f"server exited: {self.proc.stderr.read()[-2000:]}")
        except TimeoutError:
            self.stop()
            raise

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


def mixed_requests(items, seed: int = 0):
    """Request i of the sweeps: /vqa, /caption or /retrieval/rank drawn by MIX (same sequence on
    every server), each with the server's default compute."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(list(MIX), size=4096, p=list(MIX.values()))

    def make(i):
        image, question, _ = items[i % len(items)]
        kind = kinds[i % len(kinds)]
        if kind == "vqa":
            return "/vqa", {"image": image, "question": question}, None
        if kind == "caption":
            return "/caption", {"image": image, "max_length": 20}, None
        return "/retrieval/rank", {"image": image, "texts": RANK_TEXTS}, None

    return make


def sweep(servers: dict, items, concurrency=CONCURRENCY, fractions=OPEN_LOOP_FRACTIONS, seconds: float = 6.0) -> dict:
    """The mixed workload on every server: closed-loop clients 1..64, then open-loop Poisson
    arrivals at fractions of the first server's closed-loop capacity; servers take turns per point."""
    make = mixed_requests(items)
    closed: dict[str, dict] = {name: {} for name in servers}
    for c in concurrency:
        for name, srv in servers.items():
            stats = asyncio.run(closed_loop(srv.url, make, c, max(60, 12 * c), warmup=min(c, 8)))
            closed[name][str(c)] = stats.summary()
    first = next(iter(servers))
    capacity = max(row["throughput_rps"] for row in closed[first].values())
    rates = [round(f * capacity, 1) for f in fractions]
    opened: dict[str, dict] = {name: {} for name in servers}
    for rate in rates:
        for name, srv in servers.items():
            stats = asyncio.run(open_loop(srv.url, make, rate, seconds, seed=1))
            row = stats.summary()
            row["offered_rps"] = rate
            opened[name][str(rate)] = row
    return {
        "mix": MIX,
        "closed_loop": closed,
        "open_loop": opened,
        "capacity_rps": capacity,
        "open_loop_seconds": seconds,
        "how": "closed loop: N clients on keep-alive connections, max(60, 12N) requests per point; open loop: Poisson "
        f"arrivals for {seconds:g} s at fractions {list(fractions)} of the '{first}' server's best closed-loop "
        "throughput, latency measured until every answer arrived; the same request sequence on every server",
    }


def plot_sweep(sw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "closed_loop", "closed loop (clients 1..64)"),
        (axes[1], "open_loop", "open loop (Poisson)"),
    ):
        for i, (name, rows) in enumerate(sw[key].items()):
            x_key = "offered_rps" if key == "open_loop" else "throughput_rps"
            pts = [(r[x_key], r["p50_ms"], r["p99_ms"]) for r in rows.values() if r["p50_ms"] is not None]
            if not pts:
                continue
            x, p50, p99 = zip(*pts, strict=True)
            colour = f"C{i}"
            ax.plot(x, p50, "o-", color=colour, label=f"{name} p50")
            ax.plot(x, p99, "s--", color=colour, alpha=0.6, label=f"{name} p99")
        ax.set_yscale("log")
        ax.set_xlabel("offered requests / s" if key == "open_loop" else "answered requests / s")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Mixed /vqa, /caption, /retrieval/rank: latency vs throughput", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _level_latencies(url: str, items, levels: list[str], n: int) -> dict[str, list[float]]:
    """Server-reported latency_ms of n sequential requests per level, levels alternated request
    by request so machine noise lands on all of them alike."""
    out: dict[str, list[float]] = {lv: [] for lv in levels}
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for i in range(n):
            image, question, _ = items[i % len(items)]
            for lv in levels:
                r = c.post("/vqa", json={"image": image, "question": question, "compute": lv})
                r.raise_for_status()
                out[lv].append(r.json()["latency_ms"])
    return out


def _auto_under_deadline(url: str, items, deadline_ms: float, n: int) -> dict:
    """n sequential `compute: auto` requests with this deadline: level mix, answered / refused
    (503, early) / missed (late answers + 504) shares, all out of n."""
    levels, statuses, late, lat = {}, {}, 0, []
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for i in range(n):
            image, question, _ = items[i % len(items)]
            r = c.post("/vqa", json={"image": image, "question": question, "compute": "auto", "deadline_ms": deadline_ms})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                data = r.json()
                lat.append(data["latency_ms"])
                late += data["latency_ms"] > deadline_ms
                levels[data["compute"]["level"]] = levels.get(data["compute"]["level"], 0) + 1
    return {
        "deadline_ms": round(deadline_ms, 3),
        "levels": levels,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "answered_rate": round(statuses.get(200, 0) / n, 4),
        "refused_rate": round(statuses.get(503, 0) / n, 4),
        "miss_rate": round((late + statuses.get(504, 0)) / n, 4),
        "p50_ms": round(percentile(sorted(lat), 50), 3) if lat else None,
    }


def _adaptive(url: str, items, level_names: list[str], n_levels: int = 200, n_auto: int = 300) -> dict:
    """The issue's case: a deadline `balanced` meets (its p99) that `full` misses (when full's p50
    is above it), plus a sweep of deadlines from the fastest level's p50 to full's p99, each
    with the miss rate `full` alone would have (from the same level latencies)."""
    lat = _level_latencies(url, items, level_names, n_levels)
    levels = {lv: {f"p{q}_ms": round(percentile(sorted(v), q), 3) for q in (50, 95, 99)} for lv, v in lat.items()}
    out: dict = {"levels_server_latency": levels}
    if "balanced" not in levels:
        return out
    target = levels["balanced"]["p99_ms"]
    low = min(v["p50_ms"] for v in levels.values())
    grid = sorted({round(float(x), 3) for x in np.linspace(low, levels["full"]["p99_ms"], 5)} | {target})
    sweep = []
    for d in grid:
        row = _auto_under_deadline(url, items, d, n_auto)
        row["full_only_miss_rate"] = round(float(np.mean([x > d for x in lat["full"]])), 4)
        sweep.append(row)
    case = next(r for r in sweep if r["deadline_ms"] == target)
    out["adaptive"] = {
        **case,
        "full_cannot_meet": levels["full"]["p50_ms"] > target,
        "sweep": sweep,
        "how": "server-side latency_ms (arrival in the app to response) against deadline_ms, sequential requests; "
        "misses = late answers + 504s; refused = 503 deadline_unreachable (answered at once, not queued); "
        "rates out of all requests",
    }
    return out


def run(
    models: Path,
    out: Path,
    clients: int = 32,
    requests: int = 640,
    rounds: int = 3,
    overhead_samples: int = 200,
    baseline: Path | None = Path("models/trimvlm-teacher/1"),
    concurrency: tuple[int, ...] = CONCURRENCY,
    fractions: tuple[float, ...] = OPEN_LOOP_FRACTIONS,
    sweep_seconds: float = 6.0,
    adaptive_requests: tuple[int, int] = (200, 300),
) -> dict:
    from service.tasks import TaskModel

    out.mkdir(parents=True, exist_ok=True)
    items = easy_vqa_requests(256)
    report: dict = {
        "machine": machine_info("cpu", "cores", "python"),
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
        # 1b. the mixed workload: batching, no batching and the naive torch baseline, side by side
        servers = {"trimvlm": batched, "trimvlm, no batching": unbatched}
        naive = None
        if baseline is not None and (Path(baseline) / "config.json").is_file():
            naive = ServerProcess(Path(baseline), naive_baseline=True)
            servers[f"naive torch baseline ({Path(baseline).parent.name})"] = naive
        else:
            report["baseline_skipped"] = f"{baseline} not found"
        try:
            report["sweep"] = sweep(servers, items, concurrency, fractions, sweep_seconds)
        finally:
            if naive is not None:
                naive.stop()
    finally:
        unbatched.stop()
    plot_sweep(report["sweep"], out / "latency_vs_throughput.png")
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
        from service.settings import Settings

        options = Settings().runtime_options()
        tasks = TaskModel(models if (models / "manifest.json").is_file() else _first_model(models), options=options)
        pre = []
        for image, question, _ in items[:overhead_samples]:
            from service.images import ImageLimits, load_request_image

            arr = load_request_image(image, ImageLimits(), tasks.image_spec).array
            ids, mask = tasks.tokenize([question])
            pre.append((tasks.pixels(arr[None]), ids, mask))
        report["http_overhead"] = _overhead(batched.url, tasks, items[:overhead_samples], pre, rounds)
        # the same with ONNX Runtime's threads spin-waiting (lower latency at low load, see README)
        spinning_options = dataclasses.replace(options, extra={**options.extra, "allow_spinning": True})
        spin_tasks = TaskModel(tasks.folder, options=spinning_options)
        with ServerProcess(models, {"TRIMVLM_ORT_SPINNING": "true"}) as spinning:
            report["http_overhead_spinning"] = _overhead(spinning.url, spin_tasks, items[:overhead_samples], pre, rounds)

        # 3. adaptive compute: each level's latency, then `auto` under a sweep of deadlines
        report |= _adaptive(batched.url, items, tasks.level_names, *adaptive_requests)
    finally:
        batched.stop()

    checks = {"batching_speedup": report["batching"]["speedup"], "http_overhead_ms": report["http_overhead"]["overhead_p50_ms"]}
    if "adaptive" in report:
        checks["deadline_miss_rate"] = report["adaptive"]["miss_rate"]
    report["checks"] = checks
    report["headline"] = service_headline(report)
    report["passed"] = {k: (v >= TARGETS[k] if k == "batching_speedup" else v <= TARGETS[k]) for k, v in checks.items()}
    report["targets"] = TARGETS
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(_markdown(report))
    return report


def service_headline(r: dict) -> dict:
    """The ratios README and docs/BENCHMARKS.md quote."""
    out = {"batching_vs_none_vqa_throughput": r["batching"]["speedup"]}
    closed = r.get("sweep", {}).get("closed_loop", {})
    best = {name: max(row["throughput_rps"] for row in rows.values()) for name, rows in closed.items()}
    names = list(closed)
    if len(names) >= 2:
        out["batching_vs_none_mixed_best_throughput"] = round(best[names[0]] / best[names[1]], 3)
    if len(names) >= 3:
        ours, naive = closed[names[0]], closed[names[2]]
        out["service_vs_naive_best_throughput"] = round(best[names[0]] / best[names[2]], 3)
        if "1" in ours and ours["1"]["p50_ms"] and naive["1"]["p50_ms"]:
            out["service_vs_naive_p50_latency_c1"] = round(naive["1"]["p50_ms"] / ours["1"]["p50_ms"], 3)
    out["http_overhead_p50_ms"] = r["http_overhead"]["overhead_p50_ms"]
    return out


def _overhead(url: str, tasks, items, pre, rounds: int) -> dict:
    """p50 HTTP round trip minus p50 bare runtime call, alternated request by request."""

    async def measure():
        bare, http, server = [], [], []
        async with RawClient(url) as c:
            for _ in range(rounds):
                for (image, question, _), (px, ids, mask) in zip(items, pre, strict=True):
                    t0 = time.perf_counter()
                    tasks.vqa(px, ids, mask, level="full")
                    bare.append(1000 * (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    status, _, content = await c.post("/vqa", {"image": image, "question": question, "compute": "full"})
                    http.append(1000 * (time.perf_counter() - t0))
                    if status != 200:
                        raise RuntimeError(f"/vqa answered {status}: {content[:200]!r}")
                    server.append(json.loads(content)["latency_ms"])
        return bare, http, server

    bare, http, server = asyncio.run(measure())
    return {
        "bare_runtime_p50_ms": round(statistics.median(bare), 3),
        "http_round_trip_p50_ms": round(statistics.median(http), 3),
        "overhead_p50_ms": round(statistics.median(http) - statistics.median(bare), 3),
        "server_latency_p50_ms": round(statistics.median(server), 3),
        "samples": len(http),
        "how": "sequential keep-alive POST /vqa (base64 PNG, compute=full) round trips from the load generator's raw "
        "HTTP/1.1 client in the bench process, minus TaskModel.vqa(full) on the same pre-decoded inputs in the same "
        "process with the server's runtime settings (threads, spinning); alternated request by request. "
        "server_latency = the response's latency_ms (inside the app: from the ASGI call to the response)",
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
    lv = "\n".join(
        f"| {k} | {v['p50_ms']} | {v['p95_ms']} | {v.get('p99_ms', '')} |" for k, v in r.get("levels_server_latency", {}).items()
    )
    a = r.get("adaptive")
    if a:
        sweep = "\n".join(
            f"| {row['deadline_ms']}{' (case)' if row['deadline_ms'] == a['deadline_ms'] else ''} "
            f"| {100 * row['full_only_miss_rate']:.1f}% | {row['levels']} | {100 * row['answered_rate']:.1f}% "
            f"| {100 * row['refused_rate']:.1f}% | {100 * row['miss_rate']:.2f}% |"
            for row in a["sweep"]
        )
        exists = (
            "`full`'s p50 is above it, so `full` alone misses most requests"
            if a["full_cannot_meet"]
            else "**`full`'s p50 is not above it on this run**: the levels' latencies are too close here for a deadline "
            "that `balanced` meets and `full` does not"
        )
        adaptive = f"""## Adaptive compute under deadlines
The issue's case: deadline {a["deadline_ms"]} ms = `balanced`'s server-side p99; {exists}.
With `compute: auto`: levels chosen {a["levels"]}, statuses {a["statuses"]}: answered **{100 * a["answered_rate"]:.1f}%**,
refused early {100 * a["refused_rate"]:.1f}%, deadline-miss rate **{100 * a["miss_rate"]:.2f}%**.

Sweep ({a["how"]}):

| deadline ms | `full` alone misses | `auto` levels | answered | refused (503) | missed |
|---:|---:|---|---:|---:|---:|
{sweep}
"""
    else:
        adaptive = "No `balanced` level in this model: the adaptive check needs one.\n"
    return f"""# Service benchmark

`trimvlm bench service --models {r["models"]}` on {r["machine"]["cpu"]} ({r["machine"]["cores"]} cores), loopback, one run.
Load generator and servers share the machine.

## Checks
{checks}

## Headline ratios
{chr(10).join(f"- {k}: **{v}**" for k, v in r.get("headline", {}).items())}

## Dynamic batching: /vqa, {r["clients"]} concurrent clients, {r["requests_per_round"]} requests per round
Median throughput: batching {b["median_throughput_rps"]["batching"]} req/s,
no batching {b["median_throughput_rps"]["no_batching"]} req/s
(**{b["speedup"]}x**); mean executed batch size with batching: {b["mean_batch_size"]}.

| server | round | req/s | p50 ms | p95 ms | p99 ms | statuses |
|---|---|---:|---:|---:|---:|---|
{rounds}

## HTTP overhead at batch 1
Default settings: bare runtime p50 {h["bare_runtime_p50_ms"]} ms, HTTP round trip p50 {h["http_round_trip_p50_ms"]} ms:
overhead **{h["overhead_p50_ms"]} ms** over {h["samples"]} requests (the app's own latency_ms p50:
{h.get("server_latency_p50_ms", "—")} ms, the rest is the HTTP server, loopback and the client).
With `TRIMVLM_ORT_SPINNING=true` (server and bare runtime): bare {hs["bare_runtime_p50_ms"]} ms, round trip
{hs["http_round_trip_p50_ms"]} ms: overhead **{hs["overhead_p50_ms"]} ms**.
How: {h["how"]}.

{_sweep_markdown(r)}
## Server-side latency per level (sequential requests, levels alternated)
| level | p50 ms | p95 ms | p99 ms |
|---|---:|---:|---:|
{lv}

{adaptive}"""


def _sweep_markdown(r: dict) -> str:
    sw = r.get("sweep")
    if not sw:
        return r.get("baseline_skipped", "")
    rows = []
    for mode, label, unit in (("closed_loop", "closed", "clients"), ("open_loop", "open", "offered req/s")):
        for name, points in sw[mode].items():
            for point, row in points.items():
                rows.append(
                    f"| {name} | {label}: {point} {unit} | {row['throughput_rps']} | {row['p50_ms']} | {row['p95_ms']} | "
                    f"{row['p99_ms']} | {row['statuses']} | {row['levels'] or ''} |"
                )
    mix = ", ".join(f"{k} {int(100 * v)}%" for k, v in sw["mix"].items())
    return f"""## Mixed workload: TrimVLM vs no batching vs the naive torch baseline
Mix: {mix}. {sw["how"]}. Naive baseline: `benchmarks/baselines/naive_app.py` (torch fp32 teacher per request).

![latency vs throughput](latency_vs_throughput.png)

| server | load | answered req/s | p50 ms | p95 ms | p99 ms | statuses | VQA levels |
|---|---|---:|---:|---:|---:|---|---|
{chr(10).join(rows)}
"""
