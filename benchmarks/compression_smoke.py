"""`trimvlm bench compression-smoke`: what distillation, pruning and trimming cost per step at
BLIP-base size on this machine, with the imported random BLIP-base of `trimvlm bench scale` as the
teacher.

The pipeline an imported BLIP goes through (docs/IMPORT_BLIP.md), a few steps per stage, each stage
a `python -m service ...` command in its own process (wall time and peak RSS from wait4):

1. `import blip` of the scale fixture's checkpoint with `--answers-for` the smoke YAML, so the
   teacher's VQA classifier knows the answers of the training data (the fixture's own import has a
   16-word dummy list);
2. `distill` (teacher: that import; student: half of every stack, initialised from the teacher);
3. `prune` (the distilled student, the same teacher; then fine-tune after slicing);
4. `trim` (the pruned student; then the compute levels' calibration on a few validation questions).

Data: the scenes dataset, images resized from 64 px to the model's size by the training loaders
(`compression.data.load_images`, the model's own resampling), as a real run on an imported teacher
does. Seconds per step = the time between the first step's log row and the last one's, over the
steps between them (the first step, which warms up allocators and kernels, is left out).
Weights are random: the losses mean nothing, only time and memory are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import yaml

from benchmarks.scale import load, run_stage
from benchmarks.scale_fixtures import Fixture

# scenes only, a small generated set (every image is resized to 224/384 px and held in memory)
DATA = {
    "easy_vqa": False,
    "scenes": True,
    "scenes_counts": {"n_train": 40, "n_val": 10, "n_test": 10},
    "limit": 40,
}
RUN = {"log_every": 1, "eval_every": 0, "checkpoint_every": 0, "warmup_steps": 1, "device": "cpu", "save_dtype": "fp32"}


def stage_yamls(work: Path, image_size: int, batch: int, steps: int) -> dict[str, Path]:
    """The distil, prune and trim YAMLs of one smoke run (configs/*.yaml at this size, few steps)."""
    base = {**DATA, **RUN, "image_size": image_size, "batch_size": batch}
    docs = {
        "distill": {**yaml.safe_load(Path("configs/distill.yaml").read_text()), **base, "steps": steps},
        "prune": {
            **yaml.safe_load(Path("configs/prune.yaml").read_text()),
            **base,
            "prune_steps": steps,
            "finetune_steps": steps,
        },
        "trim": {
            **yaml.safe_load(Path("configs/trim.yaml").read_text()),
            **base,
            "steps": steps,
            "thresholds": [0.5],
            "calibration_limit": 4,
        },
    }
    paths = {}
    for name, doc in docs.items():
        for key in ("out", "teacher", "student"):  # given on the command line
            doc.pop(key, None)
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


def step_seconds(log: Path) -> dict:
    """Seconds per step after the first, from a training log's per-step `elapsed_s`."""
    rows = [r for r in map(json.loads, log.read_text().splitlines()) if "elapsed_s" in r]
    first, last = rows[0], rows[-1]
    timed = last["step"] - first["step"]
    return {
        "steps": len(rows),
        "first_step_s": first["elapsed_s"],
        "s_per_step": round((last["elapsed_s"] - first["elapsed_s"]) / timed, 2) if timed else None,
        "timed_steps": timed,
    }


def smoke(fx: Fixture, work: Path, batch: int, steps: int) -> dict:
    if work.exists():
        shutil.rmtree(work)  # training stages resume from checkpoints; a smoke run starts afresh
    work.mkdir(parents=True)
    yamls = stage_yamls(work, fx.image_size, batch, steps)
    cli = [sys.executable, "-m", "service"]
    teacher, distilled, pruned, trimmed = work / "teacher", work / "distill", work / "prune", work / "trim"
    commands = {
        "import": [*cli, "import", "blip", str(fx.hf), "--out", str(teacher), "--answers-for", str(yamls["distill"])],
        "distill": [*cli, "distill", str(yamls["distill"]), "--teacher", str(teacher), "--out", str(distilled)],
        "prune": [
            *cli,
            "prune",
            str(yamls["prune"]),
            "--teacher",
            str(teacher),
            "--student",
            str(distilled / "model"),
            "--out",
            str(pruned),
        ],
        "trim": [*cli, "trim", str(yamls["trim"]), "--student", str(pruned / "model"), "--out", str(trimmed)],
    }
    logs = {
        "distill": {"distill": distilled / "train_log.jsonl"},
        "prune": {"prune": pruned / "prune_log.jsonl", "finetune": pruned / "finetune_log.jsonl"},
        "trim": {"trim": trimmed / "trim_log.jsonl"},
    }
    result = {"image_size": fx.image_size, "image_tokens": (fx.image_size // 16) ** 2 + 1, "stages": {}}
    for name, argv in commands.items():
        print(f"[{fx.image_size} px] {name}: {' '.join(argv[2:])}", flush=True)
        before = load()
        stage = run_stage(argv) | {"load_before": before, "load_after": load()}  # a shared machine: say how busy
        for phase, log in logs.get(name, {}).items():
            stage[phase] = step_seconds(log)
        stage["params_m"] = _params_m(teacher if name == "import" else work / name / "model")
        result["stages"][name] = stage
        print(f"[{fx.image_size} px] {name}: {json.dumps({k: v for k, v in stage.items() if k != 'command'})}", flush=True)
    return result


def _params_m(model_dir: Path) -> float | None:
    """Parameters of a saved model folder, in millions (read from the safetensors header)."""
    from safetensors import safe_open

    path = model_dir / "model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return round(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6, 1)


def run(root: Path, work: Path, sizes: tuple[int, ...], batch: int, steps: int, out: Path, size: str = "base") -> dict:
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.update(
        {
            "command": "trimvlm bench " + shlex.join(sys.argv[2:])
            if sys.argv[1:2] == ["bench"]
            else "python -m benchmarks.compression_smoke " + shlex.join(sys.argv[1:]),
            "machine": _machine(),
            "batch_size": batch,
            "steps_per_stage": steps,
            "fixture_size": size,
            "data": DATA,
        }
    )
    report.setdefault("sizes", {})
    for px in sizes:
        fx = Fixture(root, size, px)
        if not (fx.hf / "config.json").is_file():
            raise SystemExit(f"{fx.hf}: no checkpoint; build the fixture first (trimvlm bench scale --fixtures-only)")
        t0 = time.time()
        report["sizes"][str(px)] = {**smoke(fx, work / f"{px}", batch, steps), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        report["sizes"][str(px)]["wall_s"] = round(time.time() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each size: an interrupted run keeps what it has
    print(table(report))
    return report


def _machine() -> str:
    import os
    import platform

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU"


def table(report: dict) -> str:
    """The markdown table docs/SCALE.md shows."""
    rows = [
        "| px | stage | params of its output (M) | s/step (after step 1) | first step s | stage wall s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for px, r in sorted(report["sizes"].items(), key=lambda kv: -int(kv[0])):
        for name, st in r["stages"].items():
            phases = [p for p in ("distill", "prune", "finetune", "trim") if p in st] or [None]
            for phase in phases:
                ph = st.get(phase, {}) if phase else {}
                label = name if phase in (None, name) else f"{name} ({phase})"
                rows.append(
                    f"| {px} | {label} | {st.get('params_m', '')} | {ph.get('s_per_step', '')} | "
                    f"{ph.get('first_step_s', '')} | {st['wall_s']} | {st['peak_rss_mib']} |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("runs/scale"), help="the scale fixtures (trimvlm bench scale)")
    p.add_argument("--work", type=Path, default=Path("runs/compression-smoke"))
    p.add_argument("--sizes", default="384,224")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("reports/scale/compression_smoke.json"))
    p.add_argument("--size", choices=("base", "tiny"), default="base", help="tiny: the CI-sized fixture")
    a = p.parse_args(argv)
    run(a.root, a.work, tuple(int(s) for s in a.sizes.split(",")), a.batch_size, a.steps, a.out, a.size)


if __name__ == "__main__":
    main()
