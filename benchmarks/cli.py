"""`trimvlm bench ...`: benchmarks that write reports (JSON + Markdown), added to the `trimvlm` command
through the `trimvlm.commands` entry point. They need the dev extra (`make install-dev`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from compression.cli import LatencySamples, OfflineApp, ReportDir, Rounds
from service.cli import ModelsDir

PANEL = "Benchmarks: speed, accuracy, reliability reports (the dev extra)"
app = OfflineApp(PANEL, help="Benchmarks that write reports (JSON + Markdown).")


def register(main: typer.Typer) -> None:
    """Add `trimvlm bench` to the `trimvlm` command (the `trimvlm.commands` entry point)."""
    main.add_typer(app, name="bench", rich_help_panel=PANEL)


@app.command("model")
def bench_model(
    out: ReportDir = Path("reports/bench-model"),
    artifact: Annotated[
        list[str], typer.Option(help="LABEL=PATH of a torch model folder; repeatable (default: the Makefile chain's).")
    ] = [],  # noqa: B006
    exported: Annotated[
        list[str], typer.Option(help="PATH:BACKEND:PRECISION of an exported model; repeatable (default: the embedded default).")
    ] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(help="Questions for accuracy (default: the whole test split).")] = None,
    latency_samples: LatencySamples = 48,
    throughput_batches: int = 6,
    rounds: Rounds = 3,
    reuse_accuracy: Annotated[
        bool, typer.Option(help="Reuse accuracy measured on identical model files (OUT/accuracy_cache.json).")
    ] = True,
):
    """Every artifact on VQA in one interleaved run: latency, throughput, accuracy, FLOPs, FLOP/s vs GEMM."""
    from benchmarks.model_bench import run

    arts = dict(a.split("=", 1) for a in artifact) or None
    exp = [tuple(e.rsplit(":", 2)) for e in exported] or None
    run(
        out,
        arts,
        exp,
        limit=limit,
        latency_samples=latency_samples,
        throughput_batches=throughput_batches,
        rounds=rounds,
        reuse_accuracy=reuse_accuracy,
    )
    typer.echo((out / "REPORT.md").read_text())


@app.command("docs")
def bench_docs(
    model_dir: Annotated[str, typer.Option(help="`bench model` report folder.")] = "reports/bench-model",
    service_dir: Annotated[str, typer.Option(help="`bench service` report folder.")] = "reports/service",
    peers_dir: Annotated[str, typer.Option(help="`bench peers` report folder (left out where absent).")] = "reports/peers",
    previous: Annotated[
        Optional[str],
        typer.Option(help="Folder with the previous run's model.json/service.json/peers.json (make bench keeps it)."),
    ] = "reports/bench-previous",
):
    """docs/BENCHMARKS.md and the README's headline block, from the benchmark reports (model, service, peers)."""
    from benchmarks.bench_docs import write_docs

    repro = write_docs(model_dir, service_dir, previous, peers_dir=peers_dir)
    typer.echo("wrote docs/BENCHMARKS.md and the README headline block")
    for name, r in (repro or {}).items():
        if r is not None:
            where = "same machine" if r["same_machine"] else "DIFFERENT machines, not a reproducibility check"
            verdict = "all" if r["all_within"] else "NOT all"
            typer.echo(f"{name} run-to-run ({where}): {verdict} timing ratios within ±{r['tolerance']:.0%}")


@app.command("compare")
def bench_compare(
    before: Annotated[Path, typer.Argument(help="A benchmark report.json.")],
    after: Annotated[Path, typer.Argument(help="The same benchmark's report.json from another run.")],
    tolerance: float = 0.10,
):
    """Headline ratios of two runs side by side; exit 1 if a timing ratio moved more than the tolerance."""
    from benchmarks.bench_docs import DESCRIPTIONS, compare, load

    result = compare(load(before)["headline"], load(after)["headline"], tolerance)
    for key, row in result["rows"].items():
        flag = "" if row["within"] is None else ("ok" if row["within"] else "MOVED")
        typer.echo(f"{row['change']:+8.1%}  {row['before']:>9} -> {row['after']:<9} {flag:5} {DESCRIPTIONS.get(key, key)}")
    if not result["all_within"]:
        raise typer.Exit(1)


