"""The trimmed VQA forward pass and its FLOPs: SmartTrim-style per-instance trimming of tokens and
attention heads (the model side; training and calibration are compression/trim.py).

Every vision, text and fusion layer gets a token trimmer (keep-logit per token from the token, its
stream's pooled kept state and the other modality's pooled state) and every attention block a
head trimmer (modeling.Trimmers). Masks are cumulative: a token dropped before layer l is never
attended to again and its state is frozen; [CLS] is always kept.

Streams run text -> vision -> fusion so each trimmer sees the other modality's best available
summary: the text trimmers the mean image patch embedding, the vision trimmers the question's
[CLS], the fusion trimmers the image [CLS].

Execution modes, one set of weights (`Trim.mode`):
  train   straight-through Gumbel gates; soft keep-masks carry gradients into attention
          (log-keep key bias, as DynamicViT) and into the frozen-state blend.
  mask    deterministic keep = p > threshold, static shapes (keep-masks -> key bias).
  gather  dropped tokens are removed (batch 1: exactly the kept tokens; batches: padded up to
          a bucket of the stream's length, the padding masked), and at batch 1 dropped heads
          are skipped by slicing their weights. Same outputs as mask within fp tolerance.

`trimmed_flops` counts the FLOPs a trace of kept tokens and heads costs (trimmers included),
differentiably, so the same formula drives the training cost and the reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compression.config import ModelConfig
from compression.flops import attention_flops, ffn_flops
from compression.modeling import TextLayer, TrimVLM, VisionLayer, key_bias

DEFAULT_BUCKETS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)
LOG_KEEP_EPS = 1e-6


@dataclass
class Trim:
    """How to run the trimmers. enabled=False runs the same code untrimmed (the full model)."""

    mode: str = "mask"  # train | mask | gather
    token_threshold: float = 0.5
    head_threshold: float = 0.5
    tau: float = 1.0  # Gumbel temperature (train)
    buckets: tuple[float, ...] = DEFAULT_BUCKETS  # gather with batch > 1
    enabled: bool = True
    skip_heads: bool = True  # gather at batch 1: skip dropped heads (Python-side; off for ONNX export)

    def __post_init__(self) -> None:
        if self.mode not in ("train", "mask", "gather"):
            raise ValueError(f"unknown trim mode {self.mode!r} (train | mask | gather)")


@dataclass
class TrimTrace:
    """Per-sample kept counts ([B] tensors; soft in training) that the FLOPs formula reads."""

    text_len: torch.Tensor  # real (unpadded) question tokens
    vision_tokens: list = field(default_factory=list)  # tokens entering each vision layer
    text_tokens: list = field(default_factory=list)
    fusion_tokens: list = field(default_factory=list)
    image_kv: torch.Tensor | None = None  # image tokens the fusion cross-attention reads
    vision_heads: list = field(default_factory=list)
    text_heads: list = field(default_factory=list)
    fusion_self_heads: list = field(default_factory=list)
    fusion_cross_heads: list = field(default_factory=list)
    scored: dict = field(default_factory=lambda: {"vision": [], "text": [], "fusion": []})  # tokens each trimmer scored
    image_keep: torch.Tensor | None = None  # [B, N_img] final kept image tokens (original positions)
    trimmed: bool = True


# ----------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------


def gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through binary Gumbel (logistic noise): hard 0/1 forward, sigmoid gradient."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def keep_decision(logits: torch.Tensor, trim: Trim, threshold: float) -> torch.Tensor:
    """Keep gate from keep-logits: sampled in training, `sigmoid(logit) > threshold` otherwise."""
    if trim.mode == "train":
        return gumbel_keep(logits, trim.tau)
    return (torch.sigmoid(logits) > threshold).to(logits.dtype)


def masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = keep.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def attention_bias(keep: torch.Tensor, trim: Trim, dtype: torch.dtype) -> torch.Tensor:
    """Key bias from a keep-mask: log(keep) in training (differentiable, DynamicViT-style),
    a hard -inf-like mask otherwise."""
    if trim.mode == "train":
        return torch.log(keep.to(dtype) + LOG_KEEP_EPS)[:, None, None, :]
    return key_bias(keep.bool(), dtype)


def blend(new: torch.Tensor, old: torch.Tensor, keep: torch.Tensor, trim: Trim) -> torch.Tensor:
    """Dropped tokens keep their incoming state (zero residual update)."""
    if trim.mode == "train":
        k = keep.to(new.dtype)[..., None]
        return k * new + (1 - k) * old
    return torch.where(keep.bool()[..., None], new, old)


def bucket_size(count: int, n: int, buckets: tuple[float, ...]) -> int:
    """Smallest bucket (a fraction of the stream length n) holding `count` tokens."""
    sizes = sorted({max(1, math.ceil(f * n)) for f in buckets} | {n})
    return next(s for s in sizes if s >= count)


def compact(x: torch.Tensor, keep: torch.Tensor, pos: torch.Tensor, size: int):
    """Keep `size` slots per sample: the kept tokens (and, to fill a bucket, the first dropped
    ones, which stay masked), in their original order."""
    n = x.shape[1]
    order = (~keep.bool()).long() * n + torch.arange(n, device=x.device)
    idx = order.topk(size, dim=1, largest=False).indices.sort(dim=1).values
    x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return x, keep.gather(1, idx), pos.gather(1, idx)


class Stream:
    """A token stream being trimmed: states, keep-mask and the tokens' original positions."""

    def __init__(self, x: torch.Tensor, keep: torch.Tensor, trim: Trim, dense: bool = False):
        self.x, self.keep, self.trim = x, keep, trim
        self.pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        self.length = x.shape[1]
        # dense: every token present is kept (known when tracing), so masks are skipped entirely;
        # true at batch 1 in gather mode, where dropped tokens are gone
        self.dense = dense

    def pooled(self) -> torch.Tensor:
        return self.x.mean(1) if self.dense else masked_mean(self.x, self.keep)

    def bias(self) -> torch.Tensor | None:
        return None if self.dense else attention_bias(self.keep, self.trim, self.x.dtype)

    def update(self, new: torch.Tensor) -> None:
        self.x = new if self.dense else blend(new, self.x, self.keep, self.trim)

    def drop(self, trimmer: nn.Module, other: torch.Tensor, scored: list) -> torch.Tensor:
        """Run a token trimmer, update the cumulative keep-mask ([CLS] forced) and, in gather
        mode, remove dropped tokens. Returns the tokens entering the layer, per sample."""
        trim = self.trim
        scored.append(self.keep.to(self.x.dtype).sum(1))
        # Trimmers read the backbone's features without writing back: the FLOPs cost (weighted
        # heavily) would otherwise push the backbone's features around to move the gates.
        logits = trimmer(self.x.detach(), self.pooled().detach(), other.detach())
        new = keep_decision(logits, trim, trim.token_threshold)
        new = torch.cat([torch.ones_like(new[:, :1]), new[:, 1:]], dim=1)
        self.keep = self.keep.to(new.dtype) * new
        self.dense = False
        if trim.mode == "gather":
            if self.x.shape[0] == 1:
                self.select(self.keep[0].nonzero().squeeze(1))
            else:
                size = bucket_size(int(self.keep.sum(1).max().item()), self.length, trim.buckets)
                if size < self.x.shape[1]:
                    self.x, self.keep, self.pos = compact(self.x, self.keep, self.pos, size)
        return self.keep.sum(1)

    def select(self, idx: torch.Tensor) -> None:
        """Batch 1: keep only the tokens at idx (NonZero + Gather when exported: no host sync)."""
        self.x, self.keep, self.pos = self.x.index_select(1, idx), self.keep.index_select(1, idx), self.pos.index_select(1, idx)
        self.dense = True


