"""The TrimVLM model family: a BLIP / X-VLM-style vision-language model in one file.

Top-down: attention primitive, vision layer (ViT, pre-LN), text layer (BERT, post-LN, with
optional cross-attention and causal self-attention), the four stacks, then the model with its
heads (ITC, ITM, VQA classifier, LM head for captions and generative answers).

Parameter names follow Hugging Face BLIP (`vision_model.encoder.layers.N.self_attn.qkv`,
`text_encoder.encoder.layer.N.attention.self.query`, `text_decoder.bert...`, `itm_head`,
`vision_proj`, `text_proj`, `temp`) so a BLIP checkpoint maps key-for-key; BLIP's text encoder
layers, which all carry cross-attention, map onto our `fusion_encoder`.

Every attention can return its probabilities (for distillation) and accepts a per-head gate
(for pruning); every layer accepts a token keep-mask (for trimming): dropped tokens stop being
attended to and their hidden state is frozen from that layer on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compression.config import ModelConfig

# Per-layer optional controls: a tensor per layer or None (see the module docstring).
Gates = list[torch.Tensor | None] | None


def _gate_for(gates: Gates, i: int) -> torch.Tensor | None:
    return None if gates is None else gates[i]


def key_bias(key_mask: torch.Tensor | None, dtype: torch.dtype, causal_len: int | None = None) -> torch.Tensor | None:
    """Boolean keep-mask(s) -> one additive attention bias.

    key_mask: [B, Nk] (True = may be attended). causal_len: also apply a causal mask for a
    query block of that length aligned to the end of the keys (KV-cache decoding).
    Combining as booleans first avoids adding two large negatives (overflow to -inf / NaN).
    """
    allowed = None
    if key_mask is not None:
        allowed = key_mask[:, None, None, :].bool()
    if causal_len is not None:
        nk = key_mask.shape[1] if key_mask is not None else causal_len
        q_pos = torch.arange(nk - causal_len, nk, device=key_mask.device if key_mask is not None else None)
        k_pos = torch.arange(nk, device=q_pos.device)
        causal = (k_pos[None, :] <= q_pos[:, None])[None, None]
        allowed = causal if allowed is None else (allowed & causal)
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def multi_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_heads: int,
    head_dim: int,
    bias: torch.Tensor | None,
    head_gate: torch.Tensor | None = None,
    need_probs: bool = False,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention over projected q [B,Nq,H*d], k/v [B,Nk,H*d] or k/v already
    split into heads, [B,H,Nk,d] (the decoder's cache in the `heads` layout).

    Returns the context [B, Nq, H*d] and, if asked, probabilities [B, H, Nq, Nk].
    head_gate ([H] or [B, H]) scales each head's context before the output projection, as
    the hard-concrete pruning gates and SmartTrim head trimmers do.
    """
    b, nq, _ = q.shape
    nk = k.shape[-2]
    if n_heads == 0:  # fully pruned block: only the output projection's bias remains
        probs = q.new_zeros(b, 0, nq, nk) if need_probs else None
        return q.new_zeros(b, nq, 0), probs
    q = q.view(b, nq, n_heads, head_dim).transpose(1, 2)
    split = k.dim() == 4
    if not split:
        k = k.view(b, nk, n_heads, head_dim).transpose(1, 2)
        v = v.view(b, nk, n_heads, head_dim).transpose(1, 2)
    probs = None
    if need_probs or split:
        # Head-split K/V (a decoder cache) take the plain matmuls too: exported, K is read through
        # a transposed MatMul and V as it is, where SDPA's ONNX form transposes and scales all of
        # K at every call. The query is scaled instead (one token per decoding step).
        if split:
            scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-1, -2)
        else:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        if bias is not None:
            scores = scores + bias
        p = scores.softmax(dim=-1)
        ctx = F.dropout(p, dropout, training=dropout > 0) @ v
        probs = p if need_probs else None
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    if head_gate is not None:
        gate = head_gate.view(-1, n_heads, 1, 1) if head_gate.dim() == 2 else head_gate.view(1, n_heads, 1, 1)
        ctx = ctx * gate.to(ctx.dtype)
    return ctx.transpose(1, 2).reshape(b, nq, n_heads * head_dim), probs


