"""Student construction from a teacher and the distillation losses."""

import pytest
import torch

from compression.distill import (
    DistillConfig,
    Distiller,
    attention_layer_map,
    attention_mse,
    hidden_state_map,
    init_from_teacher,
    kl_logits,
    student_config,
    student_layers,
)
from compression.modeling import TrimVLM
from compression.training import task_forward
from tests.unit.test_modeling import tiny_config
from tests.unit.test_prune import synthetic_batches


def four_layer_config(**overrides):
    return tiny_config(
        vision_heads=[4, 2, 4, 3],
        vision_mlp=[64, 48, 32, 16],
        text_heads=[4, 2],
        text_mlp=[40, 20],
        decoder_self_heads=[4, 2],
        decoder_cross_heads=[4, 1],
        decoder_mlp=[40, 8],
        **overrides,
    )


def test_layer_maps_follow_efficientvlm():
    assert attention_layer_map(4, 2) == [1, 3]  # init and attention KD: teacher layers 1, 3
    assert hidden_state_map(4, 2) == [0, 2, 4]  # hidden KD: student state i <-> teacher state 2i
    assert attention_layer_map(12, 6) == [1, 3, 5, 7, 9, 11]
    assert attention_layer_map(3, 3) == [0, 1, 2] and hidden_state_map(3, 3) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        attention_layer_map(2, 3)


