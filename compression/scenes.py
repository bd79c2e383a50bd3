"""Deterministic synthetic scene dataset: shapes on a light background.

Each image holds 2-4 non-overlapping coloured shapes. Ground truth is known
exactly, so every caption and VQA answer is generated to be true of its image.
Output uses the standard COCO captions, VQAv2 and Karpathy-split layouts so the
project's generic loaders read it unchanged::

    out_dir/images/{split}/{image_id:06d}.png
    out_dir/annotations/captions_{split}.json
    out_dir/annotations/vqa_questions_{split}.json
    out_dir/annotations/vqa_annotations_{split}.json
    out_dir/annotations/scenes_{split}.json
    out_dir/annotations/dataset_karpathy.json
    out_dir/scenes_meta.json

Determinism: every image draws from its own RNG derived from
(seed, split, index), so output is byte-identical for the same arguments and an
image never changes when another split's (or a later image's) count changes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")

SHAPES = ("circle", "rectangle", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 30),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (140, 80, 30),
}
# Object side as a fraction of the image side; the gap between the two ranges
# keeps "small" and "large" visually unambiguous.
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "large": (0.28, 0.36)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

MIN_OBJECTS, MAX_OBJECTS = 2, 4
OBJECT_MARGIN = 2  # empty pixels required between two objects' boxes
EDGE_MARGIN = 1  # keep shapes off the image border
RELATION_MIN_OFFSET = 6.0  # px at 64 px; scaled with image_size
BACKGROUND_RANGE = (220, 255)  # per channel, like easy-VQA
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = (8, 12)
ANSWERS_PER_QUESTION = 10  # VQAv2 has ten human answers per question

RELATION_PHRASES = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}

# Every answer the generator can produce: a fixed vocabulary, so it does not
# depend on the seed or the split sizes.
ANSWER_VOCAB = sorted({"yes", "no", *COLORS, *SHAPES, *NUMBER_WORDS})


# ---------------------------------------------------------------- data types


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1; x1/y1 exclusive

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def label(self) -> str:
        """'red circle': unambiguous, since (shape, colour) is unique per scene."""
        return f"{self.color} {self.shape}"

    def phrase(self, with_size: bool) -> str:
        words = ([self.size] if with_size else []) + [self.color, self.shape]
        return _a(" ".join(words))

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "bbox": list(self.bbox),
        }


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    image_size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    @property
    def file_name(self) -> str:
        return f"{self.split}/{self.image_id:06d}.png"

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "background": list(self.background),
            "objects": [o.to_json() for o in self.objects],
        }


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    question_type: str  # existence, color, shape, count, relation
    answer_type: str  # yes/no, number, other


# ---------------------------------------------------------------- small helpers


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def _join(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _derive_seed(*parts: object) -> int:
    # sha256 rather than hash(): stable across processes and PYTHONHASHSEED.
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _relation_threshold(image_size: int) -> float:
    return RELATION_MIN_OFFSET * image_size / 64


# ---------------------------------------------------------------- scene sampling


def _boxes_clear(a: Sequence[int], b: Sequence[int], margin: int) -> bool:
    """True when boxes a and b are at least `margin` empty pixels apart."""
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _object_extent(rng: random.Random, shape: str, size: str, image_size: int) -> tuple[int, int]:
    lo, hi = SIZES[size]

    def side() -> int:
        return max(3, round(rng.uniform(lo, hi) * image_size))

    w = side()
    # Rectangles may be non-square; circles and triangles use a square box.
    h = side() if shape == "rectangle" else w
    return w, h


def _place_objects(
    rng: random.Random,
    specs: Sequence[tuple[str, str, str]],
    image_size: int,
    tries: int = 100,
) -> list[SceneObject] | None:
    """Rejection-sample a box for each (shape, colour, size); None if one doesn't fit."""
    placed: list[SceneObject] = []
    for shape, color, size in specs:
        w, h = _object_extent(rng, shape, size, image_size)
        for _ in range(tries):
            x0 = rng.randint(EDGE_MARGIN, image_size - EDGE_MARGIN - w)
            y0 = rng.randint(EDGE_MARGIN, image_size - EDGE_MARGIN - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_boxes_clear(box, o.bbox, OBJECT_MARGIN) for o in placed):
                placed.append(SceneObject(shape, color, size, box))
                break
        else:
            return None
    return placed