@app.command("protocols")
def bench_protocols(
    out: ReportDir = Path("reports/protocols"),
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (one request of each protocol per round).")] = 300,
    models: ModelsDir = Path("models"),
):
    """What the OpenAI and KServe v2 protocols add over /vqa at 1 client (p50 ratios, one server, one run)."""
    from benchmarks.protocols import markdown, run

    typer.echo(markdown(run(out, rounds, models)))


@app.command("service")
def bench_service(
    models: ModelsDir = Path("models"),
    out: ReportDir = Path("reports/service"),
    clients: int = 32,
    requests: Annotated[int, typer.Option(help="Requests per round and server.")] = 640,
    rounds: Rounds = 3,
    baseline: Annotated[
        Optional[Path], typer.Option(help="Torch model folder for the naive baseline server (benchmarks/baselines/).")
    ] = Path("models/trimvlm-teacher/1"),
    sweep_seconds: Annotated[float, typer.Option(help="Seconds per open-loop rate.")] = 6.0,
):
    """The service on loopback: a mixed-endpoint sweep (closed loop 1..64 clients, open-loop Poisson) against
    no batching and a naive torch baseline; batching on vs off; HTTP overhead; adaptive compute under a deadline."""
    from benchmarks.service_bench import run

    run(models, out, clients, requests, rounds, baseline=baseline, sweep_seconds=sweep_seconds)
    typer.echo((out / "REPORT.md").read_text())


@app.command("gallery")
def bench_gallery(
    out: ReportDir = Path("reports/gallery"),
    sizes: Annotated[list[int], typer.Option("--size", help="Gallery entries; repeatable.")] = [10_000, 100_000],  # noqa: B006
    queries: int = 200,
    chroma_url: Annotated[
        Optional[str], typer.Option(help="An existing Chroma server (default: a local `chroma run` started for the run).")
    ] = None,
):
    """The gallery backends side by side: search p50/p99, recall@10 and index throughput at each size, and what
    ITM re-ranking's states cost to store and read (embedded usearch + SQLite vs a shared Chroma server)."""
    from benchmarks.gallery_bench import run

    run(out, tuple(sizes), queries=queries, chroma_url=chroma_url)
    typer.echo((out / "REPORT.md").read_text())


