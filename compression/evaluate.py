"""Evaluation of a model folder: VQA accuracy (easy-VQA test, scenes test), caption BLEU-4 and
CIDEr (pycocoevalcap) and retrieval R@1/5/10 in both directions (scenes test).

Captions are tokenised by lowercasing and splitting on non-alphanumerics before scoring: the
PTB tokenizer pycocoevalcap ships needs Java, and our captions are plain lowercase words, so
both tokenisations agree on them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from compression import data as D
from compression.artifacts import LoadedModel, load_model_dir
from compression.tokenization import decode_ids
from compression.train import normalize_on_device, pick_device
from service.preprocess import encode_texts


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def evaluate_vqa(lm: LoadedModel, split: D.VQASplit, device, batch: int = 256, generative: bool = True) -> dict:
    """Closed-vocabulary accuracy (VQAv2 metric), per question type, and generative accuracy."""
    m, tok, pre = lm.model, lm.tokenizer, lm.preprocessing
    generative = generative and m.config.generative_vqa
    answers = m.config.answers
    scores, gen_scores, by_type = [], [], {}
    for sl in _batches(len(split.samples), batch):
        chunk = split.samples[sl]
        ids, mask = encode_texts(tok, [s.question for s in chunk], pre.max_text_length)
        ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device).bool()
        # questions come grouped by image: encode each image of the batch once
        unique, inverse = np.unique([s.image for s in chunk], return_inverse=True)
        pixels = normalize_on_device(torch.from_numpy(split.images[unique]).to(device), pre.image)
        image_states = m.encode_image(pixels).last_hidden_state[torch.from_numpy(inverse).to(device)]
        text_states = m.text_encoder(ids, mask).last_hidden_state
        fused = m.fuse(text_states, mask, image_states)
        logits = m.vqa_logits(fused.last_hidden_state)
        for s, p in zip(chunk, logits.argmax(-1).tolist(), strict=True):
            acc = D.vqa_accuracy(answers[p], s.answers)
            scores.append(acc)
            by_type.setdefault(s.question_type or "all", []).append(acc)
        if generative:
            gen = m.generate(fused.last_hidden_state, mask, max_new_tokens=pre.max_answer_length)
            for s, row in zip(chunk, gen.tolist(), strict=True):
                text = decode_ids(tok, row, m.config.sep_token_id, m.config.pad_token_id)
                gen_scores.append(D.vqa_accuracy(text, s.answers))
    out = {"accuracy": float(np.mean(scores)) if scores else 0.0, "n": len(scores)}
    if generative:
        out["generative_accuracy"] = float(np.mean(gen_scores)) if gen_scores else 0.0
    if len(by_type) > 1:
        out["by_type"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(by_type.items())}
    return out


def _caption_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(predictions: dict[int, str], references: dict[int, list[str]]) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [_caption_tokens(v)] for k, v in predictions.items()}
    gts = {k: [_caption_tokens(c) for c in references[k]] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@torch.no_grad()
def generate_captions(lm: LoadedModel, images_u8: np.ndarray, device, batch: int = 128) -> list[str]:
    m, pre = lm.model, lm.preprocessing
    out = []
    for sl in _batches(len(images_u8), batch):
        pixels = normalize_on_device(torch.from_numpy(images_u8[sl]).to(device), pre.image)
        states = m.encode_image(pixels).last_hidden_state
        ids = m.generate(states, max_new_tokens=pre.max_caption_length)
        out += [decode_ids(lm.tokenizer, row, m.config.sep_token_id, m.config.pad_token_id) for row in ids.tolist()]
    return out


def recall_at_k(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """ranks: 0-based rank of the first correct item per query."""
    return {k: float(np.mean(ranks < k)) for k in ks}


@torch.no_grad()
def evaluate_retrieval(lm: LoadedModel, split: D.CaptionSplit, device, batch: int = 256) -> dict:
    """ITC retrieval, image->text (any of the image's captions counts) and text->image."""
    m, pre = lm.model, lm.preprocessing
    img_emb = []
    for sl in _batches(len(split.images), batch):
        pixels = normalize_on_device(torch.from_numpy(split.images[sl]).to(device), pre.image)
        img_emb.append(m.image_embeds(m.encode_image(pixels).last_hidden_state))
    texts = [c for caps in split.captions for c in caps]
    owner = np.array([i for i, caps in enumerate(split.captions) for _ in caps])
    txt_emb = []
    for sl in _batches(len(texts), batch):
        ids, mask = encode_texts(lm.tokenizer, texts[sl], pre.max_text_length)
        states = m.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device).bool()).last_hidden_state
        txt_emb.append(m.text_embeds(states))
    sim = (torch.cat(img_emb) @ torch.cat(txt_emb).t()).float().cpu().numpy()  # [N_img, N_txt]
    order_i2t = np.argsort(-sim, axis=1)
    ranks_i2t = np.array([np.where(owner[order_i2t[i]] == i)[0].min() for i in range(len(split.images))])
    order_t2i = np.argsort(-sim.T, axis=1)
    ranks_t2i = np.array([np.where(order_t2i[j] == owner[j])[0][0] for j in range(len(texts))])
    r_i2t, r_t2i = recall_at_k(ranks_i2t), recall_at_k(ranks_t2i)
    return {
        **{f"r{k}_i2t": v for k, v in r_i2t.items()},
        **{f"r{k}_t2i": v for k, v in r_t2i.items()},
        "n_images": len(split.images),
        "n_texts": len(texts),
        "chance_r1_i2t": float(np.mean([len(c) for c in split.captions]) / len(texts)) if texts else 0.0,
        "chance_r1_t2i": 1.0 / max(1, len(split.images)),
    }


def evaluate(
    model_dir: str | Path,
    limit: int | None = None,
    device: str = "auto",
    scenes_root: str | Path | None = None,
    include_easy_vqa: bool = True,
    include_scenes: bool = True,
) -> dict:
    """Every metric of a model folder; `limit` evaluates the first N items of each split."""
    dev = pick_device(device)
    lm = load_model_dir(model_dir, dev)
    spec = lm.preprocessing.image
    t0 = time.time()
    results: dict = {"model": str(model_dir), "limit": limit}
    if include_easy_vqa:
        results["easy_vqa"] = evaluate_vqa(lm, D.load_easy_vqa("test", spec).limit(limit), dev)
    if include_scenes:
        root = D.ensure_scenes(scenes_root)
        vqa = evaluate_vqa(lm, D.load_scenes_vqa(root, "test", spec).limit(limit), dev)
        caps = D.load_scenes_captions(root, "test", spec).limit(limit)
        predictions = generate_captions(lm, caps.images, dev)
        scores = caption_scores(dict(enumerate(predictions)), dict(enumerate(caps.captions)))
        retrieval = evaluate_retrieval(lm, caps, dev)
        results["scenes"] = {
            "vqa_accuracy": vqa["accuracy"],
            "vqa_generative_accuracy": vqa.get("generative_accuracy"),
            "vqa_by_type": vqa.get("by_type", {}),
            "vqa_n": vqa["n"],
            **scores,
            **retrieval,
            "caption_examples": [
                {"image_id": caps.image_ids[i], "prediction": predictions[i], "reference": caps.captions[i][0]}
                for i in range(min(5, len(predictions)))
            ],
        }
    results["eval_seconds"] = round(time.time() - t0, 1)
    return results


def flat_metrics(results: dict) -> dict[str, float]:
    """The headline metrics as `section.key` -> value (the JSON contract of `trimvlm eval`)."""
    out = {}
    for section in ("easy_vqa", "scenes"):
        for k, v in results.get(section, {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{section}.{k}"] = v
    return out
