"""Knowledge distillation of a half-depth student from a teacher (EfficientVLM, DLIP).

The student is the same class with fewer layers per stack (default: half of the teacher's in
every stack), initialised from teacher layers 1, 3, 5, ... as EfficientVLM does; width kept.
Losses (EfficientVLM's VQA recipe, module-wise as DLIP recommends, the decoder included):

    L = w_task * L_task + w_kd * [ KL_T(all heads)
                                   + vision (A + 0.2 H) + text (A + H)
                                   + 0.5 fusion (H + A_self + A_cross)
                                   + decoder (H + A_self + A_cross) + E ]

H: hidden-state MSE, student state i <-> teacher state 2i (embeddings are state 0).
A: attention-probability MSE scaled by the key length, student layer i <-> teacher layer 2i+1.
KL_T: KL(teacher || student) at temperature T on the VQA classifier, generative answers, ITM,
both ITC directions and the captioning LM. E: cosine distance between the student's and the
teacher's normalised ITC embeddings of the caption images and texts (DLIP's feature KD on the
projected [CLS]); the in-batch ITC KL only sees B candidates, this pins the whole retrieval space.
Where widths differ, learned linear projections map student states to the teacher's width;
where head counts differ, attention is head-averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compression.artifacts import load_model_dir
from compression.config import ModelConfig
from compression.config_file import ConfigError, NotAModelFolder
from compression.modeling import TokenEvidence, TrimVLM, check_top_level_modules
from compression.training import (
    MultiTaskLoss,
    TaskOutputs,
    TrainConfig,
    adopt_image_spec,
    end_run,
    fit,
    load_data_for,
    save_run,
    stack_kwargs,
    start_run,
    task_forward,
    task_losses,
    weighted_sum,
)

STACKS = ("vision", "text", "fusion", "decoder")
# config fields holding each stack's per-layer lists
STACK_FIELDS = {
    "vision": ("vision_heads", "vision_mlp"),
    "text": ("text_heads", "text_mlp"),
    "fusion": ("fusion_self_heads", "fusion_cross_heads", "fusion_mlp"),
    "decoder": ("decoder_self_heads", "decoder_cross_heads", "decoder_mlp"),
}
# state-dict prefix of layer i of each stack
LAYER_PREFIX = {
    "vision": "vision_model.encoder.layers.{}.",
    "text": "text_encoder.encoder.layer.{}.",
    "fusion": "fusion_encoder.layer.{}.",
    "decoder": "text_decoder.bert.encoder.layer.{}.",
}

DEFAULT_KD_WEIGHTS = {
    "logits": 1.0,
    "vision_attn": 1.0,
    "vision_hidden": 0.2,
    "text_attn": 1.0,
    "text_hidden": 1.0,
    "fusion_attn": 0.5,
    "fusion_cross_attn": 0.5,
    "fusion_hidden": 0.5,
    "decoder_attn": 1.0,
    "decoder_cross_attn": 1.0,
    "decoder_hidden": 1.0,
    "itc_embed": 1.0,
    # off unless set: contrastive KD on the in-batch similarity matrix at its own temperature
    # (KL both directions, x T^2), and CLIP-KD's interactive contrastive term (student images
    # against teacher texts and student texts against teacher images)
    "itc_contrastive": 0.0,
    "itc_interactive": 0.0,
    # off unless set: the teacher's ITM ranking of each caption's top-k in-batch images (and each
    # image's top-k captions, by the teacher's ITC) distilled listwise, as serving re-ranks
    "itm_rank": 0.0,
}


@dataclass
class DistillConfig(TrainConfig):
    out: str = "runs/distill"
    teacher: str = "models/trimvlm-teacher/1"
    # student layers per stack; missing stacks get half the teacher's (at least 1)
    student_layers: dict = field(default_factory=dict)
    student_name: str = "trimvlm-student"
    # teacher (layers 1, 3, 5, ...) | scratch (the config's fresh initialisation) | a model directory
    # (continue distilling an existing student, e.g. a pruned one; student_layers is then ignored)
    init: str = "teacher"
    task_weight: float = 0.6
    kd_weight: float = 0.4
    temperature: float = 1.0
    kd_weights: dict = field(default_factory=lambda: dict(DEFAULT_KD_WEIGHTS))
    kd_logits: list = field(default_factory=lambda: ["vqa", "vqa_gen", "itm", "itc", "caption"])
    projection_lr: float | None = None  # defaults to 2 x lr (EfficientVLM's lr_mult for new parameters)
    contrastive_temperature: float = 1.0  # of kd_weights.itc_contrastive
    itm_rank_k: int = 4  # candidates per query of kd_weights.itm_rank
    itm_rank_directions: list = field(default_factory=lambda: ["t2i", "i2t"])  # whose rankings it distils
    # train only these top-level modules of the student (e.g. fusion_encoder, itm_head, vqa_head)
    # and keep every other weight as `init` has it; null: train all
    train_modules: list | None = None
    # give the student a token-evidence ITM term of this hidden width (ModelConfig.itm_evidence_hidden)
    # if it has none; it starts at zero, so an existing student starts unchanged. 0: as `init` has it
    itm_evidence_hidden: int = 0
    # a folder for the teacher's outputs per training sample (compression/teacher_cache.py):
    # a teacher forward only the first time a sample is drawn. null: a teacher forward every step.
    teacher_cache: str | None = None
    # ITC/ITM hard negatives mined from the teacher's similarities over the whole training set: each
    # caption batch pairs images with one of their k hardest (0: random batches). The teacher's
    # embeddings come from teacher_cache when set, else from one pass stored in the run folder.
    hard_negative_k: int = 0
    # Templated captions are often true of other images, so a mined "negative" can match. ITM pairs
    # drawn as negatives that the teacher scores above this match probability are left out of the
    # student's hard-label ITM loss (the KD term keeps the teacher's soft label). null: keep all.
    itm_false_negative_p: float | None = None
    # eval_every also logs scenes-val VQA (per type), ITC and ITM-re-ranked R@1/5/10, CIDEr and
    # easy-VQA val (a few minutes on CPU), and the teacher's once (teacher_eval.json)
    eval_full: bool = False
    eval_rerank_k: int = 16
    eval_caption_images: int | None = 200  # first N scenes-val images for captions and retrieval (None: all 500)


# ----------------------------------------------------------------------------------------------
# The student: layer maps, config and initialisation
# ----------------------------------------------------------------------------------------------


def attention_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer each student layer is initialised from and distilled against:
    round((i + 1) * n_t / n_s) - 1, i.e. 1, 3, 5, ... when halving. A stack the teacher lacks
    (an imported BLIP has no text-only layers) stays empty."""
    if n_student == n_teacher == 0:
        return []
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"student depth {n_student} must be between 1 and the teacher's {n_teacher}")
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