@app.command("overload")
def bench_overload(
    models: ModelsDir = Path("models"),
    out: ReportDir = Path("reports/reliability/overload"),
    duration: Annotated[float, typer.Option(help="Seconds of overload.")] = 60.0,
    factor: Annotated[float, typer.Option(help="Offered rate as a multiple of the measured capacity.")] = 4.0,
    capacity_seconds: Annotated[float, typer.Option(help="Seconds of closed-loop load to measure capacity.")] = 10.0,
    client: Annotated[
        str, typer.Option(help="Overload client: h2load (nghttp2-client, C), python, or auto (h2load when installed).")
    ] = "auto",
):
    """Open-loop load at FACTOR x measured capacity: every request answered (200 or 429/503 + Retry-After)."""
    from benchmarks.overload import pick_client, run

    try:
        pick_client(client)
    except (RuntimeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--client") from None
    report = run(models, out, duration_s=duration, factor=factor, capacity_s=capacity_seconds, client=client)
    typer.echo((out / "REPORT.md").read_text())
    raise typer.Exit(0 if report["passed"] else 1)


@app.command("soak")
def bench_soak(
    models: ModelsDir = Path("models"),
    out: ReportDir = Path("reports/reliability/soak"),
    minutes: Annotated[float, typer.Option(help="Minutes of load per configuration.")] = 5.0,
    clients: Annotated[int, typer.Option(help="Closed-loop clients (mixed endpoints).")] = 8,
    compare_arena: Annotated[
        bool, typer.Option(help="Also run with ORT's CPU memory arena off, for the RSS comparison.")
    ] = False,
):
    """Mixed-endpoint load for MINUTES: RSS over time (PNG), errors, p99 drift first vs last window."""
    from benchmarks.soak import run

    report = run(models, out, minutes=minutes, clients=clients, compare_arena=compare_arena)
    typer.echo((out / "REPORT.md").read_text())
    raise typer.Exit(0 if report["passed"] else 1)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _parts(text: str) -> tuple[str, ...]:
    from benchmarks.scale import PARTS

    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = set(chosen) - set(PARTS)
    if unknown or not chosen:
        raise typer.BadParameter(f"--parts takes some of {','.join(PARTS)}, got {text!r}")
    return chosen


@app.command("compression-smoke")
def bench_compression_smoke(
    root: Annotated[Path, typer.Option(help="The scale fixtures (`trimvlm bench scale --fixtures-only` builds them).")] = Path(
        "runs/scale"
    ),
    work: Annotated[Path, typer.Option(help="Where the smoke runs' models and logs go (git-ignored).")] = Path(
        "runs/compression-smoke"
    ),
    sizes: Annotated[str, typer.Option(help="Image sizes in px, comma-separated.")] = "384,224",
    batch_size: Annotated[int, typer.Option(help="Training batch (VQA and captions each).")] = 2,
    steps: Annotated[int, typer.Option(help="Steps per stage (the first is a warm-up, not timed).")] = 3,
    size: Annotated[str, typer.Option(help="base (BLIP-base) or tiny (tests).")] = "base",
    out: Annotated[Path, typer.Option(help="The JSON written.")] = Path("reports/scale/compression_smoke.json"),
):
    """Distil, prune and trim a few steps at BLIP-base size (imported random BLIP as teacher): s/step and peak RSS."""
    from benchmarks.compression_smoke import run

    run(root, work, _ints(sizes), batch_size, steps, out, size)


@app.command("scale")
def bench_scale(
    out: ReportDir = Path("reports/scale"),
    root: Annotated[Path, typer.Option(help="Where the random BLIP fixtures are built and kept (git-ignored).")] = Path(
        "runs/scale"
    ),
    size: Annotated[str, typer.Option(help="base (BlipConfig() defaults, BLIP-base) or tiny (tests).")] = "base",
    sizes: Annotated[str, typer.Option(help="Image sizes in px, comma-separated.")] = "224,384",
    precisions: Annotated[str, typer.Option(help="Comma-separated: fp32,int8.")] = "fp32,int8",
    repeats: Annotated[int, typer.Option(help="Timed calls per runner (interleaved rounds).")] = 3,
    batches: Annotated[
        str, typer.Option(help="Batch sizes of the bare-runtime batching figures (vision, text, fusion).")
    ] = "1,8,16,32",
    decode_lengths: Annotated[str, typer.Option(help="New tokens per caption (forced).")] = "20,40",
    decode_batches: Annotated[str, typer.Option(help="Caption batch sizes.")] = "1,8",
    skip_service: Annotated[bool, typer.Option("--skip-service", help="Leave out the service (batching, overhead).")] = False,
    service_size: Annotated[Optional[int], typer.Option(help="Image size the service runs (default: the largest).")] = None,
    service_precision: Annotated[str, typer.Option(help="fp32 | int8 for the service part.")] = "int8",
    clients: Annotated[int, typer.Option(help="Concurrent clients of the batching comparison.")] = 16,
    service_requests: Annotated[int, typer.Option(help="/vqa requests per round and server.")] = 32,
    service_rounds: Annotated[int, typer.Option(help="Rounds per server (alternated).")] = 2,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the fixtures even where they exist.")] = False,
    profile: Annotated[str, typer.Option(help="ORT/decoding profiles: unmet (targets not met) | always | never.")] = "unmet",
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep the image sizes an interrupted run already wrote to OUT/report.json.")
    ] = False,
    fixtures_only: Annotated[
        bool, typer.Option("--fixtures-only", help="Build the fixtures (stage times and memory recorded), measure nothing.")
    ] = False,
    parts: Annotated[
        str, typer.Option(help="Measurements per size, comma-separated: trimming,graphs,kv (the service part needs graphs).")
    ] = "trimming,graphs,kv",
):
    """Trimming, the KV cache, INT8 and batching at BLIP-base size (random weights, built locally), side by side."""
    from benchmarks.scale import Options, run

    opts = Options(
        root=root,
        out=out,
        size=size,
        image_sizes=_ints(sizes),
        precisions=tuple(p for p in precisions.split(",") if p),
        repeats=repeats,
        batching_batches=_ints(batches),
        decode_lengths=_ints(decode_lengths),
        decode_batches=_ints(decode_batches),
        service=not skip_service,
        service_size=service_size,
        service_precision=service_precision,
        clients=clients,
        service_requests=service_requests,
        service_rounds=service_rounds,
        rebuild=rebuild,
        fixtures_only=fixtures_only,
        resume=resume,
        profile=profile,
        parts=_parts(parts),
    )
    report = run(opts)
    typer.echo((out / "REPORT.md").read_text())
    typer.echo(f"wall time {report['wall_s'] / 60:.1f} min")


