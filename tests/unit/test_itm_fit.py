"""The token-evidence ITM term fitted on a student's own re-ranking candidates
(compression/itm_fit.py)."""

import pytest
import torch

from compression.itm_fit import Candidates, EvidenceFit, candidates, fit_itm_evidence, rerank_r1
from tests.unit.test_text_pool import _lm, _split


def test_candidates_are_each_captions_itc_top_k_of_its_gallery_fused():
    lm = _lm()
    m = lm.model
    split = _split(10, 4)
    c = candidates(lm, split, k=3, gallery=5)
    assert c.fused.shape[:2] == (20, 3) and c.mask.shape[0] == 20
    from service.preprocess import encode_texts, normalize_uint8

    row, owner = 13, 6  # image 6's second caption: gallery images 5-9
    encoded = encode_texts(lm.tokenizer, [split.captions[owner][1]], lm.preprocessing.max_text_length)
    ids, mask = (torch.from_numpy(a) for a in encoded)
    mask = mask.bool()
    with torch.no_grad():
        img = m.encode_image(torch.from_numpy(normalize_uint8(split.images[5:10], lm.preprocessing.image))).last_hidden_state
        txt = m.encode_text(ids, mask).last_hidden_state
        cos, top = (m.text_embeds(txt, mask) @ m.image_embeds(img).t()).topk(3, dim=1)
        cos, top = cos[0], top[0]
        fused = m.fuse(txt.expand(3, -1, -1), mask.expand(3, -1), img[top]).last_hidden_state
    n = int(mask.sum())
    torch.testing.assert_close(c.fused[row, :, :n].float(), fused.half().float())
    torch.testing.assert_close(c.itc[row], cos)
    hit = torch.where(top == owner - 5)[0]
    assert c.positive[row] == (int(hit[0]) if len(hit) else -1)


def test_fit_moves_only_the_itm_path_and_keeps_the_best_val_step():
    lm = _lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train, val = candidates(lm, _split(16, 5), 4, 8), candidates(lm, _split(8, 6), 4, 8)
    fit = EvidenceFit(hidden=8, k=4, steps=40, batch_size=8, lr=1e-2, eval_every=20)
    model = fit_itm_evidence(lm, train, val, fit)
    after = model.state_dict()
    assert model.config.itm_evidence_hidden == 8
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("itm_head.") for k in changed)
    assert [h["step"] for h in fit.history] == [0, 20, 40]
    best = max(fit.history, key=lambda h: h["r1_t2i"])
    assert rerank_r1(model, val, fit.itc_weight) == pytest.approx(best["r1_t2i"])
    assert not any(p.requires_grad for p in model.parameters())


def test_fit_finds_a_match_only_a_non_cls_token_shows():
    """The true candidate differs from the others only in one text token's state, which [CLS]
    never sees: the evidence term learns to rank it first."""
    lm = _lm()
    g = torch.Generator().manual_seed(0)
    n, k, t, w = 96, 4, 6, lm.model.config.text_width
    fused = torch.randn(n, k, t, w, generator=g)
    positive = torch.randint(k, (n,), generator=g)
    fused[torch.arange(n), positive, 3, :4] += 2.0
    c = Candidates(fused.half(), torch.ones(n, t, dtype=torch.bool), torch.zeros(n, k), positive)
    fit = EvidenceFit(hidden=16, k=k, steps=150, batch_size=32, lr=1e-2, eval_every=150)
    fit_itm_evidence(lm, c, c, fit)
    assert fit.history[0]["r1_t2i"] < 0.5
    assert fit.history[-1]["r1_t2i"] > 0.9


def test_the_fitted_score_adds_the_itc_share():
    """With a large ITC weight the lists are ordered by ITC: a candidate list whose positive has
    the highest cosine is right before any fitting."""
    lm = _lm()
    n, k, t, w = 8, 4, 5, lm.model.config.text_width
    itc = torch.zeros(n, k)
    positive = torch.arange(n) % k
    itc[torch.arange(n), positive] = 1.0
    c = Candidates(torch.zeros(n, k, t, w, dtype=torch.float16), torch.ones(n, t, dtype=torch.bool), itc, positive)
    assert rerank_r1(lm.model, c, itc_weight=100.0) == 1.0
    assert rerank_r1(lm.model, c, itc_weight=0.0) < 1.0  # equal fused states: the ITM alone cannot tell