def test_student_is_half_depth_with_the_mapped_layers_shapes_and_weights():
    torch.manual_seed(0)
    tcfg = four_layer_config()
    teacher = TrimVLM(tcfg)
    layers = student_layers(tcfg)
    assert layers == {"vision": 2, "text": 1, "fusion": 1, "decoder": 1}
    scfg = student_config(tcfg, layers, "s")
    assert scfg.role == "student"
    assert scfg.vision_heads == [2, 3] and scfg.vision_mlp == [48, 16]  # teacher layers 1 and 3
    assert scfg.fusion_cross_heads == [4] and scfg.decoder_mlp == [8]
    student = TrimVLM(scfg)
    init_from_teacher(student, teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert torch.equal(s_sd["vision_model.encoder.layers.1.mlp.fc1.weight"], t_sd["vision_model.encoder.layers.3.mlp.fc1.weight"])
    assert torch.equal(
        s_sd["fusion_encoder.layer.0.crossattention.self.key.weight"],
        t_sd["fusion_encoder.layer.1.crossattention.self.key.weight"],
    )
    assert torch.equal(s_sd["vqa_head.3.weight"], t_sd["vqa_head.3.weight"])


def test_init_from_teacher_refuses_other_widths():
    with pytest.raises(ValueError, match="shape"):
        init_from_teacher(TrimVLM(tiny_config(vision_width=48)), TrimVLM(tiny_config()))


def test_kd_losses_vanish_when_the_student_equals_the_teacher():
    torch.manual_seed(0)
    cfg = tiny_config(decoder_cross_width=None, text_width=32, text_head_dim=8)
    teacher = TrimVLM(cfg).eval()
    student = TrimVLM(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    d = Distiller(student, teacher, DistillConfig())
    vqa, cap = synthetic_batches(cfg)
    losses = d(vqa, cap)
    kd_terms = [k for k in losses if k.startswith("kl_") or k.endswith(("_hidden", "_attn")) or k == "itc_embed"]
    assert {
        "itc_embed",
        "kl_vqa",
        "kl_vqa_gen",
        "kl_itm",
        "kl_itc",
        "kl_caption",
        "decoder_cross_attn",
        "fusion_cross_attn",
    } <= set(kd_terms)
    for k in kd_terms:
        assert float(losses[k]) == pytest.approx(0.0, abs=1e-6), k
    # a perturbed student has positive KD terms and its task loss is mixed 0.6 / 0.4
    with torch.no_grad():  # random, not constant: a constant shift of fc1 is cancelled by the zero-mean LayerNorm output
        fc1 = student.vision_model.encoder.layers[0].mlp.fc1.weight
        fc1.add_(0.5 * torch.randn_like(fc1))
    losses = d(vqa, cap)
    assert float(losses["vision_hidden"]) > 0 and float(losses["kl_vqa"]) > 0
    assert float(losses["total"]) == pytest.approx(0.6 * float(losses["task"]) + 0.4 * float(losses["kd"]), rel=1e-5)


def test_projection_and_head_averaging_when_shapes_differ():
    tcfg = tiny_config()
    narrow = tiny_config(vision_width=16, vision_head_dim=8, decoder_cross_width=16, vision_heads=[2, 1])
    d = Distiller(TrimVLM(narrow), TrimVLM(tcfg), DistillConfig())
    assert set(d.projections) == {"vision"} and d.projections["vision"].in_features == 16
    vqa, cap = synthetic_batches(tcfg)
    losses = d(vqa, cap)
    assert torch.isfinite(losses["total"]) and float(losses["vision_attn"]) >= 0


def test_kl_and_attention_mse_definitions():
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    p = torch.softmax(t, -1)
    expected = float((p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum())
    assert float(kl_logits(s, t, 1.0)) == pytest.approx(expected)
    a = torch.zeros(1, 1, 1, 4)
    b = torch.zeros(1, 1, 1, 4)
    a[..., 0], b[..., 1] = 1.0, 1.0
    # squared error summed over keys (= MSE x key length)
    assert float(attention_mse(a, b)) == pytest.approx(2.0)
    assert float(attention_mse(torch.zeros(1, 0, 1, 4), b)) == 0.0  # fully pruned block


def test_task_forward_reuses_given_negatives():
    cfg = tiny_config()
    m = TrimVLM(cfg).eval()
    vqa, cap = synthetic_batches(cfg)
    neg = (torch.arange(6).roll(1), torch.arange(6).roll(2))
    out = task_forward(m, vqa, cap, negatives=neg)
    assert out.negatives is neg and out.itm_logits.shape == (18, 2)


def test_embedding_kd_is_the_cosine_distance_of_itc_embeddings():
    from compression.distill import embedding_cosine

    a = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert float(embedding_cosine(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(embedding_cosine(a, -a)) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="widths"):
        embedding_cosine(a, torch.randn(5, 4))


def test_init_from_an_existing_student_keeps_its_pruned_shape(tmp_path):
    from compression.artifacts import save_model_dir
    from compression.distill import build_student
    from service.preprocess import ImageSpec, Preprocessing
    from tests.unit.test_modeling import _tokenizer

    torch.manual_seed(0)
    pruned = TrimVLM(tiny_config(vision_mlp=[7, 3], fusion_self_heads=[1, 2]))
    tok = _tokenizer()
    save_model_dir(tmp_path / "s", pruned, tok, Preprocessing(image=ImageSpec(size=32)))
    cfg = DistillConfig(init=str(tmp_path / "s"), student_name="again")
    student = build_student(cfg, TrimVLM(tiny_config()), tok)
    assert student.config.vision_mlp == [7, 3] and student.config.fusion_self_heads == [1, 2]
    assert student.config.name == "again"
    assert torch.equal(
        student.state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"],
        pruned.state_dict()["vision_model.encoder.layers.0.mlp.fc1.weight"],
    )


def test_itm_negatives_the_teacher_calls_matches_leave_the_hard_label_loss():
    from compression.distill import itm_false_negatives
    from compression.training import task_losses

    # B = 2: rows 0-1 positives, 2-3 negative texts, 4-5 negative images; logits [no match, match]
    t_logits = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.0, 4.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.1]])
    flagged = itm_false_negatives(t_logits, 0.5)
    assert flagged.tolist() == [False, False, True, False, False, True]  # positives never flagged
    assert itm_false_negatives(t_logits, 0.99).tolist() == [False] * 6

    cfg = tiny_config()
    m = TrimVLM(cfg).eval()
    vqa, cap = synthetic_batches(cfg)
    out = task_forward(m, vqa, cap, negatives=(torch.arange(6).roll(1), torch.arange(6).roll(2)))
    b = out.itm_logits.shape[0] // 3
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
    per_pair = torch.nn.functional.cross_entropy(out.itm_logits.float(), labels, reduction="none")
    keep = torch.ones(3 * b)
    keep[b] = keep[2 * b + 1] = 0.0
    kept = task_losses(out, vqa, cap, keep)["itm"]
    assert float(kept) == pytest.approx(float(per_pair[keep.bool()].mean()), rel=1e-6)
    unmasked = float(task_losses(out, vqa, cap)["itm"])
    assert float(task_losses(out, vqa, cap, torch.ones(3 * b))["itm"]) == pytest.approx(unmasked, rel=1e-6)


def test_distiller_logs_the_share_of_negatives_it_dropped():
    torch.manual_seed(0)
    cfg = tiny_config(decoder_cross_width=None, text_width=32, text_head_dim=8)
    teacher, student = TrimVLM(cfg).eval(), TrimVLM(cfg).eval()
    vqa, cap = synthetic_batches(cfg)
    keep_all = Distiller(student, teacher, DistillConfig(itm_false_negative_p=1.0))(vqa, cap)
    drop_all = Distiller(student, teacher, DistillConfig(itm_false_negative_p=0.0))(vqa, cap)
    assert float(keep_all["itm_false_negatives"]) == 0.0
    assert float(drop_all["itm_false_negatives"]) == pytest.approx(1.0)
    assert float(drop_all["itm"]) != pytest.approx(float(keep_all["itm"]))  # negatives left the loss
    assert "itm_false_negatives" not in Distiller(student, teacher, DistillConfig())(vqa, cap)


def test_itm_rank_candidates_are_the_teachers_top_k_both_ways():
    from compression.distill import itm_rank_candidates

    # 3 images x 3 captions: sim[i, j] of image i and caption j
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.6, 0.4]])
    text_rows, image_rows = itm_rank_candidates(sim, 2)
    pairs = list(zip(text_rows.tolist(), image_rows.tolist(), strict=True))
    # captions first (each with its two best images), then images (each with its two best captions)
    assert pairs[:6] == [(0, 0), (0, 2), (1, 1), (1, 2), (2, 1), (2, 0)]
    assert pairs[6:] == [(0, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2)]
    text_rows, image_rows = itm_rank_candidates(sim, 2, ("t2i",))  # one direction: its lists only
    assert list(zip(text_rows.tolist(), image_rows.tolist(), strict=True)) == pairs[:6]