def _freeze_dropped(new: torch.Tensor, old: torch.Tensor, token_keep: torch.Tensor | None) -> torch.Tensor:
    """Trimming: a dropped token keeps its incoming state (zero residual update)."""
    if token_keep is None:
        return new
    return torch.where(token_keep[..., None].bool(), new, old)


def _gate_ffn(h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    if gate is None:
        return h
    return h * (gate.view(-1, 1, gate.shape[-1]) if gate.dim() == 2 else gate).to(h.dtype)


# ----------------------------------------------------------------------------------------------
# Vision encoder (HF BlipVisionModel names)
# ----------------------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    def __init__(self, width: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        self.qkv = nn.Linear(width, 3 * n_heads * head_dim)
        self.projection = nn.Linear(n_heads * head_dim, width)

    def forward(self, x, bias=None, head_gate=None, need_probs=False):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        drop = self.dropout if self.training else 0.0
        ctx, probs = multi_head_attention(q, k, v, self.n_heads, self.head_dim, bias, head_gate, need_probs, drop)
        return self.projection(ctx), probs


class VisionMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x, gate=None):
        return self.fc2(_gate_ffn(F.gelu(self.fc1(x)), gate))


class VisionLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        w = cfg.vision_width
        self.self_attn = VisionAttention(w, cfg.vision_heads[i], cfg.vision_head_dim, cfg.attention_dropout)
        self.layer_norm1 = nn.LayerNorm(w, eps=cfg.vision_layer_norm_eps)
        self.mlp = VisionMLP(w, cfg.vision_mlp[i])
        self.layer_norm2 = nn.LayerNorm(w, eps=cfg.vision_layer_norm_eps)

    def forward(self, x, bias=None, head_gate=None, ffn_gate=None, token_keep=None, need_probs=False):
        attn, probs = self.self_attn(self.layer_norm1(x), bias, head_gate, need_probs)
        h = x + attn
        h = h + self.mlp(self.layer_norm2(h), ffn_gate)
        return _freeze_dropped(h, x, token_keep), probs


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.vision_width
        self.class_embedding = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.patch_embedding = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.num_image_tokens, w) * 0.02)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, i) for i in range(len(cfg.vision_heads)))


@dataclass
class StackOutput:
    last_hidden_state: torch.Tensor
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # embeddings + each layer
    attentions: list[torch.Tensor] = field(default_factory=list)
    cross_attentions: list[torch.Tensor] = field(default_factory=list)
    past_key_values: list | None = None


class VisionModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoderLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_layer_norm_eps)

    def forward(
        self,
        pixel_values,
        head_gates: Gates = None,
        ffn_gates: Gates = None,
        token_keep: Gates = None,
        output_attentions=False,
        output_hidden_states=False,
    ) -> StackOutput:
        x = self.embeddings(pixel_values)
        out = StackOutput(x)
        if output_hidden_states:
            out.hidden_states.append(x)
        for i, layer in enumerate(self.encoder.layers):
            keep = _gate_for(token_keep, i)
            bias = key_bias(keep, x.dtype) if keep is not None else None
            x, probs = layer(x, bias, _gate_for(head_gates, i), _gate_for(ffn_gates, i), keep, output_attentions)
            if output_hidden_states:
                out.hidden_states.append(x)
            if output_attentions:
                out.attentions.append(probs)
        out.last_hidden_state = self.post_layernorm(x)
        return out


# ----------------------------------------------------------------------------------------------
# Text side (HF BlipText / BERT names)
# ----------------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, kv_width: int, n_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, head_dim, dropout
        inner = n_heads * head_dim
        self.query = nn.Linear(width, inner)
        self.key = nn.Linear(kv_width, inner)
        self.value = nn.Linear(kv_width, inner)


