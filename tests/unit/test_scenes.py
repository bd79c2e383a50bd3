"""Tests for the synthetic scenes generator (compression/scenes.py).

The truthfulness checks re-derive every answer from scenes_{split}.json with
their own small parsers and geometry, not with the generator's helpers.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from compression.scenes import ANSWER_VOCAB, COLORS, SHAPES, generate_scenes, main

SPLITS = ("train", "val", "test")
SIZE = 64
THRESHOLD = 6.0  # px at 64 px: the minimum offset for a stated relation
NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
COLOR_RE = "|".join(COLORS)
SHAPE_RE = "|".join(SHAPES)
REL_RE = "to the left of|to the right of|above|below"
SMALL = {"n_train": 12, "n_val": 4, "n_test": 4}


# ---------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes_small")
    generate_scenes(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes_moderate")
    generate_scenes(out, seed=3, n_train=200, n_val=0, n_test=0)
    return out


def load(root: Path, name: str):
    return json.loads((root / "annotations" / name).read_text())


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def center(obj: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def holds(a: dict, rel: str, b: dict) -> bool:
    """Is a `rel` of b, by the dominant axis of the centre offset, clearly?"""
    (ax, ay), (bx, by) = center(a), center(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        actual = "to the left of" if dx < 0 else "to the right of"
        offset = abs(dx)
    else:
        actual = "above" if dy < 0 else "below"
        offset = abs(dy)
    return offset >= THRESHOLD and actual == rel


def find(objs: list[dict], **attrs) -> list[dict]:
    return [o for o in objs if all(v is None or o[k] == v for k, v in attrs.items())]


def one(objs: list[dict], color: str, shape: str) -> dict:
    hits = find(objs, color=color, shape=shape)
    assert len(hits) == 1, (color, shape, objs)
    return hits[0]


def expected_answer(question: str, objs: list[dict]) -> str:
    """The true answer, re-derived from the ground-truth objects."""
    if m := re.fullmatch(rf"is there an? (?:(small|large) )?(?:({COLOR_RE}) )?(\w+)\?", question):
        size, color, shape = m.groups()
        shape = None if shape == "shape" else shape
        return "yes" if find(objs, size=size, color=color, shape=shape) else "no"
    if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
        size, shape = m.groups()
        hits = find(objs, size=size, shape=None if shape == "shape" else shape)
        assert len(hits) == 1, f"ambiguous: {question}"
        return hits[0]["color"]
    if m := re.fullmatch(rf"what shape is the (?:(small|large) )?(?:({COLOR_RE}) )?object\?", question):
        size, color = m.groups()
        hits = find(objs, size=size, color=color)
        assert len(hits) == 1, f"ambiguous: {question}"
        return hits[0]["shape"]
    if m := re.fullmatch(r"how many (?:(small|large|\w+) )?(\w+)s are there\?", question):
        attr, shape = m.groups()
        size = attr if attr in ("small", "large") else None
        color = attr if attr in COLORS else None
        n = len(find(objs, size=size, color=color, shape=None if shape == "shape" else shape))
        return list(NUMBERS)[n]
    if m := re.fullmatch(rf"is the ({COLOR_RE}) (\w+) ({REL_RE}) the ({COLOR_RE}) (\w+)\?", question):
        c1, s1, rel, c2, s2 = m.groups()
        return "yes" if holds(one(objs, c1, s1), rel, one(objs, c2, s2)) else "no"
    if m := re.fullmatch(rf"what is ({REL_RE}) the ({COLOR_RE}) (\w+)\?", question):
        rel, c, s = m.groups()
        ref = one(objs, c, s)
        hits = [o for o in objs if o is not ref and holds(o, rel, ref)]
        assert len(hits) == 1, f"ambiguous: {question}"
        return hits[0]["shape"]
    raise AssertionError(f"unrecognised question: {question!r}")


# ---------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical(tmp_path):
    generate_scenes(tmp_path / "a", seed=7, **SMALL)
    generate_scenes(tmp_path / "b", seed=7, **SMALL)
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(a) == sum(SMALL.values()) + 4 * 3 + 2  # images, 4 files a split, karpathy, meta
    assert a == b


def test_different_seed_gives_different_images(tmp_path, small):
    generate_scenes(tmp_path / "other", seed=1, **SMALL)
    a, b = digests(small), digests(tmp_path / "other")
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_split_sizes_do_not_change_other_splits_images(tmp_path, small):
    generate_scenes(tmp_path / "more_val", seed=0, n_train=12, n_val=9, n_test=4)
    a, b = digests(small), digests(tmp_path / "more_val")
    train = [k for k in a if k.startswith("images/train/")]
    assert train and all(a[k] == b[k] for k in train)
    assert load(small, "captions_train.json") == load(tmp_path / "more_val", "captions_train.json")


# ---------------------------------------------------------------- formats


def test_summary_and_meta(small):
    meta = json.loads((small / "scenes_meta.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == SIZE and meta["generator_version"] == 1
    assert meta["answers"] == sorted(meta["answers"]) == ANSWER_VOCAB
    for split, n in zip(SPLITS, SMALL.values(), strict=True):
        counts = meta["counts"][split]
        assert counts["images"] == n and counts["captions"] == 5 * n
        assert 8 * n <= counts["questions"] <= 12 * n


def test_coco_captions_format_and_images(small):
    seen_ids: set[int] = set()
    for split in SPLITS:
        coco = load(small, f"captions_{split}.json")
        assert set(coco) >= {"info", "images", "annotations"}
        assert coco["info"]["seed"] == 0
        ids = [im["id"] for im in coco["images"]]
        assert not seen_ids & set(ids), "image ids must be unique across splits"
        seen_ids |= set(ids)
        for im in coco["images"]:
            assert set(im) == {"id", "file_name", "width", "height"}
            assert im["file_name"] == f"{split}/{im['id']:06d}.png"
            with Image.open(small / "images" / im["file_name"]) as img:
                assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        per_image = {i: 0 for i in ids}
        for ann in coco["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            per_image[ann["image_id"]] += 1
        assert set(per_image.values()) == {5}
    files = {p.name for split in SPLITS for p in (small / "images" / split).iterdir()}
    assert files == {f"{i:06d}.png" for i in seen_ids}


def test_vqa_format_question_ids_match(small):
    qids: set[int] = set()
    for split in SPLITS:
        qs = load(small, f"vqa_questions_{split}.json")
        anns = load(small, f"vqa_annotations_{split}.json")
        assert qs["data_subtype"] == split and "info" in qs
        assert "info" in anns
        image_ids = {im["id"] for im in load(small, f"captions_{split}.json")["images"]}
        for q in qs["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert q["image_id"] in image_ids
        for a in anns["annotations"]:
            assert set(a) >= {
                "question_id",
                "image_id",
                "question_type",
                "answer_type",
                "multiple_choice_answer",
                "answers",
            }
            assert a["question_type"] in {
                "existence",
                "color",
                "shape",
                "count",
                "relation",
            }
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert a["multiple_choice_answer"] in ANSWER_VOCAB
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer"] == a["multiple_choice_answer"] for x in a["answers"])
            assert all(x["answer_confidence"] == "yes" for x in a["answers"])
        q_map = {q["question_id"]: q["image_id"] for q in qs["questions"]}
        a_map = {a["question_id"]: a["image_id"] for a in anns["annotations"]}
        assert q_map == a_map and len(q_map) == len(qs["questions"])
        assert not qids & set(q_map)
        qids |= set(q_map)


def test_karpathy_format(small):
    kp = load(small, "dataset_karpathy.json")
    assert kp["dataset"] == "scenes"
    assert [im["imgid"] for im in kp["images"]] == list(range(sum(SMALL.values())))
    for im in kp["images"]:
        assert im["filename"] == f"{im['cocoid']:06d}.png" and im["filepath"] == im["split"]
        assert (small / "images" / im["filepath"] / im["filename"]).is_file()
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]] and len(im["sentids"]) == 5
        for s in im["sentences"]:
            assert s["imgid"] == im["imgid"]
            assert s["tokens"] == re.findall(r"[a-z]+", s["raw"])


def test_pycocotools_reads_captions(small):
    coco_mod = pytest.importorskip("pycocotools.coco")
    coco = coco_mod.COCO(str(small / "annotations" / "captions_val.json"))
    assert len(coco.getImgIds()) == SMALL["n_val"]


def test_cli_main(tmp_path):
    meta = main(
        [
            "--out",
            str(tmp_path),
            "--seed",
            "5",
            "--n-train",
            "2",
            "--n-val",
            "1",
            "--n-test",
            "1",
            "--image-size",
            "48",
        ]
    )
    assert meta["image_size"] == 48
    with Image.open(tmp_path / "images" / "test" / "000004.png") as img:
        assert img.size == (48, 48)


# ---------------------------------------------------------------- truthfulness


def scenes_by_id(root: Path, split: str) -> dict[int, list[dict]]:
    return {s["image_id"]: s["objects"] for s in load(root, f"scenes_{split}.json")}


def test_scene_ground_truth_is_valid(moderate):
    for objs in scenes_by_id(moderate, "train").values():
        assert 2 <= len(objs) <= 4
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            side = max(x1 - x0, y1 - y0) / SIZE
            assert (0.15 <= side <= 0.23) if a["size"] == "small" else (0.27 <= side <= 0.37)
            for b in objs[i + 1 :]:
                # Boxes (exclusive ends) must be at least 2 empty pixels apart.
                bx0, by0, bx1, by1 = b["bbox"]
                assert x1 + 2 <= bx0 or bx1 + 2 <= x0 or y1 + 2 <= by0 or by1 + 2 <= y0, (a, b)


def test_objects_are_drawn_where_the_scene_says(small):
    for split in SPLITS:
        for image_id, objs in scenes_by_id(small, split).items():
            with Image.open(small / "images" / split / f"{image_id:06d}.png") as img:
                for o in objs:
                    # A box's centre is inside every shape, triangles included.
                    cx, cy = (int(v) for v in center(o))
                    assert img.getpixel((cx, cy)) == COLORS[o["color"]]


def test_vqa_answers_are_true(moderate):
    objs_by_id = scenes_by_id(moderate, "train")
    qs = {q["question_id"]: q for q in load(moderate, "vqa_questions_train.json")["questions"]}
    anns = load(moderate, "vqa_annotations_train.json")["annotations"]
    types = set()
    for a in anns:
        q = qs[a["question_id"]]
        got = a["multiple_choice_answer"]
        assert got == expected_answer(q["question"], objs_by_id[q["image_id"]]), q
        types.add(a["question_type"])
    assert types == {"existence", "color", "shape", "count", "relation"}


def test_yes_no_balance(moderate):
    anns = load(moderate, "vqa_annotations_train.json")["annotations"]
    yes_no = [a["multiple_choice_answer"] for a in anns if a["answer_type"] == "yes/no"]
    assert set(yes_no) == {"yes", "no"}
    assert 0.35 <= yes_no.count("yes") / len(yes_no) <= 0.65


def test_captions_are_true(moderate):
    objs_by_id = scenes_by_id(moderate, "train")
    for ann in load(moderate, "captions_train.json")["annotations"]:
        caption, objs = ann["caption"], objs_by_id[ann["image_id"]]
        assert caption == caption.lower()
        words = re.findall(r"[a-z]+", caption)
        colors = {o["color"] for o in objs}
        shapes = {o["shape"] for o in objs}
        assert {w for w in words if w in COLORS} <= colors, caption
        assert {w.rstrip("s") for w in words if w.rstrip("s") in SHAPES} <= shapes, caption
        # Every "<colour> <shape>" named is in the image, with the stated size.
        for size, color, shape in re.findall(rf"(?:(small|large) )?({COLOR_RE}) ({SHAPE_RE})", caption):
            target = one(objs, color, shape)
            assert not size or target["size"] == size, caption
        # Number words count what they say: "three shapes", "two red shapes",
        # "one large shape", "two circles".
        for n, attr in re.findall(rf"\b(\w+) (?:(small|large|{COLOR_RE}) )?shapes?\b", caption):
            if n in NUMBERS:
                size = attr if attr in ("small", "large") else None
                color = attr if attr in COLORS else None
                assert NUMBERS[n] == len(find(objs, size=size, color=color)), caption
        for n, shape in re.findall(rf"\b(\w+) ({SHAPE_RE})s?\b", caption):
            if n in NUMBERS:
                assert NUMBERS[n] == len(find(objs, shape=shape)), caption
        # Relations between two named objects.
        obj = rf"(?:a |the )(?:(?:small|large) )?({COLOR_RE}) ({SHAPE_RE})"
        for c1, s1, rel, c2, s2 in re.findall(rf"{obj} (?:is )?({REL_RE}) {obj}", caption):
            assert holds(one(objs, c1, s1), rel, one(objs, c2, s2)), caption
        for c2, s2, c1, s1, rel in re.findall(rf"{obj} with {obj} ({REL_RE}) it", caption):
            assert holds(one(objs, c1, s1), rel, one(objs, c2, s2)), caption
        if caption.startswith("from left to right: "):
            named = re.findall(rf"({COLOR_RE}) ({SHAPE_RE})", caption)
            xs = [center(one(objs, c, s))[0] for c, s in named]
            assert len(named) == len(objs) and xs == sorted(xs), caption


def test_captions_are_distinct(moderate):
    by_image: dict[int, list[str]] = {}
    for ann in load(moderate, "captions_train.json")["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    distinct = sum(len(set(c)) == 5 for c in by_image.values())
    assert distinct >= 0.95 * len(by_image)


def test_rejects_tiny_images(tmp_path):
    with pytest.raises(ValueError):
        generate_scenes(tmp_path, image_size=16, n_train=1, n_val=0, n_test=0)


def test_caption_template_names_the_template_that_wrote_each_caption():
    import random

    from compression.scenes import CAPTION_TEMPLATES, caption_template, related_pairs, sample_scene

    seen = set()
    for i in range(400):
        rng = random.Random(i)
        scene = sample_scene(rng, i, "train", 64)
        pairs = related_pairs(scene)
        for template in CAPTION_TEMPLATES:
            caption = template(rng, scene, pairs)
            if caption is not None:
                assert caption_template(caption) == template.__name__.removeprefix("_cap_"), caption
                seen.add(template)
    assert seen == set(CAPTION_TEMPLATES)
    with pytest.raises(ValueError, match="not a scenes caption"):
        caption_template("a man riding a horse on a beach")
