"""Calibrate a model's re-ranking score on validation.

Retrieval re-ranks each query's ITC top k by `log p(match) + w x ITC cosine`
(service.tasks.rerank_scores). BLIP's own evaluation adds the two with w = 1; here w is a per-model
calibration, because the right weight depends on the model: a small student's ITM head alone can
rank its candidates worse than its own ITC does (text->image R@1 below ITC-only R@1), where the
teacher's ITM head alone beats its ITC. The sweep scores every weight of a grid from one pass of the
fusion encoder over the candidates, picks the one with the highest R@1 image->text + text->image
among the weights whose re-ranking leaves neither direction below ITC alone (any weight when none
does; the smallest weight on a tie: closest to the ITM head alone) and writes it to the model
folder's rerank.json, which `trimvlm export` copies into the manifest and the service applies.
Without that floor a student whose ITC is strong one way and whose ITM is strong the other would
be calibrated to trade one direction away for the other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from compression import data as D
from compression.artifacts import RERANK_FILE, load_model_dir
from compression.evaluate import RERANK_K, _recalls, as_tasks, encode_split, rerank_candidates
from compression.torch_runtime import pick_device

DEFAULT_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def sweep(cand, grid=DEFAULT_GRID) -> list[dict]:
    """R@1/5/10 both ways of the re-ranked candidates under each weight of `grid`."""
    rows = []
    for w in grid:
        order_i2t, order_t2i = cand.reranked_orders(float(w))
        rows.append(
            {"itc_weight": float(w), **{k: round(v, 4) for k, v in _recalls(order_i2t, order_t2i, cand.enc.owner, "").items()}}
        )
    return rows


def pick(rows: list[dict], itc_only: dict | None = None) -> dict:
    """The row with the highest R@1 i->t + t->i; on a tie the smallest weight. With `itc_only`
    (R@1 of the ITC ranking), only rows at or above it both ways, when there are any."""
    floor = [r for r in rows if itc_only and all(r[f"r1_{d}"] >= round(itc_only[f"r1_{d}"], 4) for d in ("i2t", "t2i"))]
    return max(floor or rows, key=lambda r: (round(r["r1_i2t"] + r["r1_t2i"], 6), -r["itc_weight"]))


def calibrate(
    model_dir: str | Path,
    split: str = "val",
    rerank_k: int = RERANK_K,
    grid=DEFAULT_GRID,
    limit: int | None = None,
    device: str = "auto",
    scenes_root: str | Path | None = None,
    write: bool = True,
) -> dict:
    """Sweep the weight on a scenes split (validation by default; the test split is for reporting)
    of a torch model folder and, with `write`, store the pick in its rerank.json."""
    model_dir = Path(model_dir)
    if (model_dir / "manifest.json").is_file():
        raise ValueError(f"{model_dir} is an exported folder: calibrate its torch source, then export it again")
    if rerank_k < 2:
        raise ValueError(f"rerank_k must be at least 2, got {rerank_k}")
    if not grid or any(w < 0 for w in grid):
        raise ValueError(f"the grid needs weights >= 0, got {list(grid)}")
    t0 = time.time()
    lm = load_model_dir(model_dir, pick_device(device))
    caps = D.load_scenes_captions(D.ensure_scenes(scenes_root), split, lm.preprocessing.image).limit(limit)
    tasks = as_tasks(lm)
    cand = rerank_candidates(tasks, encode_split(tasks, caps), rerank_k)
    rows = sweep(cand, grid)
    itc_only = _recalls(cand.enc.order_i2t, cand.enc.order_t2i, cand.enc.owner, "")
    best = pick(rows, itc_only)
    result = {
        "itc_weight": best["itc_weight"],
        "split": caps.name,
        "limit": limit,
        "n_images": len(caps.images),
        "n_texts": len(cand.enc.owner),
        "rerank_k": rerank_k,
        "objective": (
            "max R@1 image->text + text->image of the re-ranked top k, neither below ITC alone when a weight allows "
            "(smallest weight on a tie)"
        ),
        "itc_only": {k: round(v, 4) for k, v in itc_only.items()},
        "sweep": rows,
        "seconds": round(time.time() - t0, 1),
    }
    if write:
        (model_dir / RERANK_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def sweep_table(result: dict) -> str:
    """The sweep as Markdown, the ITC-only ranking first and the pick in bold."""
    head = "| ITC weight | R@1 i→t | R@1 t→i | R@5 i→t | R@5 t→i | R@10 i→t | R@10 t→i |\n|---|---:|---:|---:|---:|---:|---:|\n"
    keys = ("r1_i2t", "r1_t2i", "r5_i2t", "r5_t2i", "r10_i2t", "r10_t2i")
    itc = result["itc_only"]
    lines = ["| ITC alone (no re-ranking) | " + " | ".join(f"{itc[k]:.4f}" for k in keys) + " |"]
    for r in result["sweep"]:
        mark = "**" if r["itc_weight"] == result["itc_weight"] else ""
        w = f"{mark}{r['itc_weight']:g}{' (ITM alone)' if r['itc_weight'] == 0 else ''}{mark}"
        lines.append(f"| {w} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    return head + "\n".join(lines) + "\n"


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--grid takes comma-separated numbers, got {text!r}") from None
    if not grid or any(not np.isfinite(w) or w < 0 for w in grid):
        raise ValueError(f"--grid takes comma-separated weights >= 0, got {text!r}")
    return grid
