"""`trimvlm pipeline run CONFIG.yaml`: teacher -> distill -> prune -> trim -> export -> evaluate
-> report, from one YAML (configs/pipeline-default.yaml makes the embedded default).

Every stage writes its output folder plus a `.stage.json` stamp: the hash of its own settings,
the stage YAML's contents and the stamps of its inputs. A stage whose stamp is unchanged is
skipped; a changed upstream stage reruns everything after it. Training stages resume from their
checkpoints, so an interrupted pipeline picks up where it stopped. A stage may instead `reuse`
an existing model folder (e.g. the committed teacher).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from compression.config_file import ConfigError, load_yaml

STAGES = ("teacher", "distill", "prune", "trim", "export", "evaluate", "report")
STAMP = ".stage.json"
console = Console()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _yaml_text(stage: dict) -> str:
    path = stage.get("config")
    return Path(path).read_text() if path else ""


def _read_stamp(folder: Path) -> str | None:
    path = folder / STAMP
    return json.loads(path.read_text()).get("stamp") if path.is_file() else None


def _write_stamp(folder: Path, stamp: str, stage: str, seconds: float) -> None:
    info = {"stage": stage, "stamp": stamp, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / STAMP).write_text(json.dumps(info, indent=2) + "\n")


def load_pipeline(path: str | Path) -> dict:
    cfg = load_yaml(path)
    missing = [s for s in ("teacher", "export") if s not in cfg]
    if missing:
        raise ConfigError(f"{path}: the pipeline needs at least these stages: {missing}")
    unknown = set(cfg) - set(STAGES) - {"name", "version", "work", "device"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (stages: {', '.join(STAGES)})")
    return cfg


# Stage runners: (stage settings, upstream model folder, stage run folder, device) -> output folder.


def _train_teacher(st: dict, upstream, out: Path, device) -> Path:
    from compression.train import train
    from compression.training import TrainConfig

    cfg = TrainConfig.from_yaml(st["config"], out=str(out), steps=st.get("steps"), device=device)
    return train(cfg)


def _distill(st: dict, teacher: Path, out: Path, device) -> Path:
    from compression.distill import DistillConfig, distill

    cfg = DistillConfig.from_yaml(st["config"], out=str(out), teacher=str(teacher), steps=st.get("steps"), device=device)
    return distill(cfg)


def _prune(st: dict, student: Path, out: Path, device, teacher: Path) -> Path:
    from compression.prune import PruneConfig, prune

    cfg = PruneConfig.from_yaml(
        st["config"],
        student=str(student),
        teacher=str(teacher),
        out=str(out),
        device=device,
        target_sparsity=st.get("target"),
        cost=st.get("cost"),
    )
    return prune(cfg)


def _trim(st: dict, student: Path, out: Path, device) -> Path:
    from compression.trim import TrimConfig, trim

    cfg = TrimConfig.from_yaml(
        st["config"], student=str(student), out=str(out), steps=st.get("steps"), device=device, target_flops=st.get("target")
    )
    return trim(cfg)


def run_pipeline(path: str | Path, force: set[str] | None = None) -> dict[str, Path]:
    """Run (or skip) every stage in order; returns each stage's output folder."""
    cfg = load_pipeline(path)
    force = force or set()
    work = Path(cfg.get("work", "runs/pipeline"))
    device = cfg.get("device")
    outputs: dict[str, Path] = {}
    stamps: dict[str, str] = {}

    def stage(name: str, inputs: list[str], out: Path, runner: Callable[[], Path]) -> None:
        st = cfg.get(name)
        if st is None or st.get("skip"):
            console.print(f"[dim]{name}: not in the pipeline[/dim]")
            return
        if st.get("reuse"):
            # a reused folder's stamp follows its contents, so later stages rerun when it changes
            files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(st["reuse"]).rglob("*") if p.is_file())
            outputs[name], stamps[name] = Path(st["reuse"]), _digest({"reuse": st["reuse"], "files": files})
            console.print(f"[bold]{name}[/bold]: reusing {st['reuse']}")
            return
        stamp = _digest({"settings": st, "yaml": _yaml_text(st), "inputs": [stamps.get(i) for i in inputs]})
        if name not in force and _read_stamp(out) == stamp:
            outputs[name], stamps[name] = out, stamp
            console.print(f"[bold]{name}[/bold]: up to date ({out})")
            return
        console.rule(f"[bold]{name}")
        t0 = time.time()
        result = Path(runner())
        out.mkdir(parents=True, exist_ok=True)
        _write_stamp(out, stamp, name, time.time() - t0)
        outputs[name], stamps[name] = out, stamp
        console.print(f"[bold]{name}[/bold]: done in {time.time() - t0:.0f}s -> {result}")

    # Training stages write <run>/model; the stamp sits in that model folder.
    stage("teacher", [], work / "teacher" / "model", lambda: _train_teacher(cfg["teacher"], None, work / "teacher", device))
    teacher = outputs["teacher"]
    stage("distill", ["teacher"], work / "distill" / "model", lambda: _distill(cfg["distill"], teacher, work / "distill", device))
    student = outputs.get("distill", teacher)
    stage(
        "prune",
        ["teacher", "distill"],
        work / "prune" / "model",
        lambda: _prune(cfg["prune"], student, work / "prune", device, teacher),
    )
    student = outputs.get("prune", student)
    stage("trim", ["prune", "distill"], work / "trim" / "model", lambda: _trim(cfg["trim"], student, work / "trim", device))
    final = outputs.get("trim", student)

    ex = cfg["export"]
    export_dir = Path(ex["out"])

    def run_export() -> Path:
        from compression.artifacts import RERANK_FILE
        from compression.export import export_model
        from compression.training import training_words

        # the model's re-ranking weight (compression/rerank.py, rerank.json), calibrated here for a model
        # this pipeline trained and has none; `rerank: false` skips the calibration
        rerank = ex.get("rerank", {})
        if rerank is not False and not isinstance(rerank, dict):
            raise ConfigError(f"{path}: export.rerank is false or a mapping (split, limit), got {rerank!r}")
        reused = any(isinstance(cfg.get(n), dict) and Path(str(cfg[n].get("reuse"))) == Path(final) for n in STAGES)
        if rerank is not False and not (Path(final) / RERANK_FILE).is_file():
            if reused:
                console.print(
                    f"[yellow]{final} has no {RERANK_FILE}: retrieval re-ranks by the ITM head alone "
                    f"(`trimvlm calibrate-rerank {final}` calibrates it)[/yellow]"
                )
            else:
                from compression.rerank import calibrate

                result = calibrate(final, split=rerank.get("split", "val"), limit=rerank.get("limit"), device=device or "auto")
                console.print(
                    f"re-ranking weight {result['itc_weight']:g} calibrated on {result['split']} ({final / RERANK_FILE})"
                )
        precisions = ("fp32", *ex.get("precisions", ["int8"]))
        name = cfg.get("name")
        words_from = ex.get("known_words_from")  # a training YAML: its texts' words become known_words
        words = training_words(words_from, Path(final) / "tokenizer.json") if words_from else None
        return export_model(
            final,
            export_dir,
            precisions,
            name=name,
            version=str(cfg.get("version", export_dir.name)),
            command=f"trimvlm pipeline run {path}",
            keep_fp32=ex.get("keep_fp32", True),
            description=ex.get("description"),
            known_words=words,
        )

    stage("export", ["trim", "prune", "distill", "teacher"], export_dir, run_export)

    ev = cfg.get("evaluate", {})
    eval_dir = work / "evaluate"

    def run_evaluate() -> Path:
        from compression.evaluate import evaluate

        eval_dir.mkdir(parents=True, exist_ok=True)
        limit = ev.get("limit")
        exported = evaluate(export_dir, limit=limit, precision=ev.get("precision"))
        (eval_dir / "exported.json").write_text(json.dumps(exported, indent=2) + "\n")
        source = evaluate(final, limit=limit, device="cpu")
        (eval_dir / "torch.json").write_text(json.dumps(source, indent=2) + "\n")
        teacher_eval = evaluate(teacher, limit=limit, device="cpu") if ev.get("teacher", True) else None
        if teacher_eval:
            (eval_dir / "teacher.json").write_text(json.dumps(teacher_eval, indent=2) + "\n")
        return eval_dir

    stage("evaluate", ["export"], eval_dir, run_evaluate)

    def run_report() -> Path:
        from compression.report import write_export_card

        return write_export_card(export_dir, eval_dir, final, command=f"trimvlm pipeline run {path}")

    if "evaluate" in outputs:
        stage("report", ["evaluate"], work / "report", run_report)
    return outputs