def hidden_state_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher hidden state for each student state (0 = embeddings): 0, 2, 4, ... when halving."""
    if n_student == n_teacher == 0:
        return [0]
    return [round(i * n_teacher / n_student) for i in range(n_student + 1)]


def student_layers(teacher_cfg: ModelConfig, requested: dict | None = None) -> dict[str, int]:
    requested = requested or {}
    unknown = set(requested) - set(STACKS)
    if unknown:
        raise ValueError(f"unknown stacks in student_layers: {sorted(unknown)}")
    counts = teacher_cfg.layer_counts
    return {s: int(requested.get(s, max(min(1, counts[s]), counts[s] // 2))) for s in STACKS}


def student_config(teacher_cfg: ModelConfig, layers: dict[str, int], name: str, overrides: dict | None = None) -> ModelConfig:
    """The teacher's config with each stack cut to the mapped layers (their heads and widths)."""
    d = teacher_cfg.to_dict()
    counts = teacher_cfg.layer_counts
    for stack, fields_ in STACK_FIELDS.items():
        keep = attention_layer_map(counts[stack], layers[stack])
        for f in fields_:
            d[f] = [d[f][t] for t in keep]
    d.update({"name": name, "role": "student", **(overrides or {})})
    return ModelConfig.from_dict(d)