class BertOutput(nn.Module):
    """`output` of an attention block or of the FFN: dense projection, then post-LN (BERT)."""

    def __init__(self, inner: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(inner, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)


class BertAttention(nn.Module):
    """`attention` / `crossattention` block: self (q, k, v) + output (dense, LayerNorm)."""

    def __init__(self, width: int, kv_width: int, n_heads: int, head_dim: int, eps: float, dropout: float):
        super().__init__()
        self.self = BertSelfAttention(width, kv_width, n_heads, head_dim, dropout)
        self.output = BertOutput(n_heads * head_dim, width, eps)

    def project_kv(self, states: torch.Tensor, heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of states [B, N, D]: [B, N, H*d], or split into heads [B, H, N, d]."""
        k, v = self.self.key(states), self.self.value(states)
        if heads:
            b, n, _ = k.shape
            k, v = (t.view(b, n, self.self.n_heads, self.self.head_dim).transpose(1, 2) for t in (k, v))
        return k, v

    def forward(self, x, kv=None, bias=None, head_gate=None, need_probs=False, past_kv=None, kv_heads=False):
        """kv: precomputed (k, v) (cross-attention cache) or None to project from x.
        past_kv: cached self-attention (k, v) to which this step's k, v are appended.
        kv_heads: the self-attention cache (past_kv and the returned k, v) is head-split."""
        s = self.self
        q = s.query(x)
        k, v = kv if kv is not None else self.project_kv(x, kv_heads)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=-2)  # the token axis of either layout
            v = torch.cat([past_kv[1], v], dim=-2)
        drop = s.dropout if self.training else 0.0
        ctx, probs = multi_head_attention(q, k, v, s.n_heads, s.head_dim, bias, head_gate, need_probs, drop)
        out = self.output.LayerNorm(x + self.output.dense(ctx))
        return out, probs, (k, v)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)


class TextLayer(nn.Module):
    """BERT layer; with cross_heads set it gains `crossattention` (fusion encoder, decoder)."""

    def __init__(
        self, cfg: ModelConfig, self_heads: int, mlp: int, cross_heads: int | None = None, cross_width: int | None = None
    ):
        super().__init__()
        w, eps, hd = cfg.text_width, cfg.text_layer_norm_eps, cfg.text_head_dim
        self.attention = BertAttention(w, w, self_heads, hd, eps, cfg.attention_dropout)
        self.has_cross = cross_heads is not None
        if self.has_cross:
            self.crossattention = BertAttention(w, cross_width, cross_heads, hd, eps, cfg.attention_dropout)
        self.intermediate = BertIntermediate(w, mlp)
        self.output = BertOutput(mlp, w, eps)

    def forward(
        self,
        x,
        self_bias=None,
        enc_kv=None,
        enc_bias=None,
        head_gate=None,
        cross_head_gate=None,
        ffn_gate=None,
        token_keep=None,
        need_probs=False,
        past_kv=None,
        kv_heads=False,
    ):
        """enc_kv: cross-attention (k, v) already projected from the encoder states, or None to
        run text-only (fusion encoder without an image). kv_heads: the self-attention cache is
        head-split (BertAttention.forward)."""
        h, probs, self_kv = self.attention(x, None, self_bias, head_gate, need_probs, past_kv, kv_heads)
        cross_probs = None
        if self.has_cross and enc_kv is not None:
            h, cross_probs, _ = self.crossattention(h, enc_kv, enc_bias, cross_head_gate, need_probs)
        inter = _gate_ffn(F.gelu(self.intermediate.dense(h)), ffn_gate)
        out = self.output.LayerNorm(h + self.output.dense(inter))
        return _freeze_dropped(out, x, token_keep), probs, cross_probs, self_kv


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_layer_norm_eps)

    def forward(self, input_ids, past_length: int = 0):
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class TextLayers(nn.Module):
    def __init__(self, layers: list[TextLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """Unimodal text encoder (N_t layers, self-attention only)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextLayers([TextLayer(cfg, h, m) for h, m in zip(cfg.text_heads, cfg.text_mlp, strict=True)])

    def forward(
        self,
        input_ids,
        attention_mask,
        head_gates: Gates = None,
        ffn_gates: Gates = None,
        token_keep: Gates = None,
        output_attentions=False,
        output_hidden_states=False,
    ) -> StackOutput:
        x = self.embeddings(input_ids)
        return run_text_stack(
            self.encoder.layer,
            x,
            attention_mask,
            None,
            None,
            head_gates,
            None,
            ffn_gates,
            token_keep,
            output_attentions,
            output_hidden_states,
        )


def run_text_stack(
    layers,
    x,
    attention_mask,
    enc_kv_per_layer,
    enc_mask,
    head_gates,
    cross_head_gates,
    ffn_gates,
    token_keep,
    output_attentions,
    output_hidden_states,
) -> StackOutput:
    """Run BERT layers over x with padding (and trimming) masks; encoder states optional."""
    out = StackOutput(x)
    if output_hidden_states:
        out.hidden_states.append(x)
    enc_bias = key_bias(enc_mask, x.dtype) if enc_mask is not None else None
    for i, layer in enumerate(layers):
        keep = _gate_for(token_keep, i)
        mask = attention_mask if keep is None else (attention_mask.bool() & keep.bool())
        enc_kv = enc_kv_per_layer[i] if enc_kv_per_layer is not None else None
        x, probs, cross_probs, _ = layer(
            x,
            key_bias(mask, x.dtype),
            enc_kv,
            enc_bias,
            _gate_for(head_gates, i),
            _gate_for(cross_head_gates, i),
            _gate_for(ffn_gates, i),
            keep,
            output_attentions,
        )
        if output_hidden_states:
            out.hidden_states.append(x)
        if output_attentions:
            out.attentions.append(probs)
            out.cross_attentions.append(cross_probs)
    out.last_hidden_state = x
    return out


class FusionEncoder(nn.Module):
    """Fusion encoder (N_f layers): self-attention, cross-attention to image tokens, FFN.

    Without image states it runs text-only (cross-attention skipped), as BLIP's text encoder
    does for ITC."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            TextLayer(cfg, h, m, c, cfg.vision_width)
            for h, m, c in zip(cfg.fusion_self_heads, cfg.fusion_mlp, cfg.fusion_cross_heads, strict=True)
        )

    def forward(
        self,
        text_states,
        attention_mask,
        image_states=None,
        image_mask=None,
        head_gates: Gates = None,
        cross_head_gates: Gates = None,
        ffn_gates: Gates = None,
        token_keep: Gates = None,
        output_attentions=False,
        output_hidden_states=False,
    ) -> StackOutput:
        enc_kv = None
        if image_states is not None:
            enc_kv = [layer.crossattention.project_kv(image_states) for layer in self.layer]
            if image_mask is None:
                image_mask = torch.ones(image_states.shape[:2], dtype=torch.bool, device=image_states.device)
        return run_text_stack(
            self.layer,
            text_states,
            attention_mask,
            enc_kv,
            image_mask,
            head_gates,
            cross_head_gates,
            ffn_gates,
            token_keep,
            output_attentions,
            output_hidden_states,
        )


class LMPredictionTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_layer_norm_eps)


class LMPredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = LMPredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.text_width, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(h) + self.bias


class LMHeads(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.predictions = LMPredictionHead(cfg)


class DecoderBert(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextLayers(
            [
                TextLayer(cfg, h, m, c, cfg.cross_width)
                for h, m, c in zip(cfg.decoder_self_heads, cfg.decoder_mlp, cfg.decoder_cross_heads, strict=True)
            ]
        )


class TextDecoder(nn.Module):
    """Causal decoder (N_d layers) with cross-attention and a KV cache; LM head tied to its
    word embeddings (BERT/BLIP convention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = DecoderBert(cfg)
        self.cls = LMHeads(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def cross_kv(self, encoder_states: torch.Tensor, heads: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values: computed once per image, reused at every step.
        heads: split into heads, [B, H, N, d] (then the self-attention cache is too, see forward)."""
        return [layer.crossattention.project_kv(encoder_states, heads) for layer in self.bert.encoder.layer]

    def forward(
        self,
        input_ids,
        attention_mask,
        encoder_states=None,
        encoder_mask=None,
        cross_kv=None,
        past_key_values=None,
        use_cache=False,
        head_gates: Gates = None,
        cross_head_gates: Gates = None,
        ffn_gates: Gates = None,
        output_attentions=False,
        output_hidden_states=False,
    ) -> tuple[torch.Tensor, StackOutput]:
        """Logits for input_ids [B, L]. attention_mask covers past + current tokens [B, P+L].
        With past_key_values, input_ids holds only the new tokens.

        K/V layouts: cross_kv and the self-attention cache are [B, tokens, H*d] (`tokens`), or,
        when cross_kv comes head-split ([B, H, tokens, d], `cross_kv(..., heads=True)`), the
        cache is head-split too (`heads`: what the exported decoder graphs keep, no transposes
        of the cache per step)."""
        past_len = past_key_values[0][0].shape[-2] if past_key_values else 0
        x = self.bert.embeddings(input_ids, past_len)
        if cross_kv is None:
            cross_kv = self.cross_kv(encoder_states)
        kv_heads = cross_kv[0][0].dim() == 4
        if encoder_mask is None:
            n_enc = cross_kv[0][0].shape[-2]
            encoder_mask = torch.ones(x.shape[0], n_enc, dtype=torch.bool, device=x.device)
        self_bias = key_bias(attention_mask, x.dtype, causal_len=input_ids.shape[1])
        enc_bias = key_bias(encoder_mask, x.dtype)
        out = StackOutput(x, past_key_values=[] if use_cache else None)
        if output_hidden_states:
            out.hidden_states.append(x)
        for i, layer in enumerate(self.bert.encoder.layer):
            past = past_key_values[i] if past_key_values else None
            x, probs, cross_probs, self_kv = layer(
                x,
                self_bias,
                cross_kv[i],
                enc_bias,
                _gate_for(head_gates, i),
                _gate_for(cross_head_gates, i),
                _gate_for(ffn_gates, i),
                None,
                output_attentions,
                past,
                kv_heads,
            )
            if use_cache:
                out.past_key_values.append(self_kv)
            if output_hidden_states:
                out.hidden_states.append(x)
            if output_attentions:
                out.attentions.append(probs)
                out.cross_attentions.append(cross_probs)
        out.last_hidden_state = x
        return self.cls.predictions(x), out


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# SmartTrim trimming modules (run by compression/trimmed.py; present when config.trimming is set)
# ----------------------------------------------------------------------------------------------

TRIM_KEEP_INIT = 3.0  # initial keep logit: sigmoid(3) = 0.95, so training starts from "keep all"


class TokenTrimmer(nn.Module):
    """Keep-logit per token from the token's features, its own stream's pooled kept state and the
    other modality's pooled state (cross-modal guidance of what is redundant)."""

    def __init__(self, width: int, other_width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.token = nn.Linear(width, hidden)
        self.own = nn.Linear(width, hidden, bias=False)
        self.other = nn.Linear(other_width, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, own_pooled: torch.Tensor, other_pooled: torch.Tensor) -> torch.Tensor:
        context = self.own(self.norm(own_pooled)) + self.other(other_pooled)
        return self.out(F.gelu(self.token(self.norm(x)) + context[:, None])).squeeze(-1)


class HeadTrimmer(nn.Module):
    """Keep-logit per attention head from the block's pooled input and the other modality."""

    def __init__(self, width: int, other_width: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width + other_width, heads)

    def forward(self, own_pooled: torch.Tensor, other_pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([self.norm(own_pooled), other_pooled], dim=-1))


class Trimmers(nn.Module):
    """One token trimmer before every vision, text and fusion layer; one head trimmer per
    attention block (vision self, text self, fusion self and cross)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.trimming.get("hidden", 32))
        vw, tw = cfg.vision_width, cfg.text_width
        self.vision_tokens = nn.ModuleList(TokenTrimmer(vw, tw, hidden) for _ in cfg.vision_heads)
        self.text_tokens = nn.ModuleList(TokenTrimmer(tw, vw, hidden) for _ in cfg.text_heads)
        self.fusion_tokens = nn.ModuleList(TokenTrimmer(tw, vw, hidden) for _ in cfg.fusion_self_heads)
        self.vision_heads = nn.ModuleList(HeadTrimmer(vw, tw, h) for h in cfg.vision_heads)
        self.text_heads = nn.ModuleList(HeadTrimmer(tw, vw, h) for h in cfg.text_heads)
        self.fusion_self_heads = nn.ModuleList(HeadTrimmer(tw, vw, h) for h in cfg.fusion_self_heads)
        self.fusion_cross_heads = nn.ModuleList(HeadTrimmer(tw, vw, h) for h in cfg.fusion_cross_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.set_keep_init(TRIM_KEEP_INIT, TRIM_KEEP_INIT)

    @torch.no_grad()
    def set_keep_init(self, token: float, head: float) -> None:
        """Initial keep-logits (the output biases) of the token and head trimmers."""
        for m in self.modules():
            if isinstance(m, TokenTrimmer):
                m.out.bias.fill_(token)
            elif isinstance(m, HeadTrimmer):
                m.proj.bias.fill_(head)


class TokenEvidence(nn.Module):
    """ITM evidence pooled over the fused text tokens: each token scores how well its part of the
    caption matches the image, and the scores pool into one term added to the match logit, a soft
    minimum (one contradicted part vetoes the match) plus the mean. Its output layer starts at zero,
    so a model given this term starts with the ITM it had."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.score = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.trunc_normal_(self.score[0].weight, std=0.02)
        nn.init.zeros_(self.score[0].bias)
        nn.init.zeros_(self.score[2].weight)
        nn.init.zeros_(self.score[2].bias)

    def forward(self, fused_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask.bool()
        e = self.score(self.norm(fused_states)).squeeze(-1).float()  # [B, T]
        count = valid.sum(-1).clamp_min(1).to(e.dtype)
        # -log mean exp(-e): a smooth minimum that equals e when every token agrees
        soft_min = -(torch.logsumexp((-e).masked_fill(~valid, float("-inf")), dim=-1) - count.log())
        mean = (e * valid).sum(-1) / count
        return (soft_min + mean).to(fused_states.dtype)


class TextAttentionPool(nn.Module):
    """The text tokens pooled by `heads` learned attention patterns (each over its slice of the
    width) and added to [CLS]: the ITC text feature. Its output layer starts at zero, so a model
    given this pool starts with the embeddings it had."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text_pool_heads must divide the text width {width}, got {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.score = nn.Linear(width, heads)
        self.out = nn.Linear(width, width)
        nn.init.trunc_normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, text_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, w = text_states.shape
        scores = self.score(self.norm(text_states)).float().masked_fill(~mask.bool()[..., None], float("-inf"))
        weights = scores.softmax(dim=1).to(text_states.dtype)  # [B, T, heads]
        values = text_states.reshape(b, t, self.heads, w // self.heads)
        pooled = (weights[..., None] * values).sum(dim=1).reshape(b, w)
        return text_states[:, 0] + self.out(pooled)


class TrimVLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionModel(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.fusion_encoder = FusionEncoder(cfg)
        self.text_decoder = TextDecoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(cfg.text_width, 2)
        w = cfg.text_width
        self.vqa_head = nn.Sequential(
            nn.Linear(w, 2 * w), nn.GELU(), nn.LayerNorm(2 * w), nn.Linear(2 * w, max(cfg.num_answers, 1))
        )
        self.apply(self._init_weights)
        self.text_pool = TextAttentionPool(cfg.text_width, cfg.text_pool_heads) if cfg.text_pool_heads else None
        self.itm_evidence = TokenEvidence(cfg.text_width, cfg.itm_evidence_hidden) if cfg.itm_evidence_hidden else None
        self.trimmers = Trimmers(cfg) if cfg.trimming else None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # Encoders ----------------------------------------------------------------------------------
    def encode_image(self, pixel_values, **kw) -> StackOutput:
        return self.vision_model(pixel_values, **kw)

    def encode_text(self, input_ids, attention_mask, **kw) -> StackOutput:
        out = self.text_encoder(input_ids, attention_mask, **kw)
        if self.config.itc_text_through_fusion:
            out = self.fusion_encoder(out.last_hidden_state, attention_mask)
        return out

    def fuse(self, text_states, text_mask, image_states, image_mask=None, **kw) -> StackOutput:
        return self.fusion_encoder(text_states, text_mask, image_states, image_mask, **kw)

    # Heads -------------------------------------------------------------------------------------
    def image_embeds(self, image_states: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_states[:, 0]), dim=-1)

    def text_embeds(self, text_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC embeddings of texts; `mask` marks their tokens."""
        pooled = text_states[:, 0] if self.text_pool is None else self.text_pool(text_states, mask)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def itc_logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Image-to-text similarity logits [N_img, N_txt] at the learned temperature."""
        return image_emb @ text_emb.t() / self.temp.clamp(0.001, 0.5)

    def itm_logits(self, fused_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[no match, match] logits of fused (text, image) pairs; `mask` marks the text tokens."""
        logits = self.itm_head(fused_states[:, 0])
        if self.itm_evidence is None:
            return logits
        evidence = self.itm_evidence(fused_states, mask)
        return torch.stack([logits[:, 0], logits[:, 1] + evidence], dim=1)

    def vqa_logits(self, fused_states: torch.Tensor) -> torch.Tensor:
        return self.vqa_head(fused_states[:, 0])

    # Convenience forward passes -----------------------------------------------------------------
    def vqa_forward(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, StackOutput]:
        image = self.encode_image(pixel_values).last_hidden_state
        text = self.text_encoder(input_ids, attention_mask).last_hidden_state
        fused = self.fuse(text, attention_mask, image)
        return self.vqa_logits(fused.last_hidden_state), fused

    @torch.no_grad()
    def generate(
        self,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        prompt_ids: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding from [BOS] (+ prompt) until [SEP] or max_new_tokens.

        Returns the generated ids [B, <=max_new_tokens] (prompt excluded), padded with [PAD]
        after [SEP]. With use_cache the cross K/V are projected once and self-attention K/V
        are cached; without it every step reruns the full prefix (reference path)."""
        cfg = self.config
        b, dev = encoder_states.shape[0], encoder_states.device
        ids = torch.full((b, 1), cfg.bos_token_id, dtype=torch.long, device=dev)
        if prompt_ids is not None:
            ids = torch.cat([ids, prompt_ids.to(dev)], dim=1)
        cross_kv = self.text_decoder.cross_kv(encoder_states)
        past, step_ids = None, ids
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        generated = []
        for _ in range(max_new_tokens):
            mask = torch.ones(b, ids.shape[1], dtype=torch.bool, device=dev)
            if use_cache:
                logits, out = self.text_decoder(
                    step_ids, mask, encoder_mask=encoder_mask, cross_kv=cross_kv, past_key_values=past, use_cache=True
                )
                past = out.past_key_values
            else:
                logits, _ = self.text_decoder(ids, mask, encoder_mask=encoder_mask, cross_kv=cross_kv)
            next_tok = logits[:, -1].argmax(dim=-1)
            next_tok = torch.where(done, torch.full_like(next_tok, cfg.pad_token_id), next_tok)
            generated.append(next_tok)
            done = done | (next_tok == cfg.sep_token_id)
            ids = torch.cat([ids, next_tok[:, None]], dim=1)
            step_ids = next_tok[:, None]
            if bool(done.all()):
                break
        return torch.stack(generated, dim=1)


def check_top_level_modules(weight_names, modules, label: str, error: type[Exception] = ValueError) -> None:
    """Refuse `modules` unless it is non-empty and every name is a top-level part of a model whose
    weights are `weight_names` (e.g. "fusion_encoder", "itm_head", "temp")."""
    known = {name.split(".")[0] for name in weight_names}
    if not modules or set(modules) - known:
        raise error(f"{label} must be some of {sorted(known)}, got {list(modules)}")
