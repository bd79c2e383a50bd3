"""The text attention pool of the ITC text embedding and its fit (compression/text_pool.py), and
the ONNX text and fusion graphs of a model with the pool and the token-evidence ITM term."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from compression import data as D
from compression.artifacts import LoadedModel
from compression.distill import add_itm_evidence
from compression.export import graph_modules
from compression.export_graphs import export_graph
from compression.modeling import TrimVLM
from compression.text_pool import PoolFit, add_text_pool, fit_text_pool, pick, recall_at_1
from service.preprocess import ImageSpec, Preprocessing
from tests.unit.test_modeling import _fused, batch, tiny_config

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "large", "small", "and"]


def _lm(seed=0) -> LoadedModel:
    torch.manual_seed(seed)
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[DEC]": 3, "[UNK]": 4, **{w: 5 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    model = TrimVLM(tiny_config(vocab_size=len(vocab), text_heads=[4], text_mlp=[40])).eval()
    return LoadedModel(model=model, tokenizer=tok, preprocessing=Preprocessing(image=ImageSpec(size=32)))


def _split(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    captions = [[" ".join(rng.choice(WORDS, 4)) for _ in range(2)] for _ in range(n)]
    return D.CaptionSplit("s", images, list(range(n)), captions)


def test_a_new_pool_keeps_the_embeddings_and_ignores_padding():
    torch.manual_seed(0)
    model = TrimVLM(tiny_config()).eval()
    _, ids, mask = batch()
    with torch.no_grad():
        states = model.encode_text(ids, mask).last_hidden_state
        before = model.text_embeds(states, mask)
        add_text_pool(model, 4)
        torch.testing.assert_close(model.text_embeds(states, mask), before)
        torch.nn.init.normal_(model.text_pool.out.weight)
        moved = model.text_embeds(states, mask)
        changed = states.clone()
        changed[1, 4:] = 77.0  # padded positions of sample 1
        again = model.text_embeds(changed, mask)
    assert not torch.allclose(moved, before)
    torch.testing.assert_close(again[1], moved[1])
    with pytest.raises(ValueError, match="already has a text pool"):
        add_text_pool(model, 4)
    with pytest.raises(ValueError, match="must divide"):
        add_text_pool(TrimVLM(tiny_config()), 5)


def test_fit_moves_only_the_pool_and_text_proj_and_keeps_the_best_val_step():
    lm = _lm()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train, val = _split(24, 1), _split(12, 2)
    fit = PoolFit(heads=4, steps=30, batch_size=16, lr=3e-3, eval_every=10)
    model = fit_text_pool(lm, train, val, fit)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("text_proj.") for k in changed)
    assert any(k.startswith("text_pool.") for k in after)
    assert [h["step"] for h in fit.history] == [0, 10, 20, 30]
    best = pick(fit.history)
    assert (best["step"] == 0) == (not changed)  # step 0 is the model as it was
    from compression.text_pool import _encode

    assert recall_at_1(model, _encode(lm, val)) == pytest.approx((best["r1_t2i"], best["r1_i2t"]))
    assert not any(p.requires_grad for p in model.parameters())


def test_fit_raises_text_to_image_recall():
    """Fitted and measured on one split, text->image R@1 ends well above where it started."""
    lm = _lm()
    train = _split(16, 3)
    fit = PoolFit(heads=4, steps=150, batch_size=32, lr=1e-2, eval_every=150)
    fit_text_pool(lm, train, train, fit)
    assert fit.history[-1]["r1_t2i"] > fit.history[0]["r1_t2i"] + 0.2


ort = pytest.importorskip("onnxruntime")


def test_text_and_fusion_graphs_with_pool_and_evidence_match_torch(tmp_path):
    torch.manual_seed(0)
    model = add_itm_evidence(add_text_pool(TrimVLM(tiny_config()), 4), 8).eval()
    torch.nn.init.normal_(model.text_pool.out.weight, std=0.1)
    torch.nn.init.normal_(model.itm_evidence.score[2].weight, std=0.5)
    graphs = graph_modules(model)
    text = ort.InferenceSession(str(export_graph(graphs["text"], tmp_path / "text.onnx")))
    fusion = ort.InferenceSession(str(export_graph(graphs["fusion"], tmp_path / "fusion.onnx")))
    pixels, ids, mask = batch(b=3, n=9)
    with torch.no_grad():
        states = model.encode_text(ids, mask).last_hidden_state
        embeds = model.text_embeds(states, mask)
        image = model.encode_image(pixels).last_hidden_state
        itm = model.itm_logits(_fused(model, pixels, ids, mask), mask)
    m64 = mask.numpy().astype(np.int64)
    got_states, got_embeds = text.run(None, {"input_ids": ids.numpy(), "attention_mask": m64})
    np.testing.assert_allclose(got_embeds, embeds.numpy(), atol=1e-5)
    feed = {"text_states": got_states, "attention_mask": m64, "image_states": image.numpy()}
    got_itm = dict(zip([o.name for o in fusion.get_outputs()], fusion.run(None, feed), strict=True))["itm_logits"]
    np.testing.assert_allclose(got_itm, itm.numpy(), atol=1e-4)


def test_pick_never_trades_image_to_text_for_text_to_image():
    history = [
        {"step": 0, "r1_t2i": 0.30, "r1_i2t": 0.70},
        {"step": 1, "r1_t2i": 0.45, "r1_i2t": 0.69},  # best text->image, but image->text fell
        {"step": 2, "r1_t2i": 0.40, "r1_i2t": 0.70},
        {"step": 3, "r1_t2i": 0.38, "r1_i2t": 0.80},
    ]
    assert pick(history)["step"] == 2
    assert pick(history[:2])["step"] == 0
