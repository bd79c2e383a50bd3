"""Datasets in the formats users already have, read into compact in-memory splits.

- VQAv2-style question + annotation JSON (`load_vqav2`), used for the generated scenes too;
- COCO captions JSON (`load_coco_captions`) and Karpathy-style `dataset_*.json` (`load_karpathy`);
- easy-VQA through its PyPI package (`load_easy_vqa`), the external VQA benchmark;
- the deterministic scene generator (compression.scenes), written in the COCO/VQAv2 formats.

Images are decoded once with the shared preprocessing (service.preprocess) into uint8
[N, S, S, 3] arrays, cached as .npy beside a key of their source files, and normalised on the
fly, so training and serving see the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.preprocess import ImageSpec, image_to_uint8, load_image

SCENES_SEED = 0
SCENES_COUNTS = {"n_train": 3000, "n_val": 500, "n_test": 500}


def cache_dir() -> Path:
    d = Path(os.environ.get("TRIMVLM_CACHE", Path.home() / ".cache" / "trimvlm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_images(paths: list[str | Path], spec: ImageSpec, use_cache: bool = True) -> np.ndarray:
    """Decode and resize images to uint8 [N, S, S, 3], cached by (paths, mtimes, sizes, spec)."""
    key_src = json.dumps([spec.model_dump(mode="json"), [(str(p), os.path.getsize(p), int(os.path.getmtime(p))) for p in paths]])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cached = cache_dir() / "images" / f"{key}.npy"
    if use_cache and cached.is_file():
        return np.load(cached)
    arr = (
        np.stack([image_to_uint8(load_image(p), spec) for p in paths])
        if paths
        else np.zeros((0, spec.size, spec.size, 3), np.uint8)
    )
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(cached)
    return arr


# ----------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------


@dataclass
class VQASample:
    image: int  # row in the split's image array
    question: str
    answer: str  # most common answer (training target)
    answers: list[str] = field(default_factory=list)  # all annotator answers (VQA accuracy)
    question_id: int = 0
    question_type: str = ""


@dataclass
class VQASplit:
    name: str
    images: np.ndarray  # uint8 [N, S, S, 3]
    image_ids: list[int]
    samples: list[VQASample]

    def limit(self, n: int | None) -> VQASplit:
        return self if n is None else VQASplit(self.name, self.images, self.image_ids, self.samples[:n])


def normalize_answer(a: str) -> str:
    return " ".join(a.lower().strip().rstrip(".").split())


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 accuracy: min(#annotators who gave the answer / 3, 1), averaged over the 10
    leave-one-out subsets of annotators as the official evaluation does."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        return 0.0
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return float(np.mean(accs))


def load_vqav2(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_root: str | Path,
    spec: ImageSpec,
    image_pattern: str = "COCO_{data_subtype}_{image_id:012d}.jpg",
    name: str | None = None,
) -> VQASplit:
    """VQAv2-format questions + annotations. image_pattern names an image file under image_root
    from `image_id` and the questions file's `data_subtype` (e.g. train2014)."""
    qdoc = json.loads(Path(questions_json).read_text())
    adoc = json.loads(Path(annotations_json).read_text())
    subtype = qdoc.get("data_subtype", "")
    anns = {a["question_id"]: a for a in adoc["annotations"]}
    image_ids = sorted({q["image_id"] for q in qdoc["questions"]})
    row = {iid: i for i, iid in enumerate(image_ids)}
    paths = [Path(image_root) / image_pattern.format(data_subtype=subtype, image_id=iid) for iid in image_ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} VQA images missing, e.g. {missing[0]}")
    samples = []
    for q in qdoc["questions"]:
        a = anns.get(q["question_id"])
        if a is None:
            raise ValueError(f"question {q['question_id']} has no annotation")
        answers = [x["answer"] for x in a.get("answers", [])] or [a["multiple_choice_answer"]]
        samples.append(
            VQASample(
                row[q["image_id"]],
                q["question"],
                normalize_answer(a["multiple_choice_answer"]),
                answers,
                q["question_id"],
                a.get("question_type", ""),
            )
        )
    return VQASplit(name or subtype, load_images(paths, spec), image_ids, samples)


