"""Parameter and FLOPs counts per module (vision / text / fusion / decoder / heads).

FLOPs are analytic: 2 x multiply-accumulates of every matmul (projections, attention scores and
context, FFN, heads) per sample, from the config's per-layer head counts and FFN widths and the
token counts actually processed. Norms, softmax and activations are ignored (< 1%). A test checks
these formulas against torch's FlopCounterMode on real forward passes. Every report uses this
module so figures stay comparable across teacher, students and trimmed variants.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compression.config import ModelConfig

MODULES = ("vision", "text", "fusion", "decoder", "heads")


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameters per module (shared tensors counted once), plus 'total'."""
    prefixes = {
        "vision_model.": "vision",
        "text_encoder.": "text",
        "fusion_encoder.": "fusion",
        "text_decoder.": "decoder",
    }
    counts = dict.fromkeys(MODULES, 0)
    for name, p in model.named_parameters():  # named_parameters() already de-duplicates tied weights
        module = next((m for pre, m in prefixes.items() if name.startswith(pre)), "heads")
        counts[module] += p.numel()
    counts["total"] = sum(counts[m] for m in MODULES)
    return counts


def attention_flops(
    nq: int, nk: int, q_width: int, kv_width: int, heads: int, head_dim: int, out_width: int, project_kv: bool = True
) -> int:
    inner = heads * head_dim
    f = 2 * nq * q_width * inner  # query
    if project_kv:
        f += 2 * 2 * nk * kv_width * inner  # key, value
    f += 2 * 2 * nq * nk * inner  # scores and context
    f += 2 * nq * inner * out_width  # output projection
    return f


def ffn_flops(n: int, width: int, hidden: int) -> int:
    return 2 * 2 * n * width * hidden


@dataclass
class TokenCounts:
    """Tokens per sample processed by each stack (per layer when trimming makes them vary)."""

    text: int = 16
    caption: int = 16
    image: list[int] | None = None  # kept image tokens entering each vision layer
    fused_text: list[int] | None = None  # kept text tokens per fusion layer


def flops_per_sample(cfg: ModelConfig, tokens: TokenCounts | None = None, task: str = "vqa") -> dict[str, int]:
    """Forward FLOPs per sample, per module, for a task:

    vqa: vision + text + fusion + VQA head; itm: same with the ITM head; itc: vision + text +
    projections; caption: vision + decoder over `caption` tokens (teacher-forced pass).
    """
    t = tokens or TokenCounts()
    n_img = cfg.num_image_tokens
    image_per_layer = t.image or [n_img] * cfg.layer_counts["vision"]
    out = dict.fromkeys(MODULES, 0)

    # vision: patch embedding + layers
    out["vision"] += 2 * cfg.num_patches * (3 * cfg.patch_size**2) * cfg.vision_width
    vw, vhd = cfg.vision_width, cfg.vision_head_dim
    for i, (h, m) in enumerate(zip(cfg.vision_heads, cfg.vision_mlp, strict=True)):
        n = image_per_layer[i]
        out["vision"] += attention_flops(n, n, vw, vw, h, vhd, vw) + ffn_flops(n, vw, m)
    n_img_out = image_per_layer[-1] if image_per_layer else n_img

    tw, thd = cfg.text_width, cfg.text_head_dim
    if task in ("vqa", "itm", "itc"):
        n = t.text
        for h, m in zip(cfg.text_heads, cfg.text_mlp, strict=True):
            out["text"] += attention_flops(n, n, tw, tw, h, thd, tw) + ffn_flops(n, tw, m)
    if task in ("vqa", "itm"):
        fused = t.fused_text or [t.text] * cfg.layer_counts["fusion"]
        for i, (h, c, m) in enumerate(zip(cfg.fusion_self_heads, cfg.fusion_cross_heads, cfg.fusion_mlp, strict=True)):
            n = fused[i]
            out["fusion"] += attention_flops(n, n, tw, tw, h, thd, tw)
            out["fusion"] += attention_flops(n, n_img_out, tw, vw, c, thd, tw)
            out["fusion"] += ffn_flops(n, tw, m)
        if task == "vqa":
            out["heads"] += 2 * (tw * 2 * tw + 2 * tw * cfg.num_answers)
        else:
            out["heads"] += 2 * tw * 2
            if cfg.itm_evidence_hidden:  # every fused text token's evidence MLP
                out["heads"] += 2 * fused[-1] * (tw * cfg.itm_evidence_hidden + cfg.itm_evidence_hidden)
    if task == "itc":
        out["heads"] += 2 * (vw + tw) * cfg.embed_dim
        if cfg.text_pool_heads:  # per-token scores, the pooled sum and the output layer
            out["heads"] += 2 * t.text * (tw * cfg.text_pool_heads + tw) + 2 * tw * tw
    if task == "caption":
        n = t.caption
        for h, c, m in zip(cfg.decoder_self_heads, cfg.decoder_cross_heads, cfg.decoder_mlp, strict=True):
            out["decoder"] += attention_flops(n, n, tw, tw, h, thd, tw)
            out["decoder"] += attention_flops(n, n_img_out, tw, cfg.cross_width, c, thd, tw)
            out["decoder"] += ffn_flops(n, tw, m)
        out["decoder"] += 2 * n * (tw * tw + tw * cfg.vocab_size)  # LM head transform + vocabulary
    out["total"] = sum(out[m] for m in MODULES)
    return out
