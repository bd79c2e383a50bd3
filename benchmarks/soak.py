"""`trimvlm bench soak --minutes N`: steady mixed-endpoint load on one server for N minutes.

Closed-loop clients (benchmarks/loadgen.py) send a mix that varies tensor shapes on purpose
(VQA at every compute level, batches of 1-4 items, captions of 8-20 tokens with 1-3 beams, rank
against 1-6 texts), so ONNX Runtime's memory arena sees many shapes. Recorded: the server's RSS
every second, every request's status and latency, p99 per window. Reported: RSS growth after the
first window, the RSS slope over the second half (MiB/min), errors, and p99 drift (last window /
first window). `--compare-arena` repeats the run with ORT's CPU memory arena off
(TRIMVLM_ORT_CPU_MEM_ARENA=false), for the evidence behind the default.

Writes report.json, REPORT.md and rss.png into `out` (reports/reliability/soak by default).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path

from benchmarks.loadgen import RunStats, closed_loop, percentile
from benchmarks.overload import MiB, RssSampler, machine, shape_images
from benchmarks.service_bench import ServerProcess

WINDOWS = 5


def mixed_factory():
    images = shape_images()
    texts = ["a red circle", "a blue rectangle", "a green triangle", "a shape", "something yellow", "two gray squares"]

    def make(i: int):
        rng = random.Random(i)
        image = images[i % len(images)][0]
        kind = rng.random()
        if kind < 0.55:
            item = {
                "image": image,
                "question": "what shape is in the image?",
                "compute": rng.choice(["full", "balanced", "fast"]),
            }
            n = rng.choice([1, 1, 2, 4])
            return "/vqa", (item if n == 1 else {"items": [item] * n}), None
        if kind < 0.8:
            return "/caption", {"image": image, "max_length": rng.randint(8, 20), "num_beams": rng.randint(1, 3)}, None
        return "/retrieval/rank", {"image": image, "texts": texts[: rng.randint(1, 6)]}, None

    return make


def windows(stats: RunStats, t0: float, seconds: float, n: int = WINDOWS) -> list[dict]:
    width = seconds / n
    out = []
    for w in range(n):
        lo, hi = t0 + w * width, t0 + (w + 1) * width
        rs = [r for r in stats.results if lo <= r.started_s < hi]
        ok = sorted(1000 * r.latency_s for r in rs if r.status == 200)
        out.append(
            {
                "start_s": round(w * width, 1),
                "requests": len(rs),
                "ok": len(ok),
                "errors": sum(1 for r in rs if r.status == 0 or r.status >= 500),
                "p50_ms": round(percentile(ok, 50), 1) if ok else None,
                "p99_ms": round(percentile(ok, 99), 1) if ok else None,
            }
        )
    return out


def soak_once(models: Path, seconds: float, clients: int, env: dict[str, str]) -> dict:
    make = mixed_factory()
    with ServerProcess(models, {"TRIMVLM_LOG_LEVEL": "warning", **env}) as srv:

        async def go():
            await closed_loop(srv.url, make, clients, seconds=min(5.0, seconds / 10))  # warm-up: every shape once
            sampler = RssSampler(srv.proc.pid, every_s=1.0)
            t0 = time.perf_counter()
            sampler.start(t0)
            stats = await closed_loop(srv.url, make, clients, seconds=seconds)
            await sampler.stop()
            return stats, sampler, t0

        stats, sampler, t0 = asyncio.run(go())
        alive = srv.proc.poll() is None
    statuses = Counter(r.status for r in stats.results)
    wins = windows(stats, t0, seconds)
    rss = sampler.samples
    first_end = seconds / WINDOWS
    after_first = [b for t, b in rss if t >= first_end] or [b for _, b in rss]
    half = [(t, b) for t, b in rss if t >= seconds / 2]
    slope = 0.0
    if len(half) >= 3:
        ts = [t for t, _ in half]
        bs = [b for _, b in half]
        mt, mb = sum(ts) / len(ts), sum(bs) / len(bs)
        den = sum((t - mt) ** 2 for t in ts)
        slope = sum((t - mt) * (b - mb) for t, b in half) / den * 60 / MiB if den else 0.0
    p99_first, p99_last = wins[0]["p99_ms"], wins[-1]["p99_ms"]
    return {
        "env": env,
        "seconds": round(seconds, 1),
        "clients": clients,
        "summary": stats.summary(),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(v for k, v in statuses.items() if k == 0 or k >= 500),
        "windows": wins,
        "p99_first_ms": p99_first,
        "p99_last_ms": p99_last,
        "p99_drift": round(p99_last / p99_first, 3) if p99_first and p99_last else None,
        "rss": {
            **sampler.summary(),
            "after_first_window_mib": round(after_first[0] / MiB, 1),
            "growth_after_first_window_mib": round((rss[-1][1] - after_first[0]) / MiB, 1),
            "slope_second_half_mib_per_min": round(slope, 2),
        },
        "rss_series": [(round(t, 1), round(b / MiB, 1)) for t, b in rss],
        "server_alive": alive,
    }


def plot(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, r in runs.items():
        ts, mb = zip(*r["rss_series"], strict=True)
        ax.plot(ts, mb, label=name)
        wx = [w["start_s"] + r["seconds"] / WINDOWS / 2 for w in r["windows"]]
        ax2.plot(wx, [w["p99_ms"] for w in r["windows"]], marker="o", label=name)
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("trimvlm bench soak: RSS and p99 over time")
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.set_ylabel("p99 per window (ms)")
    ax2.set_xlabel("seconds")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(models: Path, out: Path, minutes: float = 5.0, clients: int = 8, compare_arena: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    configs = {"arena on (default)": {}}
    if compare_arena:
        configs["arena off"] = {"TRIMVLM_ORT_CPU_MEM_ARENA": "false"}
    runs = {name: soak_once(models, 60 * minutes, clients, env) for name, env in configs.items()}
    plot(runs, out / "rss.png")
    cmd = f"trimvlm bench soak --minutes {minutes:g} --clients {clients}" + (" --compare-arena" if compare_arena else "")
    report = {"command": cmd, "machine": machine(), "models": str(models), "runs": runs}
    report["checks"] = {
        name: {
            "no_errors": r["errors"] == 0,
            "server_alive": r["server_alive"],
            "all_answered_200": r["statuses"] == {"200": r["summary"]["requests"]},
        }
        for name, r in runs.items()
    }
    report["passed"] = all(all(c.values()) for c in report["checks"].values())
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "REPORT.md").write_text(markdown(report))
    return report


HEADER = (
    "| configuration | requests | errors | p99 first -> last window | RSS start (MiB) | after window 1 | end (growth) "
    "| peak | slope, 2nd half (MiB/min) |"
)


def markdown(report: dict) -> str:
    m = report["machine"]
    rows = []
    for name, r in report["runs"].items():
        s, rss = r["summary"], r["rss"]
        drift = f"{r['p99_first_ms']} -> {r['p99_last_ms']} ms (x{r['p99_drift']})"
        rss_cols = (
            f"{rss['start_mib']} | {rss['after_first_window_mib']} | {rss['end_mib']} ({rss['growth_after_first_window_mib']:+})"
        )
        rows.append(
            f"| {name} | {s['requests']} ({s['throughput_rps']} req/s) | {r['errors']} | {drift} | {rss_cols} "
            f"| {rss['peak_mib']} | {rss['slope_second_half_mib_per_min']:+} |"
        )
    return f"""# Soak: {report["command"]}