def load_easy_vqa(split: str, spec: ImageSpec) -> VQASplit:
    """easy-VQA from its PyPI package: split 'train' (4,000 images) or 'test' (1,000)."""
    import easy_vqa

    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        texts, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError("easy-VQA has splits 'train' and 'test'")
    ids = sorted(paths)
    row = {iid: i for i, iid in enumerate(ids)}
    samples = [
        VQASample(row[iid], q, normalize_answer(a), [a], qid, "")
        for qid, (q, a, iid) in enumerate(zip(texts, answers, image_ids, strict=True))
    ]
    return VQASplit(f"easy_vqa_{split}", load_images([paths[i] for i in ids], spec), ids, samples)


# ----------------------------------------------------------------------------------------------
# Captions (captioning and retrieval)
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptionSplit:
    name: str
    images: np.ndarray  # uint8 [N, S, S, 3]
    image_ids: list[int]
    captions: list[list[str]]  # per image

    def limit(self, n: int | None) -> CaptionSplit:
        if n is None:
            return self
        return CaptionSplit(self.name, self.images[:n], self.image_ids[:n], self.captions[:n])


def load_coco_captions(
    captions_json: str | Path, image_root: str | Path, spec: ImageSpec, name: str | None = None
) -> CaptionSplit:
    doc = json.loads(Path(captions_json).read_text())
    images = sorted(doc["images"], key=lambda im: im["id"])
    caps: dict[int, list[str]] = {im["id"]: [] for im in images}
    for a in sorted(doc["annotations"], key=lambda a: a["id"]):
        caps[a["image_id"]].append(a["caption"].strip())
    paths = [Path(image_root) / im["file_name"] for im in images]
    ids = [im["id"] for im in images]
    return CaptionSplit(name or Path(captions_json).stem, load_images(paths, spec), ids, [caps[i] for i in ids])


def load_karpathy(dataset_json: str | Path, image_root: str | Path, split: str, spec: ImageSpec) -> CaptionSplit:
    """Karpathy-style `dataset_coco.json`: images carry filepath/filename/split/sentences."""
    doc = json.loads(Path(dataset_json).read_text())
    images = [im for im in doc["images"] if im["split"] == split or (split == "train" and im["split"] == "restval")]
    paths = [Path(image_root) / im.get("filepath", "") / im["filename"] for im in images]
    ids = [im.get("cocoid", im.get("imgid")) for im in images]
    caps = [[s["raw"].strip() for s in im["sentences"]] for im in images]
    return CaptionSplit(f"karpathy_{split}", load_images(paths, spec), ids, caps)


# ----------------------------------------------------------------------------------------------
# Generated scenes
# ----------------------------------------------------------------------------------------------


def scenes_dir(seed: int = SCENES_SEED, **counts) -> Path:
    """Cache folder of the generated scenes for a seed and split sizes (the defaults unless given)."""
    c = {**SCENES_COUNTS, **counts}
    default = cache_dir() / f"scenes-seed{seed}-{c['n_train']}-{c['n_val']}-{c['n_test']}"
    return Path(default if counts else os.environ.get("TRIMVLM_SCENES", default))


def ensure_scenes(root: str | Path | None = None, seed: int = SCENES_SEED, **counts) -> Path:
    """Return the scenes folder, generating it (deterministically) if it is not there yet."""
    from compression.scenes import generate_scenes

    root = Path(root) if root is not None else scenes_dir(seed, **{k: v for k, v in counts.items() if SCENES_COUNTS.get(k) != v})
    if not (root / "scenes_meta.json").is_file():
        generate_scenes(root, seed=seed, **{**SCENES_COUNTS, **counts})
    return root


def load_scenes_vqa(root: str | Path, split: str, spec: ImageSpec) -> VQASplit:
    ann = Path(root) / "annotations"
    return load_vqav2(
        ann / f"vqa_questions_{split}.json",
        ann / f"vqa_annotations_{split}.json",
        Path(root) / "images",
        spec,
        image_pattern="{data_subtype}/{image_id:06d}.png",
        name=f"scenes_{split}",
    )


def load_scenes_captions(root: str | Path, split: str, spec: ImageSpec) -> CaptionSplit:
    return load_coco_captions(
        Path(root) / "annotations" / f"captions_{split}.json", Path(root) / "images", spec, name=f"scenes_{split}"
    )


def answer_vocabulary(*splits: VQASplit, min_count: int = 1) -> list[str]:
    """Closed answer vocabulary: answers seen at least min_count times, most frequent first."""
    counts = Counter(s.answer for split in splits for s in split.samples)
    return [a for a, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_count]
