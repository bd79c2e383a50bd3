"""`trimvlm bench gallery`: the two gallery backends side by side in one run, at 10k and 100k entries.

For each size and backend: index throughput (items/s, batches of `batch` through GalleryBackend.add_many,
committed, as `trimvlm index build` stores them), search latency p50/p99 over `queries` top-10 queries
(GalleryBackend.search, as /retrieval/search calls it) and recall@10 against exact brute force. Then, with
`rerank_items` items that carry ITM states (65 x 384 fp16, the default model's), the cost of what re-ranking
adds: storing states (items/s) and reading the 16 candidates' states (p50/p99), plus the bytes on disk per
item. Random unit vectors at the default model's embedding size (128); the Chroma server is a local
`chroma run` started here (or --chroma-url). Report: OUT/report.json, REPORT.md, gallery.png.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from service.gallery.chroma import ChromaGallery
from service.gallery.embedded import Gallery
from service.machine import machine_info

STATES_SHAPE = (65, 384)  # the default model's ITM image states
RERANK_K = 16  # TRIMVLM_RERANK_TOP_K's default


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class LocalChroma:
    """`chroma run` on a free loopback port, persisting to `path`."""

    def __init__(self, path: Path, log: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.path, self.url = path, f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "chroma"
        cmd = [str(exe if exe.exists() else shutil.which("chroma") or "chroma"), "run", "--path", str(path)]
        with open(log, "ab") as f:
            self.proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(self.port)], stdout=f, stderr=f)
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/api/v2/heartbeat", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"chroma on {self.url} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def measure(gallery, vecs: np.ndarray, queries: np.ndarray, batch: int, states: np.ndarray | None = None) -> dict:
    n = len(vecs)
    ids = [f"img-{i}" for i in range(n)]
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        st = None if states is None else [states] * len(ids[s : s + batch])
        gallery.add_many(vecs[s : s + batch], ids[s : s + batch], [{"i": i} for i in range(s, min(n, s + batch))], st)
    index_s = time.perf_counter() - t0
    out = {"items": n, "index_items_per_s": round(n / index_s, 1), "index_s": round(index_s, 2)}
    if states is not None:  # the re-ranking read: the top-16 candidates' states
        rng = np.random.default_rng(1)
        times = []
        for _ in range(len(queries)):
            pick = [ids[i] for i in rng.choice(n, RERANK_K, replace=False)]
            t = time.perf_counter()
            got = gallery.states_many(pick)
            times.append(time.perf_counter() - t)
            assert all(v is not None and v.shape == STATES_SHAPE for v in got.values())
        return out | {"states_read_16": percentiles(times)}
    times, recall = [], []
    for q in queries:
        t = time.perf_counter()
        hits = gallery.search(q, top_k=10)
        times.append(time.perf_counter() - t)
        truth = set(np.argpartition(-(vecs @ q), 10)[:10].tolist())
        recall.append(len(truth & {int(h.id[4:]) for h in hits}) / 10)
    return out | {"search": percentiles(times), "recall_at_10": round(float(np.mean(recall)), 4)}


def run(
    out: Path,
    sizes: tuple[int, ...] = (10_000, 100_000),
    dim: int = 128,
    queries: int = 200,
    batch: int = 1000,
    rerank_items: int = 1000,
    chroma_url: str | None = None,
    seed: int = 0,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    qs = unit(rng, queries, dim)
    work = Path(tempfile.mkdtemp(prefix="gallery-bench-"))
    server = None if chroma_url else LocalChroma(work / "chroma", work / "chroma.log")
    url = chroma_url or server.url
    rows: list[dict] = []
    try:

        def chroma(name: str) -> ChromaGallery:
            g = ChromaGallery(url, f"bench-{name}", dim, "bench/1", max_items=10**7, timeout_s=120)
            g.connect()
            if len(g):
                g.drop()
                g.connect()
            return g

        def embedded(name: str) -> Gallery:
            return Gallery.open(work / name, dim, "bench/1", max_items=10**7, flush_every=0)

        for n in sizes:
            vecs = unit(rng, n, dim)
            for backend, make in (("embedded", embedded), ("chroma", chroma)):
                g = make(f"{backend}-{n}")
                row = {"backend": backend, **measure(g, vecs, qs, batch)}
                row["mode"] = ("exact" if n <= g.exact_below else "hnsw") if backend == "embedded" else "hnsw"
                if backend == "embedded":
                    g.close()
                    row["disk_bytes_per_item"] = round(folder_bytes(work / f"embedded-{n}") / n)
                else:
                    g.drop()
                rows.append(row)
                print(json.dumps(row), flush=True)
        states = np.random.default_rng(2).standard_normal(STATES_SHAPE).astype(np.float16)
        vecs = unit(rng, rerank_items, dim)
        for backend, make in (("embedded", embedded), ("chroma", chroma)):
            before = folder_bytes(work / "chroma") if server else 0
            g = make(f"{backend}-states")
            row = {"backend": backend, "with_states": True, **measure(g, vecs, qs[:100], min(batch, 100), states)}
            if backend == "embedded":
                g.close()
                row["disk_bytes_per_item"] = round(folder_bytes(work / "embedded-states") / rerank_items)
            elif server:
                time.sleep(2)  # the server flushes its log to the segments
                row["disk_bytes_per_item"] = round((folder_bytes(work / "chroma") - before) / rerank_items)
            if backend == "chroma":
                g.drop()
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    import chromadb
    import usearch

    report = {
        "machine": machine_info("cpu", "cores", "python", "numpy", note="shared 2-core machine; other jobs were running"),
        "versions": {"usearch": usearch.__version__, "chromadb": chromadb.__version__},
        "setup": {
            "dim": dim,
            "queries": queries,
            "top_k": 10,
            "batch": batch,
            "chroma": "local `chroma run` over loopback HTTP" if server else chroma_url,
            "embedded_exact_below": 10_000,
            "states_shape": list(STATES_SHAPE),
        },
        "sizes": list(sizes),
        "rows": rows,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(report))
    plot(report, out / "gallery.png")
    return report


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Gallery backends: embedded (usearch + SQLite) vs shared (Chroma server)",
        "",
        f"`trimvlm bench gallery`; {m['cpu']}, {m['cores']} cores ({m.get('note', '')}); usearch "
        f"{r['versions']['usearch']}, chromadb {r['versions']['chromadb']} ({r['setup']['chroma']}); random unit vectors, "
        f"dim {r['setup']['dim']}, {r['setup']['queries']} top-10 queries, batches of {r['setup']['batch']}.",
        "",
        "| entries | backend | search | p50 ms | p99 ms | recall@10 | index items/s | disk B/item |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        if row.get("with_states"):
            continue
        s = row["search"]
        lines.append(
            f"| {row['items']:,} | {row['backend']} | {row['mode']} | {s['p50_ms']} | {s['p99_ms']} | {row['recall_at_10']} | "
            f"{row['index_items_per_s']:,.0f} | {row.get('disk_bytes_per_item', '')} |"
        )
    lines += [
        "",
        f"Re-ranking's share: {r['rows'][-1]['items']:,} items each with ITM states {tuple(r['setup']['states_shape'])} fp16 "
        "(the default model's), then reading 16 candidates' states as a text search with re-ranking does:",
        "",
        "| backend | store items/s | read 16 states p50 ms | p99 ms | disk B/item |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        if row.get("with_states"):
            s = row["states_read_16"]
            lines.append(
                f"| {row['backend']} | {row['index_items_per_s']:,.0f} | {s['p50_ms']} | {s['p99_ms']} | "
                f"{row.get('disk_bytes_per_item', '')} |"
            )
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in r["rows"] if not x.get("with_states")]
    labels = [f"{x['backend']}\n{x['items'] // 1000}k" for x in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = np.arange(len(rows))
    a.bar(xs - 0.2, [x["search"]["p50_ms"] for x in rows], 0.4, label="p50")
    a.bar(xs + 0.2, [x["search"]["p99_ms"] for x in rows], 0.4, label="p99")
    a.set_xticks(xs, labels, fontsize=8)
    a.set_ylabel("search latency (ms)")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.grid(alpha=0.3, axis="y")
    b.bar(xs, [x["index_items_per_s"] for x in rows], 0.5, color="tab:green")
    b.set_xticks(xs, labels, fontsize=8)
    b.set_ylabel("index throughput (items/s)")
    b.set_yscale("log")
    b.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Gallery backends ({r['machine']['cpu']}, {r['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
