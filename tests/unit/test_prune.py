"""Hard-concrete gates, the expected-sparsity formula, the Lagrangian, and physical slicing."""

import math

import pytest
import torch

from compression.artifacts import load_model_dir, save_model_dir
from compression.distill import DistillConfig, Distiller
from compression.flops import TokenCounts, count_params
from compression.modeling import TrimVLM
from compression.prune import (
    GROUPS,
    HardConcreteGates,
    Lagrangian,
    PruneConfig,
    Pruner,
    deterministic_mask,
    p_open,
    sample_hard_concrete,
    slice_model,
    unit_costs,
)
from compression.training import task_forward
from service.preprocess import ImageSpec, Preprocessing
from tests.unit.test_modeling import tiny_config


def synthetic_batches(cfg, b=6, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, cfg.vocab_size, (b, n), generator=g)
    ids[:, 0] = cfg.cls_token_id
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 4:] = False
    dec = ids.clone()
    dec[:, 0] = cfg.bos_token_id
    vqa = {
        "pixels": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
        "q_ids": ids,
        "q_mask": mask,
        "answer": torch.randint(0, cfg.num_answers, (b,), generator=g),
        "a_ids": dec[:, :4],
        "a_mask": mask[:, :4],
    }
    cap = {
        "pixels": torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
        "ids": ids,
        "mask": mask,
        "key": torch.arange(b),
        "dec_ids": dec,
    }
    return vqa, cap


def test_gate_samples_match_the_open_probability():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    z = torch.stack([sample_hard_concrete(log_alpha) for _ in range(20000)])
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0  # the stretch makes exact zeros and ones
    empirical = (z > 0).float().mean(0)
    assert torch.allclose(empirical, p_open(log_alpha), atol=0.015), (empirical, p_open(log_alpha))
    # closed form: P(z != 0) = sigmoid(log_alpha - beta * log(-l / r)) = sigmoid(log_alpha + 1.5987)
    assert float(p_open(torch.tensor(0.0))) == pytest.approx(1 / (1 + math.exp(-(2 / 3) * math.log(11))), abs=1e-6)
    # more open gates have larger mean values
    assert torch.all(z.mean(0)[1:] > z.mean(0)[:-1])


