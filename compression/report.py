"""Model cards and summary tables (Markdown) shared by every command that writes a report."""

from __future__ import annotations

import json
import platform
import textwrap
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
        for d in ("i2t", "t2i"):
            if f"r1_{d}_rerank" in sc:
                rows.append(
                    f"| scenes test retrieval {d} R@1 / R@5 / R@10, ITC top-k re-ranked by ITM + w x ITC | "
                    f"{sc[f'r1_{d}_rerank']:.4f} / {sc[f'r5_{d}_rerank']:.4f} / {sc[f'r10_{d}_rerank']:.4f} |"
                )
    return "\n".join(rows)


def _head_extras(cfg) -> str:
    extras = []
    if cfg.text_pool_heads:
        pool = f"an attention pool over the text tokens ({cfg.text_pool_heads} heads)"
        extras.append(f"the ITC text embedding adds {pool} to [CLS]")
    if cfg.itm_evidence_hidden:
        extras.append(f"ITM adds each fused text token's match evidence (hidden {cfg.itm_evidence_hidden}), pooled")
    return "".join(f"\n- {e[0].upper()}{e[1:]}." for e in extras)


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
  generative answers and captions through the decoder.{_head_extras(cfg)}

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


def comparison_table(columns: dict[str, dict]) -> str:
    """Headline metrics side by side, one column per evaluation (`trimvlm eval` results)."""
    from compression.evaluate import flat_metrics

    flats = {name: flat_metrics(r) for name, r in columns.items()}
    keys = [k for k in next(iter(flats.values())) if not k.endswith(("n", "_n", "n_images", "n_texts")) and "chance" not in k]
    rows = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for k in keys:
        rows.append(f"| {k} | " + " | ".join(f"{flats[c][k]:.4f}" if k in flats[c] else "-" for c in columns) + " |")
    return "\n".join(rows)


def retention_section(columns: dict[str, dict], teacher: str = "teacher (torch)") -> str:
    """What each other column keeps of the teacher's metrics, the unsaturated first (`trimvlm eval`
    results per column); empty without a teacher column."""
    if teacher not in columns:
        return ""
    from compression.compression_report import retention_table
    from compression.evaluate import flat_metrics

    rows = {teacher: {"metrics": flat_metrics(columns[teacher])}}
    rows |= {name: {"metrics": flat_metrics(r)} for name, r in columns.items() if name != teacher}
    return "\n" + "\n".join(retention_table(rows, teacher)).replace("## ", "### ", 1) + "\n"


def domain_section(m) -> str:
    """The model card's "What it knows" section: the manifest's description, input size, closed
    answer list and known words (empty when the manifest has none of the first)."""
    pre = m.preprocessing
    lines = ["", "## What it knows", ""]
    if m.description:
        lines += [textwrap.fill(m.description, 100), ""]
    size = f"{pre.image.size}x{pre.image.size}"
    lines.append(f"- Input: images resized to {size} pixels; questions and texts cut to {pre.max_text_length} tokens.")
    if m.answers:
        lines.append(f"- VQA answers: always one of these {len(m.answers)} (a closed list): {', '.join(m.answers)}.")
    else:
        lines.append("- VQA answers: generated (open vocabulary).")
    if m.known_words is not None:
        listed = f": {', '.join(m.known_words)}" if len(m.known_words) <= 300 else " (listed in manifest.json)"
        lines.append(
            f"- Known words ({len(m.known_words)}, the words of the training texts; a served question with any other "
            f"word gets a `warnings` entry naming it){listed}."
        )
    return "\n".join(lines) + "\n" if m.description or m.known_words is not None else ""


def write_export_card(export_dir: str | Path, eval_dir: str | Path, source: str | Path, command: str) -> Path:
    """MODEL_CARD.md of an exported model: what it is, how it was made, the exported runtime's
    metrics beside the torch source's (and the teacher's), and the measured metrics recorded in
    the manifest. Rewrites manifest.json (its file table covers the new card)."""
    from service.repository import load_manifest, write_manifest

    export_dir, eval_dir = Path(export_dir), Path(eval_dir)
    columns = {}
    for label, name in (
        ("exported (ONNX Runtime)", "exported.json"),
        ("torch source", "torch.json"),
        ("teacher (torch)", "teacher.json"),
    ):
        if (eval_dir / name).is_file():
            columns[label] = json.loads((eval_dir / name).read_text())
    exported = columns["exported (ONNX Runtime)"]
    m = load_manifest(export_dir)
    from compression.evaluate import flat_metrics

    runtime = exported.get("runtime", {})
    m.metrics = {f"onnxruntime/{runtime.get('precision', '?')}": flat_metrics(exported)}
    if "torch source" in columns:
        m.metrics["torch/fp32 (source)"] = flat_metrics(columns["torch source"])
    levels = ""
    if m.levels:
        rows = ["| level | thresholds (token/head) | FLOPs ratio | calibration accuracy |", "|---|---|---:|---|"]
        for name, lv in m.levels.levels.items():
            th = "untrimmed" if not lv.trimmed else f"{lv.token_threshold}/{lv.head_threshold}"
            acc = ", ".join(f"{k} {v:.4f}" for k, v in lv.accuracy.items())
            rows.append(f"| {name} | {th} | {lv.flops_ratio:.3f} | {acc} |")
        levels = "\n## Compute levels\nCalibrated on the validation splits (`trimvlm trim`):\n\n" + "\n".join(rows) + "\n"
    graphs = "\n".join(
        f"| {g} | {', '.join(t.name for t in info.inputs)} | {', '.join(t.name for t in info.outputs)} | "
        f"{', '.join(f'{p}: {f}' for p, f in info.files.items())} | {info.parity.get('fp32', float('nan')):.1e} |"
        for g, info in m.graphs.items()
    )
    card = f"""# {m.name}/{m.version} (exported)

The TrimVLM embedded default format: ONNX graphs served by `trimvlm serve` through ONNX Runtime,
with the preprocessing, tokenizer, answer vocabulary, compute levels and checksums in
`manifest.json`. Source torch model: `{source}`.
{domain_section(m)}
## How it was made
```
{command}
```
Produced by: {json.dumps(m.produced_by)}

## Graphs
| graph | inputs | outputs | files | fp32 parity vs torch (max abs) |
|---|---|---|---|---:|
{graphs}
{levels}
## Evaluation
Same evaluation code for every column (`trimvlm eval`; exported folders run through the
service's runtime, {runtime.get("backend", {}).get("runtime", "onnxruntime")} {runtime.get("precision", "")}):

{comparison_table(columns)}
{retention_section(columns)}
Generative VQA accuracy is measured on torch models only (the exported decoder graphs take image
states). Verify the files and reference outputs with `trimvlm models verify --models {export_dir}`.
"""
    (export_dir / "MODEL_CARD.md").write_text(card)
    (export_dir / "eval.json").write_text(json.dumps(exported, indent=2) + "\n")
    write_manifest(export_dir, m)
    return export_dir / "MODEL_CARD.md"
