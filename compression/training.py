"""The training loop every stage shares (train, distill, prune, trim): the config fields they all
have (`TrainConfig`), the training data on the device, the multi-task forward and its losses, run
set-up (seed, device, torchrun with DDP) and `fit` (progress bar, periodic checkpoints and resume,
validation through compression/evaluate.py, a time budget). The teacher recipe on top of it is
compression/train.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from compression import data as D
from compression.artifacts import LoadedModel, save_model_dir
from compression.config import ModelConfig
from compression.config_file import check_fields, load_yaml
from compression.evaluate import evaluate_vqa
from compression.modeling import TrimVLM
from compression.torch_runtime import pick_device
from service.preprocess import ImageSpec, Preprocessing, encode_texts, text_words

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    out: str = "runs/teacher"
    seed: int = 0
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    # tokenizer: {source: minilm} (trimmed MiniLM WordPiece) or {source: train, vocab_size: N}
    tokenizer: dict = field(default_factory=lambda: {"source": "minilm"})
    # text_init: {source: minilm, text_layers: [..], fusion_layers: [..], decoder_layers: [..]} or null
    text_init: dict | None = None
    easy_vqa: bool = True
    easy_vqa_val_images: int = 200  # held out from easy-VQA train for validation
    scenes: bool = True
    scenes_seed: int = D.SCENES_SEED
    scenes_counts: dict = field(default_factory=lambda: dict(D.SCENES_COUNTS))
    limit: int | None = None  # cap every training split (tests)
    steps: int = 4000
    batch_size: int = 96
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 300
    grad_clip: float = 1.0
    loss_weights: dict = field(default_factory=lambda: {"vqa": 1.0, "vqa_gen": 0.5, "itc": 1.0, "itm": 1.0, "caption": 1.0})
    # sampling weight per VQA question type (scenes: color, count, existence, relation, shape;
    # easy-VQA questions are type "easy_vqa"); unnamed types weigh 1. Empty: uniform over questions.
    question_type_weights: dict = field(default_factory=dict)
    flip_easy_vqa: bool = True  # easy-VQA questions have no left/right, so flips are label-safe
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    device: str = "auto"
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    max_text_length: int = 32
    max_answer_length: int = 8
    max_caption_length: int = 32
    image_size: int = 64
    save_dtype: str = "fp32"
    max_minutes: float | None = None  # stop early (and still save) when a time budget runs out

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        """The config a YAML file describes; ConfigError (one line: file and line, or key) when it
        does not parse, names an unknown key or gives a value of the wrong type."""
        raw = load_yaml(path)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        check_fields(cls, raw, path)
        if isinstance(raw.get("model"), dict):
            check_fields(ModelConfig, raw["model"], path, prefix="model.")
        return cls(**raw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Data on the device: uint8 images, pre-tokenised texts, index sampling
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    vqa_images: torch.Tensor  # uint8 [N, S, S, 3]
    vqa_image_index: torch.Tensor  # [Q]
    vqa_q_ids: torch.Tensor  # [Q, Lq]
    vqa_answer: torch.Tensor  # [Q] class index
    vqa_answer_ids: torch.Tensor  # [Q, La] [DEC] answer [SEP]
    vqa_flip_ok: torch.Tensor  # [Q] bool
    cap_images: torch.Tensor  # uint8 [M, S, S, 3]
    cap_image_index: torch.Tensor  # [C]
    cap_ids: torch.Tensor  # [C, Lc]
    cap_text_key: torch.Tensor  # [C] caption identity (equal strings share a key)
    cap_first: torch.Tensor  # [M] first caption row of each image (captions are grouped by image)
    cap_count: torch.Tensor  # [M] captions per image
    vqa_type: list[str] = field(default_factory=list)  # [Q] question type ("easy_vqa" for easy-VQA)
    vqa_weight: torch.Tensor | None = None  # [Q] sampling weights (None: uniform)
    cap_partners: torch.Tensor | None = None  # [M, K] hard-negative images to batch with each image

    def to(self, device) -> TrainData:
        return TrainData(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})


def tokenize_padded(tok: Tokenizer, texts: list[str], max_length: int, bos_id: int | None = None) -> torch.Tensor:
    ids, _ = encode_texts(tok, texts, max_length)
    ids = torch.from_numpy(ids)
    if bos_id is not None:  # decoder inputs start with [DEC] instead of [CLS]
        ids[:, 0] = bos_id
    return ids


def load_training_splits(cfg: TrainConfig, spec: ImageSpec):
    """VQA splits (train, val) and caption splits (train, val) named in the config."""
    vqa_train, vqa_val, cap_train, cap_val = [], [], [], []
    if cfg.easy_vqa:
        ev = D.load_easy_vqa("train", spec)
        n_val = cfg.easy_vqa_val_images
        cut = len(ev.image_ids) - n_val
        tr = [s for s in ev.samples if s.image < cut]
        va = [D.VQASample(s.image - cut, s.question, s.answer, s.answers, s.question_id) for s in ev.samples if s.image >= cut]
        vqa_train.append(D.VQASplit("easy_vqa_train", ev.images[:cut], ev.image_ids[:cut], tr))
        vqa_val.append(D.VQASplit("easy_vqa_val", ev.images[cut:], ev.image_ids[cut:], va))
    if cfg.scenes:
        root = D.ensure_scenes(seed=cfg.scenes_seed, **cfg.scenes_counts)
        vqa_train.append(D.load_scenes_vqa(root, "train", spec))
        vqa_val.append(D.load_scenes_vqa(root, "val", spec))
        cap_train.append(D.load_scenes_captions(root, "train", spec))
        cap_val.append(D.load_scenes_captions(root, "val", spec))
    if cfg.limit:
        vqa_train = [s.limit(cfg.limit) for s in vqa_train]
        cap_train = [s.limit(cfg.limit) for s in cap_train]
    return vqa_train, vqa_val, cap_train, cap_val


def build_train_data(cfg: TrainConfig, tok: Tokenizer, answers: list[str], bos_id: int, vqa_splits, cap_splits) -> TrainData:
    a_index = {a: i for i, a in enumerate(answers)}
    images, image_index, questions, answer_idx, answer_text, flip_ok, qtypes = [], [], [], [], [], [], []
    offset = 0
    for split in vqa_splits:
        images.append(torch.from_numpy(split.images))
        for s in split.samples:
            qtypes.append("easy_vqa" if split.name.startswith("easy_vqa") else s.question_type or "other")
            image_index.append(offset + s.image)
            questions.append(s.question)
            answer_idx.append(a_index[s.answer])
            answer_text.append(s.answer)
            flip_ok.append(split.name.startswith("easy_vqa") and cfg.flip_easy_vqa)
        offset += len(split.images)
    cap_images, cap_index, captions, cap_first, cap_count = [], [], [], [], []
    offset = 0
    for split in cap_splits:
        cap_images.append(torch.from_numpy(split.images))
        for i, caps in enumerate(split.captions):
            if not caps:
                raise ValueError(f"{split.name}: image {split.image_ids[i]} has no caption")
            cap_first.append(len(captions))
            cap_count.append(len(caps))
            for c in caps:
                cap_index.append(offset + i)
                captions.append(c)
        offset += len(split.images)
    if not captions:
        raise ValueError("training needs captions (enable scenes)")
    keys = {c: i for i, c in enumerate(sorted(set(captions)))}
    unknown = set(cfg.question_type_weights) - set(qtypes)
    if unknown:
        raise ValueError(f"question_type_weights names types the data lacks: {sorted(unknown)} (has {sorted(set(qtypes))})")
    weight = None
    if cfg.question_type_weights:
        weight = torch.tensor([float(cfg.question_type_weights.get(t, 1.0)) for t in qtypes])
    return TrainData(
        vqa_images=torch.cat(images),
        vqa_image_index=torch.tensor(image_index),
        vqa_q_ids=tokenize_padded(tok, questions, cfg.max_text_length),
        vqa_answer=torch.tensor(answer_idx),
        vqa_answer_ids=tokenize_padded(tok, answer_text, cfg.max_answer_length, bos_id),
        vqa_flip_ok=torch.tensor(flip_ok),
        cap_images=torch.cat(cap_images),
        cap_image_index=torch.tensor(cap_index),
        cap_ids=tokenize_padded(tok, captions, cfg.max_caption_length, None),
        cap_text_key=torch.tensor([keys[c] for c in captions]),
        cap_first=torch.tensor(cap_first),
        cap_count=torch.tensor(cap_count),
        vqa_type=qtypes,
        vqa_weight=weight,
    )


def normalize_on_device(images_u8: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Torch twin of service.preprocess.normalize_uint8 (tested equal), run on the device."""
    x = images_u8.float().div_(255.0)
    mean = torch.tensor(spec.mean, device=x.device)
    std = torch.tensor(spec.std, device=x.device)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def trim_padding(ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = ids != pad_id
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over non-pad targets (teacher forcing)."""
    target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


GATE_KWARGS = {"head": "head_gates", "cross": "cross_head_gates", "ffn": "ffn_gates"}


def stack_kwargs(gates: dict | None, stack: str) -> dict:
    """Pruning gates {(stack, kind): [per-layer tensor]} -> keyword arguments of one stack."""
    if not gates:
        return {}
    return {GATE_KWARGS[kind]: g for (s, kind), g in gates.items() if s == stack}


@dataclass
class TaskOutputs:
    """Everything one multi-task forward produces: logits for every head and, when asked, the
    per-stack hidden states and attention probabilities distillation compares."""

    vqa_logits: torch.Tensor
    vqa_gen_logits: torch.Tensor | None
    itc_sim: torch.Tensor  # [B_img, B_txt]
    image_emb: torch.Tensor  # [B, embed_dim] normalised ITC embeddings of the caption images
    text_emb: torch.Tensor  # [B, embed_dim] ... and of the captions
    itm_logits: torch.Tensor  # [3B, 2]: positives, negative texts, negative images
    caption_logits: torch.Tensor
    negatives: tuple[torch.Tensor, torch.Tensor]  # (negative text per image, negative image per text)
    vision: object = None  # StackOutput of the VQA images
    text: object = None  # StackOutput of the questions
    fusion: object = None  # StackOutput of the VQA fusion pass
    decoder: object = None  # StackOutput of the captioning pass
    caption_images: torch.Tensor | None = None  # [B, N_img, D] last vision states of the caption images
    caption_texts: torch.Tensor | None = None  # [B, L, D] last text-encoder states of the captions


@torch.no_grad()
def draw_negatives(sim: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM negatives (a text per image, an image per text) drawn in proportion to the softmax of
    the ITC similarities, never a caption equal to the positive (BLIP/ALBEF)."""
    same = key[:, None] == key[None, :]
    w_i2t = F.softmax(sim.float(), 1).masked_fill(same, 0) + 1e-6
    w_t2i = F.softmax(sim.float().t(), 1).masked_fill(same, 0) + 1e-6
    return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)


