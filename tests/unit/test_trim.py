import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compression.flops import TokenCounts, flops_per_sample
from compression.modeling import Trimmers, TrimVLM
from compression.trim import TrimConfig, TrimObjective
from compression.trimmed import (
    Trim,
    TrimTrace,
    bucket_size,
    flops_ratio,
    gumbel_keep,
    keep_decision,
    trimmed_flops,
    trimmed_vqa_forward,
)
from tests.unit.test_modeling import tiny_config


def trimmed_model(seed: int = 0, spread: float = 2.0) -> TrimVLM:
    """A tiny model whose trimmers drop a random, input-dependent share of tokens and heads."""
    torch.manual_seed(seed)
    cfg = tiny_config(trimming={"hidden": 8})
    model = TrimVLM(cfg).eval()
    for m in model.trimmers.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=spread / m.in_features**0.5)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    return model


def inputs(b: int, n_text: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(4, 50, (b, n_text), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(b, n_text, dtype=torch.bool)
    for i in range(b):  # ragged questions, padded
        mask[i, n_text - (i % 4) :] = False
    return pixels, ids.masked_fill(~mask, 0), mask


def test_gumbel_gates_are_hard_with_gradients_and_deterministic_at_inference():
    logits = torch.randn(64, 40, requires_grad=True)
    train = gumbel_keep(logits, tau=0.5)
    assert torch.allclose(train, train.round(), atol=1e-6) and set(train.round().unique().tolist()) <= {0.0, 1.0}
    train.sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through: the sigmoid's gradient
    # sampling: P(keep) follows sigmoid(logit)
    fixed = torch.full((20000,), 1.0)
    rate = gumbel_keep(fixed, tau=1.0).mean().item()
    assert abs(rate - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    # inference: no noise, a threshold on sigmoid(logit)
    a = keep_decision(logits.detach(), Trim(mode="mask"), 0.5)
    b = keep_decision(logits.detach(), Trim(mode="mask"), 0.5)
    assert torch.equal(a, b) and torch.equal(a, (logits.detach() > 0).float())
    assert keep_decision(torch.tensor([0.0]), Trim(mode="gather"), 0.4).item() == 1.0
    assert keep_decision(torch.tensor([0.0]), Trim(mode="gather"), 0.6).item() == 0.0


def test_mask_and_gather_give_the_same_outputs():
    model = trimmed_model()
    pixels, ids, mask = inputs(6)
    dropped_any = False
    for i in range(6):
        row = (pixels[i : i + 1], ids[i : i + 1], mask[i : i + 1])
        with torch.no_grad():
            m_logits, m_trace = trimmed_vqa_forward(model, *row, Trim(mode="mask"))
            g_logits, g_trace = trimmed_vqa_forward(model, *row, Trim(mode="gather"))
        assert torch.allclose(m_logits, g_logits, atol=1e-4), (m_logits - g_logits).abs().max()
        assert torch.equal(m_trace.image_keep, g_trace.image_keep)
        assert torch.allclose(flops_ratio(model.config, m_trace), flops_ratio(model.config, g_trace))
        dropped_any |= bool((m_trace.image_keep == 0).any())
        dropped_any |= any(h.item() < n for h, n in zip(m_trace.vision_heads, model.config.vision_heads, strict=True))
    assert dropped_any, "the test model should actually trim something"


def test_bucketed_gather_equals_per_sample_gather():
    model = trimmed_model(seed=5)
    pixels, ids, mask = inputs(8, seed=4)
    with torch.no_grad():
        batched, trace = trimmed_vqa_forward(model, pixels, ids, mask, Trim(mode="gather"))
        single = torch.cat(
            [
                trimmed_vqa_forward(model, pixels[i : i + 1], ids[i : i + 1], mask[i : i + 1], Trim(mode="gather"))[0]
                for i in range(8)
            ]
        )
        masked, _ = trimmed_vqa_forward(model, pixels, ids, mask, Trim(mode="mask"))
    assert torch.allclose(batched, single, atol=1e-4)
    assert torch.allclose(batched, masked, atol=1e-4)
    kept = torch.stack(trace.vision_tokens)
    assert (kept != kept[:, :1]).any(), "kept-token counts should differ between inputs"


def test_bucket_size():
    assert bucket_size(1, 65, (1.0, 0.5, 0.25)) == 17
    assert bucket_size(17, 65, (1.0, 0.5, 0.25)) == 17
    assert bucket_size(18, 65, (1.0, 0.5, 0.25)) == 33
    assert bucket_size(65, 65, (0.5,)) == 65


def test_untrimmed_path_matches_the_model_and_its_flops():
    model = trimmed_model()
    pixels, ids, mask = inputs(1)
    with torch.no_grad():
        full, trace = trimmed_vqa_forward(model, pixels, ids, mask, Trim(enabled=False))
        ref, _ = model.vqa_forward(pixels, ids, mask)
    assert torch.allclose(full, ref, atol=1e-5)
    n = int(mask.sum())
    expected = flops_per_sample(model.config, TokenCounts(text=n), "vqa")["total"]
    assert trimmed_flops(model.config, trace).item() == expected


def test_trimmed_flops_match_a_hand_count():
    cfg = tiny_config(trimming={"hidden": 8})
    # vision 32 wide, 2 layers (4, 2 heads of 8; FFN 64, 48); text 24 wide, heads of 6; 17 image tokens
    trace = TrimTrace(text_len=torch.tensor([10.0]))
    trace.text_tokens = [torch.tensor([8.0])]
    trace.text_heads = [torch.tensor([3.0])]
    trace.vision_tokens = [torch.tensor([12.0]), torch.tensor([5.0])]
    trace.vision_heads = [torch.tensor([4.0]), torch.tensor([1.0])]
    trace.image_kv = torch.tensor([5.0])
    trace.fusion_tokens = [torch.tensor([6.0]), torch.tensor([4.0])]
    trace.fusion_self_heads = [torch.tensor([2.0]), torch.tensor([3.0])]
    trace.fusion_cross_heads = [torch.tensor([1.0]), torch.tensor([0.0])]
    trace.scored = {"vision": [17, 12], "text": [10], "fusion": [8, 6]}

    def attn(nq, nk, qw, kvw, inner, ow):  # q, k, v, scores, context, output: 2 x MACs
        return 2 * nq * qw * inner + 2 * 2 * nk * kvw * inner + 2 * 2 * nq * nk * inner + 2 * nq * inner * ow

    patch = 2 * 16 * (3 * 64) * 32
    text = attn(8, 8, 24, 24, 3 * 6, 24) + 4 * 8 * 24 * 40
    vision = attn(12, 12, 32, 32, 4 * 8, 32) + 4 * 12 * 32 * 64 + attn(5, 5, 32, 32, 1 * 8, 32) + 4 * 5 * 32 * 48
    fusion = attn(6, 6, 24, 24, 2 * 6, 24) + attn(6, 5, 24, 32, 1 * 6, 24) + 4 * 6 * 24 * 40
    fusion += attn(4, 4, 24, 24, 3 * 6, 24) + attn(4, 5, 24, 32, 0, 24) + 4 * 4 * 24 * 16
    head = 2 * (24 * 48 + 48 * cfg.num_answers)
    token_trimmers = sum(n * 2 * (32 * 8 + 8) + 2 * (32 + 24) * 8 for n in (17, 12))
    token_trimmers += sum(n * 2 * (24 * 8 + 8) + 2 * (24 + 32) * 8 for n in (10, 8, 6))
    head_trimmers = 2 * 56 * (4 + 2 + 4 + 4 + 3 + 2 + 4)
    expected = patch + text + vision + fusion + head + token_trimmers + head_trimmers
    assert trimmed_flops(cfg, trace).item() == pytest.approx(expected, rel=1e-9)


def test_gather_flops_match_torch_flop_counter():
    """At batch 1 the gather path runs exactly what trimmed_flops counts: torch's counter sees
    every matmul (trimmer MLPs included) except SDPA's scores and context, added by hand."""
    model = trimmed_model(seed=5)
    cfg = model.config
    pixels, ids, mask = inputs(1, seed=6)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        _, t = trimmed_vqa_forward(model, pixels, ids, mask, Trim(mode="gather"))
    assert t.image_kv.item() < cfg.num_image_tokens  # something was dropped

    def sdpa(nq, nk, heads, head_dim):
        return 2 * 2 * nq * nk * heads * head_dim

    unseen = sum(sdpa(n, n, h, cfg.vision_head_dim) for n, h in zip(t.vision_tokens, t.vision_heads, strict=True))
    unseen += sum(sdpa(n, n, h, cfg.text_head_dim) for n, h in zip(t.text_tokens, t.text_heads, strict=True))
    for n, h, c in zip(t.fusion_tokens, t.fusion_self_heads, t.fusion_cross_heads, strict=True):
        unseen += sdpa(n, n, h, cfg.text_head_dim) + sdpa(n, t.image_kv, c, cfg.text_head_dim)
    assert fc.get_total_flops() + unseen.item() == trimmed_flops(cfg, t).item()


def test_trimmers_cost_under_two_percent_on_the_committed_student():
    from compression.config import ModelConfig

    cfg = ModelConfig.load("models/trimvlm-student/6/config.json")
    cfg.trimming = {"hidden": 32}
    n = 12
    full = TrimTrace(text_len=torch.tensor([float(n)]), trimmed=False)
    kept_all = TrimTrace(text_len=torch.tensor([float(n)]))
    n_img = float(cfg.num_image_tokens)
    kept_all.vision_tokens = [torch.tensor([n_img])] * len(cfg.vision_heads)
    kept_all.vision_heads = [torch.tensor([float(h)]) for h in cfg.vision_heads]
    kept_all.text_tokens = [torch.tensor([float(n)])] * len(cfg.text_heads)
    kept_all.text_heads = [torch.tensor([float(h)]) for h in cfg.text_heads]
    kept_all.fusion_tokens = [torch.tensor([float(n)])] * len(cfg.fusion_self_heads)
    kept_all.fusion_self_heads = [torch.tensor([float(h)]) for h in cfg.fusion_self_heads]
    kept_all.fusion_cross_heads = [torch.tensor([float(h)]) for h in cfg.fusion_cross_heads]
    kept_all.image_kv = torch.tensor([n_img])
    kept_all.scored = {
        "vision": [n_img] * len(cfg.vision_heads),
        "text": [n] * len(cfg.text_heads),
        "fusion": [n] * len(cfg.fusion_self_heads),
    }
    overhead = trimmed_flops(cfg, kept_all) / trimmed_flops(cfg, full) - 1
    assert 0 < overhead.item() < 0.02


def test_objective_trains_trimmers_towards_the_flops_target():
    torch.manual_seed(0)
    model = TrimVLM(tiny_config(trimming={"hidden": 8}))
    trimmers = model.trimmers
    model.trimmers = None
    cfg = TrimConfig(steps=10, target_flops=0.4, curriculum_fraction=0.5)
    objective = TrimObjective(model, trimmers, cfg)
    assert objective.schedule(0)[1] == 1.0 and objective.schedule(5)[1] == pytest.approx(0.4)
    pixels, ids, mask = inputs(4)
    vqa = {"pixels": pixels, "q_ids": ids, "q_mask": mask, "answer": torch.zeros(4, dtype=torch.long)}
    losses = objective(vqa, {}, step=9)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    token_grad = sum(p.grad.abs().sum() for p in trimmers.vision_tokens.parameters() if p.grad is not None)
    head_grad = sum(p.grad.abs().sum() for p in trimmers.vision_heads.parameters() if p.grad is not None)
    assert token_grad > 0 and head_grad > 0


def test_trimmers_survive_save_and_load(tmp_path):
    from compression.artifacts import load_model_dir, save_model_dir
    from service.preprocess import ImageSpec, Preprocessing
    from tests.unit.test_modeling import _tokenizer

    model = trimmed_model()
    assert isinstance(model.trimmers, Trimmers)
    save_model_dir(tmp_path, model, _tokenizer(), Preprocessing(image=ImageSpec(size=32)))
    loaded = load_model_dir(tmp_path).model
    pixels, ids, mask = inputs(2)
    with torch.no_grad():
        a, _ = trimmed_vqa_forward(model, pixels, ids, mask, Trim())
        b, _ = trimmed_vqa_forward(loaded, pixels, ids, mask, Trim())
    assert torch.allclose(a, b, atol=1e-6)


def test_joint_training_can_keep_every_task_on_the_untrimmed_pass():
    from tests.unit.test_prune import synthetic_batches

    torch.manual_seed(0)
    model = TrimVLM(tiny_config(trimming={"hidden": 8}, decoder_cross_width=None, text_width=32, text_head_dim=8))
    trimmers = model.trimmers
    model.trimmers = None
    vqa, cap = synthetic_batches(model.config)
    only_vqa = TrimObjective(model, trimmers, TrimConfig(steps=10, lr=1e-4, full_tasks="vqa"))
    every = TrimObjective(model, trimmers, TrimConfig(steps=10, lr=1e-4, full_tasks="all"))
    caption_grad = []
    for objective in (only_vqa, every):
        model.zero_grad()
        objective(vqa, cap, step=5)["total"].backward()
        g = model.text_decoder.bert.encoder.layer[0].output.dense.weight.grad
        caption_grad.append(0.0 if g is None else float(g.abs().sum()))
    assert caption_grad[0] == 0.0 and caption_grad[1] > 0  # only "all" trains the decoder
    with pytest.raises(ValueError, match="full_tasks"):
        TrimObjective(model, trimmers, TrimConfig(full_tasks="some"))