def init_from_teacher(student: TrimVLM, teacher: TrimVLM) -> list[str]:
    """Copy every teacher tensor into the student: student layer i of a stack takes the mapped
    teacher layer; embeddings, norms and heads are copied as they are. Returns the copied keys.
    Shapes are asserted: a student of another width must use init 'scratch'."""
    t_counts, s_counts = teacher.config.layer_counts, student.config.layer_counts
    rename = {}
    for stack, prefix in LAYER_PREFIX.items():
        for i, t in enumerate(attention_layer_map(t_counts[stack], s_counts[stack])):
            rename[prefix.format(i)] = prefix.format(t)
    t_sd = teacher.state_dict()
    new = {}
    for key, value in student.state_dict().items():
        src = key
        for s_pre, t_pre in rename.items():
            if key.startswith(s_pre):
                src = t_pre + key[len(s_pre) :]
                break
        if src not in t_sd:
            raise KeyError(f"student tensor {key} has no teacher counterpart {src}")
        if t_sd[src].shape != value.shape:
            raise ValueError(f"{key}: student shape {tuple(value.shape)} != teacher {src} {tuple(t_sd[src].shape)}")
        new[key] = t_sd[src]
    student.load_state_dict(new, strict=True)
    return list(new)


# ----------------------------------------------------------------------------------------------
# Distillation losses
# ----------------------------------------------------------------------------------------------


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) averaged over rows (valid rows only with a mask)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean 1 - cos between matching rows (CosineEmbeddingLoss on positive pairs)."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"ITC embedding widths differ: student {student.shape[-1]}, teacher {teacher.shape[-1]}")
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    err = (student.float() - teacher.float()).pow(2).mean(-1)
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of attention probabilities [B, H, Nq, Nk] times the key length (squared error summed
    over keys, averaged over batch, heads and valid queries), as EfficientVLM. Head-averaged when
    head counts differ; a fully pruned block (0 heads) contributes nothing."""
    if student.shape[1] == 0:
        return student.new_zeros(())
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    err = (student.float() - teacher.float()).pow(2).sum(-1).mean(1)  # [B, Nq]
    if query_mask is None:
        return err.mean()
    mask = query_mask.to(err.dtype)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def contrastive_kd(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on the in-batch image-text similarity matrix, image->text rows and
    text->image rows averaged, scaled by T^2 so its gradient does not shrink with T (Hinton)."""
    t = temperature
    rows = kl_logits(student_sim, teacher_sim, t)
    cols = kl_logits(student_sim.t(), teacher_sim.t(), t)
    return t * t * 0.5 * (rows + cols)


