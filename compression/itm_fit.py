"""Fit a token-evidence ITM term for re-ranking, with everything else frozen.

Retrieval re-ranks each caption's ITC top k images by the ITM head. A student whose single fusion
layer gives [CLS] one look at the image ranks those candidates below its own ITC; every fused text
token has also looked at the image, and `modeling.TokenEvidence` pools what each found. Here the
term and `itm_head` are fitted on the student's own candidate lists: captions of the transfer set
in galleries the size of the scenes test split, each with its ITC top k, fused once (frozen
encoders and fusion layer). The loss is the listwise cross-entropy, over the k candidates, of the
score re-ranking sorts by, log p(match) + w x ITC cosine (so the term learns what ITC misses),
plus the binary match loss on every pair (so p(match) stays a probability). The step with the
best scenes-val re-ranked text->image R@1 at that w is kept; `trimvlm calibrate-rerank` then
picks the served w.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compression import data as D
from compression.artifacts import LoadedModel, load_model_dir, save_model_dir
from compression.distill import add_itm_evidence
from compression.flops import count_params
from compression.head_fit import copy_levels, fit_frozen
from compression.modeling import TrimVLM
from service.preprocess import encode_texts, normalize_uint8


@dataclass
class EvidenceFit:
    hidden: int = 128
    k: int = 16
    itc_weight: float = 20.0  # w of the re-ranking score it is fitted for
    gallery: int = 500  # images per gallery the candidates are drawn from (the scenes test size)
    steps: int = 1500
    batch_size: int = 64  # captions per step, each with its k candidates
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 250
    seed: int = 0
    history: list = field(default_factory=list)  # per evaluation: step, r1_t2i (val, re-ranked at itc_weight)


@dataclass
class Candidates:
    fused: torch.Tensor  # [captions, k, T, W] fp16 fused states of each caption with its candidates
    mask: torch.Tensor  # [captions, T]
    itc: torch.Tensor  # [captions, k] ITC cosine of each candidate
    positive: torch.Tensor  # [captions] index of the caption's own image among its k, -1 if absent


@torch.no_grad()
def candidates(lm: LoadedModel, split: D.CaptionSplit, k: int, gallery: int, batch: int = 256) -> Candidates:
    """Every caption of `split` fused with its ITC top k images of its gallery (consecutive
    `gallery` images)."""
    m = lm.model
    texts = [c for caps in split.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
    ids, mask = (torch.from_numpy(a) for a in encode_texts(lm.tokenizer, texts, lm.preprocessing.max_text_length))
    mask = mask.bool()
    width = m.config.text_width
    fused = torch.zeros(len(texts), k, ids.shape[1], width, dtype=torch.float16)
    positive = torch.full((len(texts),), -1)
    itc = torch.zeros(len(texts), k)
    for g0 in range(0, len(split.images), gallery):
        pixels = torch.from_numpy(normalize_uint8(split.images[g0 : g0 + gallery], lm.preprocessing.image))
        img_states = torch.cat([m.encode_image(pixels[i : i + batch]).last_hidden_state for i in range(0, len(pixels), batch)])
        img_emb = m.image_embeds(img_states)
        rows = torch.where((owner >= g0) & (owner < g0 + len(pixels)))[0]
        for r0 in range(0, len(rows), batch):
            r = rows[r0 : r0 + batch]
            txt_states = m.encode_text(ids[r], mask[r]).last_hidden_state
            cos, top = (m.text_embeds(txt_states, mask[r]) @ img_emb.t()).topk(min(k, len(pixels)), dim=1)
            itc[r, : top.shape[1]] = cos
            for j, row in enumerate(r.tolist()):
                n = int(mask[row].sum())
                kk = top.shape[1]
                states = txt_states[j : j + 1, :n].expand(kk, n, width)
                out = m.fuse(states, mask[row : row + 1, :n].expand(kk, n), img_states[top[j]]).last_hidden_state
                fused[row, :kk, :n] = out.half()
                hit = torch.where(top[j] == owner[row] - g0)[0]
                positive[row] = int(hit[0]) if len(hit) else -1
    return Candidates(fused, mask, itc, positive)


def _itm_logits(m: TrimVLM, fused: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, k, 2] ITM logits of B captions with their k candidates."""
    b, k, t, w = fused.shape
    logits = m.itm_logits(fused.reshape(b * k, t, w).float(), mask[:, None].expand(b, k, t).reshape(b * k, t))
    return logits.float().reshape(b, k, 2)


