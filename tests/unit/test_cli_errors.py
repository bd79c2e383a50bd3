"""The command line as a user sees it (a subprocess, stdout not a terminal). Which commands the
entry point holds in the dev install and in the serving install alone (no compression/ or
benchmarks/), and its own errors: one line naming what to do, a non-zero exit, no traceback. An
offline command in the serving install (no torch), a config file that does not parse or fit its
run, and `trimvlm models list`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from tests.conftest import REPO

# Runs the CLI with some modules (and their submodules) made unimportable: `torch`, as in the serving
# install (`make run`: no torch), or compression/ and benchmarks/, as in the serving image.
ABSENT = """
import sys

ABSENT = set(sys.argv[1].split(","))

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name in ABSENT or name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
sys.argv = ["trimvlm", *sys.argv[2:]]
if sys.argv[1:] == ["--commands"]:  # the command names `trimvlm` holds
    import typer
    from service.entrypoint import build_app

    print(" ".join(typer.main.get_command(build_app()).commands))
else:
    from service.entrypoint import main

    main()
"""
SERVING = ("serve", "models", "levels", "index")
OFFLINE = (
    "data",
    "import",
    "train",
    "distill",
    "prune",
    "trim",
    "eval",
    "eval-compare",
    "retrieval-by-template",
    "grow",
    "text-pool",
    "itm-evidence",
    "calibrate-rerank",
    "info",
    "publish",
    "merge",
    "model-card",
)
OFFLINE += ("export", "build-engine", "report", "pipeline")


def cli(*args: str, absent: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    head = ["-c", ABSENT, ",".join(absent)] if absent else ["-m", "service"]
    return subprocess.run([sys.executable, *head, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---- which commands: each package adds its own -------------------------------------------------------


def test_the_dev_install_lists_every_command():
    """serve / models / levels / index from service/, the offline ones from compression/, bench from
    benchmarks/, through the installed `trimvlm` script."""
    from service.entrypoint import build_app

    names = set(typer.main.get_command(build_app()).commands)
    assert names == {*SERVING, *OFFLINE, "bench"}
    script = Path(sys.executable).parent / "trimvlm"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in (*SERVING, *OFFLINE, "bench"):
        assert f" {name} " in proc.stdout, name
    assert "Serving and the model repository" in proc.stdout and "Offline" in proc.stdout and "Benchmarks" in proc.stdout


def test_the_serving_install_alone_lists_and_runs_the_serving_commands():
    """Without compression/ and benchmarks/ (the serving image): `python -m service` holds serve,
    models, levels and index, and they work."""
    proc = cli("--commands", absent=("compression", "benchmarks"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(SERVING)
    proc = cli("--help", absent=("compression", "benchmarks"))
    assert proc.returncode == 0 and "Serving" in proc.stdout and "Offline" not in proc.stdout, proc.stderr
    assert "Not in this install: compression/, benchmarks/" in " ".join(proc.stdout.split())
    proc = cli("models", "list", "--models", "models", absent=("compression", "benchmarks"))
    assert proc.returncode == 0, proc.stderr
    assert "trimvlm-default/1" in proc.stdout
    proc = cli("serve", "--help", absent=("compression", "benchmarks"))
    assert proc.returncode == 0 and "--port" in proc.stdout, proc.stderr


def test_a_broken_command_module_is_not_skipped_as_absent():
    """Only a package missing from the install is skipped; an import error inside one is shown."""
    proc = cli("--help", absent=("compression.cli",))
    assert proc.returncode != 0 and "compression.cli" in proc.stderr


# ---- an offline command without torch ------------------------------------------------------------


@pytest.mark.parametrize("args", [("eval", "models/trimvlm-teacher/1"), ("info", "models/trimvlm-teacher/1")])
def test_offline_command_without_torch_names_the_extra(args):
    proc = cli(*args, absent=("torch",))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "torch" in line and "pip install 'trimvlm[train]'" in line and "make install" in line


def test_other_missing_modules_still_raise():
    """Only the train extra's modules get the one-line hint; any other import error is a bug to show."""
    proc = cli("info", "models/trimvlm-teacher/1", absent=("compression.report",))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ---- config files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("out: runs/x\nsteps: [1, 2\nlr: 0.1\n", "bad.yaml:3:3: invalid YAML: expected ',' or ']'"),
        ("out: runs/x\n  steps: 3\n", "bad.yaml:2:8: invalid YAML: mapping values are not allowed here"),
        ("out: runs/x\nstepz: 3\n", "bad.yaml: unknown key stepz (did you mean steps?)"),
        ("steps: many\n", "bad.yaml: steps: expected int, got str 'many'"),
        ("lr: 1e-4\n", "bad.yaml: lr: expected float, got str '1e-4' (YAML reads 1e-4 as a string"),
        ("model:\n  vision_widht: 256\n", "bad.yaml: unknown key model.vision_widht (did you mean model.vision_width?)"),
        ("- steps\n", "bad.yaml: expected a mapping of keys to values, got a list"),
    ],
)
def test_bad_training_config_is_one_line_with_file_and_place(tmp_path, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    proc = cli("train", str(bad), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert expected in one_line_error(proc)
    assert not (tmp_path / "run").exists()


def test_merge_of_a_folder_that_is_not_a_model_is_one_line(tmp_path):
    proc = cli("merge", "models/trimvlm-student/6", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "is not a model folder" in one_line_error(proc)
    assert not (tmp_path / "out").exists()


def test_merge_of_an_unknown_module_is_one_line(tmp_path):
    student = "models/trimvlm-student/6"
    proc = cli("merge", student, student, "--out", str(tmp_path / "out"), "--module", "itm_hed")
    assert proc.returncode == 2
    assert "modules to mix must be some of" in one_line_error(proc)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["models/trimvlm-default/1"], "is an exported folder: calibrate its torch source"),
        (["models/trimvlm-student/6", "--grid", "1,x"], "--grid takes comma-separated numbers"),
        (["models/trimvlm-student/6", "--grid", "-1"], "--grid takes comma-separated weights >= 0"),
        (["models/trimvlm-student/6", "--split", "dev"], "--split is train, val or test"),
        (["models/trimvlm-student/6", "--rerank-k", "1"], "rerank_k must be at least 2"),
    ],
)
def test_calibrate_rerank_refuses_bad_input_in_one_line(args, expected):
    before = (REPO / "models/trimvlm-student/6/rerank.json").read_bytes()
    proc = cli("calibrate-rerank", *args)
    assert proc.returncode == 2
    assert expected in one_line_error(proc)
    assert (REPO / "models/trimvlm-student/6/rerank.json").read_bytes() == before  # nothing written