@app.command("peers")
def bench_peers(
    out: ReportDir = Path("reports/peers"),
    models: ModelsDir = Path("models"),
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Exported model: a folder with a manifest.json, or a name or name/version under --models "
            "(default: trimvlm-default)."
        ),
    ] = None,
    servers: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of trimvlm,trimvlm-2w,litserve,mosec,mosec-2w,ray (trimvlm-2w: `serve "
            "--workers 2` with its gallery on a Chroma server; mosec-2w: mosec with two inference worker processes)."
        ),
    ] = "trimvlm,trimvlm-2w,litserve,mosec,mosec-2w,ray",
    clients: Annotated[str, typer.Option(help="Closed-loop client counts, comma-separated.")] = "1,32,64",
    duration: Annotated[float, typer.Option(help="Seconds of load per server, client count and round.")] = 8.0,
    rounds: Rounds = 3,
    warmup: Annotated[float, typer.Option(help="Seconds of load before a server's measured windows (not recorded).")] = 2.0,
    max_batch: Annotated[int, typer.Option(help="Peers' batch size (TrimVLM keeps its default, 32).")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="Peers' batching window in ms.")] = 2.0,
    ceiling_batch: Annotated[int, typer.Option(help="Batch size of the bare runtime's throughput ceiling.")] = 32,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds before a request counts as timed out (and peers' own timeouts).")
    ] = 30.0,
    load_generator: Annotated[str, typer.Option(help="wrk (Debian `wrk`), python (benchmarks/loadgen.py) or auto.")] = "auto",
    check_requests: Annotated[
        int, typer.Option(help="Requests each server must answer as the bare runtime does, per start.")
    ] = 8,
    start_timeout: Annotated[float, typer.Option(help="Seconds a server may take to load, warm up and answer.")] = 240.0,
    title: Annotated[str, typer.Option(help="The report's title.")] = "TrimVLM vs serving frameworks",
):
    """TrimVLM, LitServe, mosec and Ray Serve serving the same model (same TaskModel, same ONNX Runtime
    settings): answers checked identical, then p50/p99, req/s, errors and server CPU per request at each
    client count (wrk, interleaved rounds, medians), beside the bare runtime's ceiling. The `peers` extra."""
    from benchmarks.peers import Options, pick_load_generator, resolve_model, run

    try:
        pick_load_generator(load_generator)
    except (RuntimeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--load-generator") from None
    try:
        folder = resolve_model(models, model)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    opts = Options(
        model=folder,
        out=out,
        servers=tuple(s.strip() for s in servers.split(",") if s.strip()),
        clients=_ints(clients),
        duration_s=duration,
        rounds=rounds,
        warmup_s=warmup,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        ceiling_batch=ceiling_batch,
        request_timeout_s=request_timeout,
        load_generator=load_generator,
        check_requests=check_requests,
        start_timeout_s=start_timeout,
        title=title,
    )
    run(opts, log=typer.echo)
    typer.echo((out / "REPORT.md").read_text())
