"""The version policy in the running app: a repository holding versions 9 and 10 of one model
(the default model's files, linked) serves x/10 alone by default (latest:1; a string sort chose
9), and both with `all`, x/10 the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.repository import MANIFEST
from tests.e2e.conftest import MODELS, ready_client, settings_for

SOURCE = MODELS / "trimvlm-default" / "1"


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    manifest = json.loads((SOURCE / MANIFEST).read_text())
    for version in ("9", "10"):
        folder = root / "x" / version
        folder.mkdir(parents=True)
        for f in SOURCE.iterdir():
            if f.name != MANIFEST:
                (folder / f.name).symlink_to(f)
        (folder / MANIFEST).write_text(json.dumps({**manifest, "name": "x", "version": version}))
    return root


def served(tmp_path: Path, root: Path, **settings) -> list[tuple[str, bool]]:
    with ready_client(settings_for(tmp_path, models_dir=root, warmup=False, **settings)) as client:
        return [(m["id"], m["default"]) for m in client.get("/v1/models").json()]


def test_latest_one_by_default_serves_version_10_not_9(tmp_path, two_versions):
    assert served(tmp_path, two_versions) == [("x/10", True)]


def test_all_serves_both_with_the_highest_as_default(tmp_path, two_versions):
    assert served(tmp_path, two_versions, version_policy="all") == [("x/9", False), ("x/10", True)]
    assert served(tmp_path, two_versions, version_policy="specific:9") == [("x/9", True)]