def test_itm_rank_kd_vanishes_on_agreement_and_trains_the_itm_ranking():
    from compression.distill import itm_rank_kd

    torch.manual_seed(0)
    cfg = tiny_config(decoder_cross_width=None, text_width=32, text_head_dim=8)
    teacher, student = TrimVLM(cfg).eval(), TrimVLM(cfg).eval()
    student.load_state_dict(teacher.state_dict())
    vqa, cap = synthetic_batches(cfg)
    t_out = task_forward(teacher, vqa, cap)
    s_out = task_forward(student, vqa, cap, negatives=t_out.negatives)
    assert float(itm_rank_kd(student, teacher, s_out, t_out, cap["mask"], 3)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # a different ITM head ranks the same candidates differently
        student.itm_head.weight.add_(torch.randn_like(student.itm_head.weight))
    s_out = task_forward(student, vqa, cap, negatives=t_out.negatives)
    loss = itm_rank_kd(student, teacher, s_out, t_out, cap["mask"], 3)
    assert float(loss) > 1e-4
    loss.backward()
    assert student.itm_head.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    # the Distiller adds it as its own KD term only when weighted
    d = Distiller(student, teacher, DistillConfig(kd_weights={"itm_rank": 1.0}, itm_rank_k=3))
    assert "itm_rank" in d(vqa, cap) and "itm_rank" not in Distiller(student, teacher, DistillConfig())(vqa, cap)
    with pytest.raises(ValueError, match="itm_rank_directions"):
        Distiller(student, teacher, DistillConfig(itm_rank_directions=["up"]))


def test_freeze_except_trains_only_the_named_modules_and_refuses_unknown_ones():
    from compression.distill import freeze_except

    student = TrimVLM(tiny_config())
    freeze_except(student, ["fusion_encoder", "itm_head"])
    trained = {n.split(".")[0] for n, p in student.named_parameters() if p.requires_grad}
    assert trained == {"fusion_encoder", "itm_head"}
    with pytest.raises(ValueError, match="train_modules must be some of"):
        freeze_except(student, ["fusion"])
    with pytest.raises(ValueError, match="train_modules"):
        freeze_except(student, [])
