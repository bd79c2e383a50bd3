"""`trimvlm serve` and `trimvlm index build` (registered into the `trimvlm` command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

index_app = typer.Typer(help="The retrieval gallery.", no_args_is_help=True)


def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (TRIMVLM_HOST; default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (TRIMVLM_PORT; default 8000).")] = None,
    models: Annotated[Optional[Path], typer.Option(help="Model repository (TRIMVLM_MODELS_DIR; default models/).")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (each loads the models).")] = 1,
):
    """Serve the models in the repository over HTTP (FastAPI + uvicorn; no torch)."""
    import os

    import uvicorn

    from service.settings import Settings

    overrides = {k: v for k, v in {"host": host, "port": port, "models_dir": models}.items() if v is not None}
    for key, value in overrides.items():  # workers re-read settings from the environment
        os.environ[f"TRIMVLM_{key.upper()}"] = str(value)
    settings = Settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        access_log=False,  # the app logs one JSON line per request itself
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        log_level=settings.log_level,
        backlog=settings.listen_backlog,
    )


@index_app.command("build")
def index_build(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively; ids are relative paths).")],
    models: Annotated[Path, typer.Option(help="Model repository.")] = Path("models"),
    model: Annotated[Optional[str], typer.Option(help="name or name/version (default: the server's default).")] = None,
    gallery: Annotated[Optional[Path], typer.Option(help="Gallery folder (default: TRIMVLM_GALLERY_DIR/<model>).")] = None,
    batch: int = 32,
):
    """Bulk-index a folder of images into the gallery the server searches."""
    import numpy as np

    from service.gallery import build_index
    from service.settings import Settings
    from service.state import AppState

    settings = Settings(models_dir=models, default_model=model, warmup=False)
    st = AppState.create(settings)
    st.load_models()
    srv = st.servers[st.default]
    target = gallery or settings.gallery_dir / srv.id.replace("/", "-")

    def encode(images):
        states, embeds = srv.tasks.encode_images(srv.tasks.pixels(np.stack(images)))
        return embeds, states

    n = build_index(
        folder, target, encode, srv.tasks.image_spec, batch=batch, model_id=srv.id, max_items=settings.gallery_max_items
    )
    typer.echo(f"indexed {n} images into {target} for {srv.id} (the server must not have this gallery open meanwhile)")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.add_typer(index_app, name="index")
