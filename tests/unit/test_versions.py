"""Model versions (service/repository.py): numeric order and the version policy (latest N, all,
specific), as Triton's model repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.repository import MANIFEST, VersionPolicy, find_models, latest, version_key
from service.settings import Settings


def repo(root: Path, *versions: str) -> Path:
    """A repository whose version folders hold (empty) manifests: find_models only looks for them."""
    for v in versions:
        name, version = v.split("/")
        (root / name / version).mkdir(parents=True)
        (root / name / version / MANIFEST).write_text("{}")
    return root


def names(folders: list[Path]) -> list[str]:
    return [f"{f.parent.name}/{f.name}" for f in folders]


def test_versions_sort_by_number_not_by_string():
    assert sorted(["10", "9", "1", "100"], key=version_key) == ["1", "9", "10", "100"]
    assert latest(["x/9", "x/10"]) == "x/10" and latest(["x/10", "x/9", "x/2"]) == "x/10"
    assert sorted(["2", "old", "10"], key=version_key) == ["old", "2", "10"]  # names sort before numbers


def test_find_models_orders_by_name_then_number(tmp_path):
    root = repo(tmp_path, "b/1", "a/10", "a/9", "a/2")
    assert names(find_models(root)) == ["a/2", "a/9", "a/10", "b/1"]


@pytest.mark.parametrize(
    "policy, served",
    [
        ("latest:1", ["a/10", "b/1"]),
        ("latest:2", ["a/9", "a/10", "b/1"]),
        ("latest", ["a/10", "b/1"]),
        ("all", ["a/2", "a/9", "a/10", "b/1"]),
        ("specific:2,10", ["a/2", "a/10"]),
        ("specific:1", ["b/1"]),
        ("specific:7", []),
    ],
)
def test_each_policy_applies_per_model_name(tmp_path, policy, served):
    root = repo(tmp_path, "a/2", "a/9", "a/10", "b/1", "b/draft")
    assert names(find_models(root, policy)) == served
    assert names(find_models(root, VersionPolicy.parse(policy))) == served


def test_version_folders_not_named_by_a_number_are_never_served(tmp_path):
    root = repo(tmp_path, "a/v2", "a/1", "b/latest")
    assert names(find_models(root)) == ["a/v2", "a/1", "b/latest"]  # listed (models list, verify) ...
    assert names(find_models(root, "all")) == ["a/1"]  # ... but not served


def test_a_version_folder_given_as_the_root_is_served_whatever_its_name(tmp_path):
    root = repo(tmp_path, "a/exported")
    assert find_models(root / "a" / "exported", "latest:1") == [root / "a" / "exported"]


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("latest:1", "latest:1"),
        ("latest", "latest:1"),
        (" Latest:3 ", "latest:3"),
        ("all", "all"),
        ("specific:3, 1,3", "specific:1,3"),
    ],
)
def test_policy_strings(text, canonical):
    assert str(VersionPolicy.parse(text)) == canonical
    assert Settings(_env_file=None, version_policy=text).version_policy == canonical


@pytest.mark.parametrize(
    "text", ["", "latest:0", "latest:-1", "latest:x", "newest", "all:2", "specific", "specific:", "specific:1,a", "specific:1,"]
)
def test_bad_policy_strings_are_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="latest:N .*all.*specific:V1,V2"):
        VersionPolicy.parse(text)
    with pytest.raises(ValidationError, match="version policy"):
        Settings(_env_file=None, version_policy=text)


def test_default_policy_is_latest_one(monkeypatch):
    monkeypatch.delenv("TRIMVLM_VERSION_POLICY", raising=False)
    assert Settings(_env_file=None).version_policy == "latest:1"
    monkeypatch.setenv("TRIMVLM_VERSION_POLICY", "all")
    assert Settings(_env_file=None).version_policy == "all"


# ---- trimvlm models list, trimvlm serve ---------------------------------------------------------


@pytest.fixture
def two_versions(tmp_path) -> Path:
    """x/9 and x/10, each the default model (linked)."""
    source = Path(__file__).resolve().parents[2] / "models" / "trimvlm-default" / "1"
    for version in ("9", "10"):
        (tmp_path / "x").mkdir(exist_ok=True)
        (tmp_path / "x" / version).symlink_to(source)
    return tmp_path


def test_models_list_shows_which_versions_the_policy_serves(two_versions, monkeypatch):
    from tests.unit.test_cli_errors import cli

    def served(*args: str) -> dict[str, bool]:
        proc = cli("models", "list", "--models", str(two_versions), "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return {Path(row["path"]).name: row["served"] for row in json.loads(proc.stdout)}

    monkeypatch.delenv("TRIMVLM_VERSION_POLICY", raising=False)
    assert served() == {"9": False, "10": True}
    assert served("--version-policy", "all") == {"9": True, "10": True}
    monkeypatch.setenv("TRIMVLM_VERSION_POLICY", "specific:9")
    assert served() == {"9": True, "10": False}
    proc = cli("models", "list", "--models", str(two_versions), "--version-policy", "newest")
    assert proc.returncode == 2 and "version policy 'newest' not understood" in " ".join(proc.stderr.split())


def test_serve_refuses_a_policy_that_serves_nothing_and_two_folders_of_one_version(two_versions, tmp_path):
    from service.cli import repository_problem
    from service.state import AppState

    assert repository_problem(two_versions, "latest:1") is None
    problem = repository_problem(two_versions, "specific:3")
    assert "no version under" in problem and "version policy specific:3" in problem
    # Both folders' manifests say trimvlm-default/1: serving both would hide one behind the other.
    state = AppState.create(Settings(_env_file=None, models_dir=two_versions, version_policy="all", warmup=False))
    try:
        with pytest.raises(ValueError, match="names trimvlm-default/1, as .* does"):
            state.load_models()
    finally:
        state.preprocess_pool.shutdown()
        state.inference_pool.shutdown()
