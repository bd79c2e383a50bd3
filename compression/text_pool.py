"""Fit a text attention pool for a student's ITC embeddings, with everything else frozen.

A one-layer text encoder's [CLS] attends only to word embeddings, so "a large red circle and a
small blue square" and "a small red circle and a large blue square" get nearly the same
embedding. `modeling.TextAttentionPool` adds a second step: learned attention over the
contextualised tokens, added to [CLS]. Here the pool and `text_proj` are fitted against the
student's own image embeddings, which stay fixed: each caption's softmax runs over every training
image (text->image, what R@1 measures) and each image's over the batch's captions (image->text).
The vision side, the fusion path, the decoder and the heads keep their weights, so VQA, ITM and
captions are unchanged; only the text embeddings move. Kept: the step with the best scenes-val
text->image R@1 among those whose image->text R@1 is no lower than the model's own before the fit
(text->image is what a one-layer text encoder loses; image->text must not pay for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compression import data as D
from compression.artifacts import LoadedModel, load_model_dir, save_model_dir
from compression.flops import count_params
from compression.head_fit import copy_levels, fit_frozen
from compression.modeling import TextAttentionPool, TrimVLM
from service.preprocess import encode_texts, normalize_uint8


@dataclass
class PoolFit:
    heads: int = 8
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 250
    seed: int = 0
    history: list = field(default_factory=list)  # per evaluation: step, r1_t2i, r1_i2t (val)


@dataclass
class _Split:
    image_emb: torch.Tensor  # [N_img, D] normalised, fixed
    ids: torch.Tensor  # [N_txt, T]
    mask: torch.Tensor
    owner: torch.Tensor  # [N_txt] image row of each caption


def add_text_pool(model: TrimVLM, heads: int) -> TrimVLM:
    """`model` with a fresh text attention pool (its output starts at zero, so the embeddings are
    what they were)."""
    if model.text_pool is not None:
        raise ValueError(f"the model already has a text pool ({model.config.text_pool_heads} heads)")
    model.text_pool = TextAttentionPool(model.config.text_width, heads)
    model.config.text_pool_heads = heads
    return model


@torch.no_grad()
def _encode(lm: LoadedModel, split: D.CaptionSplit, batch: int = 256) -> _Split:
    m = lm.model
    emb = []
    for i in range(0, len(split.images), batch):
        pixels = torch.from_numpy(normalize_uint8(split.images[i : i + batch], lm.preprocessing.image))
        emb.append(m.image_embeds(m.encode_image(pixels).last_hidden_state))
    texts = [c for caps in split.captions for c in caps]
    ids, mask = encode_texts(lm.tokenizer, texts, lm.preprocessing.max_text_length)
    owner = [i for i, caps in enumerate(split.captions) for _ in caps]
    return _Split(torch.cat(emb), torch.from_numpy(ids), torch.from_numpy(mask).bool(), torch.tensor(owner))


def _text_emb(m: TrimVLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = int(mask.sum(1).max())  # batches are padded to the split's longest caption: trim to their own
    ids, mask = ids[:, :n], mask[:, :n]
    with torch.no_grad():
        states = m.encode_text(ids, mask).last_hidden_state
    return m.text_embeds(states, mask)


@torch.no_grad()
def recall_at_1(m: TrimVLM, split: _Split, batch: int = 512) -> tuple[float, float]:
    """(text->image, image->text) R@1 over the split."""
    text = torch.cat([_text_emb(m, split.ids[i : i + batch], split.mask[i : i + batch]) for i in range(0, len(split.ids), batch)])
    sim = split.image_emb @ text.t()
    t2i = (sim.argmax(0) == split.owner).float().mean().item()
    i2t = (split.owner[sim.argmax(1)] == torch.arange(len(split.image_emb))).float().mean().item()
    return t2i, i2t


def pick(history: list) -> dict:
    """The evaluation kept: best text->image R@1 with image->text no lower than at step 0."""
    allowed = [h for h in history if h["r1_i2t"] >= history[0]["r1_i2t"]]
    return max(allowed, key=lambda h: h["r1_t2i"])


def fit_text_pool(lm: LoadedModel, train: D.CaptionSplit, val: D.CaptionSplit, fit: PoolFit) -> TrimVLM:
    """Add a text pool to `lm.model` and fit it (and text_proj) on `train`; returns the model at
    the evaluation `pick` chooses (step 0, the model as it was, included)."""
    torch.manual_seed(fit.seed)
    m = lm.model.float().eval()
    tr, va = _encode(lm, train), _encode(lm, val)
    add_text_pool(m, fit.heads)
    temp = float(m.temp.detach().clamp(0.001, 0.5))
    gen = torch.Generator().manual_seed(fit.seed)

    def loss() -> torch.Tensor:
        idx = torch.randint(len(tr.owner), (fit.batch_size,), generator=gen)
        text, owner = _text_emb(m, tr.ids[idx], tr.mask[idx]), tr.owner[idx]
        t2i = F.cross_entropy(text @ tr.image_emb.t() / temp, owner)
        # image->text over the batch; a caption drawn twice for one image counts as its positive
        same = (owner[:, None] == owner[None, :]).float()
        i2t = -(F.log_softmax(tr.image_emb[owner] @ text.t() / temp, dim=1) * same / same.sum(1, keepdim=True)).sum(1).mean()
        return t2i + i2t

    def evaluate() -> dict:
        t2i, i2t = recall_at_1(m, va)
        return {"r1_t2i": t2i, "r1_i2t": i2t}

    trainable = {"text_pool": m.text_pool, "text_proj": m.text_proj}
    return fit_frozen(m, trainable, loss, evaluate, pick, fit.history, fit.steps, fit.lr, fit.weight_decay, fit.eval_every)


def fit_text_pool_dir(student_dir: str | Path, out: str | Path, fit: PoolFit, train_images: int = 15000) -> dict:
    """fit_text_pool on a model folder, on the scenes transfer set of `train_images` images;
    writes OUT (fp32, with the folder's levels: the VQA path they calibrate is unchanged) and
    returns the fit. The re-ranking weight is not copied: ITC scores moved, calibrate it again."""
    lm = load_model_dir(student_dir, "cpu")
    if lm.model.text_pool is not None:
        raise ValueError(f"{student_dir} already has a text pool ({lm.model.config.text_pool_heads} heads)")
    before = count_params(lm.model)["total"]
    spec = lm.preprocessing.image
    train = D.load_scenes_captions(D.ensure_scenes(n_train=train_images), "train", spec)
    val = D.load_scenes_captions(D.ensure_scenes(), "val", spec)
    model = fit_text_pool(lm, train, val, fit)
    save_model_dir(out, model, lm.tokenizer, lm.preprocessing, dtype="fp32")
    copy_levels(student_dir, out)
    best = pick(fit.history)
    return {"history": fit.history, "best": best, "params_before": before, "params": count_params(model)["total"]}


def val_table(history: list) -> str:
    rows = [f"{h['step']:>6}  {h['r1_t2i']:.4f}  {h['r1_i2t']:.4f}" for h in history]
    return "\n".join(["  step  val R@1 t->i  i->t", *rows])
