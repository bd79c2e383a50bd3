"""Weight-space interpolation of a student and its continuation, and the validation pick."""

import json
from types import SimpleNamespace

import pytest
import torch

from compression import merge as M
from compression.artifacts import load_model_dir, save_model_dir
from compression.modeling import TrimVLM
from service.preprocess import ImageSpec, Preprocessing
from tests.unit.test_modeling import _tokenizer, tiny_config

W = "vision_model.encoder.layers.0.mlp.fc1.weight"


def two_models(seed_a=0, seed_b=1, **cfg):
    torch.manual_seed(seed_a)
    a = TrimVLM(tiny_config(**cfg))
    torch.manual_seed(seed_b)
    b = TrimVLM(tiny_config(**cfg))
    return a, b


def test_interpolation_ends_are_the_two_models_and_the_middle_their_mean():
    a, b = two_models()
    assert torch.equal(M.interpolate(a, b, 0.0)[W], a.state_dict()[W])
    assert torch.equal(M.interpolate(a, b, 1.0)[W], b.state_dict()[W])
    mid = M.interpolate(a, b, 0.5)
    assert torch.allclose(mid[W], (a.state_dict()[W] + b.state_dict()[W]) / 2, atol=1e-7)
    assert not torch.equal(mid[W], a.state_dict()[W])
    assert mid.keys() == a.state_dict().keys()


def test_mixing_some_modules_keeps_every_other_weight_of_the_base():
    a, b = two_models()
    sa, sb = a.state_dict(), b.state_dict()
    mixed = M.interpolate(a, b, 0.5, ("itm_head", "fusion_encoder"))
    for name, w in mixed.items():
        if name.split(".")[0] in ("itm_head", "fusion_encoder"):
            assert torch.allclose(w, torch.lerp(sa[name].float(), sb[name].float(), 0.5).to(w.dtype)), name
        else:
            assert torch.equal(w, sa[name]), name
    assert not torch.equal(mixed["itm_head.weight"], sa["itm_head.weight"])
    with pytest.raises(ValueError, match="modules to mix"):
        M.interpolate(a, b, 0.5, ("itm_hed",))


def test_different_architectures_and_weights_out_of_range_are_refused():
    a, _ = two_models()
    torch.manual_seed(1)
    pruned = TrimVLM(tiny_config(vision_mlp=[7, 3]))
    with pytest.raises(ValueError, match="not the same architecture"):
        M.interpolate(a, pruned, 0.5)
    with pytest.raises(ValueError, match="within"):
        M.interpolate(a, a, 1.5)


def test_pick_takes_the_best_weakest_retention_not_the_best_mean():
    teacher = {"scenes_val.accuracy": 0.8, "scenes_val.r1_i2t": 0.7}
    candidates = {
        0.3: {"scenes_val.accuracy": 0.70, "scenes_val.r1_i2t": 0.56},  # 87.5%, 80%: weakest 80%
        0.7: {"scenes_val.accuracy": 0.78, "scenes_val.r1_i2t": 0.52},  # higher mean, weakest 74%
    }
    assert M.pick(candidates, teacher) == 0.3
    candidates[0.7]["scenes_val.r1_i2t"] = 0.6
    assert M.pick(candidates, teacher) == 0.7
    with pytest.raises(ValueError):
        M.pick({}, teacher)


def test_merge_saves_the_picked_mixture_and_records_every_candidate(tmp_path, monkeypatch):
    a, b = two_models()
    tok, pre = _tokenizer(), Preprocessing(image=ImageSpec(size=32))
    for name, m in (("base", a), ("tuned", b), ("teacher", a)):
        save_model_dir(tmp_path / name, m, tok, pre)
    (tmp_path / "tuned" / "levels.json").write_text("{}")  # stale levels must not travel
    monkeypatch.setattr(M, "validation_splits", lambda spec: ([], SimpleNamespace(name="scenes_val", images=[])))
    # the validation metric follows the weights: closest to a target point between the two models
    target = M.interpolate(a, b, 0.55)[W]

    def fake_eval(model, vqa, captions, device, k):
        w = model.model.state_dict()[W] if hasattr(model, "model") else model.state_dict()[W]
        return {"scenes_val.accuracy": 1.0 / (1.0 + float((w - target).abs().sum()))}

    import compression.evaluate

    monkeypatch.setattr(compression.evaluate, "evaluate_validation", fake_eval)
    alphas = [0.0, 0.5, 0.7, 1.0]
    record = M.merge(tmp_path / "base", tmp_path / "tuned", tmp_path / "teacher", alphas, tmp_path / "out", log=lambda *_: None)
    assert record["alpha"] == 0.5  # the candidate nearest the target in weight space
    saved = load_model_dir(tmp_path / "out").model.state_dict()
    assert torch.allclose(saved[W], M.interpolate(a, b, 0.5)[W])
    stored = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert set(stored["candidates"]) == {"0.0", "0.5", "0.7", "1.0"} and stored["alpha"] == 0.5
    assert not (tmp_path / "out" / "levels.json").exists()
    # the teacher's metrics from that merge.json: the same pick without evaluating the teacher again
    calls = []
    monkeypatch.setattr(compression.evaluate, "evaluate_validation", lambda *a: calls.append(a) or fake_eval(*a))
    again = M.merge(
        tmp_path / "base",
        tmp_path / "tuned",
        tmp_path / "teacher",
        alphas,
        tmp_path / "out2",
        teacher_metrics=tmp_path / "out" / "merge.json",
        log=lambda *_: None,
    )
    assert again["alpha"] == 0.5 and len(calls) == len(alphas)


def test_merge_refuses_two_architectures_before_evaluating(tmp_path):
    a, _ = two_models()
    torch.manual_seed(1)
    pruned = TrimVLM(tiny_config(vision_mlp=[7, 3]))
    tok, pre = _tokenizer(), Preprocessing(image=ImageSpec(size=32))
    save_model_dir(tmp_path / "a", a, tok, pre)
    save_model_dir(tmp_path / "b", pruned, tok, pre)
    with pytest.raises(ValueError, match="not the same architecture"):
        M.merge(tmp_path / "a", tmp_path / "b", tmp_path / "a", [0.5], tmp_path / "out", log=lambda *_: None)
