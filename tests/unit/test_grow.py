"""A student grown by one layer cut from a teacher layer (compression/grow.py)."""

from pathlib import Path

import pytest
import torch

from compression.distill import init_from_teacher, student_config, student_layers
from compression.grow import grow, grow_dir
from compression.modeling import TrimVLM
from tests.unit.test_distill import four_layer_config


def pair():
    torch.manual_seed(0)
    tcfg = four_layer_config(fusion_self_heads=[4, 3], fusion_cross_heads=[4, 2], fusion_mlp=[40, 24])
    teacher = TrimVLM(tcfg).eval()
    student = TrimVLM(student_config(tcfg, student_layers(tcfg), "s")).eval()
    init_from_teacher(student, teacher)
    return teacher, student


def test_grown_fusion_layer_is_the_teachers_cut_and_the_rest_the_students():
    teacher, student = pair()
    assert student.config.layer_counts["fusion"] == 1
    grown = grow(student, teacher, "fusion", {"head": 2, "cross": 1, "ffn": 8}).eval()
    cfg = grown.config
    assert (cfg.fusion_self_heads, cfg.fusion_cross_heads, cfg.fusion_mlp) == (
        student.config.fusion_self_heads + [2],
        student.config.fusion_cross_heads + [1],
        student.config.fusion_mlp + [8],
    )
    g, s, t = grown.state_dict(), student.state_dict(), teacher.state_dict()
    for key, value in s.items():  # every weight the student had is unchanged
        assert torch.equal(g[key], value), key
    d = cfg.text_head_dim
    new, src = "fusion_encoder.layer.1.", "fusion_encoder.layer.1."  # the teacher's last fusion layer
    assert torch.equal(g[new + "attention.self.query.weight"], t[src + "attention.self.query.weight"][: 2 * d])
    assert torch.equal(g[new + "crossattention.self.value.weight"], t[src + "crossattention.self.value.weight"][:d])
    assert torch.equal(g[new + "intermediate.dense.weight"], t[src + "intermediate.dense.weight"][:8])
    assert torch.equal(g[new + "output.dense.weight"], t[src + "output.dense.weight"][:, :8])
    assert torch.equal(g[new + "output.LayerNorm.weight"], t[src + "output.LayerNorm.weight"])
    # it runs, and the second layer changes what the fused [CLS] carries
    ids = torch.randint(6, cfg.vocab_size, (2, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        img = grown.encode_image(pixels).last_hidden_state
        txt = grown.text_encoder(ids, mask).last_hidden_state
        fused = grown.fuse(txt, mask, img).last_hidden_state
        one = student.fuse(txt, mask, img).last_hidden_state
    assert fused.shape == one.shape and not torch.allclose(fused, one)


def test_grow_refuses_what_it_cannot_cut():
    teacher, student = pair()
    with pytest.raises(ValueError, match="stack: one of"):
        grow(student, teacher, "heads", {"head": 1})
    with pytest.raises(ValueError, match="head, cross, ffn"):
        grow(student, teacher, "fusion", {"head": 1, "ffn": 4})
    with pytest.raises(ValueError, match="between 1 and the teacher layer's 3"):
        grow(student, teacher, "fusion", {"head": 4, "cross": 1, "ffn": 4})
    with pytest.raises(ValueError, match="has 2 layers"):
        grow(student, teacher, "fusion", {"head": 1, "cross": 1, "ffn": 4}, from_layer=2)


def test_grow_dir_writes_a_loadable_folder(tmp_path):
    from compression.artifacts import load_model_dir, save_model_dir

    teacher, student = pair()
    src = load_model_dir(Path(__file__).resolve().parents[2] / "models/trimvlm-student/6", "cpu")  # its tokenizer
    save_model_dir(tmp_path / "t", teacher, src.tokenizer, src.preprocessing)
    save_model_dir(tmp_path / "s", student, src.tokenizer, src.preprocessing)
    info = grow_dir(tmp_path / "s", tmp_path / "t", tmp_path / "g", "text", {"head": 1, "ffn": 4}, from_layer=0)
    assert info["layers"]["text"] == 2 and info["params"] > info["params_before"]
    back = load_model_dir(tmp_path / "g", "cpu").model
    assert back.config.text_heads == student.config.text_heads + [1]