def sample_scene(rng: random.Random, image_id: int, split: str, image_size: int) -> Scene:
    r, g, b = (rng.randint(*BACKGROUND_RANGE) for _ in range(3))
    for _ in range(1000):
        n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        # Distinct (shape, colour) pairs so "the red circle" always names one object.
        pairs = rng.sample([(s, c) for s in SHAPES for c in COLORS], n)
        specs = [(s, c, rng.choice(tuple(SIZES))) for s, c in pairs]
        objects = _place_objects(rng, specs, image_size)
        if objects is not None:
            return Scene(image_id, split, image_size, (r, g, b), tuple(objects))
    raise RuntimeError(f"could not place objects in a {image_size}px image")


def draw_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        # PIL's box corners are inclusive; bbox ends are exclusive.
        box = (x0, y0, x1 - 1, y1 - 1)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "rectangle":
            draw.rectangle(box, fill=fill)
        else:  # upward triangle
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return img


# ---------------------------------------------------------------- relations


def relation(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """Where a lies relative to b ('left', 'right', 'above', 'below'), from box
    centres along the dominant axis; None when that offset is too small to see."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    threshold = _relation_threshold(image_size)
    if abs(dx) >= abs(dy):
        if abs(dx) < threshold:
            return None
        return "left" if dx < 0 else "right"
    if abs(dy) < threshold:
        return None
    return "above" if dy < 0 else "below"  # image y grows downward


def related_pairs(scene: Scene) -> list[tuple[SceneObject, SceneObject, str]]:
    """All ordered (a, b, rel) with a clear relation of a relative to b."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is not b:
                rel = relation(a, b, scene.image_size)
                if rel is not None:
                    out.append((a, b, rel))
    return out


def _directional_offset(o: SceneObject, ref: SceneObject, rel: str) -> float:
    """How far o lies from ref in direction rel (negative: the other way)."""
    (ox, oy), (rx, ry) = o.center, ref.center
    return {"left": rx - ox, "right": ox - rx, "above": ry - oy, "below": oy - ry}[rel]


def unique_in_direction(scene: Scene, ref: SceneObject, rel: str) -> SceneObject | None:
    """The one object clearly `rel` of ref, if exactly one is offset that way at
    all (even off the dominant axis), so 'what is left of X?' has one answer."""
    threshold = _relation_threshold(scene.image_size)
    hits = [o for o in scene.objects if o is not ref and _directional_offset(o, ref, rel) >= threshold]
    if len(hits) == 1 and relation(hits[0], ref, scene.image_size) == rel:
        return hits[0]
    return None


# ---------------------------------------------------------------- captions

CaptionTemplate = Callable[[random.Random, Scene, list], str | None]


def _cap_listing(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    objs = rng.sample(scene.objects, len(scene.objects))
    sized = rng.random() < 0.5
    return f"{NUMBER_WORDS[len(objs)]} shapes: {_join([o.phrase(sized) for o in objs])}"


def _cap_pair(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    sized = rng.random() < 0.7
    verb = rng.choice(["", "is "])
    return f"{a.phrase(sized)} {verb}{RELATION_PHRASES[rel]} {b.phrase(sized)}"


def _cap_two_clauses(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    # A third object related to one of the first two, named by its unique label.
    follow = [(c, x, r) for c, x, r in pairs if c is not a and c is not b and (x is a or x is b)]
    if not follow:
        return None
    c, x, rel2 = rng.choice(follow)
    sized = rng.random() < 0.5
    return (
        f"{a.phrase(sized)} is {RELATION_PHRASES[rel]} {b.phrase(sized)} "
        f"and {c.phrase(sized)} is {RELATION_PHRASES[rel2]} the {x.label}"
    )


def _cap_there_are(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    n = len(scene.objects)
    lead = f"there are {NUMBER_WORDS[n]} shapes, " + ("" if n == 2 else "including ")
    return lead + f"{a.phrase(False)} {RELATION_PHRASES[rel]} {b.phrase(False)}"


def _cap_shape_counts(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    counts = Counter(o.shape for o in scene.objects)
    shapes = rng.sample(sorted(counts), len(counts))
    body = _join([f"{NUMBER_WORDS[counts[s]]} {_plural(s, counts[s])}" for s in shapes])
    return rng.choice(["", "an image with ", "a picture of "]) + body


def _cap_left_to_right(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    objs = sorted(scene.objects, key=lambda o: o.center[0])
    # Only when each object is clearly "left of" the next (dominant axis too),
    # so the order is obvious at a glance.
    size = scene.image_size
    if any(relation(a, b, size) != "left" for a, b in itertools.pairwise(objs)):
        return None
    return "from left to right: " + _join([o.phrase(rng.random() < 0.5) for o in objs])


def _cap_picture(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    objs = rng.sample(scene.objects, len(scene.objects))
    return f"a picture of {_join([o.phrase(True) for o in objs])} on a light background"


def _cap_colors(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    colors = sorted({o.color for o in scene.objects})
    n = NUMBER_WORDS[len(scene.objects)]
    if len(colors) == 1:
        return f"{n} {colors[0]} shapes"
    return f"{n} shapes in {_join(rng.sample(colors, len(colors)))}"


def _cap_with_it(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    sized = rng.random() < 0.5
    return f"{b.phrase(sized)} with {a.phrase(sized)} {RELATION_PHRASES[rel]} it"


def _cap_sizes(rng: random.Random, scene: Scene, pairs: list) -> str | None:
    counts = Counter(o.size for o in scene.objects)
    parts = [f"{NUMBER_WORDS[counts[z]]} {z} {_plural('shape', counts[z])}" for z in ("large", "small") if counts[z]]
    return _join(parts)


CAPTION_TEMPLATES: tuple[CaptionTemplate, ...] = (
    _cap_listing,
    _cap_pair,
    _cap_two_clauses,
    _cap_there_are,
    _cap_shape_counts,
    _cap_left_to_right,
    _cap_picture,
    _cap_colors,
    _cap_with_it,
    _cap_sizes,
)


_NUM = "(?:one|two|three|four)"
_SIZED_COUNT = rf"{_NUM} (?:large|small) shapes?"
_SHAPE_COUNT = rf"{_NUM} (?:{'|'.join(SHAPES)})s?"
# (template, pattern) in the order they are tried: the first match names a caption's template
_TEMPLATE_PATTERNS = (
    ("left_to_right", re.compile(r"^from left to right: ")),
    ("there_are", re.compile(r"^there are ")),
    ("listing", re.compile(rf"^{_NUM} shapes: ")),
    ("picture", re.compile(r"^a picture of .* on a light background$")),
    ("colors", re.compile(rf"^{_NUM} (?:shapes in .*|(?:{'|'.join(COLORS)}) shapes)$")),
    ("sizes", re.compile(rf"^{_SIZED_COUNT}(?: and {_SIZED_COUNT})?$")),
    ("shape_counts", re.compile(rf"^(?:an image with |a picture of )?{_SHAPE_COUNT}(?:(?:, | and ){_SHAPE_COUNT})*$")),
    ("with_it", re.compile(r" with .* it$")),
    ("two_clauses", re.compile(r" is .* and .* is .* the ")),
    ("pair", re.compile(rf"^an? .* (?:is )?(?:{'|'.join(RELATION_PHRASES.values())}) an? ")),
)


def caption_template(caption: str) -> str:
    """The name of the template (`_cap_<name>`) that wrote a scenes caption, read from its text:
    what a retrieval breakdown groups queries by (full descriptions, relations, counts)."""
    for name, pattern in _TEMPLATE_PATTERNS:
        if pattern.search(caption):
            return name
    raise ValueError(f"not a scenes caption: {caption!r}")


def make_captions(rng: random.Random, scene: Scene, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """n captions, each from a different template where possible, distinct where possible."""
    pairs = related_pairs(scene)
    captions: list[str] = []
    for _ in range(5):  # a few passes: templates with random picks can repeat
        for template in rng.sample(CAPTION_TEMPLATES, len(CAPTION_TEMPLATES)):
            caption = template(rng, scene, pairs)
            if caption and caption not in captions:
                captions.append(caption)
            if len(captions) == n:
                return captions
    # Rare: too few distinct captions. Repeat some, as COCO readers expect n per image.
    return captions + [captions[i % len(captions)] for i in range(n - len(captions))]


# ---------------------------------------------------------------- questions


def _interleave(rng: random.Random, groups: Sequence[Sequence[QA]]) -> list[QA]:
    """Shuffle each group, then take one from each in turn so no single
    question form dominates (e.g. the many absent colour/shape combinations)."""
    queues = [rng.sample(list(g), len(g)) for g in groups if g]
    rng.shuffle(queues)
    out: list[QA] = []
    while queues:
        for q in list(queues):
            out.append(q.pop())
            if not q:
                queues.remove(q)
    return out


def _alternate(rng: random.Random, yes: list[QA], no: list[QA]) -> list[QA]:
    """Alternate yes and no answers from a random start: ~50/50 per image."""
    first, second = (yes, no) if rng.random() < 0.5 else (no, yes)
    out: list[QA] = []
    for i in range(max(len(first), len(second))):
        out += first[i : i + 1] + second[i : i + 1]
    return out


def _existence_questions(rng: random.Random, scene: Scene) -> list[QA]:
    objs = scene.objects
    present_pairs = {(o.shape, o.color) for o in objs}
    present_colors = {o.color for o in objs}
    present_shapes = {o.shape for o in objs}

    def qa(text: str, yes: bool) -> QA:
        return QA(f"is there {_a(text)}?", "yes" if yes else "no", "existence", "yes/no")

    yes_groups = [
        [qa(o.label, True) for o in objs],
        [qa(f"{o.size} {o.label}", True) for o in objs],
        [qa(f"{c} shape", True) for c in sorted(present_colors)],
        [qa(s, True) for s in sorted(present_shapes)],
    ]
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present_pairs]
    # Hard negatives share a colour or a shape with something in the image.
    hard = [(s, c) for s, c in absent if s in present_shapes or c in present_colors]
    no_groups = [
        [qa(f"{c} {s}", False) for s, c in hard],
        [qa(f"{c} {s}", False) for s, c in absent if (s, c) not in hard],
        # Right colour and shape, wrong size: unique (shape, colour) makes this "no".
        [qa(f"{'small' if o.size == 'large' else 'large'} {o.label}", False) for o in objs],
        [qa(f"{c} shape", False) for c in COLORS if c not in present_colors],
        [qa(s, False) for s in SHAPES if s not in present_shapes],
    ]
    return _alternate(rng, _interleave(rng, yes_groups), _interleave(rng, no_groups))


def _unique(objs: Sequence[SceneObject], **attrs: str) -> SceneObject | None:
    hits = [o for o in objs if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def _color_questions(rng: random.Random, scene: Scene) -> list[QA]:
    objs = scene.objects

    def qa(text: str, o: SceneObject) -> QA:
        return QA(f"what color is the {text}?", o.color, "color", "other")

    by_shape = [qa(s, o) for s in SHAPES if (o := _unique(objs, shape=s))]
    by_size = [qa(f"{z} shape", o) for z in SIZES if (o := _unique(objs, size=z))]
    by_both = [
        qa(f"{z} {s}", o) for z in SIZES for s in SHAPES if (o := _unique(objs, size=z, shape=s)) and not _unique(objs, shape=s)
    ]
    return _interleave(rng, [by_shape, by_size, by_both])


def _shape_questions(rng: random.Random, scene: Scene) -> list[QA]:
    objs = scene.objects

    def qa(text: str, o: SceneObject) -> QA:
        return QA(f"what shape is the {text} object?", o.shape, "shape", "other")

    by_color = [qa(c, o) for c in COLORS if (o := _unique(objs, color=c))]
    by_size = [qa(z, o) for z in SIZES if (o := _unique(objs, size=z))]
    by_both = [
        qa(f"{z} {c}", o) for z in SIZES for c in COLORS if (o := _unique(objs, size=z, color=c)) and not _unique(objs, color=c)
    ]
    return _interleave(rng, [by_color, by_size, by_both])


def _count_questions(rng: random.Random, scene: Scene) -> list[QA]:
    objs = scene.objects

    def qa(text: str, n: int) -> QA:
        return QA(f"how many {text} are there?", NUMBER_WORDS[n], "count", "number")

    def count(**attrs: str) -> int:
        return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in objs)

    present_colors = {o.color for o in objs}
    groups = [
        [qa("shapes", len(objs))],
        [qa(f"{s}s", count(shape=s)) for s in SHAPES],
        [qa(f"{c} shapes", count(color=c)) for c in COLORS if c in present_colors],
        [qa(f"{c} shapes", 0) for c in COLORS if c not in present_colors],
        [qa(f"{z} shapes", count(size=z)) for z in SIZES],
    ]
    return _interleave(rng, groups)


def _relation_questions(rng: random.Random, scene: Scene) -> list[QA]:
    pairs = related_pairs(scene)

    def yes_no(a: SceneObject, b: SceneObject, rel: str, yes: bool) -> QA:
        text = f"is the {a.label} {RELATION_PHRASES[rel]} the {b.label}?"
        return QA(text, "yes" if yes else "no", "relation", "yes/no")

    yes = [yes_no(a, b, rel, True) for a, b, rel in pairs]
    # The opposite relation is unambiguously false; an orthogonal one may not look it.
    no = [yes_no(a, b, OPPOSITE[rel], False) for a, b, rel in pairs]
    what = [
        QA(
            f"what is {RELATION_PHRASES[rel]} the {ref.label}?",
            o.shape,
            "relation",
            "other",
        )
        for ref in scene.objects
        for rel in RELATION_PHRASES
        if (o := unique_in_direction(scene, ref, rel))
    ]
    yn = _alternate(rng, rng.sample(yes, len(yes)), rng.sample(no, len(no)))
    what = rng.sample(what, len(what))
    # Mostly yes/no, with the occasional open "what is ..." question.
    out: list[QA] = []
    while yn or what:
        if yn:
            out += yn[:2]
            yn = yn[2:]
        if what:
            out.append(what.pop())
    return out


QUESTION_GENERATORS: dict[str, Callable[[random.Random, Scene], list[QA]]] = {
    "existence": _existence_questions,
    "color": _color_questions,
    "shape": _shape_questions,
    "count": _count_questions,
    "relation": _relation_questions,
}


def make_questions(rng: random.Random, scene: Scene) -> list[QA]:
    """8-12 questions, taking one per type in turn so types stay balanced."""
    target = rng.randint(*QUESTIONS_PER_IMAGE)
    streams = {t: gen(rng, scene) for t, gen in QUESTION_GENERATORS.items()}
    order = rng.sample(sorted(streams), len(streams))
    chosen: list[QA] = []
    asked: set[str] = set()
    while len(chosen) < target and any(streams.values()):
        for t in order:
            stream = streams[t]
            while stream and stream[0].question in asked:
                stream.pop(0)
            if stream and len(chosen) < target:
                qa = stream.pop(0)
                chosen.append(qa)
                asked.add(qa.question)
    rng.shuffle(chosen)
    return chosen


# ---------------------------------------------------------------- writing


def _write_json(path: Path, obj: Any) -> None:
    # sort_keys + fixed compact separators: byte-identical output for identical
    # data, and compact like the official COCO/VQA files (ten answers a question).
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


def _info(seed: int, split: str, image_size: int) -> dict[str, Any]:
    return {
        "description": "TrimVLM synthetic scenes",
        "version": str(GENERATOR_VERSION),
        "seed": seed,
        "split": split,
        "image_size": image_size,
    }


def _write_split(
    out: Path,
    split: str,
    first_id: int,
    n: int,
    seed: int,
    image_size: int,
    karpathy: list,
) -> dict[str, int]:
    """Generate, draw and write one split; appends its Karpathy entries."""
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, captions, questions, answers, scenes = [], [], [], [], []

    for index in range(n):
        image_id = first_id + index
        rng = random.Random(_derive_seed("scenes", GENERATOR_VERSION, seed, split, index))
        scene = sample_scene(rng, image_id, split, image_size)
        draw_scene(scene).save(img_dir / f"{image_id:06d}.png", format="PNG", compress_level=6)
        scenes.append(scene.to_json())
        images.append(
            {
                "id": image_id,
                "file_name": scene.file_name,
                "width": image_size,
                "height": image_size,
            }
        )

        sentences = []
        for k, caption in enumerate(make_captions(rng, scene)):
            sent_id = image_id * 10 + k
            captions.append({"id": sent_id, "image_id": image_id, "caption": caption})
            sentences.append(
                {
                    "raw": caption,
                    "tokens": _tokens(caption),
                    "imgid": len(karpathy),
                    "sentid": sent_id,
                }
            )
        karpathy.append(
            {
                "filepath": split,
                "filename": f"{image_id:06d}.png",
                "imgid": len(karpathy),
                "cocoid": image_id,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )

        for k, qa in enumerate(make_questions(rng, scene)):
            qid = image_id * 1000 + k  # VQAv2 convention
            questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
            answers.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": qa.question_type,
                    "answer_type": qa.answer_type,
                    "multiple_choice_answer": qa.answer,
                    "answers": [
                        {
                            "answer": qa.answer,
                            "answer_confidence": "yes",
                            "answer_id": j,
                        }
                        for j in range(1, ANSWERS_PER_QUESTION + 1)
                    ],
                }
            )

    info = _info(seed, split, image_size)
    ann = out / "annotations"
    _write_json(
        ann / f"captions_{split}.json",
        {"info": info, "licenses": [], "images": images, "annotations": captions},
    )
    common = {"info": info, "data_type": "scenes", "data_subtype": split}
    _write_json(
        ann / f"vqa_questions_{split}.json",
        {**common, "task_type": "Open-Ended", "questions": questions},
    )
    _write_json(ann / f"vqa_annotations_{split}.json", {**common, "annotations": answers})
    _write_json(ann / f"scenes_{split}.json", scenes)
    return {"images": n, "captions": len(captions), "questions": len(questions)}


def generate_scenes(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 500,
    n_test: int = 500,
    image_size: int = 64,
) -> dict:
    """Write the dataset under out_dir and return scenes_meta.json's content:
    {"seed", "image_size", "counts": {split: {"images", "captions", "questions"}},
     "answers": sorted answer vocabulary, "generator_version"}."""
    if image_size < 32:
        raise ValueError("image_size must be at least 32 to fit four objects")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(v < 0 for v in sizes.values()):
        raise ValueError("split sizes must be non-negative")

    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    karpathy: list[dict] = []
    counts = {}
    next_id = 1  # image ids are global across splits, COCO-style starting at 1
    for split in SPLITS:
        counts[split] = _write_split(out, split, next_id, sizes[split], seed, image_size, karpathy)
        next_id += sizes[split]

    _write_json(
        out / "annotations" / "dataset_karpathy.json",
        {"dataset": "scenes", "images": karpathy},
    )
    meta = {
        "seed": seed,
        "image_size": image_size,
        "counts": counts,
        "answers": ANSWER_VOCAB,
        "generator_version": GENERATOR_VERSION,
    }
    _write_json(out / "scenes_meta.json", meta)
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Generate the synthetic scenes dataset.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-val", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    meta = generate_scenes(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
    )
    print(json.dumps(meta["counts"], sort_keys=True))
    return meta


if __name__ == "__main__":
    main()
