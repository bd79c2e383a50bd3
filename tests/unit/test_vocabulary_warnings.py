"""Question words the model does not know (service/preprocess.py): split as the tokenizer splits,
checked against the manifest's known words, or against the tokenizer's [UNK] without them."""

from __future__ import annotations

from tokenizers import Tokenizer

from service.preprocess import text_words, unknown_words
from tests.conftest import REPO

TOKENIZER = REPO / "models" / "trimvlm-default" / "1" / "tokenizer.json"


def _tok() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


def test_words_follow_the_tokenizers_normaliser_and_split():
    assert text_words(_tok(), "What's the COLOR, of it?") == ["what", "s", "the", "color", "of", "it"]


def test_known_words_flag_each_unknown_word_once_in_order():
    known = {"what", "is", "the", "shape"}
    assert unknown_words(_tok(), "What animal is this animal? The shape!", known) == ["animal", "this"]
    assert unknown_words(_tok(), "what is the shape", known) == []


def test_without_known_words_only_unk_words_are_flagged():
    # the trimmed WordPiece vocabulary spells any ASCII word from characters: "giraffe" is not [UNK]
    assert unknown_words(_tok(), "is the giraffe ωmega?") == ["ωmega"]
