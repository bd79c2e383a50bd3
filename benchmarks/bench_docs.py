"""`trimvlm bench docs` and `trimvlm bench compare`: docs/BENCHMARKS.md and the README's headline
block rendered from the benchmark reports (so every figure quoted comes from `make bench`), and a
run-to-run check of the headline ratios.
"""

from __future__ import annotations

import json
from pathlib import Path

README_BEGIN = "<!-- bench:begin (written by `trimvlm bench docs`; edit benchmarks/bench_docs.py instead) -->"
README_END = "<!-- bench:end -->"
TOLERANCE = 0.10

# headline key -> what it compares (README/docs wording). Keys not listed are shown as they are.
DESCRIPTIONS = {
    "student_full_vs_teacher_latency_b1": "VQA batch-1 latency: embedded default (ORT INT8, `full`) vs torch fp32 teacher",
    "student_balanced_vs_teacher_latency_b1": "VQA batch-1 latency: embedded default at `balanced` vs teacher",
    "student_full_vs_teacher_throughput_b32": "VQA batch-32 throughput: default `full` vs teacher",
    "student_balanced_vs_teacher_throughput_b32": "VQA batch-32 throughput: default `balanced` vs teacher",
    "student_full_accuracy_fraction_of_teacher": "easy-VQA accuracy: default `full` as a fraction of the teacher's",
    "student_balanced_accuracy_fraction_of_teacher": "easy-VQA accuracy: default `balanced` as a fraction of the teacher's",
    "level_accurate_latency_speedup_b1": "trimming: `accurate` vs `full` batch-1 latency (same ORT INT8 graphs)",
    "level_balanced_latency_speedup_b1": "trimming: `balanced` vs `full` batch-1 latency",
    "level_fast_latency_speedup_b1": "trimming: `fast` vs `full` batch-1 latency",
    "level_accurate_flops_reduction": "trimming: `accurate` FLOPs reduction (measured per question)",
    "level_balanced_flops_reduction": "trimming: `balanced` FLOPs reduction",
    "level_fast_flops_reduction": "trimming: `fast` FLOPs reduction",
    "level_accurate_accuracy_drop_points": "trimming: `accurate` easy-VQA drop (points)",
    "level_balanced_accuracy_drop_points": "trimming: `balanced` easy-VQA drop (points)",
    "level_fast_accuracy_drop_points": "trimming: `fast` easy-VQA drop (points)",
    "teacher_flops_fraction_of_gemm_b32": "achieved FLOP/s ÷ fp32 GEMM: teacher, batch 32",
    "teacher_flops_fraction_of_gemm_b1": "achieved FLOP/s ÷ fp32 GEMM: teacher, batch 1",
    "student_full_flops_fraction_of_gemm_b32": "achieved FLOP/s ÷ fp32 GEMM: default `full`, batch 32",
    "student_full_flops_fraction_of_gemm_b1": "achieved FLOP/s ÷ fp32 GEMM: default `full`, batch 1",
    "batching_vs_none_vqa_throughput": "service: dynamic batching vs none, /vqa throughput at 32 clients",
    "batching_vs_none_mixed_best_throughput": "service: dynamic batching vs none, best mixed-workload throughput",
    "service_vs_naive_best_throughput": "service vs naive torch baseline: best mixed-workload throughput",
    "service_vs_naive_p50_latency_c1": "service vs naive torch baseline: p50 latency, 1 client",
    "http_overhead_p50_ms": "service: HTTP + Python overhead over the bare runtime, p50 (ms)",
    "peers_trimvlm_vs_mosec_throughput_c32": "peers: TrimVLM vs mosec, /vqa throughput at 32 clients (target >= 1.1x)",
    "peers_trimvlm_vs_mosec_throughput_c64": "peers: TrimVLM vs mosec, /vqa throughput at 64 clients (target >= 1.1x)",
    "peers_trimvlm_vs_mosec_p99_c64": "peers: TrimVLM vs mosec, /vqa p99 at 64 clients (lower is better; target <= 1x)",
    "peers_trimvlm_vs_litserve_p50_c1": "peers: TrimVLM vs LitServe, /vqa p50 at 1 client (lower is better; target <= 0.8x)",
    "peers_trimvlm_c64_fraction_of_ceiling": "peers: TrimVLM req/s at 64 clients ÷ bare runtime batch-32 items/s (target >= 85%)",
    "peers_trimvlm_2w_vs_mosec_throughput_c32": "peers: TrimVLM 2 workers vs mosec, /vqa req/s at 32 clients (target >= 1.1x)",
    "peers_trimvlm_2w_vs_mosec_throughput_c64": "peers: TrimVLM 2 workers vs mosec, /vqa req/s at 64 clients (target >= 1.1x)",
    "peers_trimvlm_2w_vs_mosec_p99_c64": "peers: TrimVLM 2 workers vs mosec, /vqa p99 at 64 clients (lower is better; <= 1x)",
    "peers_trimvlm_2w_vs_litserve_p50_c1": "peers: TrimVLM 2 workers vs LitServe, /vqa p50, 1 client (lower is better; <= 0.8x)",
    "peers_trimvlm_2w_c64_fraction_of_ceiling": "peers: TrimVLM 2 workers req/s, 64 clients ÷ bare batch-32 items/s (>= 85%)",
}
# Ratios the README puts first (the compass: student vs teacher, trimming, batching, baseline, GEMM).
README_KEYS = (
    "student_balanced_vs_teacher_latency_b1",
    "student_balanced_vs_teacher_throughput_b32",
    "student_balanced_accuracy_fraction_of_teacher",
    "level_balanced_flops_reduction",
    "level_balanced_latency_speedup_b1",
    "level_balanced_accuracy_drop_points",
    "batching_vs_none_vqa_throughput",
    "batching_vs_none_mixed_best_throughput",
    "service_vs_naive_best_throughput",
    "service_vs_naive_p50_latency_c1",
    "student_full_flops_fraction_of_gemm_b32",
    "teacher_flops_fraction_of_gemm_b32",
    "peers_trimvlm_vs_mosec_throughput_c64",
    "peers_trimvlm_vs_mosec_p99_c64",
    "peers_trimvlm_vs_litserve_p50_c1",
    "peers_trimvlm_c64_fraction_of_ceiling",
    "peers_trimvlm_2w_vs_mosec_throughput_c64",
    "peers_trimvlm_2w_vs_mosec_p99_c64",
    "peers_trimvlm_2w_c64_fraction_of_ceiling",
)


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def is_gated(key: str) -> bool:
    """Run-to-run check applies to ratios of timings; absolute ms and accuracy figures are shown only."""
    return not key.endswith("_ms") and "accuracy" not in key and "flops_reduction" not in key


