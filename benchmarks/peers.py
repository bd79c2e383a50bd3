"""`trimvlm bench peers`: TrimVLM against the serving frameworks users would pick instead (LitServe, mosec,
Ray Serve), one exported model, one run, one machine.

Every peer wraps the same service.tasks.TaskModel with the service's ONNX Runtime settings
(benchmarks/baselines/vqa_model.py), so only the HTTP/batching layer differs; peers batch up to 32 items
with a 2 ms window. Steps:
- each server, every time it starts, answers the same real /vqa requests as the bare TaskModel does
  (the answer identical, the score within SCORE_TOLERANCE), else the run stops with the differences;
- rounds interleaved (round r: the bare runtime, then every server at every client count, the servers'
  order rotated per round; one server runs at a time), medians over rounds;
- load from wrk (C, closed loop, a Lua script for the POST bodies) or, where wrk is absent, the project's
  raw asyncio client (benchmarks/loadgen.py); p50/p99 latency, req/s, errors;
- the server's whole process tree's CPU time during the window (psutil) per request served;
- the bare runtime's ceiling: TaskModel called directly (batch-1 latency, batch-32 items/s).
Writes report.json, REPORT.md and latency_vs_throughput.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx
import psutil

from benchmarks.chroma_server import ChromaServer, chroma_executable
from benchmarks.service_bench import easy_vqa_requests, free_port
from service.machine import machine_info

REPO = Path(__file__).resolve().parents[1]  # the peers' apps run as `python -m benchmarks.baselines...` from here
SERVERS = ("trimvlm", "trimvlm-2w", "litserve", "mosec", "mosec-2w", "ray")
TRIMVLM = ("trimvlm", "trimvlm-2w")  # the layouts the targets are evaluated for
LABELS = {
    "trimvlm": "trimvlm serve (defaults)",
    "trimvlm-2w": "trimvlm serve --workers 2",
    "litserve": "LitServe",
    "mosec": "mosec",
    "mosec-2w": "mosec, 2 inference workers",
    "ray": "Ray Serve",
}
PACKAGES = {s: s.removesuffix("-2w") for s in SERVERS}  # the distribution each server comes from
# Inference workers (processes) per peer; each session gets cores / workers threads. mosec-2w is
# mosec laid out as TrimVLM runs by default: two batches at once, single-threaded sessions.
INFERENCE_WORKERS = {"mosec-2w": 2}
SCORE_TOLERANCE = 1e-4
# The targets TrimVLM's serving layer is held to (same machine, same run)
TARGETS = {
    "throughput_vs_mosec_c32": 1.1,  # >=
    "throughput_vs_mosec_c64": 1.1,  # >=
    "p99_vs_mosec_c64": 1.0,  # <=
    "p50_vs_litserve_c1": 0.8,  # <=
    "throughput_c64_fraction_of_ceiling": 0.85,  # >=
}


@dataclass
class Options:
    model: Path  # the exported model folder
    out: Path
    servers: tuple[str, ...] = SERVERS
    clients: tuple[int, ...] = (1, 32, 64)
    duration_s: float = 8.0
    rounds: int = 3
    warmup_s: float = 2.0
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    check_requests: int = 8
    body_variety: int = 16  # distinct request bodies the load cycles through
    ceiling_batch: int = 32
    ceiling_seconds: float = 3.0  # per bare-runtime figure and round
    request_timeout_s: float = 30.0
    start_timeout_s: float = 240.0
    load_generator: str = "auto"  # wrk | python | auto
    title: str = "TrimVLM vs serving frameworks"


class AnswerMismatch(RuntimeError):
    """A server answered the check requests differently from the bare TaskModel."""


def installed(server: str) -> bool:
    """Whether a peer's package is importable here (TrimVLM always is; its workers need a Chroma server for
    their shared gallery: `chroma` from chromadb, in the dev extra)."""
    if server == "trimvlm":
        return True
    if server == "trimvlm-2w":
        return chroma_executable() is not None
    try:
        metadata.version(PACKAGES[server])
    except metadata.PackageNotFoundError:
        return False
    return True


def version_of(server: str) -> str:
    try:
        return metadata.version(PACKAGES[server])
    except metadata.PackageNotFoundError:
        from service import __version__

        return __version__


def pick_load_generator(choice: str) -> str:
    if choice not in ("auto", "wrk", "python"):
        raise ValueError(f"load generator {choice!r}: wrk, python or auto")
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk); or use --load-generator python")
    return choice


# ---------------------------------------------------------------- servers


class Server:
    """One server under test in a session of its own, answering POST /vqa on 127.0.0.1:port."""

    def __init__(self, name: str, opts: Options, logdir: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        timeout_ms = int(1000 * opts.request_timeout_s)
        env = {
            **os.environ,
            "TRIMVLM_PEER_MODEL": str(opts.model.resolve()),
            "PEER_MAX_BATCH_SIZE": str(opts.max_batch),
            "PEER_BATCH_TIMEOUT_MS": f"{opts.batch_wait_ms:g}",
            "TRIMVLM_LOG_LEVEL": "warning",  # no access log line per request (peers run without theirs)
            "RAY_USAGE_STATS_ENABLED": "0",
            "PEER_INFERENCE_WORKERS": str(INFERENCE_WORKERS.get(name, 1)),
        }
        self.gallery = None  # trimvlm-2w's workers share a gallery on a Chroma server of their own
        if name == "trimvlm-2w":
            self.gallery = ChromaServer(logdir / f"chroma-{self.port}", logdir / "chroma.log").start()
            env |= {"TRIMVLM_GALLERY_BACKEND": "chroma", "TRIMVLM_GALLERY_URL": self.gallery.url}
        py = [sys.executable, "-m"]
        trimvlm = [*py, "service", "serve", "--models", str(opts.model.resolve()), "--port", str(self.port)]
        mosec = [*py, "benchmarks.baselines.mosec_app", "--port", str(self.port), "--address", "127.0.0.1"]
        mosec += ["--log-level", "warning", "--timeout", str(timeout_ms)]
        cmd = {
            "trimvlm": trimvlm,
            "trimvlm-2w": [*trimvlm, "--workers", "2"],
            "litserve": [
                *py,
                "benchmarks.baselines.litserve_app",
                "--port",
                str(self.port),
                "--max-batch-size",
                str(opts.max_batch),
                "--batch-timeout-ms",
                f"{opts.batch_wait_ms:g}",
                "--timeout-s",
                f"{opts.request_timeout_s:g}",
            ],
            "mosec": mosec,
            "mosec-2w": mosec,
            "ray": [*py, "benchmarks.baselines.ray_app", "--port", str(self.port)],
        }[name]
        self.log = logdir / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.root = psutil.Process(self.proc.pid)

    READY_IN_A_ROW = 10  # a worker still loading answers 503: 10 in a row on new connections miss one with p = 2**-10

    def wait_ready(self, body: dict, timeout_s: float) -> float:
        """Seconds until real /vqa requests are answered with 200, READY_IN_A_ROW in a row, each on a new
        connection (the kernel hashes new connections over a multi-worker server's sockets)."""
        t0, in_a_row = time.perf_counter(), 0
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                ok = httpx.post(self.url + "/vqa", json=body, timeout=30.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            in_a_row = in_a_row + 1 if ok else 0
            if in_a_row == self.READY_IN_A_ROW:
                return time.perf_counter() - t0
            if not ok:
                time.sleep(0.3)
        raise TimeoutError(f"{self.name} not answering /vqa after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def tree(self) -> list[psutil.Process]:
        """The server's processes, with its gallery server where it has one (part of what it runs on)."""
        roots = [self.root] + ([psutil.Process(self.gallery.proc.pid)] if self.gallery and self.gallery.proc else [])
        out = []
        for root in roots:
            try:
                out += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def cpu_times(self) -> dict[int, float]:
        """CPU seconds (user + system) of every process of the server's tree, by pid."""
        out = {}
        for p in self.tree():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    # seconds a server gets to stop on SIGTERM to its main process before the rest of its tree is signalled:
    # Ray's driver shuts Serve and the cluster down itself; LitServe's main process waits on its workers
    STOP_GRACE_S = {"ray": 20.0}

    def stop(self) -> None:
        """SIGTERM to the server's main process, then to whatever of its tree is left after its grace
        period, then SIGKILL after 10 s more; by pid (Ray's actors run in process groups of their own)."""
        gallery, self.gallery = self.gallery, None  # stopped last, after the workers that use it
        procs = self.tree()
        if self.proc.poll() is None:
            self.proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=self.STOP_GRACE_S.get(self.name, 3.0))
        for sig in ("terminate", "kill"):
            for p in alive:
                try:
                    getattr(p, sig)()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=10)
        self.proc.poll()
        if gallery is not None:
            gallery.stop()


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots (processes started in between count from zero)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


# ---------------------------------------------------------------- load


def _lua_long_string(text: str) -> str:
    level = "=" * 3
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


def wrk_script(bodies: list[dict], path: Path) -> Path:
    """A wrk Lua script cycling through the POST /vqa bodies and printing one JSON summary line."""
    literals = ",\n".join(_lua_long_string(json.dumps(b)) for b in bodies)
    path.write_text(
        f"""local bodies = {{
{literals}
}}
local prepared = {{}}
local i = 0
init = function(args)
  for k, b in ipairs(bodies) do
    prepared[k] = wrk.format("POST", "/vqa", {{["Content-Type"] = "application/json"}}, b)
  end
end
request = function()
  i = i % #prepared + 1
  return prepared[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""
    )
    return path


def run_wrk(url: str, script: Path, clients: int, seconds: float, timeout_s: float) -> dict:
    """One closed-loop window of wrk (one thread: it drives 64 connections at these rates with
    a few % of a core). Returns the window's figures and wrk's own CPU seconds."""
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", f"--timeout={max(1, round(timeout_s))}s"]
    cmd += ["-s", str(script), url + "/vqa"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err[-2000:]}")
    ru = psutil.Process().cpu_times()  # children_user/system: wrk's CPU, accumulated
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {out[-2000:]}")
    s = json.loads(line[len("WRKJSON ") :])
    errors = {k: s[k] for k in ("connect", "read", "write", "status", "timeout")}
    ok = s["requests"] - s["status"]
    secs = s["duration_us"] / 1e6
    return {
        "requests": s["requests"],
        "ok": ok,
        "seconds": round(secs, 3),
        "throughput_rps": round(ok / secs, 2) if secs else 0.0,
        "p50_ms": round(s["p50_us"] / 1000, 3),
        "p90_ms": round(s["p90_us"] / 1000, 3),
        "p99_ms": round(s["p99_us"] / 1000, 3),
        "mean_ms": round(s["mean_us"] / 1000, 3),
        "errors": errors,
        "error_count": sum(errors.values()),
        "_children_cpu": ru.children_user + ru.children_system,
    }


def run_python_client(url: str, bodies: list[dict], clients: int, seconds: float, timeout_s: float) -> dict:
    """The same window from the project's raw asyncio client (where wrk is not installed)."""
    from benchmarks.loadgen import closed_loop

    t0 = time.process_time()
    stats = asyncio.run(
        closed_loop(url, lambda i: ("/vqa", bodies[i % len(bodies)], None), clients, seconds=seconds, timeout_s=timeout_s)
    )
    s = stats.summary()
    errors = {"status": s["requests"] - s["ok"] - sum(s["connection_errors"].values()), **s["connection_errors"]}
    return {
        "requests": s["requests"],
        "ok": s["ok"],
        "seconds": s["seconds"],
        "throughput_rps": s["throughput_rps"],
        "p50_ms": s["p50_ms"],
        "p90_ms": None,
        "p99_ms": s["p99_ms"],
        "mean_ms": s["mean_ms"],
        "errors": errors,
        "error_count": sum(errors.values()),
        "client_cpu_s": round(time.process_time() - t0, 3),
    }


@dataclass
class Load:
    generator: str
    bodies: list[dict]
    script: Path | None
    timeout_s: float

    def window(self, url: str, clients: int, seconds: float) -> dict:
        if self.generator == "python":
            return run_python_client(url, self.bodies, clients, seconds, self.timeout_s)
        before = psutil.Process().cpu_times()
        r = run_wrk(url, self.script, clients, seconds, self.timeout_s)
        r["client_cpu_s"] = round(r.pop("_children_cpu") - (before.children_user + before.children_system), 3)
        return r


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; not idle, not waiting for I/O)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def measure(server: Server, load: Load, clients: int, seconds: float) -> dict:
    """One window with the server tree's CPU time around it, and what the rest of the machine used
    meanwhile (other processes: a shared machine's noise, reported beside each figure)."""
    before, busy = server.cpu_times(), busy_seconds()
    r = load.window(server.url, clients, seconds)
    cpu = cpu_delta(before, server.cpu_times())
    busy = busy_seconds() - busy
    r["server_cpu_s"] = round(cpu, 3)
    r["server_cores"] = round(cpu / r["seconds"], 3) if r["seconds"] else None
    r["server_cpu_ms_per_request"] = round(1000 * cpu / r["ok"], 3) if r["ok"] else None
    other = busy - cpu - r["client_cpu_s"]
    r["other_cores"] = round(max(0.0, other) / r["seconds"], 3) if r["seconds"] else None
    return r


# ---------------------------------------------------------------- the bare runtime and the answer check


def bare_runtime(model, items: list, batch: int, seconds: float) -> dict:
    """TaskModel.vqa called directly on decoded items: batch-1 latency and batch-N items/s (medians of
    as many calls as fit in `seconds` each, at least 5)."""

    def timed(batch_items: list) -> list[float]:
        model.logits(batch_items)  # first call after the servers ran: caches and pools warm again
        out, t_end = [], time.perf_counter() + seconds
        while len(out) < 5 or time.perf_counter() < t_end:
            t = time.perf_counter()
            model.logits(batch_items)
            out.append(time.perf_counter() - t)
        return out

    busy, own, t0 = busy_seconds(), time.process_time(), time.perf_counter()
    one = timed(items[:1])
    full = [items[i % len(items)] for i in range(batch)]
    many = timed(full)
    other = busy_seconds() - busy - (time.process_time() - own)
    return {
        "batch1_p50_ms": round(1000 * statistics.median(one), 3),
        "batch1_calls": len(one),
        "batch": batch,
        "batchN_ms": round(1000 * statistics.median(many), 3),
        "batchN_items_per_s": round(batch / statistics.median(many), 2),
        "batchN_calls": len(many),
        "other_cores": round(max(0.0, other) / (time.perf_counter() - t0), 3),  # what else ran meanwhile
    }


def check_answers(server: Server, bodies: list[dict], reference: list[dict]) -> dict:
    """Each check request once, in order; every answer must equal the bare TaskModel's."""
    got, problems, max_diff = [], [], 0.0
    with httpx.Client(timeout=60.0) as c:
        for i, body in enumerate(bodies):
            r = c.post(server.url + "/vqa", json=body)
            if r.status_code != 200:
                problems.append(f"request {i}: HTTP {r.status_code} {r.text[:200]}")
                continue
            data = r.json()
            got.append({"answer": data.get("answer"), "score": data.get("score")})
            ref = reference[i]
            if data.get("answer") != ref["answer"]:
                problems.append(f"request {i} ({body['question']!r}): {data.get('answer')!r} != bare runtime's {ref['answer']!r}")
                continue
            diff = abs(float(data.get("score", float("nan"))) - ref["score"])
            max_diff = max(max_diff, diff)
            if not diff <= SCORE_TOLERANCE:
                problems.append(f"request {i}: score {data.get('score')} vs bare runtime's {ref['score']} (|diff| {diff:.2g})")
    if problems:
        raise AnswerMismatch(f"{server.name} does not answer as the bare TaskModel does:\n  " + "\n  ".join(problems))
    return {"requests": len(bodies), "identical_answers": True, "max_score_diff": max_diff}


# ---------------------------------------------------------------- the run


def _median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def summarise(rounds: list[dict]) -> dict:
    keys = (
        "throughput_rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "mean_ms",
        "server_cores",
        "server_cpu_ms_per_request",
        "client_cpu_s",
        "other_cores",
    )
    out = {k: _median([r.get(k) for r in rounds]) for k in keys}
    out["errors"] = sum(r["error_count"] for r in rounds)
    out["requests"] = sum(r["requests"] for r in rounds)
    out["rounds"] = rounds
    return out


def targets(results: dict, bare: dict, clients: tuple[int, ...], trimvlm: str = "trimvlm") -> dict:
    """The targets TrimVLM's layout `trimvlm` is held to, from the measured medians (None where a server or
    client count needed was not in the run)."""

    def fig(server: str, c: int, key: str):
        return results.get(server, {}).get(str(c), {}).get(key)

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    rows = {
        "throughput_vs_mosec_c32": (
            ratio(fig(trimvlm, 32, "throughput_rps"), fig("mosec", 32, "throughput_rps")),
            ">=",
            "throughput at 32 clients vs mosec's",
        ),
        "throughput_vs_mosec_c64": (
            ratio(fig(trimvlm, 64, "throughput_rps"), fig("mosec", 64, "throughput_rps")),
            ">=",
            "throughput at 64 clients vs mosec's",
        ),
        "p99_vs_mosec_c64": (
            ratio(fig(trimvlm, 64, "p99_ms"), fig("mosec", 64, "p99_ms")),
            "<=",
            "p99 at 64 clients vs mosec's",
        ),
        "p50_vs_litserve_c1": (
            ratio(fig(trimvlm, 1, "p50_ms"), fig("litserve", 1, "p50_ms")),
            "<=",
            "1-client p50 vs LitServe's",
        ),
        "throughput_c64_fraction_of_ceiling": (
            ratio(fig(trimvlm, 64, "throughput_rps"), bare.get("batchN_items_per_s")),
            ">=",
            f"throughput at 64 clients vs the bare runtime's batch-{bare.get('batch')} items/s",
        ),
    }
    out = {}
    for key, (value, op, what) in rows.items():
        goal = TARGETS[key]
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out[key] = {"what": what, "value": value, "target": f"{op} {goal:g}", "met": met}
    return out


def serving_share(results: dict, bare: dict, clients: tuple[int, ...]) -> dict:
    """The serving layer's share of each server's time: 1 - bare batch-1 latency / 1-client p50, and at
    the most clients 1 - req/s / the bare runtime's batch-N items/s."""
    out = {}
    top = max(clients)
    for server, rows in results.items():
        p50 = rows.get("1", {}).get("p50_ms")
        rps = rows.get(str(top), {}).get("throughput_rps")
        out[server] = {
            "latency_c1": round(1 - bare["batch1_p50_ms"] / p50, 4) if p50 else None,
            f"throughput_c{top}": round(1 - rps / bare["batchN_items_per_s"], 4) if rps else None,
        }
    return out


def headline(tg: dict, trimvlm: str = "trimvlm") -> dict:
    """The README's ratios (benchmarks/bench_docs.py formats `fraction` keys as %); another layout's
    keys carry its name (peers_trimvlm_2w_...)."""
    names = {
        "throughput_vs_mosec_c32": "peers_trimvlm_vs_mosec_throughput_c32",
        "throughput_vs_mosec_c64": "peers_trimvlm_vs_mosec_throughput_c64",
        "p99_vs_mosec_c64": "peers_trimvlm_vs_mosec_p99_c64",
        "p50_vs_litserve_c1": "peers_trimvlm_vs_litserve_p50_c1",
        "throughput_c64_fraction_of_ceiling": "peers_trimvlm_c64_fraction_of_ceiling",
    }
    prefix = "peers_" + trimvlm.replace("-", "_")
    return {names[k].replace("peers_trimvlm", prefix): v["value"] for k, v in tg.items() if v["value"] is not None}


def resolve_model(models: Path, model: str | None) -> Path:
    """--model as a folder with a manifest.json, or a name / name/version under --models (default: the
    embedded default, trimvlm-default, at its highest version)."""
    from service.repository import find_models

    if model and (Path(model) / "manifest.json").is_file():
        return Path(model)
    if (models / "manifest.json").is_file() and not model:
        return models
    wanted = model or "trimvlm-default"
    found = [f for f in find_models(models) if f"{f.parent.name}/{f.name}" == wanted or f.parent.name == wanted]
    if not found:
        raise ValueError(f"no exported model {wanted!r} under {models} (or give --model a folder with a manifest.json)")
    return max(found, key=lambda f: int(f.name) if f.name.isdigit() else -1)


def run(opts: Options, log=print) -> dict:
    from benchmarks.baselines.vqa_model import VqaModel

    for s in opts.servers:
        if s not in SERVERS:
            raise ValueError(f"unknown server {s!r} (known: {', '.join(SERVERS)})")
        if not installed(s):
            need = "chromadb (pip install -e '.[dev]')" if s == "trimvlm-2w" else "pip install -e '.[peers]'"
            raise RuntimeError(f"{s} is not installed: {need}")
    generator = pick_load_generator(opts.load_generator)
    t_start = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    n = max(opts.check_requests, opts.body_variety)
    requests = easy_vqa_requests(n, seed=0)
    bodies = [{"image": im, "question": q, "compute": "full"} for im, q, _ in requests]
    check_bodies = bodies[: opts.check_requests]
    load_bodies = bodies[: opts.body_variety]

    model = VqaModel(opts.model)
    items = [model.decode(b) for b in bodies]
    reference = [model.infer([it])[0] for it in items[: opts.check_requests]]

    results: dict[str, dict[str, list]] = {s: {str(c): [] for c in opts.clients} for s in opts.servers}
    bare_rounds, checks, starts = [], {s: [] for s in opts.servers}, {s: [] for s in opts.servers}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        tmpdir = Path(tmp)
        script = wrk_script(load_bodies, tmpdir / "vqa.lua") if generator == "wrk" else None
        load = Load(generator, load_bodies, script, opts.request_timeout_s)
        for r in range(opts.rounds):
            bare = bare_runtime(model, items, opts.ceiling_batch, opts.ceiling_seconds)
            bare_rounds.append(bare)
            log(
                f"round {r + 1}/{opts.rounds}: bare runtime batch-1 {bare['batch1_p50_ms']:.2f} ms, "
                f"batch-{opts.ceiling_batch} {_rate(bare['batchN_items_per_s'])} items/s"
            )
            order = opts.servers[r % len(opts.servers) :] + opts.servers[: r % len(opts.servers)]
            for name in order:
                server = Server(name, opts, tmpdir)
                try:
                    starts[name].append(round(server.wait_ready(bodies[0], opts.start_timeout_s), 2))
                    checks[name].append(check_answers(server, check_bodies, reference))
                    if opts.warmup_s > 0:
                        load.window(server.url, max(opts.clients), opts.warmup_s)
                    for c in opts.clients:
                        row = measure(server, load, c, opts.duration_s)
                        results[name][str(c)].append(row)
                        log(
                            f"  {name:9} {c:3d} clients: {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:8.2f} ms  "
                            f"p99 {row['p99_ms']:8.2f} ms  errors {row['error_count']}  "
                            f"CPU {row['server_cpu_ms_per_request']} ms/req"
                        )
                except BaseException:
                    log(f"{name} log tail:\n{server.log_tail()}")
                    raise
                finally:
                    server.stop()
    model.tasks.close()

    summary = {s: {c: summarise(rows) for c, rows in per.items()} for s, per in results.items()}
    bare_keys = ("batch1_p50_ms", "batchN_ms", "batchN_items_per_s", "other_cores")
    bare_summary = {k: _median([b[k] for b in bare_rounds]) for k in bare_keys} | {
        "batch": opts.ceiling_batch,
        "rounds": bare_rounds,
    }
    tg = targets(summary, bare_summary, opts.clients)
    tg_layouts = {t: targets(summary, bare_summary, opts.clients, t) for t in TRIMVLM[1:] if t in summary}
    manifest = model.manifest
    report = {
        "title": opts.title,
        "machine": machine_info(
            "cpu",
            "cores",
            "cpu_features",
            "python",
            "platform",
            "numpy",
            "onnxruntime",
            note="a shared machine, loopback, the load generator on the same cores",
        ),
        "model": {
            "folder": str(opts.model),
            "id": f"{manifest.name}/{manifest.version}",
            "image_size": manifest.preprocessing.image.size,
            "precision": model.tasks.precision,
            "backend": model.tasks.runtime.name,
        },
        "config": {
            "servers": list(opts.servers),
            "clients": list(opts.clients),
            "duration_s": opts.duration_s,
            "rounds": opts.rounds,
            "warmup_s": opts.warmup_s,
            "max_batch": opts.max_batch,
            "batch_wait_ms": opts.batch_wait_ms,
            "load_generator": generator,
            "request_bodies": len(load_bodies),
            "ceiling_batch": opts.ceiling_batch,
        },
        "servers": {s: {"label": LABELS[s], "version": version_of(s), "ready_s": starts[s]} for s in opts.servers},
        "answer_check": {
            "requests": opts.check_requests,
            "score_tolerance": SCORE_TOLERANCE,
            "identical": all(c["identical_answers"] for cs in checks.values() for c in cs),
            "checked_starts": {s: len(cs) for s, cs in checks.items()},
            "max_score_diff": {s: max((c["max_score_diff"] for c in cs), default=None) for s, cs in checks.items()},
            "reference": reference,
        },
        "bare_runtime": bare_summary,
        "results": summary,
        "targets": tg,
        "targets_other_layouts": tg_layouts,
        "serving_share": serving_share(summary, bare_summary, opts.clients),
        "headline": headline(tg) | {k: v for t, x in tg_layouts.items() for k, v in headline(x, t).items()},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_report(report, opts.out)
    return report


# ---------------------------------------------------------------- the report


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "latency_vs_throughput.png")
    (out / "REPORT.md").write_text(markdown(report))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for server, rows in report["results"].items():
        pts = sorted((int(c), r) for c, r in rows.items())
        xs = [r["throughput_rps"] for _, r in pts]
        for ax, key in zip(axes, ("p50_ms", "p99_ms"), strict=True):
            ys = [r[key] for _, r in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=report["servers"][server]["label"])
            for (c, _), x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    ceiling = report["bare_runtime"]["batchN_items_per_s"]
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        ax.axvline(
            ceiling, color="grey", linestyle="--", linewidth=1, label=f"bare runtime, batch {report['bare_runtime']['batch']}"
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("throughput (req/s); points labelled by clients")
        ax.set_ylabel(f"{key} latency (ms)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"POST /vqa ({report['model']['id']}, full level): latency vs throughput (medians, rounds: {report['config']['rounds']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _rate(v: float | None) -> str:
    """Requests or items per second: whole numbers at this model's hundreds, decimals at BLIP-base's few."""
    return "—" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _f(v, fmt: str = "{:.1f}", suffix: str = "") -> str:
    return "—" if v is None else fmt.format(v) + suffix


def markdown(r: dict) -> str:
    cfg, bare, res = r["config"], r["bare_runtime"], r["results"]
    clients = cfg["clients"]
    lo, hi = min(clients), max(clients)
    head = (
        "| server | "
        + " | ".join([f"{lo} client p50"] + [f"{c} clients req/s" for c in clients if c != lo] + [f"{hi} clients p99"])
        + " |"
    )
    sep = "|---|" + "---:|" * (len(clients) + 1)
    rows = []
    for s, per in res.items():
        label = f"{r['servers'][s]['label']} {r['servers'][s]['version']}" if s not in TRIMVLM else r["servers"][s]["label"]
        cells = [_f(per[str(lo)]["p50_ms"], suffix=" ms")]
        cells += [_rate(per[str(c)]["throughput_rps"]) for c in clients if c != lo]
        cells += [_f(per[str(hi)]["p99_ms"], suffix=" ms")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    # the bare runtime's ceiling under the first throughput column (batch 1 latency under the 1-client p50)
    bare_cells = [f"{bare['batch1_p50_ms']:.2f} ms (batch 1)"] + [""] * len(clients)
    bare_cells[1 if len(clients) > 1 else 0] += f" {_rate(bare['batchN_items_per_s'])} items/s (batch {bare['batch']})"
    rows.append("| bare runtime (no HTTP) | " + " | ".join(bare_cells) + " |")

    detail = [
        "| server | clients | req/s | p50 | p90 | p99 | errors | server cores | server CPU / request | client CPU s "
        "| other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, per in res.items():
        for c in clients:
            x = per[str(c)]
            detail.append(
                f"| {r['servers'][s]['label']} | {c} | {_f(x['throughput_rps'])} | {_f(x['p50_ms'], '{:.2f}', ' ms')} | "
                f"{_f(x['p90_ms'], '{:.2f}', ' ms')} | {_f(x['p99_ms'], '{:.2f}', ' ms')} | {x['errors']} of {x['requests']} | "
                f"{_f(x['server_cores'], '{:.2f}')} | {_f(x['server_cpu_ms_per_request'], '{:.2f}', ' ms')} | "
                f"{_f(x['client_cpu_s'], '{:.2f}')} | {_f(x.get('other_cores'), '{:.2f}')} |"
            )
    layouts = {"trimvlm": r["targets"], **r.get("targets_other_layouts", {})}
    tg_rows = ["| target | " + " | ".join(LABELS[x] for x in layouts) + " | goal |", "|---|" + "---:|" * len(layouts) + "---|"]
    for key, t in r["targets"].items():
        cells = []
        for x in layouts.values():
            v = x[key]
            verdict = "not evaluated" if v["met"] is None else ("**met**" if v["met"] else "**not met**")
            cells.append(f"{_f(v['value'], '{:.2f}')} {verdict}")
        tg_rows.append(f"| {t['what']} | " + " | ".join(cells) + f" | {t['target']} |")
    share_rows = [
        "| server | serving layer's share, 1 client (1 - bare batch-1 / p50) | "
        f"at {hi} clients (1 - req/s / bare batch-{bare['batch']} items/s) |",
        "|---|---:|---:|",
    ]
    for s, sh in r["serving_share"].items():
        share_rows.append(
            f"| {r['servers'][s]['label']} | {_f(sh['latency_c1'], '{:.1%}')} | {_f(sh[f'throughput_c{hi}'], '{:.1%}')} |"
        )
    ac = r["answer_check"]
    noise = background_note(r)
    diffs = ", ".join(f"{s} {_f(v, '{:.1g}')}" for s, v in ac["max_score_diff"].items())
    m = r["machine"]
    model = r["model"]
    setup = [
        f"| {r['servers'][s]['label']} | {r['servers'][s]['version']} | {HOW[s]} | "
        + ", ".join(f"{x:g}" for x in r["servers"][s]["ready_s"])
        + " |"
        for s in res
    ]
    starts = sum(ac["checked_starts"].values())
    model_flag = f" --model {model['folder']}" if model["id"] != "trimvlm-default/1" else ""
    repro = (
        f"trimvlm bench peers --out OUT{model_flag} --servers {','.join(cfg['servers'])} --clients {','.join(map(str, clients))} "
        f"--duration {cfg['duration_s']:g} --rounds {cfg['rounds']}"
    )
    return f"""# {r["title"]}

`trimvlm bench peers` ({r["wall_s"] / 60:.1f} min): POST /vqa at the `full` level on **{model["id"]}** ({model["image_size"]} px,
{model["precision"]}, {model["backend"]}), served by each server in turn on loopback; closed-loop clients from
**{cfg["load_generator"]}** for {cfg["duration_s"]:g} s per cell after a {cfg["warmup_s"]:g} s warm-up,
{cfg["rounds"]} interleaved round(s) (round r: the bare runtime, then every server at every client count,
the servers' order rotated; one server up at a time), medians over rounds. Machine: {m["cpu"]}, {m["cores"]} cores
({m.get("cpu_features") or "features not recorded"}; {m["note"]}); python {m["python"]}, onnxruntime {m["onnxruntime"]}.
Absolute figures are this machine's; compare servers within the run.

Every peer wraps the same `service.tasks.TaskModel` with the service's ONNX Runtime settings
(`benchmarks/baselines/vqa_model.py`), so only the HTTP/batching layer differs. Peers batch up to
{cfg["max_batch"]} items with a {cfg["batch_wait_ms"]:g} ms window; TrimVLM runs `python -m service serve` with its defaults
(batches of up to 32, no added wait). Per-request logging is off in every server.

## Headline

{head}
{sep}
{chr(10).join(rows)}
{noise}
## Targets (same machine, same run)

{chr(10).join(tg_rows)}

## Answers

Before its load, every server (at each of the {starts} starts) answered {ac["requests"]} real easy-VQA
requests one at a time exactly as the bare TaskModel does: identical answers, scores within {ac["score_tolerance"]:g}
(largest difference seen: {diffs}).

## Every cell

Errors are the load generator's (connect, read, write, timeout, non-2xx) summed over rounds; server CPU is the whole
process tree's user + system time during the window (psutil) over the requests it served; client CPU is the
load generator's own CPU seconds per window; other processes: the machine's busy time less
the server's and the client's, in cores (a shared machine: what else ran during the window).

{chr(10).join(detail)}

![latency vs throughput](latency_vs_throughput.png)

## The serving layer's share

{chr(10).join(share_rows)}

Bare runtime (TaskModel called directly in the benchmark's process, no HTTP, medians over rounds): batch 1
{bare["batch1_p50_ms"]:.2f} ms, batch {bare["batch"]} {bare["batchN_ms"]:.1f} ms = {_rate(bare["batchN_items_per_s"])} items/s;
other processes used {_f(bare.get("other_cores"), "{:.2f}")} cores meanwhile. A share measured while other processes took
more of the machine during the servers' windows than during the bare runtime's counts their load as serving time.

## Set-up

| server | version | how it runs | ready after (s, per start) |
|---|---|---|---|
{chr(10).join(setup)}

Reproduce (the `peers` extra; wrk from Debian): `{repro}`
"""


NOISY_CORES = 0.25  # other processes' median use in a cell beyond which the report says the figures are disturbed


def background_note(r: dict) -> str:
    """A warning when other processes used the machine during the windows (measured per window), with how
    much per server: servers measured under different background load do not compare fairly."""
    per = {s: [x["other_cores"] for x in rows.values() if x.get("other_cores") is not None] for s, rows in r["results"].items()}
    worst = max((v for vals in per.values() for v in vals), default=None)
    if worst is None or worst < NOISY_CORES:
        return ""
    each = ", ".join(f"{r['servers'][s]['label']} {min(v):.2f}-{max(v):.2f}" for s, v in per.items() if v)
    return f"""
**Disturbed run:** other processes on this shared machine used up to {worst:.2f} of its {r["machine"]["cores"]} cores
during the measured windows (medians per cell: {each}), so the servers were not measured under the same
background load and the ratios below carry that noise. Rerun on a quiet machine before drawing conclusions.
"""


HOW = {
    "trimvlm": "`python -m service serve` with its defaults: uvicorn + FastAPI, dynamic batching in-process",
    "trimvlm-2w": "as trimvlm, two worker processes (one socket of the port each, one single-threaded batch "
    "each) and their shared gallery on a Chroma server (`chroma run`, counted in the server's CPU)",
    "litserve": "an API server process (uvicorn) and one inference worker process (decode, batch, predict)",
    "mosec": "Rust HTTP server; a preprocessing worker process and a batching inference worker process",
    "mosec-2w": "as mosec, with two batching inference worker processes (single-threaded sessions)",
    "ray": "Ray Serve: HTTP proxy actor, controller, one replica with `@serve.batch`, Ray's own daemons",
}
