import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compression import data as D
from compression.training import normalize_on_device
from service.preprocess import ImageSpec, Preprocessing, encode_texts, load_image, normalize_uint8, preprocess_image
from service.repository import load_manifest

SPEC = ImageSpec(size=16)
MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("path", sorted(MODELS.glob("*/*/preprocess.json")), ids=lambda p: p.parent.parent.name)
def test_a_model_folders_preprocessing_reads_and_writes_back_unchanged(path):
    """One type for model folders (compression/artifacts.py) and manifests: the committed JSON is unchanged."""
    text = path.read_text()
    pre = Preprocessing.model_validate_json(text)
    assert json.dumps(pre.model_dump(mode="json"), indent=2) + "\n" == text  # as save_model_dir writes it


def test_the_manifest_carries_the_same_preprocessing_type():
    folder = MODELS / "trimvlm-default" / "1"
    pre = load_manifest(folder).preprocessing
    assert type(pre) is Preprocessing and type(pre.image) is ImageSpec
    assert pre.model_dump(mode="json") == json.loads((folder / "manifest.json").read_text())["preprocessing"]
    assert pre.image == ImageSpec(size=64)  # CLIP mean/std, bicubic: the defaults


def test_an_unknown_resampling_filter_is_refused():
    with pytest.raises(ValueError, match="resample"):
        ImageSpec(size=16, resample="lanczos")


def _write_images(root, names, size=(20, 24)):
    for i, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10 * i, 100, 200)).save(p)


def test_vqav2_loader_reads_questions_annotations_and_images(tmp_path):
    _write_images(tmp_path / "img", ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000007.jpg"])
    q = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 7, "question": "What color?", "question_id": 70},
            {"image_id": 1, "question": "Is it big?", "question_id": 10},
        ],
    }
    a = {
        "annotations": [
            {
                "question_id": 70,
                "image_id": 7,
                "question_type": "what color",
                "answer_type": "other",
                "multiple_choice_answer": "Blue",
                "answers": [{"answer": "blue"}] * 9 + [{"answer": "teal"}],
            },
            {
                "question_id": 10,
                "image_id": 1,
                "question_type": "is",
                "answer_type": "yes/no",
                "multiple_choice_answer": "yes",
                "answers": [{"answer": "yes"}] * 10,
            },
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    split = D.load_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "img", SPEC)
    assert split.images.shape == (2, 16, 16, 3) and split.images.dtype == np.uint8
    assert split.image_ids == [1, 7]
    first = split.samples[0]
    assert (first.question, first.answer, first.image, first.question_type) == ("What color?", "blue", 1, "what color")
    assert len(first.answers) == 10
    assert D.answer_vocabulary(split) == ["blue", "yes"]


def test_vqav2_loader_reports_missing_images(tmp_path):
    (tmp_path / "q.json").write_text(
        json.dumps({"data_subtype": "x", "questions": [{"image_id": 1, "question": "q", "question_id": 1}]})
    )
    (tmp_path / "a.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(FileNotFoundError):
        D.load_vqav2(tmp_path / "q.json", tmp_path / "a.json", tmp_path, SPEC)


def test_coco_and_karpathy_caption_loaders(tmp_path):
    _write_images(tmp_path, ["val/a.png", "val/b.png"])
    coco = {
        "images": [{"id": 2, "file_name": "val/b.png"}, {"id": 1, "file_name": "val/a.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "a cat "},
            {"id": 2, "image_id": 2, "caption": "a dog"},
            {"id": 3, "image_id": 1, "caption": "one cat"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    split = D.load_coco_captions(tmp_path / "captions.json", tmp_path, SPEC)
    assert split.image_ids == [1, 2]
    assert split.captions == [["a cat", "one cat"], ["a dog"]]
    karpathy = {
        "images": [
            {"filepath": "val", "filename": "a.png", "imgid": 0, "cocoid": 1, "split": "test", "sentences": [{"raw": "a cat"}]},
            {
                "filepath": "val",
                "filename": "b.png",
                "imgid": 1,
                "cocoid": 2,
                "split": "restval",
                "sentences": [{"raw": "a dog"}],
            },
        ]
    }
    (tmp_path / "dataset.json").write_text(json.dumps(karpathy))
    test = D.load_karpathy(tmp_path / "dataset.json", tmp_path, "test", SPEC)
    train = D.load_karpathy(tmp_path / "dataset.json", tmp_path, "train", SPEC)
    assert test.captions == [["a cat"]] and train.captions == [["a dog"]]  # restval joins train


def test_vqa_accuracy_follows_the_official_formula():
    assert D.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert D.vqa_accuracy("no", ["yes"] * 10) == 0.0
    # 2 of 10 annotators: each leave-one-out subset holds 1 or 2 matches -> mean of 1/3 and 2/3
    assert D.vqa_accuracy("Blue.", ["blue"] * 2 + ["red"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_easy_vqa_loader_reads_the_package():
    split = D.load_easy_vqa("test", ImageSpec(size=64))
    assert split.images.shape == (1000, 64, 64, 3)
    assert len(split.samples) == 9673
    assert {s.answer for s in split.samples} <= {
        "circle",
        "rectangle",
        "triangle",
        "yes",
        "no",
        "red",
        "green",
        "blue",
        "black",
        "gray",
        "teal",
        "brown",
        "yellow",
    }


def test_scenes_round_trip_through_the_generic_loaders(tmp_path):
    root = D.ensure_scenes(tmp_path / "scenes", seed=3, n_train=6, n_val=2, n_test=2)
    vqa = D.load_scenes_vqa(root, "test", ImageSpec(size=64))
    caps = D.load_scenes_captions(root, "test", ImageSpec(size=64))
    assert vqa.images.shape[0] == 2 and caps.images.shape[0] == 2
    assert all(len(c) == 5 for c in caps.captions)
    assert {s.question_type for s in vqa.samples} <= {"existence", "color", "shape", "count", "relation"}


def test_image_cache_returns_identical_arrays(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"])
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    first = D.load_images(paths, SPEC)
    again = D.load_images(paths, SPEC)
    assert np.array_equal(first, again)


def test_torch_normalisation_matches_the_shared_numpy_preprocessing():
    """Bit for bit: a last-digit difference flips near-tied retrieval ranks, and the exported
    model's task metrics must equal torch's exactly."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    ours = normalize_on_device(torch.from_numpy(u8), SPEC).numpy()
    np.testing.assert_array_equal(ours, normalize_uint8(u8, SPEC))


def test_preprocess_handles_alpha_palette_and_exif(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8))
    assert load_image(pal).mode == "RGB"
    img = Image.new("RGB", (10, 20), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 10)
    assert preprocess_image(tmp_path / "r.jpg", SPEC).shape == (3, 16, 16)


def test_encode_texts_pads_and_keeps_the_closing_sep():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    ids, mask = encode_texts(tok, ["a b a b a", "a"], max_length=4)
    assert ids.tolist() == [[2, 4, 5, 3], [2, 4, 3, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
