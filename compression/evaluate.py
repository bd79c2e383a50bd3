"""Evaluation of a model folder: VQA accuracy (easy-VQA test, scenes test), caption BLEU-4 and
CIDEr (pycocoevalcap) and retrieval R@1/5/10 in both directions (scenes test).

Captions are tokenised by lowercasing and splitting on non-alphanumerics before scoring: the
PTB tokenizer pycocoevalcap ships needs Java, and our captions are plain lowercase words, so
both tokenisations agree on them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compression import data as D
from compression.artifacts import LoadedModel, load_model_dir
from compression.torch_runtime import TorchTasks, pick_device
from service.tasks import log_match, rerank_scores


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def as_tasks(model, device=None):
    """LoadedModel -> TorchTasks; an exported TaskModel passes through."""
    return TorchTasks(model, device or "cpu") if isinstance(model, LoadedModel) else model


def evaluate_vqa(
    model, split: D.VQASplit, device=None, batch: int = 256, generative: bool = True, items: dict | None = None
) -> dict:
    """Closed-vocabulary accuracy (VQAv2 metric), per question type, and generative accuracy
    (models whose decoder answers from fused question states; exported ones too). `items`, when
    given, receives each question's score ("accuracy", and "generative_accuracy" when measured) and
    type ("question_type")."""
    tasks = as_tasks(model, device)
    generative = generative and getattr(tasks, "generative_vqa", False)
    answers = tasks.answer_vocab
    scores, gen_scores, by_type = [], [], {}
    for sl in _batches(len(split.samples), batch):
        chunk = split.samples[sl]
        ids, mask = tasks.tokenize([s.question for s in chunk])
        # questions come grouped by image: encode each image of the batch once
        unique, inverse = np.unique([s.image for s in chunk], return_inverse=True)
        image_states, _ = tasks.encode_images(tasks.pixels(split.images[unique]))
        text_states, _ = tasks.encode_texts(ids, mask)
        fused = tasks.fuse(text_states, mask, image_states[inverse])
        for s, p in zip(chunk, fused["vqa_logits"].argmax(-1).tolist() if answers else [], strict=False):
            acc = D.vqa_accuracy(answers[p], s.answers)
            scores.append(acc)
            by_type.setdefault(s.question_type or "all", []).append(acc)
        if generative:
            for s, text in zip(chunk, tasks.generate_answers(fused["fused_states"], mask), strict=True):
                gen_scores.append(D.vqa_accuracy(text, s.answers))
    out = {"accuracy": float(np.mean(scores)) if scores else 0.0, "n": len(scores)}
    if items is not None:
        items["accuracy"] = np.asarray(scores, np.float32)
        items["question_type"] = np.array([s.question_type or "all" for s in split.samples[: len(scores)]])
    if generative:
        out["generative_accuracy"] = float(np.mean(gen_scores)) if gen_scores else 0.0
        if items is not None:
            items["generative_accuracy"] = np.asarray(gen_scores, np.float32)
    if len(by_type) > 1:
        out["by_type"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(by_type.items())}
    return out


def _caption_tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(predictions: dict[int, str], references: dict[int, list[str]], items: dict | None = None) -> dict:
    """Corpus BLEU-4 and CIDEr-D; `items`, when given, receives each image's CIDEr-D ("cider",
    in the order of `predictions`; the corpus score is their mean)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [_caption_tokens(v)] for k, v in predictions.items()}
    gts = {k: [_caption_tokens(c) for c in references[k]] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    if items is not None:
        items["cider"] = np.asarray(per_image, np.float32)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def generate_captions(model, images_u8: np.ndarray, device=None, batch: int = 128) -> list[str]:
    tasks = as_tasks(model, device)
    out = []
    for sl in _batches(len(images_u8), batch):
        states, _ = tasks.encode_images(tasks.pixels(images_u8[sl]))
        out += tasks.captions(states)
    return out


def recall_at_k(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """ranks: 0-based rank of the first correct item per query."""
    return {k: float(np.mean(ranks < k)) for k in ks}


RERANK_K = 16  # ITC candidates re-ranked by ITM per query (BLIP / X-VLM / EfficientVLM use 128-256 on COCO)


def evaluate_retrieval(
    model,
    split: D.CaptionSplit,
    device=None,
    batch: int = 256,
    rerank_k: int = RERANK_K,
    items: dict | None = None,
    rerank_itc_weight: float | None = None,
) -> dict:
    """Retrieval image->text (any of the image's captions counts) and text->image: by ITC alone
    (`r{k}_i2t`, `r{k}_t2i`), and as BLIP, X-VLM and EfficientVLM report it and POST
    /retrieval/search serves it: the ITC top `rerank_k` re-ranked (`r{k}_i2t_rerank`,
    `r{k}_t2i_rerank`; the rest keep their ITC order) by the ITM head's log p(match) plus
    `rerank_itc_weight` x the ITC cosine (service.tasks.rerank_scores; None: the model's calibrated
    weight, 0: the ITM head alone). rerank_k 0 skips the re-ranking. `items`, when given, receives
    each query's 0-based rank of its first correct result ("rank_i2t" per image, "rank_t2i" per
    caption, and "rank_*_rerank")."""
    tasks = as_tasks(model, device)
    enc = encode_split(tasks, split, batch, states=rerank_k > 0)
    out = _recalls(enc.order_i2t, enc.order_t2i, enc.owner, "", items)
    if rerank_k > 0:
        weight = float(getattr(tasks, "rerank_itc_weight", 0.0) if rerank_itc_weight is None else rerank_itc_weight)
        cand = rerank_candidates(tasks, enc, rerank_k)
        order_i2t, order_t2i = cand.reranked_orders(weight)
        out |= _recalls(order_i2t, order_t2i, enc.owner, "_rerank", items)
        out |= {"rerank_k": rerank_k, "rerank_itc_weight": weight}
    return {
        **out,
        "n_images": len(split.images),
        "n_texts": len(enc.owner),
        "chance_r1_i2t": float(np.mean([len(c) for c in split.captions]) / len(enc.owner)) if len(enc.owner) else 0.0,
        "chance_r1_t2i": 1.0 / max(1, len(split.images)),
    }


@dataclass
class EncodedSplit:
    """A caption split through the encoders: states, the ITC similarity and both ITC orders."""

    owner: np.ndarray  # caption -> its image
    sim: np.ndarray  # [images, captions] ITC cosine
    order_i2t: np.ndarray  # [images, captions], best first
    order_t2i: np.ndarray  # [captions, images]
    image_states: np.ndarray | None
    text_states: list | None  # per caption: (states, mask)


def encode_split(tasks, split: D.CaptionSplit, batch: int = 256, states: bool = True) -> EncodedSplit:
    """`states`: keep the encoders' states for ITM (re-ranking); without, only the ITC ranking."""
    images = [tasks.encode_images(tasks.pixels(split.images[sl])) for sl in _batches(len(split.images), batch)]
    texts = [c for caps in split.captions for c in caps]
    owner = np.array([i for i, caps in enumerate(split.captions) for _ in caps])
    tokenized = [tasks.tokenize(texts[sl]) for sl in _batches(len(texts), batch)]
    encoded = [(tok, tasks.encode_texts(*tok)) for tok in tokenized]
    img_emb = np.concatenate([e for _, e in images]).astype(np.float32)
    txt_emb = np.concatenate([e for _, (_, e) in encoded]).astype(np.float32)
    sim = img_emb @ txt_emb.T  # [N_img, N_txt]
    # stable: duplicate captions (1985 distinct of 2500 in the scenes test split) tie exactly, and
    # quicksort's order among ties moved R@1 with last-bit differences (torch vs ONNX Runtime)
    return EncodedSplit(
        owner=owner,
        sim=sim,
        order_i2t=np.argsort(-sim, axis=1, kind="stable"),
        order_t2i=np.argsort(-sim.T, axis=1, kind="stable"),
        image_states=np.concatenate([s for s, _ in images]) if states else None,
        text_states=[(st[i], mask[i]) for (_, mask), (st, _) in encoded for i in range(len(st))] if states else None,
    )


@dataclass
class RerankCandidates:
    """Each query's ITC top k with their ITC cosines and ITM log p(match): enough to re-rank them
    under any weight without running the fusion encoder again."""

    enc: EncodedSplit
    k_i2t: int
    k_t2i: int
    itc_i2t: np.ndarray  # [images, k_i2t] cosine of the image's top captions, in ITC order
    log_p_i2t: np.ndarray
    itc_t2i: np.ndarray  # [captions, k_t2i]
    log_p_t2i: np.ndarray

    def reranked_orders(self, itc_weight: float) -> tuple[np.ndarray, np.ndarray]:
        """Both full orders with each query's top k re-ranked (stable: ties keep their ITC order)."""
        order_i2t, order_t2i = self.enc.order_i2t.copy(), self.enc.order_t2i.copy()
        for order, k, itc, log_p in (
            (order_i2t, self.k_i2t, self.itc_i2t, self.log_p_i2t),
            (order_t2i, self.k_t2i, self.itc_t2i, self.log_p_t2i),
        ):
            score = rerank_scores(log_p, itc, itc_weight)
            top = order[:, :k]
            order[:, :k] = np.take_along_axis(top, np.argsort(-score, axis=1, kind="stable"), axis=1)
        return order_i2t, order_t2i


def rerank_candidates(tasks, enc: EncodedSplit, rerank_k: int) -> RerankCandidates:
    k_i2t, k_t2i = min(rerank_k, len(enc.owner)), min(rerank_k, len(enc.image_states))
    top_i2t, top_t2i = enc.order_i2t[:, :k_i2t], enc.order_t2i[:, :k_t2i]
    log_p_i2t = np.stack(
        [_itm_log_match(tasks, [enc.text_states[j] for j in top], enc.image_states[[i] * k_i2t]) for i, top in enumerate(top_i2t)]
    )
    log_p_t2i = np.stack(
        [_itm_log_match(tasks, [enc.text_states[j]] * k_t2i, enc.image_states[top]) for j, top in enumerate(top_t2i)]
    )
    return RerankCandidates(
        enc,
        k_i2t,
        k_t2i,
        np.take_along_axis(enc.sim, top_i2t, axis=1),
        log_p_i2t,
        np.take_along_axis(enc.sim.T, top_t2i, axis=1),
        log_p_t2i,
    )


def _recalls(
    order_i2t: np.ndarray, order_t2i: np.ndarray, owner: np.ndarray, suffix: str, items: dict | None = None
) -> dict[str, float]:
    ranks_i2t = np.array([np.where(owner[order_i2t[i]] == i)[0].min() for i in range(len(order_i2t))])
    ranks_t2i = np.array([np.where(order_t2i[j] == owner[j])[0][0] for j in range(len(order_t2i))])
    if items is not None:
        items[f"rank_i2t{suffix}"], items[f"rank_t2i{suffix}"] = ranks_i2t, ranks_t2i
    r_i2t, r_t2i = recall_at_k(ranks_i2t), recall_at_k(ranks_t2i)
    return {**{f"r{k}_i2t{suffix}": v for k, v in r_i2t.items()}, **{f"r{k}_t2i{suffix}": v for k, v in r_t2i.items()}}


def _itm_log_match(tasks, texts: list[tuple[np.ndarray, np.ndarray]], image_states: np.ndarray) -> np.ndarray:
    """ITM log p(match) of the (text, image) pairs."""
    n = max(int(m.sum()) for _, m in texts)  # each text is padded to its own batch's longest: re-pad to these
    states = np.zeros((len(texts), n, texts[0][0].shape[-1]), texts[0][0].dtype)
    mask = np.zeros((len(texts), n), texts[0][1].dtype)
    for i, (s, m) in enumerate(texts):
        k = min(n, len(m))
        states[i, :k], mask[i, :k] = s[:k], m[:k]
    return log_match(tasks.fuse(states, mask, image_states)["itm_logits"])


def evaluate(
    model_dir: str | Path,
    limit: int | None = None,
    device: str = "auto",
    scenes_root: str | Path | None = None,
    include_easy_vqa: bool = True,
    include_scenes: bool = True,
    backend: str = "onnxruntime",
    precision: str | None = None,
    rerank_k: int = RERANK_K,
    items: dict | None = None,
    rerank_itc_weight: float | None = None,
) -> dict:
    """Every metric of a model folder; `limit` evaluates the first N items of each split.
    `rerank_itc_weight` overrides the model's calibrated re-ranking weight (0: the ITM head alone).
    `items`, when given, receives the per-item results behind the metrics (`metric_items`), the
    input of a paired comparison of two models (compression.eval_compare).

    A torch model folder runs in torch on `device`; an exported folder (manifest.json) runs
    through the service's runtime (`backend`, `precision`), by the same evaluation loops."""
    if (Path(model_dir) / "manifest.json").is_file():
        from service.runtime import RuntimeOptions
        from service.tasks import TaskModel

        dev = "cuda" if pick_device(device).type == "cuda" else "cpu"
        lm = TaskModel(model_dir, backend, precision, RuntimeOptions(device=dev), fallback=False)
        spec = lm.image_spec
        runtime = {"backend": lm.runtime.describe(), "precision": lm.precision}
    else:
        dev = pick_device(device)
        lm = load_model_dir(model_dir, dev)
        spec = lm.preprocessing.image
        runtime = {"backend": "torch", "device": str(dev)}
    t0 = time.time()
    results: dict = {"model": str(model_dir), "limit": limit, "runtime": runtime}
    # per-item results are kept only when asked for (a paired comparison's input)
    easy_items: dict | None = {} if items is not None and include_easy_vqa else None
    scene_items: dict | None = {} if items is not None and include_scenes else None
    if include_easy_vqa:
        easy = D.load_easy_vqa("test", spec).limit(limit)
        results["easy_vqa"] = evaluate_vqa(lm, easy, dev, items=easy_items)
        if easy_items is not None:
            easy_items["digest"] = _digest([(s.image, s.question, s.answer) for s in easy.samples])
    if include_scenes:
        root = D.ensure_scenes(scenes_root)
        questions = D.load_scenes_vqa(root, "test", spec).limit(limit)
        vqa = evaluate_vqa(lm, questions, dev, items=scene_items)
        caps = D.load_scenes_captions(root, "test", spec).limit(limit)
        if scene_items is not None:
            scene_items["digest"] = scenes_items_digest(questions, caps)
        predictions = generate_captions(lm, caps.images, dev)
        scores = caption_scores(dict(enumerate(predictions)), dict(enumerate(caps.captions)), scene_items)
        retrieval = evaluate_retrieval(lm, caps, dev, rerank_k=rerank_k, items=scene_items, rerank_itc_weight=rerank_itc_weight)
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
    if items is not None:
        items |= metric_items(easy_items or {}, scene_items or {})
    return results


def scenes_items_digest(questions: D.VQASplit, captions: D.CaptionSplit) -> str:
    """The fingerprint of a scenes test split's per-item results (questions, then captions)."""
    return _digest([(s.image, s.question, s.answer) for s in questions.samples] + captions.captions)


def _digest(records: list) -> str:
    """A fingerprint of a split's items, so that per-item results of different test sets are
    never paired (images are compared through their row numbers and the texts through themselves)."""
    import hashlib

    return hashlib.sha256(repr(records).encode()).hexdigest()[:16]


def metric_items(easy: dict, scenes: dict) -> dict[str, np.ndarray]:
    """Per-item scores under the flat metric names of `flat_metrics` (their means are the
    metrics): easy_vqa.accuracy and scenes.vqa_accuracy per question (and their generative-answer
    twins), scenes.vqa_<type> per question of that type, scenes.cider per image,
    scenes.r{1,5,10}_{i2t,t2i}[_rerank] per query (1 where the first correct result is within the
    top k)."""
    out: dict[str, np.ndarray] = {}
    for section, found in (("easy_vqa", easy), ("scenes", scenes)):
        if "digest" in found:
            out[f"{section}.items_digest"] = np.array(found["digest"])
    if "accuracy" in easy:
        out["easy_vqa.accuracy"] = easy["accuracy"]
    if "generative_accuracy" in easy:
        out["easy_vqa.generative_accuracy"] = easy["generative_accuracy"]
    if "accuracy" in scenes:
        out["scenes.vqa_accuracy"] = scenes["accuracy"]
        types = scenes["question_type"]
        if len(set(types.tolist())) > 1:
            out |= {f"scenes.vqa_{t}": scenes["accuracy"][types == t] for t in sorted(set(types.tolist()))}
    if "generative_accuracy" in scenes:
        out["scenes.vqa_generative_accuracy"] = scenes["generative_accuracy"]
    if "cider" in scenes:
        out["scenes.cider"] = scenes["cider"]
    for key, ranks in scenes.items():
        if key.startswith("rank_"):
            direction = key.removeprefix("rank_")
            out |= {f"scenes.r{k}_{direction}": (ranks < k).astype(np.float32) for k in (1, 5, 10)}
    return out


def evaluate_validation(
    model, vqa_splits: list[D.VQASplit], captions: D.CaptionSplit, device=None, rerank_k: int = RERANK_K
) -> dict:
    """Validation metrics while training, flat: `<vqa split>.accuracy` (and `.vqa_<type>` per
    question type) for each VQA split, and for the caption split CIDEr, BLEU-4 and retrieval
    R@1/5/10 both ways, by ITC alone and re-ranked by the ITM head alone (`<split>.r1_i2t_rerank`, ...)."""
    t0 = time.time()
    out: dict = {}
    for split in vqa_splits:
        r = evaluate_vqa(model, split, device, generative=False)
        out[f"{split.name}.accuracy"] = round(r["accuracy"], 4)
        out |= {f"{split.name}.vqa_{k}": v for k, v in r.get("by_type", {}).items()}
    predictions = generate_captions(model, captions.images, device)
    scores = caption_scores(dict(enumerate(predictions)), dict(enumerate(captions.captions)))
    # the ITM head alone: models in training (and merge's mixes) have no calibrated weight, so the
    # teacher's and the students' values compare like with like
    retrieval = evaluate_retrieval(model, captions, device, rerank_k=rerank_k, rerank_itc_weight=0.0)
    keep = [k for k in retrieval if k.startswith("r") and k[1:2].isdigit()]
    out |= {f"{captions.name}.{k}": round(v, 4) for k, v in {**scores, **{k: retrieval[k] for k in keep}}.items()}
    out["eval_seconds"] = round(time.time() - t0, 1)
    return out


def flat_metrics(results: dict) -> dict[str, float]:
    """The headline metrics as `section.key` -> value (the JSON contract of `trimvlm eval`)."""
    out = {}
    for section in ("easy_vqa", "scenes"):
        for k, v in results.get(section, {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{section}.{k}"] = v
        for qtype, v in results.get(section, {}).get("vqa_by_type", {}).items():  # per question type
            out[f"{section}.vqa_{qtype}"] = v
    return out