def compare(before: dict, after: dict, tolerance: float = TOLERANCE) -> dict:
    """Relative change of every headline ratio present in both; `within` per gated key."""
    rows = {}
    for key, new in after.items():
        old = before.get(key)
        if old is None or new is None or not isinstance(new, int | float):
            continue
        change = (new - old) / abs(old) if old else 0.0
        rows[key] = {
            "before": old,
            "after": new,
            "change": round(change, 4),
            "gated": is_gated(key),
            "within": abs(change) <= tolerance if is_gated(key) else None,
        }
    gated = [r for r in rows.values() if r["gated"]]
    return {"tolerance": tolerance, "rows": rows, "all_within": all(r["within"] for r in gated), "gated": len(gated)}


def _value(key: str, v) -> str:
    if v is None:
        return "—"
    if key.endswith("_ms"):
        return f"{v:.2f} ms"
    if "fraction" in key:
        return f"{100 * v:.1f}%"
    if "drop_points" in key:
        return f"{v:+.2f} pt" if v else "0.00 pt"
    return f"{v:.2f}x"


def headline(model: dict | None, service: dict | None, peers: dict | None = None) -> dict:
    return {**((model or {}).get("headline", {})), **((service or {}).get("headline", {})), **((peers or {}).get("headline", {}))}


def headline_table(h: dict, keys=None) -> str:
    rows = [f"| {DESCRIPTIONS.get(k, k)} | **{_value(k, h[k])}** |" for k in (keys or h) if k in h]
    return "| measured ratio | value |\n|---|---:|\n" + "\n".join(rows)


