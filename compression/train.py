"""Multi-task teacher training (`trimvlm train`): VQA (classifier + generative answers), ITC + ITM
with hard negatives, and captioning LM, from a YAML config; a fresh model whose text side may start
from MiniLM, and its tokenizer. Also the from-scratch baseline. The loop it runs (seeded, progress
bar, checkpoints and resume, torchrun with DDP) is compression/training.py, shared by every stage.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from compression import data as D
from compression.config import ModelConfig
from compression.modeling import TrimVLM
from compression.tokenization import minilm_dir, special_ids, trim_wordpiece
from compression.training import (
    MultiTaskLoss,
    RunContext,
    TrainConfig,
    end_run,
    fit,
    load_data_for,
    load_training_splits,
    save_run,
    start_run,
)


def build_tokenizer(cfg: TrainConfig, corpus: list[str]) -> tuple[Tokenizer, list[int | None] | None]:
    source = cfg.tokenizer.get("source", "minilm")
    if source == "minilm":
        return trim_wordpiece(minilm_dir() / "tokenizer.json", corpus)
    if source == "train":  # small WordPiece trained on the corpus (tests, no pretrained text side)
        from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.tokenizer.get("vocab_size", 500), special_tokens=specials)
        tok.train_from_iterator(corpus, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        from tokenizers import decoders

        tok.decoder = decoders.WordPiece()
        return tok, None
    raise ValueError(f"unknown tokenizer source {source!r}")


def new_model(cfg: TrainConfig, ctx: RunContext) -> tuple[TrimVLM, Tokenizer]:
    """A freshly initialised model (text side from MiniLM if the config says so) and its tokenizer."""
    vqa_train, _, cap_train, _ = load_training_splits(cfg, ctx.spec)
    answers = D.answer_vocabulary(*vqa_train)
    corpus = (
        [s.question for sp in vqa_train for s in sp.samples] + answers + [c for sp in cap_train for cs in sp.captions for c in cs]
    )
    tok, old_ids = build_tokenizer(cfg, corpus)
    mcfg = ModelConfig.from_dict(
        {
            **ModelConfig().to_dict(),
            **cfg.model,
            **special_ids(tok),
            "vocab_size": tok.get_vocab_size(),
            "answers": answers,
            "image_size": cfg.image_size,
        }
    )
    model = TrimVLM(mcfg)
    if cfg.text_init:
        if cfg.text_init.get("source") != "minilm" or old_ids is None:
            raise ValueError("text_init source 'minilm' needs the minilm tokenizer")
        from compression.pretrained import load_bert_text_side

        load_bert_text_side(
            model,
            minilm_dir() / "model.safetensors",
            old_ids,
            cfg.text_init["text_layers"],
            cfg.text_init["fusion_layers"],
            cfg.text_init["decoder_layers"],
        )
    return model, tok


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train a model from its config (the teacher recipe; also the from-scratch baseline)."""
    ctx = start_run(cfg)
    model, tok = new_model(cfg, ctx)
    model.to(ctx.device)
    data, vqa_val = load_data_for(cfg, ctx, tok, model.config.answers, model.config.bos_token_id)
    fit(cfg, ctx, model, MultiTaskLoss(model, cfg.loss_weights), data, tok, vqa_val, resume)
    final = save_run(cfg, ctx, model, tok)
    end_run(ctx)
    return final
