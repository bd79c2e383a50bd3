"""The serving install's commands: `trimvlm serve`, `models list | verify`, `levels` and `index build`
(added to the `trimvlm` command by service/entrypoint.py). No torch, no compression/ on these paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

PANEL = "Serving and the model repository"
app = typer.Typer()
models_app = typer.Typer(help="The model repository (models/<name>/<version>/manifest.json).", no_args_is_help=True)
app.add_typer(models_app, name="models", rich_help_panel=PANEL)
index_app = typer.Typer(help="The retrieval gallery.", no_args_is_help=True)
app.add_typer(index_app, name="index", rich_help_panel=PANEL)

# Options several commands share (benchmarks/cli.py uses it too).
ModelsDir = Annotated[Path, typer.Option("--models", help="Model repository root, or one exported version folder.")]


def register(main: typer.Typer) -> None:
    """Add these commands to the `trimvlm` command (the `trimvlm.commands` entry point)."""
    main.add_typer(app)


@app.command(rich_help_panel=PANEL)
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (TRIMVLM_HOST; default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (TRIMVLM_PORT; default 8000).")] = None,
    models: Annotated[Optional[Path], typer.Option(help="Model repository (TRIMVLM_MODELS_DIR; default models/).")] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            help="Worker processes, each on its own socket of the port (TRIMVLM_WORKERS; default 1). More than 1 "
            "needs a shared gallery (TRIMVLM_GALLERY_BACKEND=chroma): the embedded one belongs to one process."
        ),
    ] = None,
):
    """Serve the models in the repository over HTTP (FastAPI + uvicorn; no torch).

    Start-up problems end it with one line on stderr: models that cannot load, a port in use (exit 1), --workers 2
    with the embedded gallery (exit 2).

    TRIMVLM_EXIT_ON_LOAD_ERROR=false keeps serving after a load error (live, never ready) for debugging."""
    from pydantic import ValidationError

    from service.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "models_dir": models}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:  # a TRIMVLM_* variable or .env line that does not parse
        fail(f"invalid settings: {e}")
    workers = settings.workers if workers is None else workers
    if workers < 1:
        fail(f"--workers {workers}: at least 1 (with the embedded gallery exactly 1; scale out with replicas)", code=2)
    if workers > 1 and settings.gallery_backend == "embedded":
        fail(
            f"--workers {workers}: the embedded retrieval gallery is held and locked by one process (more workers "
            "would answer 503 gallery_locked); use one worker and scale out with replicas sharing a gallery server "
            "(TRIMVLM_GALLERY_BACKEND=chroma, TRIMVLM_GALLERY_URL), which also allows --workers > 1",
            code=2,
        )
    if settings.exit_on_load_error:
        problem = repository_problem(settings.models_dir, settings.version_policy)
        if problem:
            fail(f"{problem} (TRIMVLM_EXIT_ON_LOAD_ERROR=false serves anyway, never ready)")
    sockets = listen(settings.host, settings.port, settings.listen_backlog, workers)  # before any model loads
    if workers > 1:
        run_workers(settings, sockets, {**overrides, "workers": workers})  # sessions share the cores by it
    else:
        run_server(settings, sockets[0])


def fail(message: str, code: int = 1) -> NoReturn:
    """A start-up failure: one line on stderr (newlines folded) and exit `code`."""
    typer.echo("error: " + " ".join(message.split()), err=True)
    raise typer.Exit(code)


def repository_problem(root: Path, version_policy: str = "latest:1") -> str | None:
    """What is wrong with a model repository that a cheap look can tell (the folder, the manifests of
    the versions the policy serves); None if it looks loadable. Checksums and graphs are checked as the
    models load."""
    from service.repository import ManifestError, find_models, load_manifest

    hint = "set --models or TRIMVLM_MODELS_DIR to a model repository (folders <name>/<version>/manifest.json)"
    if not root.is_dir():
        return f"model repository {root} does not exist or is not a folder; {hint}"
    if not find_models(root):
        return f"no exported models (manifest.json) under {root}; run `trimvlm export`, or {hint}"
    folders = find_models(root, version_policy)
    if not folders:
        return f"no version under {root} is served by the version policy {version_policy} (TRIMVLM_VERSION_POLICY)"
    for folder in folders:
        try:
            load_manifest(folder)
        except ManifestError as e:
            return f"cannot load {folder}: {e}"
    return None


def listen(host: str, port: int, backlog: int, workers: int = 1) -> list:
    """The listening sockets, bound before the models load, so a port in use fails at once (uvicorn
    binds after the app's start-up): one, or one per worker sharing the port (service/workers.py).
    SO_REUSEADDR and the address family as uvicorn's own binding."""
    import errno
    import socket

    from service.workers import listen_shared

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if workers > 1:
            return listen_shared(host, port, backlog, workers)
        return [socket.create_server((host, port), family=family, backlog=backlog)]  # SO_REUSEADDR on POSIX
    except OSError as e:
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            fail(f"{where} is already in use (another server?); choose another port with --port or TRIMVLM_PORT")
        if e.errno == errno.EACCES:
            fail(f"no permission to listen on {where}; choose a port above 1023 with --port or TRIMVLM_PORT")
        fail(f"cannot listen on {where}: {e.strerror or e}; check --host / TRIMVLM_HOST and --port / TRIMVLM_PORT")


def run_server(settings, sock) -> None:
    """uvicorn on the bound socket, one process. With exit_on_load_error, a failed model load stops
    the server (uvicorn's graceful shutdown) and the process exits 1 with the error."""
    import logging

    import uvicorn

    from service.app import create_app

    failed: list[str] = []

    def stop(error: str) -> None:
        failed.append(error)
        server.should_exit = True  # uvicorn's main loop checks it every 0.1 s, then shuts down

    config = uvicorn.Config(
        lambda: create_app(settings, on_load_error=stop if settings.exit_on_load_error else None),
        factory=True,  # made inside the server's event loop, as before
        access_log=False,  # the app logs one JSON line per request itself
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        log_level=settings.log_level,
        backlog=settings.listen_backlog,
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    # uvicorn logs its "running on" line only for the sockets it binds itself
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if failed:
        fail(f"model loading failed: {failed[0]}")
    if not server.started:
        raise typer.Exit(3)  # uvicorn's start-up failure (it has logged why)


def run_workers(settings, sockets: list, overrides: dict) -> None:
    """One process per socket (service/workers.py), each with its own models and a client of the shared
    gallery. Each worker builds its settings from the environment (the command-line overrides, and the
    worker count its sessions share the cores by, are passed on as TRIMVLM_* variables)."""
    import os

    import uvicorn

    from service.worker_balance import BalancedHttpProtocol
    from service.workers import PerSocketWorkers

    for name, value in overrides.items():
        os.environ[f"TRIMVLM_{name.upper()}"] = str(value)
    config = uvicorn.Config(
        "service.app:create_app",
        factory=True,
        workers=len(sockets),
        http=BalancedHttpProtocol,  # hands connections back from a worker above its share
        access_log=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        log_level=settings.log_level,
        backlog=settings.listen_backlog,
    )
    PerSocketWorkers(config, sockets).run()


@index_app.command("build")
def index_build(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively; ids are relative paths).")],
    models: ModelsDir = Path("models"),
    model: Annotated[Optional[str], typer.Option(help="name or name/version (default: the server's default).")] = None,
    gallery: Annotated[
        Optional[Path], typer.Option(help="Embedded gallery folder (default: TRIMVLM_GALLERY_DIR/<model>).")
    ] = None,
    backend: Annotated[
        Optional[str], typer.Option(help="embedded | chroma (default: TRIMVLM_GALLERY_BACKEND, else embedded).")
    ] = None,
    url: Annotated[Optional[str], typer.Option(help="chroma: the server (default: TRIMVLM_GALLERY_URL).")] = None,
    states: Annotated[
        bool,
        typer.Option(
            help="Store each image's ITM states for re-ranking text searches (~50 KB an image for the default "
            "model, ~0.9 MB at BLIP-base size); --no-states: ITC only, re-ranking skips these images."
        ),
    ] = True,
    batch: int = 32,
):
    """Bulk-index a folder of images into the gallery the server searches (either backend).

    Resumable: files already indexed with the same content (sha256) are skipped, so re-running after an
    interruption, or on a folder that grew, indexes only what is new or changed."""
    import numpy as np

    from service.gallery import build_index, open_gallery
    from service.settings import Settings
    from service.state import AppState

    extra = {k: v for k, v in {"gallery_backend": backend, "gallery_url": url}.items() if v is not None}
    settings = Settings(models_dir=models, default_model=model, warmup=False, **extra)
    st = AppState.create(settings)
    st.load_models()
    srv = st.servers[st.default]
    embedded = settings.gallery_backend == "embedded"
    target = (gallery or settings.gallery_dir / srv.id.replace("/", "-")) if embedded else settings.gallery_url

    def encode(images):
        states, embeds = srv.tasks.encode_images(srv.tasks.pixels(np.stack(images)))
        return embeds, states

    def opener(dim: int):
        store = open_gallery(settings, srv.id, dim, folder=gallery)
        store.connect()  # a shared database that does not answer fails here, before any work
        return store

    from service.gallery import GalleryError

    stats: dict = {}
    try:
        n = build_index(
            folder,
            opener,
            encode,
            srv.tasks.image_spec,
            batch=batch,
            model_id=srv.id,
            max_items=settings.gallery_max_items,
            dim=srv.embed_dim,
            stats=stats,
            store_states=states,
        )
    except GalleryError as e:  # the gallery refuses (another model's, locked) or its database does not answer
        fail(f"index build: {e.message}")
    unchanged = f", {stats['unchanged']} already there (same content)" if stats.get("unchanged") else ""
    where = f"{target} for {srv.id}" + (" (the server must not have this gallery open meanwhile)" if embedded else "")
    typer.echo(f"indexed {n} images into {where}{unchanged}")


NOT_SERVABLE_TORCH = "torch model folder: export it with `trimvlm export`"


def _torch_model_folders(root: Path) -> list[Path]:
    """Torch model folders (config.json + model.safetensors, no manifest.json) in a repository
    root laid out as <name>/<version>/, or the root itself if it is one."""
    from service.repository import MANIFEST

    def is_torch(folder: Path) -> bool:
        files = ("config.json", "model.safetensors")
        return all((folder / f).is_file() for f in files) and not (folder / MANIFEST).is_file()

    if is_torch(root):
        return [root]
    return sorted(p.parent for p in root.glob("*/*/config.json") if is_torch(p.parent))


@models_app.command("list")
def models_list(
    models: ModelsDir = Path("models"),
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
    version_policy: Annotated[
        str,
        typer.Option(envvar="TRIMVLM_VERSION_POLICY", help="Which versions are served: latest:N, all or specific:V1,V2."),
    ] = "latest:1",
):
    """Models under the repository: exported ones (name/version, whether the version policy serves it,
    graphs, precisions, levels, size), and torch model folders, listed as not servable until exported."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from service.repository import ManifestError, VersionPolicy, find_models, summary

    try:
        policy = VersionPolicy.parse(version_policy)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--version-policy") from None
    if not models.is_dir():
        typer.echo(f"error: {models} is not a folder (--models: the model repository, e.g. models/)", err=True)
        raise typer.Exit(1)
    found, served = find_models(models), set(find_models(models, policy))
    torch_folders = _torch_model_folders(models)
    if not found and not torch_folders:
        typer.echo(f"error: no models under {models} (exported: <name>/<version>/manifest.json)", err=True)
        raise typer.Exit(1)

    def name_of(folder: Path) -> str:
        return f"{folder.parent.name}/{folder.name}"

    if as_json:
        rows = []
        for folder in found:
            try:
                rows.append({**summary(folder), "servable": True, "served": folder in served})
            except ManifestError as e:
                row = {"model": name_of(folder), "path": str(folder), "servable": False, "served": False, "reason": str(e)}
                rows.append(row)
        rows += [
            {"model": name_of(f), "path": str(f), "servable": False, "served": False, "reason": NOT_SERVABLE_TORCH}
            for f in torch_folders
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", f"served ({policy})", "tasks", "precisions", "levels", "MB", "path")
    for column in table.columns:
        column.overflow = "fold"  # never cut an id or a path
    for folder in found:
        try:
            s = summary(folder)
        except ManifestError as e:
            table.add_row(name_of(folder), "no", f"[red]not servable: {escape(str(e))}[/red]", "", "", "", str(folder))
            continue
        table.add_row(
            s["model"],
            "yes" if folder in served else "no",
            ",".join(s["tasks"]),
            ",".join(s["precisions"]),
            ",".join(s["levels"]),
            str(s["size_mb"]),
            s["path"],
        )
    for folder in torch_folders:
        not_servable = f"[yellow]not servable: {escape(NOT_SERVABLE_TORCH)}[/yellow]"
        table.add_row(name_of(folder), "no", not_servable, "", "", "", str(folder))
    console = Console()
    if not console.is_terminal:  # piped or captured: the table at its natural width, no word cut in two
        console = Console(width=100_000)
    console.print(table)


@models_app.command("verify")
def models_verify(models: ModelsDir = Path("models")):
    """Checksums, graphs load, and outputs match the recorded reference outputs; exit 1 on any problem."""
    from service.repository import find_models, verify

    found = find_models(models)
    if not found:
        typer.echo(f"error: no exported models (manifest.json) under {models}", err=True)
        raise typer.Exit(1)
    failed = 0
    for folder in found:
        problems = verify(folder)
        if problems:
            failed += 1
            typer.echo(f"FAIL {folder}")
            for p in problems:
                typer.echo(f"  - {p}")
        else:
            typer.echo(f"ok   {folder}")
    if failed:
        raise typer.Exit(1)


@app.command("levels", rich_help_panel=PANEL)
def levels_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Trimmed model folder (levels.json with its calibration curve).")],
    drop: Annotated[list[str], typer.Option(help="NAME=MAX_DROP (absolute accuracy). Repeatable.")],
    split: Annotated[list[str], typer.Option(help="Calibration split the drops apply to (default: all). Repeatable.")] = [],  # noqa: B006
):
    """Re-choose the named compute levels from the stored calibration curve (no re-measuring)."""
    from service.levels import LEVELS_FILE, choose_levels, load_levels, save_levels

    levels = load_levels(model_dir)
    if levels is None:
        raise typer.BadParameter(f"{model_dir} has no {LEVELS_FILE} (run `trimvlm trim`)")
    drops = {}
    for item in drop:
        name, _, value = item.partition("=")
        if not name or name == "full" or not value:
            raise typer.BadParameter(f"--drop takes NAME=MAX_DROP with NAME other than full, got {item!r}")
        drops[name] = float(value)
    levels.levels = choose_levels(levels.curve, levels.levels["full"], drops, split or None)
    splits = split or list(levels.levels["full"].accuracy)
    levels.calibration["rule"] = (
        f"cheapest threshold whose accuracy on {', '.join(splits)} is within the level's max_drop of full"
    )
    save_levels(model_dir, levels)
    for name, lv in levels.levels.items():
        typer.echo(f"{name}: threshold {lv.token_threshold}, FLOPs ratio {lv.flops_ratio}, accuracy {lv.accuracy}")