def _log_match(m: TrimVLM, fused: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, k] log p(match): the score re-ranking sorts by."""
    return F.log_softmax(_itm_logits(m, fused, mask), dim=-1)[..., 1]


@torch.no_grad()
def rerank_r1(m: TrimVLM, c: Candidates, itc_weight: float, batch: int = 128) -> float:
    """Text->image R@1 when each caption's candidates are ordered by log p(match) + w x ITC."""
    log_p = torch.cat([_log_match(m, c.fused[i : i + batch], c.mask[i : i + batch]) for i in range(0, len(c.positive), batch)])
    scores = log_p + itc_weight * c.itc
    return ((scores.argmax(1) == c.positive) & (c.positive >= 0)).float().mean().item()


def fit_itm_evidence(lm: LoadedModel, train: Candidates, val: Candidates, fit: EvidenceFit) -> TrimVLM:
    """Give `lm.model` a token-evidence ITM term (if it has none) and fit it with itm_head on the
    candidate lists; returns the model at the evaluation with the best val R@1 (step 0 included)."""
    torch.manual_seed(fit.seed)
    m = lm.model.float().eval()
    if m.itm_evidence is None:
        add_itm_evidence(m, fit.hidden)
    usable = torch.where(train.positive >= 0)[0]
    gen = torch.Generator().manual_seed(fit.seed)

    def loss() -> torch.Tensor:
        rows = usable[torch.randint(len(usable), (fit.batch_size,), generator=gen)]
        logits = _itm_logits(m, train.fused[rows], train.mask[rows])  # [B, k, 2]
        target = train.positive[rows]
        score = F.log_softmax(logits, dim=-1)[..., 1] + fit.itc_weight * train.itc[rows]
        is_match = F.one_hot(target, logits.shape[1])  # binary match loss on every pair
        return F.cross_entropy(score, target) + F.cross_entropy(logits.reshape(-1, 2), is_match.reshape(-1))

    def evaluate() -> dict:
        return {"r1_t2i": rerank_r1(m, val, fit.itc_weight)}

    def keep(history: list) -> dict:
        return max(history, key=lambda h: h["r1_t2i"])  # the first of equals

    trainable = {"itm_evidence": m.itm_evidence, "itm_head": m.itm_head}
    return fit_frozen(m, trainable, loss, evaluate, keep, fit.history, fit.steps, fit.lr, fit.weight_decay, fit.eval_every)


def fit_itm_evidence_dir(student_dir: str | Path, out: str | Path, fit: EvidenceFit, train_images: int = 1500) -> dict:
    """fit_itm_evidence on a model folder: candidate lists from the first `train_images` images of
    the scenes transfer set (15,000 images) and from scenes val; writes OUT (fp32, with the
    folder's levels: the VQA path they calibrate is unchanged). ITM scores moved: calibrate the
    re-ranking weight again."""
    lm = load_model_dir(student_dir, "cpu")
    if lm.model.itm_evidence is not None:
        raise ValueError(f"{student_dir} already has a token-evidence ITM term (hidden {lm.model.config.itm_evidence_hidden})")
    before = count_params(lm.model)["total"]
    spec = lm.preprocessing.image
    train = D.load_scenes_captions(D.ensure_scenes(n_train=15000), "train", spec).limit(train_images)
    val = D.load_scenes_captions(D.ensure_scenes(), "val", spec)
    model = fit_itm_evidence(lm, candidates(lm, train, fit.k, fit.gallery), candidates(lm, val, fit.k, fit.gallery), fit)
    save_model_dir(out, model, lm.tokenizer, lm.preprocessing, dtype="fp32")
    copy_levels(student_dir, out)
    best = max(fit.history, key=lambda h: h["r1_t2i"])
    return {"history": fit.history, "best": best, "params_before": before, "params": count_params(model)["total"]}
