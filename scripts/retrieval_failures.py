"""What the wrong top-1 image differs in, for text->image queries of chosen scenes caption templates.

For each model folder (torch), every scenes test caption of the templates asked for is ranked
against the 500 test images by ITC alone; each miss is sorted by how the image ranked first
differs from the caption's own: the same objects (another layout: the caption cannot tell them
apart), one attribute of one object (size, colour or shape only), the number of objects, or more.

    .venv/bin/python scripts/retrieval_failures.py models/trimvlm-teacher/1 models/trimvlm-student/6
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np

from compression import data as D
from compression import scenes as S
from compression.artifacts import load_model_dir
from compression.evaluate import as_tasks, encode_split


def test_scenes(root) -> list[dict]:
    """The test split's scenes as the generator wrote them, in image-id (evaluation) order."""
    scenes = json.loads((root / "annotations" / "scenes_test.json").read_text())
    return sorted(scenes, key=lambda scene: scene["image_id"])


def difference(a: dict, b: dict) -> str:
    def bag(scene, *attrs):
        return Counter(tuple(o[x] for x in attrs) for o in scene["objects"])

    if bag(a, "size", "color", "shape") == bag(b, "size", "color", "shape"):
        return "same objects"
    if len(a["objects"]) != len(b["objects"]):
        return "number of objects"
    for only, rest in (("size", ("color", "shape")), ("colour", ("size", "shape")), ("shape", ("size", "color"))):
        if bag(a, *rest) == bag(b, *rest):
            return f"{only} only"
    return "more than one attribute"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--templates", default="picture,listing,two_clauses")
    args = ap.parse_args()
    root = D.ensure_scenes(None)
    scenes = test_scenes(root)
    for model_dir in args.models:
        lm = load_model_dir(model_dir, "cpu")
        caps = D.load_scenes_captions(root, "test", lm.preprocessing.image)
        texts = [c for per_image in caps.captions for c in per_image]
        owner = np.repeat(np.arange(len(caps.captions)), [len(c) for c in caps.captions])
        top = encode_split(as_tasks(lm), caps).order_t2i[:, 0]
        templates = np.array([S.caption_template(t) for t in texts])
        for name in args.templates.split(","):
            queries = np.flatnonzero(templates == name)
            misses = [q for q in queries if top[q] != owner[q]]
            kinds = Counter(difference(scenes[owner[q]], scenes[top[q]]) for q in misses)
            print(f"{model_dir} | {name} | {len(queries)} captions | {len(misses)} missed | {dict(kinds.most_common())}")


if __name__ == "__main__":
    main()