def _machine_name(report: dict | None) -> str:
    m = (report or {}).get("machine", {})
    return f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores)"


def compare_runs(before: dict | None, after: dict | None, tolerance: float = TOLERANCE) -> dict | None:
    """compare() on two runs of one benchmark, with their machines: a reproducibility check only
    counts on the same machine."""
    if not before or not after:
        return None
    result = compare(before.get("headline", {}), after.get("headline", {}), tolerance)
    machines = (_machine_name(before), _machine_name(after))
    return {**result, "machines": machines, "same_machine": machines[0] == machines[1]}


def _repro_one(name: str, result: dict | None) -> str:
    if not result:
        return f"**{name}:** no previous run to compare with yet: run `make bench` again to measure run-to-run spread.\n"
    rows = "\n".join(
        f"| {DESCRIPTIONS.get(k, k)} | {_value(k, r['before'])} | {_value(k, r['after'])} | {100 * r['change']:+.1f}% | "
        f"{'—' if r['within'] is None else ('yes' if r['within'] else '**no**')} |"
        for k, r in result["rows"].items()
    )
    tol = f"±{100 * result['tolerance']:.0f}%"
    verdict = "all within" if result["all_within"] else "**not all within**"
    if result["same_machine"]:
        where = f"same machine ({result['machines'][1]})"
    else:
        where = (
            f"**different machines** (previous: {result['machines'][0]}, this: {result['machines'][1]}), "
            "so this is not a reproducibility check"
        )
    return f"""**{name}:** the previous run against this one, {where}: {verdict} {tol}
on the {result["gated"]} timing ratios (accuracy, FLOPs and absolute milliseconds are listed, not gated).

| ratio | previous run | this run | change | within {tol} |
|---|---:|---:|---:|---|
{rows}
"""


def _repro_section(repro: dict | None) -> str:
    repro = repro or {}
    parts = (("model", "Model benchmark"), ("service", "Service benchmark"), ("peers", "Peer benchmark"))
    return "\n".join(_repro_one(name, repro.get(key)) for key, name in parts)


def _machines_line(model: dict | None, service: dict | None, bold: str = "**") -> str:
    names = {_machine_name(r) for r in (model, service) if r}
    if len(names) <= 1:
        return f"{bold}{next(iter(names), '?')}{bold}"
    model_on, service_on = (f"{bold}{_machine_name(r)}{bold}" for r in (model, service))
    return f"the model benchmark on {model_on}, the service benchmark on {service_on}"


def _where(model: dict | None, service: dict | None) -> str:
    same = len({_machine_name(r) for r in (model, service) if r}) <= 1
    line = _machines_line(model, service, bold="")
    return f"on {line}" if same else f"({line})"


def _export_figures(path: Path = Path("reports/export/report.json")) -> str:
    """The stage report's own batch-1 figures, for the comparison above (none if it is absent)."""
    r = load(path)
    if not r or "level_for" not in r:
        return ""
    lv = r["level_for"]["latency_speedup"]
    teacher = r["batch1_vqa"]["teacher torch fp32"]["p50_ms"]
    return f"; its last run: teacher batch-1 p50 {teacher:.1f} ms, student `{lv}` {r['checks']['latency_speedup']:.1f}x"


def _peers_section(peers: dict | None, peers_dir: str) -> str:
    if not peers:
        return f"(no peer report yet: `make peers-report` writes {peers_dir}/)\n"
    md = (Path(peers_dir) / "REPORT.md").read_text().split("\n", 1)[1]
    md = md.replace("](latency_vs_throughput.png)", f"](../{peers_dir}/latency_vs_throughput.png)")
    return md.replace("\n## ", "\n### ")


