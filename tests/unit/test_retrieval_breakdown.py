"""Text->image recall per scenes caption template (trimvlm retrieval-by-template)."""

import json

import numpy as np
import pytest

from compression.config_file import ConfigError
from compression.retrieval_breakdown import breakdown, breakdown_table, scenes_test_captions
from compression.scenes import caption_template, generate_scenes


def fake_eval(path, digest, r1, rerank):
    path.write_text(json.dumps({"scenes": {}}))
    np.savez_compressed(
        path.with_name(path.stem + ".items.npz"),
        **{"scenes.items_digest": np.array(digest), "scenes.r1_t2i": r1, "scenes.r1_t2i_rerank": rerank},
    )
    return path


def test_breakdown_groups_each_captions_result_under_its_template(tmp_path):
    root = tmp_path / "scenes"
    generate_scenes(root, seed=4, n_train=2, n_val=2, n_test=30)
    captions, digest = scenes_test_captions(root)
    templates = [caption_template(c) for c in captions]
    rng = np.random.default_rng(0)
    r1 = rng.integers(0, 2, len(captions)).astype(np.float32)
    a = fake_eval(tmp_path / "a.json", digest, r1, np.ones_like(r1))
    result = breakdown([a], root)
    assert sum(result["n"].values()) == result["n_all"] == len(captions)
    model = result["models"][0]
    for t, n in result["n"].items():
        picked = [v for v, tt in zip(r1, templates, strict=True) if tt == t]
        assert n == len(picked)
        assert model["by_template"][t]["r1_t2i"] == pytest.approx(np.mean(picked), abs=1e-4)
        assert model["by_template"][t]["r1_t2i_rerank"] == 1.0
    assert model["all"]["r1_t2i"] == pytest.approx(r1.mean(), abs=1e-4)
    table = breakdown_table(result, "r1_t2i")
    assert table.splitlines()[0] == "| template | captions | a |"
    assert table.splitlines()[-1].startswith(f"| all | {len(captions)} | ")


def test_breakdown_refuses_results_of_other_captions(tmp_path):
    root = tmp_path / "scenes"
    generate_scenes(root, seed=4, n_train=2, n_val=2, n_test=10)
    captions, digest = scenes_test_captions(root)
    other = fake_eval(tmp_path / "other.json", "0" * 16, np.ones(len(captions)), np.ones(len(captions)))
    with pytest.raises(ConfigError, match="not the full scenes test split"):
        breakdown([other], root)
    with pytest.raises(ConfigError, match="--items"):
        breakdown([tmp_path / "missing.json"], root)