@pytest.mark.parametrize(
    "args, expected",
    [
        (["text-pool", "models/trimvlm-student/5", "--heads", "8"], "is not a model folder"),
        (["text-pool", "models/trimvlm-student/6", "--heads", "0"], "--heads must be at least 1, got 0"),
        (["text-pool", "models/trimvlm-student/6"], "already has a text pool (8 heads)"),
        (["text-pool", "models/trimvlm-student/6", "--steps", "-3"], "--steps must be at least 1, got -3"),
        (["itm-evidence", "models/trimvlm-student/6", "--k", "0"], "--k must be at least 1, got 0"),
        (["itm-evidence", "models/trimvlm-student/6", "--itc-weight", "-1"], "--itc-weight must be at least 0, got -1"),
    ],
)
def test_head_fits_refuse_bad_input_in_one_line(tmp_path, args, expected):
    proc = cli(*args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert expected in one_line_error(proc)
    assert not (tmp_path / "out").exists()


def test_bad_pipeline_config_is_one_line(tmp_path):
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("teacher: {config: configs/teacher.yaml\nexport: {}\n")
    proc = cli("pipeline", "run", str(bad))
    assert proc.returncode == 2
    assert f"{bad}:2:7: invalid YAML: expected ',' or '}}'" in one_line_error(proc)


def test_every_committed_config_loads_and_type_checks():
    from compression.distill import DistillConfig
    from compression.pipeline import load_pipeline
    from compression.prune import PruneConfig
    from compression.train import TrainConfig
    from compression.trim import TrimConfig

    kinds = {"teacher": TrainConfig, "tiny": TrainConfig, "scratch-student": DistillConfig, "distill": DistillConfig}
    kinds |= {"distill-long": DistillConfig, "distill-long-rank": DistillConfig, "distill-long-fusion": DistillConfig}
    kinds |= {"distill-long-noitmkd": DistillConfig, "distill-long-transfer": DistillConfig}
    kinds |= {"distill-long-transfer-easy": DistillConfig, "distill-long-hardneg": DistillConfig}
    kinds |= {"distill-fusion-rank": DistillConfig, "distill-itm-evidence": DistillConfig}
    kinds |= {"prune": PruneConfig, "trim": TrimConfig, "trim-continue": TrimConfig, "trim-retune": TrimConfig}
    kinds |= {"calibrate-levels": TrimConfig}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.stem.startswith("pipeline"):
            load_pipeline(path)
        else:
            kinds[path.stem].from_yaml(path)


def test_distill_config_values_the_model_refuses_are_one_line_errors(tmp_path):
    """Values only the built student can check (module names, re-ranking directions) fail before
    any data loads, as one line and exit 2."""
    base = (REPO / "configs" / "distill-long-fusion.yaml").read_text()
    base = re.sub(r"(?m)^init: .*$", "init: models/trimvlm-student/6", base)  # the committed student
    cases = {
        "train_modules: [fusion_encoder, itm_head, vqa_head]": ("train_modules: [fusion]", "train_modules must be some of"),
        "itm_rank_k: 4": ("itm_rank_k: 4\nitm_rank_directions: [up]", "itm_rank_directions: one or both of t2i, i2t"),
    }
    for old, (new, message) in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(base.replace(old, new))
        proc = cli("distill", str(bad), "--out", str(tmp_path / "run"))
        assert proc.returncode == 2 and message in one_line_error(proc)


def test_a_distill_config_naming_a_missing_model_folder_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(re.sub(r"(?m)^init: .*$", "init: models/trimvlm-student/0", (REPO / "configs" / "distill.yaml").read_text()))
    proc = cli("distill", str(bad), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "init: models/trimvlm-student/0 is not a model folder" in one_line_error(proc)


def test_a_student_folder_that_is_not_there_is_one_line_for_trim_and_prune(tmp_path):
    for command, config in (("trim", "configs/trim-retune.yaml"), ("prune", "configs/prune.yaml")):
        proc = cli(command, config, "--student", str(tmp_path / "nothing"), "--out", str(tmp_path / command))
        assert proc.returncode == 2
        assert f"{tmp_path / 'nothing'} is not a model folder" in one_line_error(proc)


# ---- trimvlm models list ---------------------------------------------------------------------------


def test_models_list_keeps_names_whole_off_a_terminal():
    proc = cli("models", "list")
    assert proc.returncode == 0, proc.stderr
    assert "trimvlm-default/1" in proc.stdout and "models/trimvlm-default/1" in proc.stdout
    for line in proc.stdout.splitlines():
        if "trimvlm-default/1" in line:
            assert "accurate,balanced,fast,full" in line and "vqa,caption,retrieval" in line


def test_models_list_shows_torch_folders_as_not_servable():
    proc = cli("models", "list")
    [row] = [line for line in proc.stdout.splitlines() if "trimvlm-teacher/1" in line]
    assert "not servable: torch model folder: export it with `trimvlm export`" in row
    listing = {m["model"]: m for m in json.loads(cli("models", "list", "--json").stdout)}
    assert listing["trimvlm-default/1"]["servable"] is True
    teacher = listing["trimvlm-teacher/1"]
    assert teacher["servable"] is False and "trimvlm export" in teacher["reason"]


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_models_list_on_a_missing_or_empty_repository_is_an_error(tmp_path, json_flag):
    proc = cli("models", "list", "--models", "/nope", *json_flag)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "/nope is not a folder" in one_line_error(proc)
    proc = cli("models", "list", "--models", str(tmp_path), *json_flag)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"no models under {tmp_path}" in one_line_error(proc)
