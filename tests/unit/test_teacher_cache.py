"""The distillation teacher cache, the contrastive KD terms, hard-negative batches and per-type sampling."""

import numpy as np
import pytest
import torch

from compression.distill import DistillConfig, Distiller, contrastive_kd, interactive_contrastive, kl_logits
from compression.modeling import TrimVLM
from compression.teacher_cache import TeacherCache
from compression.training import TaskOutputs, TrainConfig, TrainData, _caption_images, build_train_data, sample_batches
from service.preprocess import ImageSpec
from tests.unit.test_distill import four_layer_config


def tiny_data(cfg, n_img=6, n_q=20, n_cap_img=8, seed=0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size

    def ids(n, length, bos=None):
        x = torch.randint(6, cfg.vocab_size, (n, length), generator=g)
        x[:, 0] = cfg.cls_token_id if bos is None else bos
        lengths = torch.randint(3, length + 1, (n,), generator=g)
        x[torch.arange(length)[None, :] >= lengths[:, None]] = cfg.pad_token_id
        return x

    caps_per = torch.randint(1, 4, (n_cap_img,), generator=g)
    first = torch.cat([torch.zeros(1, dtype=torch.long), caps_per.cumsum(0)[:-1]])
    n_cap = int(caps_per.sum())
    cap_ids = ids(n_cap, 9)
    cap_ids[1] = cap_ids[0]  # a duplicate caption text: the same key, never a negative of the other
    keys = {tuple(r.tolist()): i for i, r in enumerate(cap_ids)}
    return TrainData(
        vqa_images=torch.randint(0, 256, (n_img, s, s, 3), generator=g, dtype=torch.uint8),
        vqa_image_index=torch.randint(0, n_img, (n_q,), generator=g),
        vqa_q_ids=ids(n_q, 8),
        vqa_answer=torch.randint(0, cfg.num_answers, (n_q,), generator=g),
        vqa_answer_ids=ids(n_q, 4, cfg.bos_token_id),
        vqa_flip_ok=torch.arange(n_q) % 2 == 0,
        cap_images=torch.randint(0, 256, (n_cap_img, s, s, 3), generator=g, dtype=torch.uint8),
        cap_image_index=torch.repeat_interleave(torch.arange(n_cap_img), caps_per),
        cap_ids=cap_ids,
        cap_text_key=torch.tensor([keys[tuple(r.tolist())] for r in cap_ids]),
        cap_first=first,
        cap_count=caps_per,
    )


def models():
    """A 4/2/2/2-layer teacher able to answer generatively and its half-depth student."""
    from compression.distill import init_from_teacher, student_config, student_layers

    torch.manual_seed(0)
    tcfg = four_layer_config(decoder_cross_width=None, text_width=32, text_head_dim=8)
    teacher = TrimVLM(tcfg).eval()
    student = TrimVLM(student_config(tcfg, student_layers(tcfg), "s"))
    init_from_teacher(student, teacher)
    return teacher, student


def open_cache(root, distiller, data, identity="t1"):
    return TeacherCache(root, distiller.teacher, data, distiller.hidden_map, distiller.attn_map, identity, 0)


def test_a_cached_teacher_step_equals_an_uncached_one(tmp_path):
    teacher, student = models()
    data = tiny_data(teacher.config)
    cfg = DistillConfig(kd_weights={"itc_contrastive": 1.0, "itc_interactive": 0.5, "itm_rank": 1.0}, itm_rank_k=3)
    d = Distiller(student, teacher, cfg).train()
    spec = ImageSpec(size=teacher.config.image_size)
    gen = torch.Generator().manual_seed(3)
    d.cache = open_cache(tmp_path / "c", d, data)
    for step in range(3):  # the first step fills the cache, later steps mix hits and fills
        vqa, cap = sample_batches(data, spec, 0, teacher.config.bos_token_id, 6, gen)
        results = {}
        for mode in ("uncached", "cached", "cached again"):
            cache = d.cache
            if mode == "uncached":
                d.cache = None
            torch.manual_seed(step)  # the same ITM negatives
            student.zero_grad()
            losses = d(vqa, cap)
            losses["total"].backward()
            grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
            results[mode] = ({k: float(v.detach()) for k, v in losses.items()}, grad)
            d.cache = cache
        ref, ref_grad = results["uncached"]
        for mode in ("cached", "cached again"):
            got, grad = results[mode]
            assert set(got) == set(ref) and "itm_rank" in ref
            for k in ref:  # fp16 storage: agreement to about 1e-3 relative
                assert got[k] == pytest.approx(ref[k], rel=5e-3, abs=5e-4), (mode, k)
            assert torch.allclose(grad, ref_grad, rtol=2e-2, atol=2e-4)
    assert d.cache.hits > 0 and d.cache.misses > 0


def test_the_cache_key_holds_the_flip_and_survives_a_reopen(tmp_path):
    teacher, student = models()
    data = tiny_data(teacher.config)
    d = Distiller(student, teacher, DistillConfig())
    cache = open_cache(tmp_path / "c", d, data)
    spec = ImageSpec(size=teacher.config.image_size)
    from compression.training import caption_batch, vqa_batch

    qi = torch.tensor([0, 0])  # question 0 may be flipped: both variants, two entries
    vqa = vqa_batch(data, spec, 0, qi, torch.tensor([False, True]))
    cap = caption_batch(data, spec, 0, teacher.config.bos_token_id, torch.tensor([0, 2]))
    out = cache.teacher_outputs(vqa, cap)
    img = int(data.vqa_image_index[0])
    assert cache.filled["vimg"][[2 * img, 2 * img + 1]].all() and cache.filled["q"][[0, 1]].all()
    assert not torch.allclose(out.vision.hidden_states[0][0], out.vision.hidden_states[0][1])  # mirrored pixels
    cache.save()
    again = open_cache(tmp_path / "c", d, data)
    assert again.filled["q"][[0, 1]].all() and not again.filled["q"][2:].any()
    back = again.teacher_outputs(vqa, cap)
    assert again.misses == 0
    assert torch.equal(back.vqa_logits, out.vqa_logits)
    with pytest.raises(ValueError, match="another teacher"):
        open_cache(tmp_path / "c", d, data, identity="t2")


def test_mined_partners_are_the_teachers_hardest_other_images(tmp_path):
    teacher, student = models()
    data = tiny_data(teacher.config)
    d = Distiller(student, teacher, DistillConfig())
    cache = open_cache(tmp_path / "c", d, data)
    with pytest.raises(RuntimeError, match="prefill"):
        cache.mine_partners(2)
    cache.prefill_captions(ImageSpec(size=teacher.config.image_size), teacher.config.bos_token_id, batch=5)
    partners = cache.mine_partners(3, chunk=3)
    img = torch.from_numpy(np.asarray(cache.arrays["i_emb"][:])).float()
    txt = torch.from_numpy(np.asarray(cache.arrays["c_emb"][:])).float()
    owner, key = data.cap_image_index, data.cap_text_key
    for i in range(len(data.cap_images)):  # brute force: best caption score of each other image
        own = set(key[owner == i].tolist())
        scores = {}
        for c in range(len(key)):
            j = int(owner[c])
            if j != i and int(key[c]) not in own:
                scores[j] = max(scores.get(j, -1e9), float(img[i] @ txt[c]))
        expect = sorted(scores, key=scores.get, reverse=True)[:3]
        assert partners[i].tolist() == expect


def test_partners_mined_without_a_cache_equal_the_cached_ones_and_are_stored_once(tmp_path, monkeypatch):
    from compression import hard_negatives

    teacher, student = models()
    data = tiny_data(teacher.config)
    spec = ImageSpec(size=teacher.config.image_size)
    cache = open_cache(tmp_path / "c", Distiller(student, teacher, DistillConfig()), data)
    cache.prefill_captions(spec, teacher.config.bos_token_id, batch=5)
    img, txt = hard_negatives.teacher_embeddings(teacher, data, spec, batch=5)
    assert torch.allclose(img, torch.from_numpy(np.asarray(cache.arrays["i_emb"][:])).float(), atol=2e-3)
    assert torch.allclose(txt, torch.from_numpy(np.asarray(cache.arrays["c_emb"][:])).float(), atol=2e-3)
    owner, key = data.cap_image_index, data.cap_text_key
    # the cache keeps fp16: mined from the same rounding, the tables are equal
    assert hard_negatives.mine_partners(img.half(), txt.half(), owner, key, 3).tolist() == cache.mine_partners(3).tolist()
    table = tmp_path / "run" / "hard_negatives.pt"
    direct = hard_negatives.load_or_mine(table, teacher, data, spec, 3, "t1")
    assert direct.tolist() == hard_negatives.mine_partners(img, txt, owner, key, 3).tolist()
    with pytest.raises(ValueError, match="between 1 and 7"):
        hard_negatives.mine_partners(torch.randn(8, 4), torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.arange(3), 8)

    passes = []
    real = hard_negatives.teacher_embeddings
    monkeypatch.setattr(hard_negatives, "teacher_embeddings", lambda *a, **kw: passes.append(1) or real(*a, **kw))
    assert hard_negatives.load_or_mine(table, teacher, data, spec, 3, "t1").tolist() == direct.tolist()
    assert passes == []  # a resumed run reads the stored table back
    assert hard_negatives.load_or_mine(table, teacher, data, spec, 2, "t1").shape == (8, 2)
    assert hard_negatives.load_or_mine(table, teacher, data, spec, 2, "t2").shape == (8, 2)
    assert passes == [1, 1]  # another k or another teacher is mined again


def test_hard_negative_batches_hold_each_seed_with_a_partner_and_distinct_images():
    teacher, _ = models()
    data = tiny_data(teacher.config, n_cap_img=8)
    data.cap_partners = torch.tensor([[(i + 1) % 8, (i + 2) % 8] for i in range(8)])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        chosen = _caption_images(data, 6, gen).tolist()
        assert len(chosen) == len(set(chosen)) == 6
        assert any(b in ((a + 1) % 8, (a + 2) % 8) for a in chosen for b in chosen)


def test_contrastive_kd_is_zero_on_agreement_and_sees_both_directions():
    torch.manual_seed(0)
    t = torch.randn(5, 5)
    assert float(contrastive_kd(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(5, 5)
    at_t = contrastive_kd(s, t, 2.0)
    assert float(at_t) == pytest.approx(4 * 0.5 * float(kl_logits(s, t, 2.0) + kl_logits(s.t(), t.t(), 2.0)), rel=1e-5)
    # shifting one image's row leaves its image->text softmax as it was: only text->image sees it
    shifted = t.clone()
    shifted[0] += 3.0
    assert float(kl_logits(shifted, t, 1.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(contrastive_kd(shifted, t, 1.0)) > 0.01


def test_interactive_contrastive_matches_itc_when_student_equals_teacher():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    key = torch.tensor([0, 1, 1, 2])
    out = TaskOutputs(None, None, None, img, txt, None, None, None)
    temp = torch.tensor(0.1)
    sim = img @ txt.t() / temp
    same = (key[:, None] == key[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    ls = torch.nn.functional.log_softmax
    itc = 0.5 * (-(ls(sim, 1) * target).sum(1).mean() - (ls(sim.t(), 1) * target).sum(1).mean())
    assert float(interactive_contrastive(out, out, key, temp)) == pytest.approx(float(itc), rel=1e-6)


def test_question_type_weights_set_the_sampling_rates(monkeypatch):
    from compression import data as D

    cfg = TrainConfig(question_type_weights={"relation": 4.0, "color": 0.0})
    samples = [D.VQASample(0, f"q{i}", "yes", ["yes"], i, ["relation", "color", "shape"][i % 3]) for i in range(30)]
    split = D.VQASplit("scenes_train", np.zeros((1, 8, 8, 3), np.uint8), [0], samples)
    caps = D.CaptionSplit("scenes_train", np.zeros((1, 8, 8, 3), np.uint8), [0], [["a caption"]])

    # no tokenizer needed: every text becomes a row of ones
    monkeypatch.setattr("compression.training.encode_texts", lambda tok, texts, n: (np.ones((len(texts), n), np.int64), None))
    data = build_train_data(cfg, None, ["yes"], 3, [split], [caps])
    assert data.vqa_type[:3] == ["relation", "color", "shape"]
    gen = torch.Generator().manual_seed(0)
    vqa, _ = sample_batches(data, ImageSpec(size=8), 0, 3, 3000, gen)
    types = np.array(data.vqa_type)[vqa["qi"].numpy()]
    assert (types == "color").sum() == 0
    assert (types == "relation").sum() / (types == "shape").sum() == pytest.approx(4.0, rel=0.15)
    with pytest.raises(ValueError, match="lacks"):
        build_train_data(TrainConfig(question_type_weights={"colour": 2.0}), None, ["yes"], 3, [split], [caps])