def task_forward(
    m: TrimVLM, vqa: dict, cap: dict, gates: dict | None = None, states: bool = False, negatives=None
) -> TaskOutputs:
    """One forward over a VQA batch and a caption batch, for every head.

    gates: pruning gates per stack (see stack_kwargs). states: return hidden states and
    attention probabilities. negatives: ITM hard negatives to reuse (the student uses the
    teacher's, so both see the same pairs); drawn from this model's ITC similarities if None.
    """
    cfg = m.config
    st = {"output_attentions": states, "output_hidden_states": states}
    kv, kt, kf, kd = (stack_kwargs(gates, s) for s in ("vision", "text", "fusion", "decoder"))
    # VQA: classifier on the fused [CLS]; generative answer decoded from the fused states (BLIP).
    vision = m.encode_image(vqa["pixels"], **kv, **st)
    text = m.text_encoder(vqa["q_ids"], vqa["q_mask"], **kt, **st)
    fusion = m.fuse(text.last_hidden_state, vqa["q_mask"], vision.last_hidden_state, **kf, **st)
    vqa_logits = m.vqa_logits(fusion.last_hidden_state)
    gen_logits = None
    if cfg.generative_vqa:
        gen_logits, _ = m.text_decoder(
            vqa["a_ids"], vqa["a_mask"], encoder_states=fusion.last_hidden_state, encoder_mask=vqa["q_mask"], **kd
        )

    # ITC between caption images and texts.
    img = m.encode_image(cap["pixels"], **kv).last_hidden_state
    txt = m.encode_text(cap["ids"], cap["mask"], **kt).last_hidden_state
    image_emb, text_emb = m.image_embeds(img), m.text_embeds(txt, cap["mask"])
    sim = m.itc_logits(image_emb, text_emb)

    # ITM with hard negatives drawn from the ITC similarities (BLIP/ALBEF).
    if negatives is None:
        negatives = draw_negatives(sim, cap["key"])
    neg_text, neg_img = negatives
    fused_txt = torch.cat([txt, txt[neg_text], txt])
    fused_mask = torch.cat([cap["mask"], cap["mask"][neg_text], cap["mask"]])
    fused_img = torch.cat([img, img, img[neg_img]])
    itm = m.itm_logits(m.fuse(fused_txt, fused_mask, fused_img, **kf).last_hidden_state, fused_mask)

    # Captioning LM: [DEC] caption [SEP], cross-attending to the image tokens.
    caption_logits, decoder = m.text_decoder(cap["dec_ids"], cap["mask"], encoder_states=img, **kd, **st)
    return TaskOutputs(
        vqa_logits, gen_logits, sim, image_emb, text_emb, itm, caption_logits, negatives, vision, text, fusion, decoder, img, txt
    )