def head_gate(trimmer: nn.Module, own: torch.Tensor, other: torch.Tensor, trim: Trim) -> torch.Tensor | None:
    if trimmer.proj.out_features == 0:
        return None
    return keep_decision(trimmer(own.detach(), other.detach()), trim, trim.head_threshold)


# ----------------------------------------------------------------------------------------------
# Batch-1 head skipping (gather mode): slice the kept heads' weights
# ----------------------------------------------------------------------------------------------


def _head_runs(gate: torch.Tensor) -> list[tuple[int, int]]:
    """Kept heads of a batch-1 gate as runs [a, b) of consecutive heads: each run's weights are
    a contiguous row block (a view, no copy), so skipping heads costs no weight traffic."""
    kept = gate[0].bool().tolist()
    runs, start = [], None
    for h, k in enumerate(kept + [False]):
        if k and start is None:
            start = h
        elif not k and start is not None:
            runs.append((start, h))
            start = None
    return runs


def _sdpa(q, k, v, head_dim: int, bias):
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    heads = q.shape[-1] // head_dim
    q = q.view(b, nq, heads, head_dim).transpose(1, 2)
    k = k.view(b, nk, heads, head_dim).transpose(1, 2)
    v = v.view(b, nk, heads, head_dim).transpose(1, 2)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return ctx.transpose(1, 2).reshape(b, nq, heads * head_dim)


