"""Modal-adaptive structured pruning with hard-concrete (L0) gates (EfficientVLM, CoFiPruning).

Gates sit on every attention head (self- and cross-attention separately) and every FFN neuron
of the vision, text, fusion encoders and the decoder. One global expected sparsity ŝ is held to
a target t by a Lagrangian  λ1 (ŝ - t) + λ2 (ŝ - t)²  whose multipliers rise by explicit
gradient ascent, with t ramped up over the first part of pruning; the task + distillation loss
decides *where* units go, so the split between modalities is learned, not set.

Units are priced in `params` (the paper's cost) or `flops` (each unit weighted by the tokens it
processes, so the knob means latency: a vision head sees 65 tokens, a text head 16).

After pruning, deterministic masks keep the top round(Σ P(open)) units of each layer by log α,
and the model is physically sliced into a smaller dense model of the same class; a layer left
with no heads or neurons keeps only its bias path. The sliced model is then fine-tuned with
distillation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compression.artifacts import load_model_dir
from compression.config import ModelConfig
from compression.distill import DistillConfig, Distiller
from compression.flops import TokenCounts, attention_flops, ffn_flops
from compression.modeling import TrimVLM
from compression.training import adopt_image_spec, end_run, fit, load_data_for, save_run, start_run

# (stack, kind) -> the config field with its per-layer sizes
GROUPS: dict[tuple[str, str], str] = {
    ("vision", "head"): "vision_heads",
    ("vision", "ffn"): "vision_mlp",
    ("text", "head"): "text_heads",
    ("text", "ffn"): "text_mlp",
    ("fusion", "head"): "fusion_self_heads",
    ("fusion", "cross"): "fusion_cross_heads",
    ("fusion", "ffn"): "fusion_mlp",
    ("decoder", "head"): "decoder_self_heads",
    ("decoder", "cross"): "decoder_cross_heads",
    ("decoder", "ffn"): "decoder_mlp",
}

# Hard-concrete constants (Louizos et al.; EfficientVLM / CoFiPruning values)
LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
EPS = 1e-6


def p_open(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) = σ(log α - β log(-l / r))."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))


def sample_hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=generator, device="cpu").to(log_alpha.device).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    return (LIMIT_L + (LIMIT_R - LIMIT_L) * s).clamp(0.0, 1.0)


def deterministic_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """Keep the top round(Σ P(open)) units of the row by log α (binary, input-independent)."""
    k = int(round(float(p_open(log_alpha).sum())))
    mask = torch.zeros_like(log_alpha)
    if k > 0:
        mask[log_alpha.topk(k).indices] = 1.0
    return mask


def unit_costs(cfg: ModelConfig, mode: str, tokens: TokenCounts | None = None) -> dict[tuple[str, str], list[float]]:
    """Cost of one unit (a head or a neuron) of each layer of each group.

    params: the unit's own weights and biases (a head: its q, k, v rows and output-projection
    columns; a neuron: its fc1 row and bias and fc2 column). flops: forward FLOPs per sample of
    the unit at the token counts each stack processes (compression/flops.py's formulas)."""
    t = tokens or TokenCounts()
    n_img, vw, tw = cfg.num_image_tokens, cfg.vision_width, cfg.text_width
    vhd, thd = cfg.vision_head_dim, cfg.text_head_dim
    dims = {  # stack -> (tokens, width, head_dim, kv tokens for cross-attention, kv width)
        "vision": (n_img, vw, vhd, None, None),
        "text": (t.text, tw, thd, None, None),
        "fusion": (t.text, tw, thd, n_img, vw),
        "decoder": (t.caption, tw, thd, n_img, cfg.cross_width),
    }
    costs = {}
    for (stack, kind), field_name in GROUPS.items():
        n, w, hd, n_kv, kv_w = dims[stack]
        if kind == "ffn":
            c = (2 * w + 1) if mode == "params" else ffn_flops(n, w, 1)
        else:
            nk, kw = (n_kv, kv_w) if kind == "cross" else (n, w)
            if mode == "params":
                c = (w + 1) * hd + 2 * (kw + 1) * hd + hd * w
            else:
                c = attention_flops(n, nk, w, kw, 1, hd, w)
        if mode not in ("params", "flops"):
            raise ValueError(f"unknown cost mode {mode!r} (params | flops)")
        costs[(stack, kind)] = [float(c)] * len(getattr(cfg, field_name))
    return costs


def _key(stack: str, kind: str, i: int) -> str:
    return f"{stack}_{kind}_{i}"


class HardConcreteGates(nn.Module):
    """log α for every head and FFN neuron of a model, with costs for the expected sparsity."""

    def __init__(
        self,
        cfg: ModelConfig,
        cost_mode: str = "params",
        tokens: TokenCounts | None = None,
        head_init: float = LOG_ALPHA_MAX,
        ffn_init: float = 0.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        self.cost_mode = cost_mode
        self.log_alpha = nn.ParameterDict()
        self.layout: dict[tuple[str, str], int] = {}
        costs = unit_costs(cfg, cost_mode, tokens)
        for (stack, kind), field_name in GROUPS.items():
            sizes = getattr(cfg, field_name)
            self.layout[(stack, kind)] = len(sizes)
            for i, n in enumerate(sizes):
                mean = ffn_init if kind == "ffn" else head_init
                self.log_alpha[_key(stack, kind, i)] = nn.Parameter(torch.randn(n) * init_std + mean)
                self.register_buffer(f"cost_{_key(stack, kind, i)}", torch.tensor(costs[(stack, kind)][i]), persistent=False)
        self.total_cost = sum(n * c for (g, i, n, c) in self._rows())

    def _rows(self):
        for (stack, kind), layers in self.layout.items():
            for i in range(layers):
                k = _key(stack, kind, i)
                yield (stack, kind), i, self.log_alpha[k].numel(), float(getattr(self, f"cost_{k}"))

    def gates(self, mode: str = "sample", generator: torch.Generator | None = None) -> dict:
        """{(stack, kind): [gate per layer]} for the model's forward. mode: sample (training),
        deterministic (binary masks), or expected (P(open))."""
        out: dict = {}
        for (stack, kind), layers in self.layout.items():
            row = []
            for i in range(layers):
                la = self.log_alpha[_key(stack, kind, i)]
                if mode == "sample":
                    row.append(sample_hard_concrete(la, generator))
                elif mode == "deterministic":
                    row.append(deterministic_mask(la.detach()))
                elif mode == "expected":
                    row.append(p_open(la))
                else:
                    raise ValueError(mode)
            out[(stack, kind)] = row
        return out

    def expected_sparsity(self) -> torch.Tensor:
        """ŝ = 1 - Σ P(open) · cost / Σ cost over every gated unit."""
        kept = sum(
            p_open(self.log_alpha[_key(s, k, i)]).sum() * getattr(self, f"cost_{_key(s, k, i)}")
            for (s, k), i, _, _ in self._rows()
        )
        return 1.0 - kept / self.total_cost

    def sparsity_of(self, masks: dict) -> float:
        """Cost-weighted sparsity of binary masks (what the sliced model actually removes)."""
        kept = sum(float(masks[g][i].sum()) * c for g, i, _, c in self._rows())
        return 1.0 - kept / self.total_cost

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.log_alpha.values():
            p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


class Lagrangian(nn.Module):
    """λ1 (ŝ - t) + λ2 (ŝ - t)²: the model descends it, the multipliers ascend it."""

    def __init__(self):
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected - target
        return self.lambda_1 * gap + self.lambda_2 * gap * gap

    def ascend(self) -> None:
        """Turn the optimiser's descent into ascent for the multipliers (called before step)."""
        for p in (self.lambda_1, self.lambda_2):
            if p.grad is not None:
                p.grad.neg_()


def target_at(step: int, target: float, ramp_steps: int) -> float:
    return target * min(1.0, step / max(1, ramp_steps))


# ----------------------------------------------------------------------------------------------
# Slicing
# ----------------------------------------------------------------------------------------------


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().flatten()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


TEXT_PREFIX = {
    "text": "text_encoder.encoder.layer.{}.",
    "fusion": "fusion_encoder.layer.{}.",
    "decoder": "text_decoder.bert.encoder.layer.{}.",
}


def slice_model(model: TrimVLM, masks: dict) -> TrimVLM:
    """A smaller dense TrimVLM with only the kept heads and neurons (same outputs as the model
    run with these binary masks as gates)."""
    cfg = model.config
    d = cfg.to_dict()
    index: dict[str, tuple[int, torch.Tensor]] = {}  # parameter -> (dim, kept indices)
    for (stack, kind), field_name in GROUPS.items():
        d[field_name] = [int(m.sum()) for m in masks[(stack, kind)]]
        for i, m in enumerate(masks[(stack, kind)]):
            keep = _kept(m.cpu())
            if stack == "vision":
                p = f"vision_model.encoder.layers.{i}."
                if kind == "head":
                    hd, h = cfg.vision_head_dim, cfg.vision_heads[i]
                    rows = _head_rows(keep, hd)
                    qkv = torch.cat([rows, rows + h * hd, rows + 2 * h * hd])
                    index[p + "self_attn.qkv.weight"] = (0, qkv)
                    index[p + "self_attn.qkv.bias"] = (0, qkv)
                    index[p + "self_attn.projection.weight"] = (1, rows)
                else:
                    index[p + "mlp.fc1.weight"] = (0, keep)
                    index[p + "mlp.fc1.bias"] = (0, keep)
                    index[p + "mlp.fc2.weight"] = (1, keep)
                continue
            p = TEXT_PREFIX[stack].format(i)
            if kind == "ffn":
                index[p + "intermediate.dense.weight"] = (0, keep)
                index[p + "intermediate.dense.bias"] = (0, keep)
                index[p + "output.dense.weight"] = (1, keep)
                continue
            block = p + ("attention." if kind == "head" else "crossattention.")
            rows = _head_rows(keep, cfg.text_head_dim)
            for proj in ("query", "key", "value"):
                index[f"{block}self.{proj}.weight"] = (0, rows)
                index[f"{block}self.{proj}.bias"] = (0, rows)
            index[block + "output.dense.weight"] = (1, rows)
    new_cfg = ModelConfig.from_dict({**d, "role": "student"})
    sliced = TrimVLM(new_cfg)
    state = {}
    for name, value in model.state_dict().items():
        if name in index:
            dim, idx = index[name]
            value = value.index_select(dim, idx.to(value.device))
        state[name] = value
    sliced.load_state_dict(state, strict=True)  # asserts every shape
    return sliced.to(next(model.parameters()).device)


def remaining_units(cfg: ModelConfig) -> dict[str, list[int]]:
    """Heads and neurons per group and layer ("vision_head": [6, 4], ...)."""
    return {f"{s}_{k}": list(getattr(cfg, f)) for (s, k), f in GROUPS.items()}


# ----------------------------------------------------------------------------------------------
# The pruning objective and command
# ----------------------------------------------------------------------------------------------


@dataclass
class PruneConfig(DistillConfig):
    out: str = "runs/prune"
    student: str = "runs/distill/model"  # the distilled student to prune
    target_sparsity: float = 0.5
    cost: str = "params"  # params | flops
    prune_steps: int = 200
    ramp_fraction: float = 0.5  # target ramps from 0 over this fraction of the pruning steps
    finetune_steps: int = 100  # after slicing: distillation with the masks frozen
    reg_lr: float = 0.05  # learning rate of log α and of the multipliers' ascent
    head_init: float = LOG_ALPHA_MAX
    ffn_init: float = 0.0
    text_tokens: int = 16  # tokens assumed per text / caption for the flops cost
    steps: int = 0  # set per phase from prune_steps / finetune_steps


class Pruner(nn.Module):
    """Distillation loss of the gated student + the Lagrangian on its expected sparsity."""

    def __init__(self, distiller: Distiller, gates: HardConcreteGates, cfg: PruneConfig, ramp_steps: int):
        super().__init__()
        self.distiller, self.gates, self.cfg, self.ramp_steps = distiller, gates, cfg, ramp_steps
        self.lagrangian = Lagrangian()
        self.distiller.gates = lambda: self.gates.gates("sample" if self.training else "deterministic")

    def forward(self, vqa: dict, cap: dict, step: int = 0) -> dict[str, torch.Tensor]:
        losses = self.distiller(vqa, cap, step)
        expected = self.gates.expected_sparsity()
        target = target_at(step, self.cfg.target_sparsity, self.ramp_steps)
        lag = self.lagrangian(expected, target)
        losses["lagrangian"] = lag
        losses["expected_sparsity"] = expected.detach()
        losses["target_sparsity"] = torch.tensor(target)
        losses["lambda_1"] = self.lagrangian.lambda_1.detach()
        losses["lambda_2"] = self.lagrangian.lambda_2.detach()
        losses["total"] = losses["total"] + lag
        return losses

    def before_step(self) -> None:
        self.lagrangian.ascend()

    def after_step(self) -> None:
        self.gates.clamp_()

    def param_groups(self) -> list[dict]:
        reg = self.cfg.reg_lr
        return [
            {"params": list(self.gates.parameters()), "lr": reg, "weight_decay": 0.0},
            {"params": list(self.lagrangian.parameters()), "lr": reg, "weight_decay": 0.0},
        ] + self.distiller.param_groups()


def prune(cfg: PruneConfig, resume: bool = True) -> Path:
    """Prune cfg.student to cfg.target_sparsity with distillation from cfg.teacher, slice it,
    fine-tune the sliced model with distillation, and save it under <out>/model."""
    if cfg.cost not in ("params", "flops"):
        raise ValueError(f"unknown cost mode {cfg.cost!r} (params | flops)")
    if not 0.0 < cfg.target_sparsity < 1.0:
        raise ValueError("target_sparsity must be in (0, 1)")
    ctx = start_run(cfg)
    t = load_model_dir(cfg.teacher, ctx.device)
    s = load_model_dir(cfg.student, ctx.device)
    adopt_image_spec(ctx, cfg, t.preprocessing.image, "teacher")
    if s.model.config.vocab_size != t.model.config.vocab_size or s.model.config.answers != t.model.config.answers:
        raise ValueError("student and teacher must share the tokenizer and answer vocabulary")
    student = s.model.train()
    data, vqa_val = load_data_for(cfg, ctx, t.tokenizer, student.config.answers, student.config.bos_token_id)
    sliced_dir = ctx.out / "sliced"
    if not (sliced_dir / "model.safetensors").is_file():
        tokens = TokenCounts(text=cfg.text_tokens, caption=cfg.text_tokens)
        gates = HardConcreteGates(student.config, cfg.cost, tokens, cfg.head_init, cfg.ffn_init).to(ctx.device)
        # no mid-run validation here: it would score the ungated model
        phase = dataclasses.replace(cfg, steps=cfg.prune_steps, eval_every=0)
        pruner = Pruner(Distiller(student, t.model, cfg), gates, cfg, int(cfg.ramp_fraction * cfg.prune_steps))
        fit(
            phase,
            ctx,
            student,
            pruner,
            data,
            t.tokenizer,
            vqa_val,
            resume,
            pruner.param_groups(),
            log_name="prune_log.jsonl",
            checkpoint_name="checkpoint_prune.pt",
        )
        masks = gates.gates("deterministic")
        sliced = slice_model(student, masks)
        if ctx.is_main:
            save_run(phase, ctx, sliced, t.tokenizer, name="sliced")
            (ctx.out / "masks.json").write_text(
                json.dumps(
                    {
                        "expected_sparsity": float(gates.expected_sparsity().detach()),
                        "mask_sparsity": gates.sparsity_of(masks),
                        "cost": cfg.cost,
                        "target": cfg.target_sparsity,
                        "masks": {f"{st}_{k}": [m.int().tolist() for m in ms] for (st, k), ms in masks.items()},
                    }
                )
                + "\n"
            )
    sliced = load_model_dir(sliced_dir, ctx.device).model.train()
    if cfg.finetune_steps > 0:
        phase = dataclasses.replace(cfg, steps=cfg.finetune_steps)
        distiller = Distiller(sliced, t.model, cfg)
        extra = distiller.param_groups()
        fit(
            phase,
            ctx,
            sliced,
            distiller,
            data,
            t.tokenizer,
            vqa_val,
            resume,
            extra,
            log_name="finetune_log.jsonl",
            checkpoint_name="checkpoint_finetune.pt",
        )
    final = save_run(cfg, ctx, sliced, t.tokenizer)
    end_run(ctx)
    return final
