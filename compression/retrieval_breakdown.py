"""Text->image recall per scenes caption template, from `trimvlm eval --json X --items` results.

One R@1 over all captions mixes captions that name one image (a full description) with captions
true of dozens ("two large shapes and one small shape"), where R@1 is near chance for any model.
Grouping the per-caption results by the template that wrote each caption shows where a student
loses to its teacher: attribute binding in full descriptions, relations, or nowhere that matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from compression import data as D
from compression.config_file import ConfigError
from compression.eval_compare import items_path
from compression.evaluate import scenes_items_digest
from compression.scenes import caption_template
from service.preprocess import ImageSpec

METRICS = ("r1_t2i", "r1_t2i_rerank", "r5_t2i", "r5_t2i_rerank")


def scenes_test_captions(root: Path) -> tuple[list[str], str]:
    """The scenes test captions in evaluation order, and the digest `trimvlm eval` gives its items."""
    spec = ImageSpec(size=json.loads((root / "scenes_meta.json").read_text())["image_size"])
    questions = D.load_scenes_vqa(root, "test", spec)
    caps = D.load_scenes_captions(root, "test", spec)
    return [c for per_image in caps.captions for c in per_image], scenes_items_digest(questions, caps)


def breakdown(eval_jsons: list[str | Path], scenes_root: str | Path | None = None) -> dict:
    """Per template and per evaluation: the caption count and each METRICS key's mean over them."""
    root = D.ensure_scenes(scenes_root)
    captions, digest = scenes_test_captions(root)
    try:
        templates = np.array([caption_template(c) for c in captions])
    except ValueError as e:
        raise ConfigError(f"{root}: {e}") from None
    names = sorted(set(templates.tolist()))
    models = []
    for path in eval_jsons:
        found = items_path(path)
        if not found.is_file():
            raise ConfigError(f"{found}: no per-item results; evaluate with `trimvlm eval --json {path} --items`")
        with np.load(found) as items:
            if str(items.get("scenes.items_digest", "")) != digest:
                raise ConfigError(f"{found}: not the full scenes test split of {root} (--limit?)")
            per = {m: np.asarray(items[f"scenes.{m}"]) for m in METRICS if f"scenes.{m}" in items}
        if any(len(v) != len(captions) for v in per.values()):
            raise ConfigError(f"{found}: {len(captions)} test captions expected")
        models.append(
            {
                "eval": str(path),
                "all": {m: round(float(v.mean()), 4) for m, v in per.items()},
                "by_template": {t: {m: round(float(v[templates == t].mean()), 4) for m, v in per.items()} for t in names},
            }
        )
    return {"n": {t: int((templates == t).sum()) for t in names}, "n_all": len(captions), "models": models}


def breakdown_table(result: dict, metric: str = "r1_t2i") -> str:
    """Markdown: a row per template (most captions first), a column per evaluation."""
    models = [m for m in result["models"] if metric in m["all"]]
    head = "| template | captions | " + " | ".join(Path(m["eval"]).stem for m in models) + " |\n"
    head += "|---|---:|" + "---:|" * len(models) + "\n"
    rows = sorted(result["n"], key=lambda t: -result["n"][t])
    lines = [
        f"| {t} | {result['n'][t]} | " + " | ".join(f"{m['by_template'][t][metric]:.3f}" for m in models) + " |" for t in rows
    ]
    lines.append(f"| all | {result['n_all']} | " + " | ".join(f"{m['all'][metric]:.4f}" for m in models) + " |")
    return head + "\n".join(lines) + "\n"