def task_losses(out: TaskOutputs, vqa: dict, cap: dict, itm_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Supervised losses of every head (unweighted). itm_keep: [3B] bool, the ITM pairs that count
    (None: all); a distiller drops negatives its teacher says match (see itm_false_negatives)."""
    losses = {"vqa": F.cross_entropy(out.vqa_logits.float(), vqa["answer"])}
    if out.vqa_gen_logits is not None:
        losses["vqa_gen"] = lm_loss(out.vqa_gen_logits, vqa["a_ids"], vqa["a_mask"])
    # ITC with soft targets for identical captions (false negatives otherwise).
    sim = out.itc_sim.float()
    same = (cap["key"][:, None] == cap["key"][None, :]).float()
    target = same / same.sum(1, keepdim=True)
    losses["itc"] = 0.5 * (-(F.log_softmax(sim, 1) * target).sum(1).mean() - (F.log_softmax(sim.t(), 1) * target).sum(1).mean())
    b = sim.shape[0]
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(sim.device)
    if itm_keep is None:
        losses["itm"] = F.cross_entropy(out.itm_logits.float(), labels)
    else:
        per_pair = F.cross_entropy(out.itm_logits.float(), labels, reduction="none")
        keep = itm_keep.float()
        losses["itm"] = (per_pair * keep).sum() / keep.sum().clamp(min=1)
    losses["caption"] = lm_loss(out.caption_logits, cap["dec_ids"], cap["mask"])
    return losses


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict) -> torch.Tensor:
    unknown = set(weights) - set(losses) - {"vqa_gen"}
    if unknown:
        raise ValueError(f"loss weights for unknown terms: {sorted(unknown)}")
    return sum(weights.get(k, 0.0) * v for k, v in losses.items())


class MultiTaskLoss(nn.Module):
    """All task losses in one forward, so DDP sees a single module call per step."""

    def __init__(self, model: TrimVLM, weights: dict):
        super().__init__()
        self.model = model
        self.weights = weights

    def forward(self, vqa: dict, cap: dict, step: int = 0) -> dict[str, torch.Tensor]:
        losses = task_losses(task_forward(self.model, vqa, cap), vqa, cap)
        losses["total"] = weighted_sum(losses, self.weights)
        return losses


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------


def vqa_batch(d: TrainData, spec: ImageSpec, pad_id: int, qi: torch.Tensor, flip: torch.Tensor) -> dict:
    """The VQA batch of questions `qi`, their images mirrored where `flip`; it keeps the
    indices (`qi`, `flip`) so per-sample caches (compression/teacher_cache.py) can find them."""
    imgs = d.vqa_images[d.vqa_image_index[qi]]
    imgs = torch.where(flip[:, None, None, None], imgs.flip(2), imgs)
    q_ids, q_mask = trim_padding(d.vqa_q_ids[qi], pad_id)
    a_ids, a_mask = trim_padding(d.vqa_answer_ids[qi], pad_id)
    return {
        "pixels": normalize_on_device(imgs, spec),
        "q_ids": q_ids,
        "q_mask": q_mask,
        "answer": d.vqa_answer[qi],
        "a_ids": a_ids,
        "a_mask": a_mask,
        "qi": qi,
        "flip": flip,
    }


def caption_batch(d: TrainData, spec: ImageSpec, pad_id: int, bos_id: int, ci: torch.Tensor) -> dict:
    """The caption batch of caption rows `ci` (kept as `ci`) with their images."""
    ids, mask = trim_padding(d.cap_ids[ci], pad_id)
    return {
        "pixels": normalize_on_device(d.cap_images[d.cap_image_index[ci]], spec),
        "ids": ids,
        "mask": mask,
        "key": d.cap_text_key[ci],
        "dec_ids": torch.cat([torch.full_like(ids[:, :1], bos_id), ids[:, 1:]], dim=1),
        "ci": ci,
    }


def _caption_images(d: TrainData, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct images for a caption batch: random, or (with cap_partners) half random seeds each
    followed by one of its mined hard-negative images, so in-batch ITC/ITM negatives are hard."""
    n_img = len(d.cap_images)
    perm = torch.randperm(n_img, generator=gen)
    if d.cap_partners is None:
        return perm[: min(batch, n_img)]
    n_seed = min(batch, n_img) // 2
    seeds = perm[:n_seed]
    pick = torch.randint(d.cap_partners.shape[1], (n_seed,), generator=gen)
    partners = d.cap_partners.cpu()[seeds, pick]
    cand = torch.cat([torch.stack([seeds, partners], 1).flatten(), perm[n_seed:]]).numpy()
    _, first = np.unique(cand, return_index=True)  # keep each image once, in order of appearance
    return torch.from_numpy(cand[np.sort(first)][: min(batch, n_img)])


def sample_batches(
    d: TrainData, spec: ImageSpec, pad_id: int, bos_id: int, batch: int, gen: torch.Generator
) -> tuple[dict, dict]:
    dev = d.vqa_images.device
    if d.vqa_weight is None:
        qi = torch.randint(len(d.vqa_q_ids), (batch,), generator=gen, device="cpu").to(dev)
    else:
        qi = torch.multinomial(d.vqa_weight.cpu(), batch, replacement=True, generator=gen).to(dev)
    flip = d.vqa_flip_ok[qi] & (torch.rand(batch, generator=gen).to(dev) < 0.5)
    vqa = vqa_batch(d, spec, pad_id, qi, flip)
    # captions: distinct images per batch keep ITC targets meaningful
    ci_img = _caption_images(d, batch, gen).to(dev)
    # one random caption of each chosen image
    pick = (torch.rand(len(ci_img), generator=gen).to(dev) * d.cap_count[ci_img]).long()
    ci = d.cap_first[ci_img] + pick
    return vqa, caption_batch(d, spec, pad_id, bos_id, ci)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def validation_accuracy(
    model: TrimVLM, split: D.VQASplit, tok: Tokenizer, pre: Preprocessing, device, limit: int = 2000
) -> float:
    """Closed-vocabulary VQA accuracy on up to `limit` questions, through the evaluation code."""
    model.eval()
    acc = evaluate_vqa(LoadedModel(model, tok, pre), split.limit(limit), device, generative=False)["accuracy"]
    model.train()
    return acc


@dataclass
class RunContext:
    """What every training-style command (train, distill, prune) sets up the same way."""

    device: torch.device
    world: int
    rank: int
    local: int
    out: Path
    spec: ImageSpec
    pre: Preprocessing

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def preprocessing_for(cfg: TrainConfig, spec: ImageSpec) -> Preprocessing:
    """What a model trained under `cfg` on images of `spec` expects of its inputs (its preprocess.json)."""
    return Preprocessing(
        image=spec,
        max_text_length=cfg.max_text_length,
        max_answer_length=cfg.max_answer_length,
        max_caption_length=cfg.max_caption_length,
    )


def start_run(cfg: TrainConfig) -> RunContext:
    world, rank, local = _dist_info()
    device = pick_device(cfg.device)
    if world > 1:  # one process per device: NCCL on GPUs, gloo on CPUs
        if device.type == "cuda":
            device = torch.device(f"cuda:{local}")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ImageSpec(size=cfg.image_size)
    pre = preprocessing_for(cfg, spec)
    return RunContext(device, world, rank, local, out, spec, pre)


def adopt_image_spec(ctx: RunContext, cfg: TrainConfig, spec: ImageSpec, whose: str) -> None:
    """Train on the image preprocessing of the model being compressed: the size must be the
    config's; mean, std and resampling come from the model (an imported BLIP brings its own)."""
    if spec.size != cfg.image_size:
        raise ValueError(f"{whose} expects {spec.size}px images, config says {cfg.image_size}")
    ctx.spec = spec
    ctx.pre = preprocessing_for(cfg, spec)


def end_run(ctx: RunContext) -> None:
    if ctx.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def fit(
    cfg: TrainConfig,
    ctx: RunContext,
    model: TrimVLM,
    objective: nn.Module,
    data: TrainData,
    tok: Tokenizer,
    vqa_val: list,
    resume: bool = True,
    extra_param_groups: list[dict] | None = None,
    log_name: str = "train_log.jsonl",
    checkpoint_name: str = "checkpoint.pt",
    evaluator=None,
    on_checkpoint=None,
) -> None:
    """The training loop shared by train, distill and prune.

    objective(vqa, cap, step) returns a dict of losses with "total". Its parameters that are not
    the model's (pruning gates, distillation projections) go in through extra_param_groups with
    their own learning rates; objective.before_step() / after_step(), when defined, run around
    the optimiser step (the Lagrangian's gradient ascent, log-alpha clamping). Checkpoints hold
    the objective's trainable state (never the frozen teacher) and the optimiser.
    evaluator(model) -> {metric: value}, when given, also runs at every eval_every (and once
    before a fresh run's first step), logged as {"step", "eval"}; on_checkpoint() runs after each
    checkpoint is written (a teacher cache saves what it filled).
    """
    device, is_main = ctx.device, ctx.is_main
    wrapped: nn.Module = objective
    if ctx.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(objective, device_ids=[ctx.local] if device.type == "cuda" else None)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    n_scheduled = len(groups)  # the model's groups follow the lr schedule; extra groups keep their own lr
    groups += extra_param_groups or []
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    trainable = {k for k, v in objective.named_parameters() if v.requires_grad} | {
        k for k, _ in objective.named_buffers() if "teacher" not in k.split(".")
    }

    def trainable_state() -> dict:
        return {k: v for k, v in objective.state_dict().items() if k in trainable}

    gen = torch.Generator().manual_seed(cfg.seed + 1000 * ctx.rank)
    start = 0
    ckpt_path = ctx.out / checkpoint_name
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        missing, unexpected = objective.load_state_dict(ck["model"], strict=False)
        if unexpected or set(missing) & trainable:
            raise ValueError(
                f"{ckpt_path} does not match this run: missing {sorted(set(missing) & trainable)[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        start = ck["step"]
        if is_main:
            print(f"resumed from {ckpt_path} at step {start}")

    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    log_path = ctx.out / log_name
    mcfg = model.config

    def log_eval(at: int) -> None:
        metrics = evaluator(model)
        objective.train()
        tqdm.write(f"step {at}: {json.dumps(metrics)}")
        with log_path.open("a") as f:
            f.write(json.dumps({"step": at, "eval": metrics}) + "\n")

    if is_main and evaluator is not None and start == 0:
        log_eval(0)
    objective.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not is_main, desc=ctx.out.name)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups[:n_scheduled]:
            g["lr"] = lr_at(step, cfg)
        vqa, cap = sample_batches(data, ctx.spec, mcfg.pad_token_id, mcfg.bos_token_id, cfg.batch_size, gen)
        with autocast():
            losses = wrapped(vqa, cap, step)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(objective, "before_step"):
            objective.before_step()
        opt.step()
        if hasattr(objective, "after_step"):
            objective.after_step()
        if is_main and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            row = {"step": step, "lr": lr_at(step, cfg), "elapsed_s": round(time.time() - t0, 1)}
            row.update({k: round(v.item(), 4) for k, v in losses.items()})
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shown = {k: f"{row[k]:.3f}" for k in ("vqa", "caption", "flops_ratio") if k in row}
            bar.set_postfix(loss=f"{row['total']:.3f}", **shown)
        if is_main and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            accs = {v.name: round(validation_accuracy(model, v, tok, ctx.pre, device), 4) for v in vqa_val}
            objective.train()
            tqdm.write(f"step {step + 1}: val VQA accuracy {accs}")
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step + 1, "val": accs}) + "\n")
            if evaluator is not None:
                log_eval(step + 1)
        out_of_time = cfg.max_minutes is not None and (time.time() - t0) > 60 * cfg.max_minutes
        if ctx.world > 1 and cfg.max_minutes is not None:  # every rank must stop at the same step
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if is_main and ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or out_of_time):
            tmp = ckpt_path.with_suffix(".tmp")
            state = {"model": trainable_state(), "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step + 1}
            torch.save(state, tmp)
            tmp.replace(ckpt_path)
            if on_checkpoint is not None:
                on_checkpoint()
        if out_of_time:
            if is_main:
                tqdm.write(f"time budget of {cfg.max_minutes} min reached: stopping at step {step + 1} of {cfg.steps}")
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step + 1, "stopped_early": True}) + "\n")
            break
    objective.eval()


