"""`trimvlm` command line (typer). Heavy imports happen inside the commands so `--help` is fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="TrimVLM: compress vision-language models offline and serve them fast.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("scenes")
def data_scenes(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical files.")] = 0,
    n_train: int = 3000,
    n_val: int = 500,
    n_test: int = 500,
    image_size: int = 64,
):
    """Generate the synthetic scenes dataset (COCO captions + VQAv2 formats, train/val/test)."""
    from compression.scenes import generate_scenes

    summary = generate_scenes(out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training YAML (see configs/).")],
    out: Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Override the number of steps.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run folder's checkpoint if present.")] = True,
):
    """Train a teacher (multi-task: VQA, ITC+ITM, captioning). Under torchrun it uses DDP."""
    from compression.train import TrainConfig
    from compression.train import train as run

    cfg = TrainConfig.from_yaml(config, out=out, steps=steps, device=device)
    final = run(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"model written to {final}")


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (config.json, model.safetensors, tokenizer.json).")],
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N items of each split.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    device: str = "auto",
    scenes: Annotated[Optional[Path], typer.Option(help="Scenes folder (generated if missing).")] = None,
):
    """VQA accuracy (easy-VQA, scenes), caption BLEU-4/CIDEr and retrieval R@K (scenes)."""
    from rich.console import Console
    from rich.markdown import Markdown

    from compression.evaluate import evaluate
    from compression.report import metrics_table

    results = evaluate(model_dir, limit=limit, device=device, scenes_root=scenes)
    Console().print(Markdown(metrics_table(results)))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        typer.echo(f"results written to {json_out}")


@app.command()
def info(model_dir: Annotated[Path, typer.Argument(help="Model folder.")]):
    """Parameters and FLOPs per module (vision / text / fusion / decoder / heads)."""
    from compression.report import model_summary, params_flops_table

    typer.echo(params_flops_table(model_summary(model_dir)))


@app.command("model-card")
def model_card(
    model_dir: Path,
    eval_json: Annotated[Path, typer.Option("--eval", help="Results JSON from `trimvlm eval --json`.")],
    command: Annotated[str, typer.Option(help="The exact command that produced the model.")],
    trained_on: Annotated[str, typer.Option(help="Machine it was trained on.")],
    notes: str = "",
):
    """Write MODEL_CARD.md (architecture, params, FLOPs, command, evaluation) into a model folder."""
    from compression.report import write_model_card

    path = write_model_card(model_dir, json.loads(eval_json.read_text()), command, trained_on, notes)
    typer.echo(f"wrote {path}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