def interactive_contrastive(s: TaskOutputs, t: TaskOutputs, key: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """CLIP-KD's interactive contrastive loss: the student's image embeddings contrasted against
    the teacher's text embeddings of the batch and the student's texts against the teacher's
    images, identical captions counting as positives (as the task's ITC does)."""
    same = (key[:, None] == key[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    i2t = s.image_emb.float() @ t.text_emb.float().t() / temp
    t2i = s.text_emb.float() @ t.image_emb.float().t() / temp
    return 0.5 * (-(F.log_softmax(i2t, 1) * target).sum(1).mean() - (F.log_softmax(t2i, 1) * target).sum(1).mean())


def match_log_prob(model: TrimVLM, texts: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, **fuse_kwargs) -> torch.Tensor:
    """log p(match) of each (text, image) pair by the ITM head: the score re-ranking sorts by."""
    logits = model.itm_logits(model.fuse(texts, mask, images, **fuse_kwargs).last_hidden_state, mask).float()
    return F.log_softmax(logits, dim=1)[:, 1]


def itm_rank_candidates(
    teacher_sim: torch.Tensor, k: int, directions: tuple = ("t2i", "i2t")
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text row, image row) of every pair to rank: with "t2i", each caption with its k in-batch
    images the teacher's ITC scores highest; then with "i2t", each image with its k highest
    captions ([len(directions) x B x k] pairs)."""
    b_img, b_txt = teacher_sim.shape
    texts, images = [], []
    if "t2i" in directions:
        t2i = teacher_sim.t().topk(min(k, b_img), dim=1).indices  # [B_txt, k] images per caption
        texts.append(torch.arange(b_txt, device=t2i.device)[:, None].expand_as(t2i).reshape(-1))
        images.append(t2i.reshape(-1))
    if "i2t" in directions:
        i2t = teacher_sim.topk(min(k, b_txt), dim=1).indices  # [B_img, k] captions per image
        texts.append(i2t.reshape(-1))
        images.append(torch.arange(b_img, device=i2t.device)[:, None].expand_as(i2t).reshape(-1))
    return torch.cat(texts), torch.cat(images)


def itm_rank_kd(
    student: TrimVLM,
    teacher: TrimVLM,
    s: TaskOutputs,
    t: TaskOutputs,
    mask: torch.Tensor,
    k: int,
    gates: dict | None = None,
    directions: tuple = ("t2i", "i2t"),
) -> torch.Tensor:
    """KL(teacher || student) between the two models' ITM rankings of the same candidate lists
    (softmax over each query's k candidates of log p(match)), the directions' lists averaged. The
    pointwise ITM KD matches one negative per pair; re-ranking only asks which candidate wins."""
    text_rows, image_rows = itm_rank_candidates(t.itc_sim, k, directions)
    with torch.no_grad():
        t_score = match_log_prob(teacher, t.caption_texts[text_rows], mask[text_rows], t.caption_images[image_rows])
    s_score = match_log_prob(
        student, s.caption_texts[text_rows], mask[text_rows], s.caption_images[image_rows], **stack_kwargs(gates, "fusion")
    )
    kk = min(k, t.itc_sim.shape[0], t.itc_sim.shape[1])
    return kl_logits(s_score.view(-1, kk), t_score.view(-1, kk), 1.0)


class Distiller(nn.Module):
    """Task + distillation losses of a student against a frozen teacher on the same batch.

    `gates`, when set, is a callable returning pruning gates for the student's forward (the
    pruning stage reuses this module unchanged)."""

    def __init__(self, student: TrimVLM, teacher: TrimVLM, cfg: DistillConfig):
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.teacher.eval().requires_grad_(False)
        unknown = set(cfg.kd_weights) - set(DEFAULT_KD_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown kd_weights: {sorted(unknown)}")
        self.kd_weights = {**DEFAULT_KD_WEIGHTS, **cfg.kd_weights}
        directions = cfg.itm_rank_directions
        if not directions or not set(directions) <= {"t2i", "i2t"}:
            raise ConfigError(f"itm_rank_directions: one or both of t2i, i2t, got {directions!r}")
        s, t = student.config, teacher.config
        widths = {
            "vision": (s.vision_width, t.vision_width),
            "text": (s.text_width, t.text_width),
            "fusion": (s.text_width, t.text_width),
            "decoder": (s.text_width, t.text_width),
        }
        self.projections = nn.ModuleDict({k: nn.Linear(a, b) for k, (a, b) in widths.items() if a != b})
        counts_t, counts_s = t.layer_counts, s.layer_counts
        self.hidden_map = {k: hidden_state_map(counts_t[k], counts_s[k]) for k in STACKS}
        self.attn_map = {k: attention_layer_map(counts_t[k], counts_s[k]) for k in STACKS}
        self.gates = None
        self.cache = None  # a TeacherCache: teacher outputs read back instead of a forward

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout, frozen statistics)
        return self

    def param_groups(self) -> list[dict]:
        """Optimiser groups for the width projections (new parameters: projection_lr, default 2 x lr)."""
        if not len(self.projections):
            return []
        lr = self.cfg.projection_lr or 2 * self.cfg.lr
        return [{"params": list(self.projections.parameters()), "lr": lr, "weight_decay": 0.0}]

    def _project(self, stack: str, x: torch.Tensor) -> torch.Tensor:
        return self.projections[stack](x) if stack in self.projections else x

    def stack_losses(self, stack: str, s_out, t_out, token_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        losses = {}
        hm, am = self.hidden_map[stack], self.attn_map[stack]
        losses[f"{stack}_hidden"] = sum(
            hidden_mse(self._project(stack, s_out.hidden_states[i]), t_out.hidden_states[j], token_mask) for i, j in enumerate(hm)
        ) / len(hm)
        if not am:  # an empty stack (embeddings only): nothing attends
            return losses
        losses[f"{stack}_attn"] = sum(
            attention_mse(s_out.attentions[i], t_out.attentions[j], token_mask) for i, j in enumerate(am)
        ) / len(am)
        if s_out.cross_attentions and s_out.cross_attentions[0] is not None:
            losses[f"{stack}_cross_attn"] = sum(
                attention_mse(s_out.cross_attentions[i], t_out.cross_attentions[j], token_mask) for i, j in enumerate(am)
            ) / len(am)
        return losses

    def logit_losses(self, s: TaskOutputs, t: TaskOutputs, vqa: dict, cap: dict) -> dict[str, torch.Tensor]:
        T, out = self.cfg.temperature, {}
        wanted = set(self.cfg.kd_logits)
        if "vqa" in wanted:
            out["kl_vqa"] = kl_logits(s.vqa_logits, t.vqa_logits, T)
        if "vqa_gen" in wanted and s.vqa_gen_logits is not None and t.vqa_gen_logits is not None:
            out["kl_vqa_gen"] = kl_logits(s.vqa_gen_logits[:, :-1], t.vqa_gen_logits[:, :-1], T, vqa["a_mask"][:, 1:])
        if "itm" in wanted:
            out["kl_itm"] = kl_logits(s.itm_logits, t.itm_logits, T)
        if "itc" in wanted:
            out["kl_itc"] = 0.5 * (kl_logits(s.itc_sim, t.itc_sim, T) + kl_logits(s.itc_sim.t(), t.itc_sim.t(), T))
        if "caption" in wanted:
            out["kl_caption"] = kl_logits(s.caption_logits[:, :-1], t.caption_logits[:, :-1], T, cap["mask"][:, 1:])
        return out

    def forward(self, vqa: dict, cap: dict, step: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        need_kd = cfg.kd_weight > 0
        gates = self.gates() if self.gates is not None else None
        t_out = None
        if need_kd and self.cache is not None:
            t_out = self.cache.teacher_outputs(vqa, cap)
        elif need_kd:
            with torch.no_grad():
                t_out = task_forward(self.teacher, vqa, cap, states=True)
        s_out = task_forward(self.student, vqa, cap, gates=gates, states=need_kd, negatives=t_out.negatives if t_out else None)
        flagged = None
        if t_out is not None and cfg.itm_false_negative_p is not None:
            flagged = itm_false_negatives(t_out.itm_logits, cfg.itm_false_negative_p)
        losses = task_losses(s_out, vqa, cap, None if flagged is None else ~flagged)
        if flagged is not None:  # the share of negatives dropped (rows B..3B): logged, not optimised
            losses["itm_false_negatives"] = flagged[flagged.shape[0] // 3 :].float().mean()
        task = weighted_sum(losses, cfg.loss_weights)
        total = cfg.task_weight * task
        losses["task"] = task
        if need_kd:
            kd = self.logit_losses(s_out, t_out, vqa, cap)
            logit_total = sum(kd.values())
            kd["itc_embed"] = embedding_cosine(s_out.image_emb, t_out.image_emb) + embedding_cosine(
                s_out.text_emb, t_out.text_emb
            )
            if self.kd_weights["itc_contrastive"]:
                kd["itc_contrastive"] = contrastive_kd(s_out.itc_sim, t_out.itc_sim, cfg.contrastive_temperature)
            if self.kd_weights["itc_interactive"]:
                temp = self.student.temp.clamp(0.001, 0.5)
                kd["itc_interactive"] = interactive_contrastive(s_out, t_out, cap["key"], temp)
            if self.kd_weights["itm_rank"]:
                kd["itm_rank"] = itm_rank_kd(
                    self.student,
                    self.teacher,
                    s_out,
                    t_out,
                    cap["mask"],
                    cfg.itm_rank_k,
                    gates,
                    tuple(cfg.itm_rank_directions),
                )
            q_mask = vqa["q_mask"]
            kd.update(self.stack_losses("vision", s_out.vision, t_out.vision, None))
            kd.update(self.stack_losses("text", s_out.text, t_out.text, q_mask))
            kd.update(self.stack_losses("fusion", s_out.fusion, t_out.fusion, q_mask))
            kd.update(self.stack_losses("decoder", s_out.decoder, t_out.decoder, cap["mask"]))
            feature_total = sum(self.kd_weights[k] * v for k, v in kd.items() if k in self.kd_weights)
            losses.update(kd)
            losses["kd"] = self.kd_weights["logits"] * logit_total + feature_total
            total = total + cfg.kd_weight * losses["kd"]
        losses["total"] = total
        return losses


def itm_false_negatives(teacher_itm_logits: torch.Tensor, p_match: float) -> torch.Tensor:
    """[3B] bool: the negative ITM pairs (rows B..3B of positives, negative texts, negative images)
    that the teacher scores as a match with probability above p_match. Positives are never flagged."""
    b = teacher_itm_logits.shape[0] // 3
    flagged = F.softmax(teacher_itm_logits.float(), dim=1)[:, 1] > p_match
    flagged[:b] = False
    return flagged


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------


def _load_config_model(key: str, path, device):
    """The model folder a config key names; the error for a missing one names the key."""
    try:
        return load_model_dir(path, device)
    except NotAModelFolder as e:
        raise ConfigError(f"{key}: {e}") from None


def build_student(cfg: DistillConfig, teacher: TrimVLM, tokenizer) -> TrimVLM:
    if cfg.init not in ("teacher", "scratch"):  # an existing student: keep its (possibly pruned) shape
        existing = _load_config_model("init", cfg.init, "cpu")
        if existing.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{cfg.init}: tokenizer differs from the teacher's")
        student = existing.model.float()
        student.config.name = cfg.student_name
        return add_itm_evidence(student, cfg.itm_evidence_hidden)
    layers = student_layers(teacher.config, cfg.student_layers)
    scfg = student_config(teacher.config, layers, cfg.student_name, cfg.model)
    student = TrimVLM(scfg)
    if cfg.init == "teacher":
        init_from_teacher(student, teacher)
    elif cfg.text_init:  # scratch, the teacher's own recipe: text side from MiniLM, the rest random
        _init_text_from_minilm(student, tokenizer, cfg.text_init)
    return add_itm_evidence(student, cfg.itm_evidence_hidden)


def add_itm_evidence(model: TrimVLM, hidden: int) -> TrimVLM:
    """`model` with a fresh token-evidence ITM term of `hidden` width (0: unchanged). Its output
    starts at zero, so every score of the model is what it was."""
    if not hidden:
        return model
    have = model.config.itm_evidence_hidden
    if have and have != hidden:
        raise ConfigError(f"itm_evidence_hidden: init already has a token-evidence ITM term of width {have}, not {hidden}")
    if not have:
        model.config.itm_evidence_hidden = hidden
        model.itm_evidence = TokenEvidence(model.config.text_width, hidden)
    return model


def _init_text_from_minilm(model: TrimVLM, tokenizer, text_init: dict) -> None:
    import json

    from compression.pretrained import load_bert_text_side
    from compression.tokenization import minilm_dir

    base = json.loads((minilm_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    old_ids = [base.get(tokenizer.id_to_token(i)) for i in range(tokenizer.get_vocab_size())]
    load_bert_text_side(
        model,
        minilm_dir() / "model.safetensors",
        old_ids,
        text_init["text_layers"],
        text_init["fusion_layers"],
        text_init["decoder_layers"],
    )


def distill(cfg: DistillConfig, resume: bool = True) -> Path:
    """Distil a student from cfg.teacher and save it under <out>/model."""
    ctx = start_run(cfg)
    t = _load_config_model("teacher", cfg.teacher, ctx.device)
    adopt_image_spec(ctx, cfg, t.preprocessing.image, "teacher")
    student = build_student(cfg, t.model, t.tokenizer).to(ctx.device)
    if cfg.train_modules is not None:
        freeze_except(student, cfg.train_modules)
    objective = Distiller(student, t.model, cfg) if cfg.kd_weight > 0 else MultiTaskLoss(student, cfg.loss_weights)
    data, vqa_val = load_data_for(cfg, ctx, t.tokenizer, student.config.answers, student.config.bos_token_id)
    on_checkpoint = None
    if cfg.teacher_cache and isinstance(objective, Distiller):
        objective.cache = open_teacher_cache(cfg, objective, data, t.model)
        on_checkpoint = objective.cache.save
        if cfg.hard_negative_k:
            objective.cache.prefill_captions(ctx.spec, student.config.bos_token_id, progress=_progress("caption cache"))
            data.cap_partners = objective.cache.mine_partners(cfg.hard_negative_k).to(ctx.device)
    elif cfg.hard_negative_k:
        from compression.hard_negatives import load_or_mine
        from compression.teacher_cache import teacher_identity

        data.cap_partners = load_or_mine(
            ctx.out / "hard_negatives.pt",
            t.model,
            data,
            ctx.spec,
            cfg.hard_negative_k,
            teacher_identity(cfg.teacher),
            progress=_progress("teacher embeddings for hard negatives"),
        ).to(ctx.device)
    evaluator = None
    if cfg.eval_full and ctx.is_main:
        evaluator = validation_evaluator(cfg, ctx, t, vqa_val)
    extra = objective.param_groups() if isinstance(objective, Distiller) else []
    fit(cfg, ctx, student, objective, data, t.tokenizer, vqa_val, resume, extra, evaluator=evaluator, on_checkpoint=on_checkpoint)
    if on_checkpoint is not None:
        on_checkpoint()
    final = save_run(cfg, ctx, student, t.tokenizer)
    end_run(ctx)
    return final


def freeze_except(model: nn.Module, modules: list[str]) -> None:
    """Turn off the gradients of every parameter outside these top-level modules (names as in
    model.named_parameters(), e.g. "fusion_encoder", "itm_head", "temp"): the optimiser then leaves
    those weights exactly as they were, so what only they compute (ITC embeddings, captions) stays."""
    check_top_level_modules((name for name, _ in model.named_parameters()), modules, "train_modules", ConfigError)
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in modules)


def open_teacher_cache(cfg: DistillConfig, objective: Distiller, data, teacher: TrimVLM):
    from compression.teacher_cache import TeacherCache, teacher_identity

    return TeacherCache(
        cfg.teacher_cache,
        teacher,
        data,
        objective.hidden_map,
        objective.attn_map,
        teacher_identity(cfg.teacher),
        teacher.config.pad_token_id,
    )


def validation_evaluator(cfg: DistillConfig, ctx, teacher, vqa_val: list):
    """evaluator(model) for fit: every validation metric (compression.evaluate.evaluate_validation)
    of the model being trained; the teacher's, measured once, goes to <out>/teacher_eval.json."""
    import json

    from compression import data as D
    from compression.artifacts import LoadedModel
    from compression.evaluate import evaluate_validation

    root = D.ensure_scenes(seed=cfg.scenes_seed, **cfg.scenes_counts)
    captions = D.load_scenes_captions(root, "val", ctx.spec).limit(cfg.eval_caption_images)
    teacher_path = ctx.out / "teacher_eval.json"
    if not teacher_path.is_file():
        metrics = evaluate_validation(teacher, vqa_val, captions, ctx.device, cfg.eval_rerank_k)
        teacher_path.write_text(json.dumps(metrics, indent=2) + "\n")

    def evaluator(model: TrimVLM) -> dict:
        model.eval()
        lm = LoadedModel(model, teacher.tokenizer, ctx.pre)
        return evaluate_validation(lm, vqa_val, captions, ctx.device, cfg.eval_rerank_k)

    return evaluator


def _progress(what: str):
    def show(done: int, total: int) -> None:
        if done == total or done % 2048 < 128:
            print(f"{what}: {done}/{total}", flush=True)

    return show