def load_data_for(cfg: TrainConfig, ctx: RunContext, tok: Tokenizer, answers: list[str], bos_id: int):
    """Training tensors on the device plus the VQA validation splits, for a fixed tokenizer."""
    vqa_train, vqa_val, cap_train, _ = load_training_splits(cfg, ctx.spec)
    data = build_train_data(cfg, tok, answers, bos_id, vqa_train, cap_train).to(ctx.device)
    return data, vqa_val


def save_run(cfg: TrainConfig, ctx: RunContext, model: TrimVLM, tok: Tokenizer, name: str = "model") -> Path:
    final = ctx.out / name
    if ctx.is_main:
        model.eval()
        save_model_dir(final, model.cpu(), tok, ctx.pre, dtype=cfg.save_dtype)
        (ctx.out / "train_config.yaml").write_text(yaml.safe_dump(cfg.__dict__, sort_keys=False))
    return final


def training_words(train_config: str | Path, tokenizer_json: str | Path) -> list[str]:
    """Every word of the training texts a training config names (VQA questions and answers,
    captions), split as the service splits questions (`service.preprocess.text_words`): the
    manifest's `known_words`, against which served questions are checked."""
    cfg = TrainConfig.from_yaml(train_config)
    vqa, _, captions, _ = load_training_splits(cfg, ImageSpec(size=cfg.image_size))
    texts = [t for sp in vqa for s in sp.samples for t in (s.question, s.answer, *s.answers)]
    texts += [c for sp in captions for cs in sp.captions for c in cs]
    tok = Tokenizer.from_file(str(tokenizer_json))
    return sorted({w for t in set(texts) for w in text_words(tok, t)})