def _attend_runs(x, kv_states, bias, runs, d, q_w, q_b, k_w, k_b, v_w, v_b, o_w):
    """Attention of the kept head runs; returns the output projection without its bias."""
    out = 0
    for a, b in runs:
        r = slice(a * d, b * d)
        q = F.linear(x, q_w[r], q_b[r])
        k = F.linear(kv_states, k_w[r], k_b[r])
        v = F.linear(kv_states, v_w[r], v_b[r])
        out = out + F.linear(_sdpa(q, k, v, d, bias), o_w[:, r])
    return out


def vision_attention_kept(attn, x, bias, gate):
    """VisionAttention over the kept heads only (batch 1)."""
    w, d = attn.n_heads * attn.head_dim, attn.head_dim
    W, B = attn.qkv.weight, attn.qkv.bias
    runs = _head_runs(gate)
    out = _attend_runs(
        x, x, bias, runs, d, W[:w], B[:w], W[w : 2 * w], B[w : 2 * w], W[2 * w :], B[2 * w :], attn.projection.weight
    )
    return out + attn.projection.bias


def bert_attention_kept(block, x, kv_states, bias, gate):
    """BertAttention (self or cross) over the kept heads only (batch 1); kv_states: keys' input."""
    s, dense = block.self, block.output.dense
    runs = _head_runs(gate)
    args = (s.query.weight, s.query.bias, s.key.weight, s.key.bias, s.value.weight, s.value.bias, dense.weight)
    out = _attend_runs(x, kv_states, bias, runs, s.head_dim, *args)
    return block.output.LayerNorm(x + out + dense.bias)


def _slice_heads(trim: Trim, x: torch.Tensor, gate) -> bool:
    """Skip dropped heads for real: gather mode, batch 1, and some head actually dropped."""
    if not (trim.mode == "gather" and trim.enabled and trim.skip_heads and gate is not None and x.shape[0] == 1):
        return False
    return not bool(gate.all())


def run_vision_layer(layer: VisionLayer, x, bias, gate, trim: Trim):
    if _slice_heads(trim, x, gate):
        h = x + vision_attention_kept(layer.self_attn, layer.layer_norm1(x), bias, gate)
        return h + layer.mlp(layer.layer_norm2(h))
    return layer(x, bias, gate)[0]


def run_fusion_layer(layer: TextLayer, x, self_bias, image, enc_bias, gate, cross_gate, trim: Trim):
    """One BERT layer (self-attention, optional cross-attention to `image`, FFN)."""
    if _slice_heads(trim, x, gate):
        h = bert_attention_kept(layer.attention, x, x, self_bias, gate)
    else:
        h = layer.attention(x, None, self_bias, gate)[0]
    if image is not None:
        if _slice_heads(trim, x, cross_gate):
            h = bert_attention_kept(layer.crossattention, h, image, enc_bias, cross_gate)
        else:
            h = layer.crossattention(h, layer.crossattention.project_kv(image), enc_bias, cross_gate)[0]
    return layer.output.LayerNorm(h + layer.output.dense(F.gelu(layer.intermediate.dense(h))))