{m["cpu"]} ({m["cores"]} cores, {m["note"]}), ONNX Runtime {m["onnxruntime"]}. One `trimvlm serve`
(default settings) per configuration; closed-loop clients sending a mix of /vqa (every compute level,
batches of 1-4), /caption (8-20 tokens, 1-3 beams) and /retrieval/rank (1-6 texts).

{HEADER}
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![RSS over time](rss.png)

Checks: {json.dumps(report["checks"])}
"""


def combine(root: Path) -> dict:
    """reports/reliability/{overload,soak}/report.json -> reports/reliability/report.json + REPORT.md."""
    overload = json.loads((root / "overload" / "report.json").read_text())
    soak = json.loads((root / "soak" / "report.json").read_text())
    runs = {name: {k: v for k, v in r.items() if k != "rss_series"} for name, r in soak["runs"].items()}
    out = {
        "machine": overload["machine"],
        "overload": {
            k: overload.get(k)
            for k in (
                *("command", "client", "capacity", "overload", "goodput", "cpu_cores_used"),
                *("server_side_200", "rss", "after", "checks"),
            )
        },
        "soak": {"command": soak["command"], "runs": runs, "checks": soak["checks"]},
        "passed": overload["passed"] and soak["passed"],
    }
    (root / "report.json").write_text(json.dumps(out, indent=1) + "\n")
    o, c = overload["overload"], overload["capacity"]
    lines = [
        "# Reliability figures",
        "",
        f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, {out['machine']['note']}; "
        f"ONNX Runtime {out['machine']['onnxruntime']}. Written by `make reliability-report`; what each figure "
        "promises and which test holds it in CI: docs/RELIABILITY.md.",
        "",
        f"## Overload (`{overload['command']}`)",
        "",
        f"- capacity {c['throughput_rps']} req/s (closed loop, {c['clients']} clients); offered {o['offered_rps']} req/s "
        f"({o['factor']:g}x, {overload.get('client', {}).get('overload', 'python')}) for {o['duration_s']:.0f} s: "
        f"{o['sent']} requests sent",
        f"- {o['ok']} answered 200 ({o['ok_rps']} req/s), {o['refused']} refused with 429/503 "
        f"({o['refused_without_retry_after']} without Retry-After of {o.get('refusals_checked_for_retry_after', o['refused'])} "
        f"checked), {o['connection_errors']} connection errors, other statuses: {o['other_statuses'] or 'none'}",
        f"- goodput under overload: {overload['goodput']['ratio']} of capacity (target {overload['goodput']['target_ratio']})",
        f"- 200s inside the server: p50 <= {overload['server_side_200'].get('p50_ms_at_most')} ms, "
        f"p99 <= {overload['server_side_200'].get('p99_ms_at_most')} ms; seen by the client p50 {o['ok_p50_ms']} ms, "
        f"p99 {o['ok_p99_ms']} ms",
        f"- server RSS {overload['rss']['start_mib']} -> peak {overload['rss']['peak_mib']} MiB "
        f"({overload['rss']['growth_mib']:+} MiB); alive and serving after: {overload['after']['status'] == 200}",
        "",
        "Details: [overload/REPORT.md](overload/REPORT.md).",
        "",
        f"## Soak (`{soak['command']}`)",
        "",
        HEADER,
        "|" + "---|" * 9,
    ]
    for row in markdown(soak).splitlines():
        if row.startswith("| ") and not row.startswith("| configuration"):
            lines.append(row)
    lines += ["", "![RSS over time](soak/rss.png)", "", "Details: [soak/REPORT.md](soak/REPORT.md).", ""]
    (root / "REPORT.md").write_text("\n".join(lines))
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "combine":
        combine(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m benchmarks.soak combine reports/reliability")
