"""The README works from a fresh clone: its relative links point at files inside the repository,
and `make run` says where the `trimvlm` command is (it is not on PATH)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

README = REPO / "README.md"


def relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'(?:src|href)="([^"]+)"', text)
    return [link.split("#")[0] for link in links if not re.match(r"^[a-z]+:", link) and not link.startswith("#")]


def test_readme_links_stay_inside_the_repository():
    links = relative_links(README.read_text())
    assert "docs/DESIGN.md" in links
    for link in links:
        target = (REPO / link).resolve()
        assert target.is_relative_to(REPO), f"{link} points outside the repository"
        assert target.exists(), f"{link} does not exist"


def test_readme_names_no_path_outside_the_clone():
    assert "../shared" not in README.read_text()


def test_readme_says_where_trimvlm_is():
    text = README.read_text()
    assert "source .venv/bin/activate" in text and ".venv/bin/trimvlm" in text


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_prints_where_trimvlm_is():
    out = subprocess.run(["make", "-n", "run", "VENV=.venv"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert "trimvlm is at .venv/bin/trimvlm (source .venv/bin/activate to use it directly)" in out