# ----------------------------------------------------------------------------------------------
# Trimmed VQA forward
# ----------------------------------------------------------------------------------------------


def trimmed_vqa_forward(
    model: TrimVLM, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, trim: Trim, trimmers: nn.Module | None = None
) -> tuple[torch.Tensor, TrimTrace]:
    """VQA classifier logits with per-instance trimming, and the trace of what was kept.
    trimmers: defaults to the model's own (training passes them separately)."""
    tr = trimmers if trimmers is not None else model.trimmers
    on = trim.enabled
    if on and tr is None:
        raise ValueError("this model has no trimmers (config.trimming is unset): run `trimvlm trim` first")
    dtype = pixels.dtype if pixels.is_floating_point() else torch.float32
    trace = TrimTrace(text_len=mask.sum(1).to(dtype), trimmed=on)

    # Text encoder; its trimmers see the mean image patch embedding.
    image_emb = model.vision_model.embeddings(pixels)
    pooled_patches = image_emb[:, 1:].mean(1)
    t = Stream(model.text_encoder.embeddings(ids), mask.bool(), trim)
    if trim.mode == "gather" and ids.shape[0] == 1:  # batch 1 runs unpadded
        t.select(mask[0].nonzero().squeeze(1))
    for i, layer in enumerate(model.text_encoder.encoder.layer):
        gate = None
        if on:
            trace.text_tokens.append(t.drop(tr.text_tokens[i], pooled_patches, trace.scored["text"]))
            gate = head_gate(tr.text_heads[i], t.pooled(), pooled_patches, trim)
            trace.text_heads.append(_count(gate, layer.attention.self.n_heads, t.x))
        t.update(run_fusion_layer(layer, t.x, t.bias(), None, None, gate, None, trim))
    question = t.x[:, 0]

    # Vision encoder; its trimmers see the question.
    v = Stream(image_emb, torch.ones(image_emb.shape[:2], dtype=torch.bool, device=image_emb.device), trim, dense=True)
    for i, layer in enumerate(model.vision_model.encoder.layers):
        gate = None
        if on:
            trace.vision_tokens.append(v.drop(tr.vision_tokens[i], question, trace.scored["vision"]))
            gate = head_gate(tr.vision_heads[i], v.pooled(), question, trim)
            trace.vision_heads.append(_count(gate, layer.self_attn.n_heads, v.x))
        v.update(run_vision_layer(layer, v.x, v.bias(), gate, trim))
    image = model.vision_model.post_layernorm(v.x)
    image_bias = v.bias()
    trace.image_kv = v.keep.to(dtype).sum(1)
    full_keep = torch.zeros(image_emb.shape[:2], dtype=dtype, device=image.device)
    trace.image_keep = full_keep.scatter(1, v.pos, v.keep.to(dtype).detach())

    # Fusion encoder: the text stream continues; its trimmers see the image [CLS].
    image_cls = image[:, 0]
    for i, layer in enumerate(model.fusion_encoder.layer):
        gate = cross = None
        if on:
            trace.fusion_tokens.append(t.drop(tr.fusion_tokens[i], image_cls, trace.scored["fusion"]))
            own = t.pooled()
            gate = head_gate(tr.fusion_self_heads[i], own, image_cls, trim)
            cross = head_gate(tr.fusion_cross_heads[i], own, image_cls, trim)
            trace.fusion_self_heads.append(_count(gate, layer.attention.self.n_heads, t.x))
            trace.fusion_cross_heads.append(_count(cross, layer.crossattention.self.n_heads, t.x))
        t.update(run_fusion_layer(layer, t.x, t.bias(), image, image_bias, gate, cross, trim))
    return model.vqa_logits(t.x), trace