def test_deterministic_mask_keeps_the_expected_number_of_top_units():
    la = torch.tensor([5.0, -5.0, 4.0, -4.0, 3.0, -6.0])
    k = round(float(p_open(la).sum()))
    mask = deterministic_mask(la)
    assert int(mask.sum()) == k == 3
    assert mask.tolist() == [1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("mode", ["params", "flops"])
def test_expected_sparsity_is_the_cost_weighted_closed_probability(mode):
    cfg = tiny_config()
    gates = HardConcreteGates(cfg, mode, TokenCounts(text=7, caption=7))
    with torch.no_grad():  # heads fully open, FFN neurons fully closed
        for k, p in gates.log_alpha.items():
            p.fill_(-100.0 if "_ffn_" in k else 100.0)
    costs = unit_costs(cfg, mode, TokenCounts(text=7, caption=7))
    total = sum(c * n for g, f in GROUPS.items() for c, n in zip(costs[g], getattr(cfg, f), strict=True))
    ffn = sum(c * n for g, f in GROUPS.items() if g[1] == "ffn" for c, n in zip(costs[g], getattr(cfg, f), strict=True))
    assert float(gates.expected_sparsity()) == pytest.approx(ffn / total, rel=1e-5)
    if mode == "params":  # a unit's params cost equals what slicing it away removes
        model = TrimVLM(cfg)
        masks = {g: [torch.ones(n) for n in getattr(cfg, f)] for g, f in GROUPS.items()}
        masks[("vision", "ffn")][0][:5] = 0
        masks[("fusion", "cross")][1][:1] = 0
        removed = count_params(model)["total"] - count_params(slice_model(model, masks))["total"]
        assert removed == 5 * costs[("vision", "ffn")][0] + costs[("fusion", "cross")][1]
    # flops prices a vision unit (more tokens) above a text unit of the same shape
    if mode == "flops":
        assert costs[("vision", "ffn")][0] > costs[("text", "ffn")][0]


def test_lagrangian_drives_expected_sparsity_to_the_target():
    torch.manual_seed(0)
    cfg = tiny_config()
    student, teacher = TrimVLM(cfg), TrimVLM(cfg)
    pc = PruneConfig(target_sparsity=0.45, reg_lr=0.1, kd_weight=0.0, task_weight=1.0, lr=1e-3)
    gates = HardConcreteGates(cfg, "params", TokenCounts(text=7, caption=7))
    pruner = Pruner(Distiller(student, teacher, pc), gates, pc, ramp_steps=60).train()
    opt = torch.optim.AdamW([{"params": list(student.parameters()), "lr": 1e-3}, *pruner.param_groups()], betas=(0.9, 0.98))
    vqa, cap = synthetic_batches(cfg)
    history = []
    for step in range(300):
        losses = pruner(vqa, cap, step)
        opt.zero_grad()
        losses["total"].backward()
        pruner.before_step()
        opt.step()
        pruner.after_step()
        history.append(float(losses["expected_sparsity"]))
    assert history[0] < 0.3
    assert abs(history[-1] - 0.45) < 0.02, history[-10:]
    assert float(pruner.lagrangian.lambda_2) > 0  # ascent: the quadratic multiplier only grows
    for p in gates.log_alpha.values():  # clamped after every step
        assert float(p.min()) >= math.log(0.01) - 1e-6 and float(p.max()) <= math.log(100) + 1e-6


def test_lagrangian_ascent_moves_multipliers_against_the_gap():
    lag = Lagrangian()
    opt = torch.optim.SGD(lag.parameters(), lr=1.0)
    loss = lag(torch.tensor(0.2), 0.5)  # not sparse enough: gap -0.3
    loss.backward()
    lag.ascend()
    opt.step()
    assert float(lag.lambda_1) == pytest.approx(-0.3)  # λ1 (ŝ - t) now rewards more sparsity
    assert float(lag.lambda_2) == pytest.approx(0.09)


def random_masks(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {grp: [(torch.rand(n, generator=g) > 0.5).float() for n in getattr(cfg, f)] for grp, f in GROUPS.items()}
    masks[("fusion", "head")][0].zero_()  # a block with no heads left: only its output bias
    masks[("vision", "ffn")][1].zero_()  # an FFN with no neurons left: only fc2's bias
    masks[("decoder", "cross")][0].zero_()
    return masks


def test_sliced_model_equals_the_masked_model():
    torch.manual_seed(0)
    cfg = tiny_config(decoder_cross_width=None, text_width=32, text_head_dim=8)  # generative VQA on
    model = TrimVLM(cfg).eval()
    for p in model.parameters():  # non-trivial biases so the bias paths are exercised
        torch.nn.init.normal_(p, std=0.1) if p.dim() == 1 else None
    masks = random_masks(cfg)
    sliced = slice_model(model, masks).eval()
    assert sliced.config.fusion_self_heads[0] == 0 and sliced.config.vision_mlp[1] == 0
    assert count_params(sliced)["total"] < count_params(model)["total"]
    vqa, cap = synthetic_batches(cfg)
    with torch.no_grad():
        a = task_forward(model, vqa, cap, gates=masks)
        b = task_forward(sliced, vqa, cap, negatives=a.negatives)
    for name in ("vqa_logits", "vqa_gen_logits", "itc_sim", "itm_logits", "caption_logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=0, msg=name)


def test_per_layer_sizes_survive_save_and_load(tmp_path):
    from tokenizers import Tokenizer, models

    cfg = tiny_config()
    sliced = slice_model(TrimVLM(cfg).eval(), random_masks(cfg, seed=3)).eval()
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    save_model_dir(
        tmp_path / "m",
        sliced,
        tok,
        Preprocessing(image=ImageSpec(size=32), max_text_length=16, max_answer_length=4, max_caption_length=16),
    )
    loaded = load_model_dir(tmp_path / "m").model
    for f in GROUPS.values():
        assert getattr(loaded.config, f) == getattr(sliced.config, f)
    assert loaded.config.role == "student"
    vqa, cap = synthetic_batches(cfg)
    with torch.no_grad():
        a, b = task_forward(sliced, vqa, cap), None
        b = task_forward(loaded, vqa, cap, negatives=a.negatives)
    torch.testing.assert_close(b.vqa_logits, a.vqa_logits)


def test_distill_config_is_shared_with_prune():
    assert issubclass(PruneConfig, DistillConfig)


@pytest.mark.parametrize(("kw", "message"), [({"cost": "latency"}, "cost mode"), ({"target_sparsity": 1.2}, "target_sparsity")])
def test_prune_rejects_bad_settings_before_loading_anything(kw, message):
    from compression.prune import prune

    with pytest.raises(ValueError, match=message):
        prune(PruneConfig(teacher="/nonexistent", student="/nonexistent", **kw))