def render(
    model: dict | None,
    service: dict | None,
    repro: dict | None,
    model_dir: str,
    service_dir: str,
    peers: dict | None = None,
    peers_dir: str = "reports/peers",
) -> str:
    m = (model or {}).get("machine") or (service or {}).get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("cpu", "cores"))
    model_md = (Path(model_dir) / "REPORT.md").read_text().split("\n", 1)[1] if model else "(no model report yet)\n"
    model_md = model_md.replace("](pareto.png)", f"](../{model_dir}/pareto.png)")
    service_md = (Path(service_dir) / "REPORT.md").read_text().split("\n", 1)[1] if service else "(no service report yet)\n"
    service_md = service_md.replace("](latency_vs_throughput.png)", f"](../{service_dir}/latency_vs_throughput.png)")
    demote = lambda md: md.replace("\n## ", "\n### ")  # noqa: E731 - nest the reports' sections
    return f"""# Benchmarks

Every figure here and in the README's headline table comes from one command, `make bench`:

```
trimvlm bench model   --out {model_dir}    # every artifact on VQA, interleaved; Pareto plot
trimvlm bench service --out {service_dir} --rounds 5  # the service on loopback vs no batching vs a naive torch app
trimvlm bench peers   --out {peers_dir}       # TrimVLM vs LitServe, mosec, Ray Serve on one model (wrk)
trimvlm bench docs                                # this page + the README block, from the two report.json
```

Machine: {_machines_line(model, service)}, no GPU; {versions}. The machine is shared and
noisy: the model runners are interleaved input by input and the service's servers take turns per load
point, so ratios hold where absolute times drift. Absolute times are this CPU's only. No GPU was available
when these were measured; `trimvlm bench model` adds TensorRT runners when an fp16 export and TensorRT exist.

## Headline
{headline_table(headline(model, service, peers))}

How to read these:
- The model runners are interleaved call by call (teacher, student, each level, ...), so every call
  starts with caches and thread pools cold from the previous runner. That is harsher than the stage
  reports' block interleaving (`reports/export`: each runner runs its 100 inputs in a row per round{_export_figures()}),
  and it is the figure quoted here.
- FLOP/s ÷ GEMM compares against an **fp32** GEMM; INT8 graphs can exceed 100% of it.
- Trimmed levels in ONNX Runtime run a batch item by item through the batch-1 gather graph (as the
  service does), so their batch-32 throughput is below `full`'s batched graphs.
- The service benchmark's load generator shares the 2 cores with the servers, so it is a minimal
  keep-alive HTTP/1.1 client (`benchmarks/loadgen.py`, ~0.03 core at 500 req/s). Reports before
  2026-12-03 used httpx, which took a full core at ~140 req/s with 64 clients: their high-concurrency
  figures (batching "slower than none", p99 of seconds) measured the client's own queueing.

## Reproducibility
{_repro_section(repro)}
## Model benchmark (`{model_dir}/`)
{demote(model_md)}
## Service benchmark (`{service_dir}/`)
{demote(service_md)}
## Peer benchmark (`{peers_dir}/`)
{_peers_section(peers, peers_dir)}"""


def readme_block(model: dict | None, service: dict | None, model_dir: str, peers: dict | None = None) -> str:
    return f"""{README_BEGIN}
Measured by `make bench` {_where(model, service)}, no GPU; details, machines
and the exact commands in [docs/BENCHMARKS.md](docs/BENCHMARKS.md).

{headline_table(headline(model, service, peers), README_KEYS)}

![accuracy vs batch-1 latency across the compression chain]({model_dir}/pareto.png)
{README_END}"""


def write_docs(
    model_dir: str = "reports/bench-model",
    service_dir: str = "reports/service",
    previous: str | None = "reports/bench-previous",
    docs: Path = Path("docs/BENCHMARKS.md"),
    readme: Path = Path("README.md"),
    peers_dir: str = "reports/peers",
) -> dict | None:
    model = load(Path(model_dir) / "report.json")
    service = load(Path(service_dir) / "report.json")
    peers = load(Path(peers_dir) / "report.json")
    repro = None
    if previous:
        repro = {
            "model": compare_runs(load(Path(previous) / "model.json"), model),
            "service": compare_runs(load(Path(previous) / "service.json"), service),
            "peers": compare_runs(load(Path(previous) / "peers.json"), peers),
        }
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render(model, service, repro, model_dir, service_dir, peers, peers_dir))
    if readme.is_file():
        text = readme.read_text()
        if README_BEGIN in text and README_END in text:
            head, rest = text.split(README_BEGIN, 1)
            tail = rest.split(README_END, 1)[1]
            readme.write_text(head + readme_block(model, service, model_dir, peers) + tail)
    return repro