def _count(gate: torch.Tensor | None, heads: int, x: torch.Tensor) -> torch.Tensor:
    if gate is None:
        return torch.full((x.shape[0],), float(heads), device=x.device)
    return gate.sum(-1) if gate.dim() == 2 else gate.sum().expand(x.shape[0])


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def trimmed_flops(cfg: ModelConfig, trace: TrimTrace) -> torch.Tensor:
    """Per-sample VQA forward FLOPs ([B]) of what the trace kept, trimmers included; with an
    untrimmed trace (trace.trimmed False) the full model's FLOPs at the real question length.
    Same conventions as compression.flops (2 x MACs of every matmul)."""
    n_text = trace.text_len
    n_img = float(cfg.num_image_tokens)
    on = trace.trimmed
    vw, tw, vhd, thd = cfg.vision_width, cfg.text_width, cfg.vision_head_dim, cfg.text_head_dim
    hidden = int((cfg.trimming or {}).get("hidden", 32))
    total = n_text * 0 + 2 * cfg.num_patches * (3 * cfg.patch_size**2) * vw  # patch embedding

    def tokens(lst, i, default):
        return lst[i] if on else default

    def heads(lst, i, default):
        return lst[i] if on else default

    for i, (h, m) in enumerate(zip(cfg.text_heads, cfg.text_mlp, strict=True)):
        n, k = tokens(trace.text_tokens, i, n_text), heads(trace.text_heads, i, h)
        total = total + attention_flops(n, n, tw, tw, k, thd, tw) + ffn_flops(n, tw, m)
    for i, (h, m) in enumerate(zip(cfg.vision_heads, cfg.vision_mlp, strict=True)):
        n, k = tokens(trace.vision_tokens, i, n_img), heads(trace.vision_heads, i, h)
        total = total + attention_flops(n, n, vw, vw, k, vhd, vw) + ffn_flops(n, vw, m)
    n_kv = trace.image_kv if on else n_img
    for i, (h, c, m) in enumerate(zip(cfg.fusion_self_heads, cfg.fusion_cross_heads, cfg.fusion_mlp, strict=True)):
        n = tokens(trace.fusion_tokens, i, n_text)
        k, kc = heads(trace.fusion_self_heads, i, h), heads(trace.fusion_cross_heads, i, c)
        total = total + attention_flops(n, n, tw, tw, k, thd, tw)
        total = total + attention_flops(n, n_kv, tw, vw, kc, thd, tw) + ffn_flops(n, tw, m)
    total = total + 2 * (tw * 2 * tw + 2 * tw * cfg.num_answers)  # VQA head
    if on:
        total = total + trimmer_flops(cfg, trace, hidden)
    return total


def trimmer_flops(cfg: ModelConfig, trace: TrimTrace, hidden: int) -> torch.Tensor:
    """The trimmers' own cost: per scored token a width->hidden->1 MLP, per sample the pooled
    projections and one head-trimmer matmul per attention block."""
    vw, tw = cfg.vision_width, cfg.text_width
    total = 0
    for stream, width, other in (("vision", vw, tw), ("text", tw, vw), ("fusion", tw, vw)):
        for n in trace.scored[stream]:
            total = total + n * 2 * (width * hidden + hidden) + 2 * (width + other) * hidden
    blocks = [(vw + tw, h) for h in cfg.vision_heads] + [(tw + vw, h) for h in cfg.text_heads]
    blocks += [(tw + vw, h) for h in cfg.fusion_self_heads] + [(tw + vw, h) for h in cfg.fusion_cross_heads]
    return total + sum(2 * i * h for i, h in blocks)


def flops_ratio(cfg: ModelConfig, trace: TrimTrace) -> torch.Tensor:
    """Per-sample trimmed / untrimmed FLOPs at the same question."""
    full = trimmed_flops(cfg, TrimTrace(text_len=trace.text_len, trimmed=False))
    return trimmed_flops(cfg, trace) / full
