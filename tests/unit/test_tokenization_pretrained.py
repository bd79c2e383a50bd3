"""Trimmed MiniLM vocabulary and the pretrained text-side initialisation."""

import pytest
import torch
from tokenizers import Tokenizer

from compression.config import ModelConfig
from compression.modeling import TrimVLM
from compression.pretrained import load_bert_text_side
from compression.tokenization import DECODER_BOS, minilm_dir, special_ids, trim_wordpiece

CORPUS = ["what color is the shape?", "is there a red circle above a small triangle?", "rectangle", "teal"]


@pytest.fixture(scope="module")
def trimmed():
    return trim_wordpiece(minilm_dir() / "tokenizer.json", CORPUS)


def test_trimmed_vocabulary_tokenises_the_corpus_like_the_full_one(trimmed):
    tok, old_ids = trimmed
    full = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    full.no_padding()
    full.no_truncation()
    for text in CORPUS:
        a, b = tok.encode(text), full.encode(text)
        assert a.tokens == b.tokens
        assert [old_ids[i] for i in a.ids] == b.ids  # rows map back to the pretrained vocabulary
    assert tok.get_vocab_size() < 400


def test_unseen_ascii_words_never_become_unk(trimmed):
    tok, _ = trimmed
    enc = tok.encode("zebra xylophone 42!")
    assert "[UNK]" not in enc.tokens
    assert tok.decode(enc.ids, skip_special_tokens=True).replace(" ", "") == "zebraxylophone42!"


def test_special_ids_include_the_decoder_start(trimmed):
    tok, old_ids = trimmed
    ids = special_ids(tok)
    assert ids["pad_token_id"] == 0
    assert tok.id_to_token(ids["bos_token_id"]) == DECODER_BOS
    assert old_ids[ids["bos_token_id"]] is None


def test_minilm_text_encoder_matches_transformers_bert():
    """Our text encoder with all six MiniLM layers reproduces Hugging Face's BertModel."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    old_ids = list(range(tok.get_vocab_size()))
    cfg = ModelConfig(
        text_heads=[12] * 6,
        text_mlp=[1536] * 6,
        vocab_size=len(old_ids),
        max_position_embeddings=512,
        fusion_self_heads=[12],
        fusion_cross_heads=[12],
        fusion_mlp=[1536],
        decoder_self_heads=[12],
        decoder_cross_heads=[12],
        decoder_mlp=[1536],
        vision_heads=[1],
        vision_mlp=[8],
    )
    model = TrimVLM(cfg).eval()
    load_bert_text_side(model, minilm_dir() / "model.safetensors", old_ids, list(range(6)), [0], [0])
    bert = transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    enc = tok.encode_batch(["a red circle above a teal triangle", "what shape?"])
    length = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (length - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in enc])
    with torch.no_grad():
        ours = model.text_encoder(ids, mask.bool()).last_hidden_state
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_pretrained_loader_rejects_wrong_shapes():
    tok, old_ids = trim_wordpiece(minilm_dir() / "tokenizer.json", CORPUS)
    cfg = ModelConfig(
        text_width=32,
        text_head_dim=8,
        text_heads=[4],
        text_mlp=[64],
        vocab_size=len(old_ids),
        fusion_self_heads=[4],
        fusion_cross_heads=[4],
        fusion_mlp=[64],
        decoder_self_heads=[4],
        decoder_cross_heads=[4],
        decoder_mlp=[64],
        vision_heads=[1],
        vision_mlp=[8],
        **special_ids(tok),
    )
    with pytest.raises(ValueError, match="shape"):
        load_bert_text_side(TrimVLM(cfg), minilm_dir() / "model.safetensors", old_ids, [0], [1], [0])
