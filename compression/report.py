"""Model cards and summary tables (Markdown) shared by every command that writes a report."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from compression.artifacts import load_model_dir
from compression.flops import MODULES, TokenCounts, count_params, flops_per_sample


def model_summary(model_dir: str | Path, text_tokens: int = 16, caption_tokens: int = 16) -> dict:
    lm = load_model_dir(model_dir)
    cfg = lm.model.config
    tokens = TokenCounts(text=text_tokens, caption=caption_tokens)
    return {
        "params": count_params(lm.model),
        "flops": {task: flops_per_sample(cfg, tokens, task) for task in ("vqa", "itc", "caption")},
        "tokens": {"image": cfg.num_image_tokens, "text": text_tokens, "caption": caption_tokens},
        "config": cfg,
    }


def _fmt_millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def params_flops_table(summary: dict) -> str:
    rows = ["| module | parameters | VQA FLOPs / sample | caption FLOPs / sample |", "|---|---:|---:|---:|"]
    for m in (*MODULES, "total"):
        rows.append(
            f"| {m} | {_fmt_millions(summary['params'][m])} | {summary['flops']['vqa'][m] / 1e6:.1f}M | "
            f"{summary['flops']['caption'][m] / 1e6:.1f}M |"
        )
    return "\n".join(rows)


def metrics_table(results: dict) -> str:
    ev, sc = results.get("easy_vqa", {}), results.get("scenes", {})
    rows = ["| metric | value |", "|---|---:|"]
    if ev:
        rows.append(f"| easy-VQA test accuracy ({ev['n']} questions) | {ev['accuracy']:.4f} |")
        if "generative_accuracy" in ev:
            rows.append(f"| easy-VQA test accuracy, generative answers | {ev['generative_accuracy']:.4f} |")
    if sc:
        rows.append(f"| scenes test VQA accuracy ({sc['vqa_n']} questions) | {sc['vqa_accuracy']:.4f} |")
        for t, v in sc.get("vqa_by_type", {}).items():
            rows.append(f"| &nbsp;&nbsp;{t} | {v:.4f} |")
        rows.append(f"| scenes test caption BLEU-4 | {sc['bleu4']:.4f} |")
        rows.append(f"| scenes test caption CIDEr | {sc['cider']:.4f} |")
        for d in ("i2t", "t2i"):
            rows.append(
                f"| scenes test retrieval {d} R@1 / R@5 / R@10 | {sc[f'r1_{d}']:.4f} / {sc[f'r5_{d}']:.4f} / "
                f"{sc[f'r10_{d}']:.4f} (chance R@1 {sc[f'chance_r1_{d}']:.4f}) |"
            )
    return "\n".join(rows)


def write_model_card(model_dir: str | Path, results: dict, command: str, trained_on: str, notes: str = "") -> Path:
    model_dir = Path(model_dir)
    s = model_summary(model_dir)
    cfg = s["config"]
    lc = cfg.layer_counts
    card = f"""# {cfg.name} ({cfg.role})

A BLIP / X-VLM-style vision-language model of the TrimVLM family (compression/modeling.py).

## Architecture
- Vision: ViT, {lc["vision"]} layers, width {cfg.vision_width}, heads per layer {cfg.vision_heads}, FFN {cfg.vision_mlp},
  {cfg.image_size}x{cfg.image_size} images in {cfg.patch_size}x{cfg.patch_size} patches
  ({cfg.num_image_tokens} tokens with [CLS]).
- Text encoder: {lc["text"]} BERT layers, width {cfg.text_width}, heads {cfg.text_heads}, FFN {cfg.text_mlp}.
- Fusion encoder: {lc["fusion"]} layers (self-attention heads {cfg.fusion_self_heads}, cross-attention heads
  {cfg.fusion_cross_heads}, FFN {cfg.fusion_mlp}).
- Decoder: {lc["decoder"]} causal layers (self {cfg.decoder_self_heads}, cross {cfg.decoder_cross_heads}, FFN {cfg.decoder_mlp}),
  LM head tied to its embeddings; vocabulary {cfg.vocab_size} WordPiece tokens (tokenizer.json).
- Heads: ITC projections to {cfg.embed_dim} with learned temperature, ITM, VQA classifier over {cfg.num_answers} answers,
  generative answers and captions through the decoder.

## Size and cost
Parameters and forward FLOPs per sample (analytic, compression/flops.py; {s["tokens"]["image"]} image tokens,
{s["tokens"]["text"]} text tokens, {s["tokens"]["caption"]} caption tokens teacher-forced):

{params_flops_table(s)}

## How it was made
```
{command}
```
Trained on: {trained_on}.
{notes}

## Evaluation
`trimvlm eval {model_dir}` (torch {torch.__version__}, {platform.machine()}):

{metrics_table(results)}

Full results: `eval.json` beside this card.
"""
    (model_dir / "MODEL_CARD.md").write_text(card)
    (model_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return model_dir / "MODEL_CARD.md"
