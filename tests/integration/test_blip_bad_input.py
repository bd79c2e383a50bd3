"""Bad input and bad checkpoints at BLIP's real resolution. A small random BLIP built with transformers
(no download) has BLIP-base's image geometry, 384 px in 16-px patches (577 image tokens), but two
narrow layers; `trimvlm import blip` imports it, it is exported (fp32 only, to stay fast) and served
by a real `python -m service serve`. Camera-sized photos are resized to 384 px and answered, images
over the pixel limit get 413, captions longer than the decoder's positions get 422 (the limit read
from the manifest), and broken checkpoint folders fail the import in one line."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from tests.e2e.conftest import ServerProcess  # noqa: E402
from tests.unit.test_blip_import import randomize, tiny_tokenizer  # noqa: E402

SIZE, PATCH = 384, 16
IMAGE_TOKENS = (SIZE // PATCH) ** 2 + 1  # 577, [CLS] included
POSITIONS = 40  # the text config's max_position_embeddings: the decoder's positions
PHOTO = (4000, 3000)
MAX_PIXELS = PHOTO[0] * PHOTO[1]  # the server's TRIMVLM_MAX_PIXELS: the photo just fits


def save_blip_384(root: Path) -> Path:
    """A BlipForQuestionAnswering (vision, text encoder, decoder: every endpoint has weights) at 384 px,
    saved with its processor as a Hugging Face folder."""
    import torch
    import transformers

    tok = tiny_tokenizer(root / "vocab")
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=POSITIONS,
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE, patch_size=PATCH
    )
    config = transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    processor = transformers.BlipProcessor(transformers.BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}), tok)
    torch.manual_seed(0)
    hf = transformers.BlipForQuestionAnswering(config).eval()
    randomize(hf, seed=1)
    folder = root / "hf-blip-384"
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def import_cli(src: Path, out: Path, *options: str):
    from typer.testing import CliRunner

    from compression.cli import app

    return CliRunner().invoke(app, ["import", "blip", str(src), "--out", str(out), *options])


@pytest.fixture(scope="module")
def blip384(tmp_path_factory):
    from typer.testing import CliRunner

    from compression.cli import app

    root = tmp_path_factory.mktemp("blip384")
    hf_dir = save_blip_384(root)
    res = import_cli(hf_dir, root / "imported")  # named after the checkpoint folder: hf-blip-384
    assert res.exit_code == 0, res.output
    out = root / "models" / "blip-384" / "1"
    res = CliRunner().invoke(app, ["export", str(root / "imported"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    # served under the folder it was exported to, as the README's `"model": "blip-vqa-base"` expects
    assert json.loads((out / "manifest.json").read_text())["name"] == "blip-384"
    return {"root": root, "hf": hf_dir, "models": root / "models"}


@pytest.fixture(scope="module")
def server(blip384):
    env = {
        # the manifest's default CPU precision is int8, which an fp32-only export lacks
        "TRIMVLM_PRECISION": "fp32",
        "TRIMVLM_MAX_PIXELS": str(MAX_PIXELS),
        "TRIMVLM_GALLERY_DIR": str(blip384["root"] / "gallery"),
    }
    srv = ServerProcess(env, blip384["root"] / "server.log", models=blip384["models"])
    try:
        yield srv.wait_ready()
    finally:
        srv.kill()


def jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    size = (width, height)
    bands = [Image.linear_gradient("L").resize(size), Image.radial_gradient("L").resize(size), Image.new("L", size, 96)]
    buf = io.BytesIO()
    Image.merge("RGB", bands).save(buf, "JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg(*PHOTO)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60.0, **kwargs)


def assert_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def test_a_camera_sized_jpeg_is_resized_to_the_models_384_px_and_answered(server, photo):
    [model] = httpx.get(server.url + "/v1/models", timeout=10.0).json()
    assert model["id"] == "blip-384/1" and model["image_size"] == SIZE
    for kwargs in ({"json": {"image": b64(photo), "max_length": 5}}, {"files": {"image": ("photo.jpg", photo, "image/jpeg")}}):
        r = post(server, "/caption", **kwargs)
        assert r.status_code == 200, r.text
        assert r.json()["compute"]["tokens_total"] == IMAGE_TOKENS and isinstance(r.json()["caption"], str)
    r = post(server, "/retrieval/rank", json={"image": b64(photo), "texts": ["a red circle", "a blue square"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 2 and sorted(r.json()["ranking"]) == [0, 1]
    assert model["vqa"] == "generative"  # BlipForQuestionAnswering: the answer is written by its decoder
    r = post(server, "/vqa", json={"image": b64(photo), "question": "what color is the circle"})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["answer"], str) and r.json()["compute"]["tokens_total"] == IMAGE_TOKENS


def test_an_image_over_the_pixel_limit_is_413(server):
    big = jpeg(PHOTO[0], PHOTO[1] + 1)  # one row over TRIMVLM_MAX_PIXELS
    for path, body in (("/caption", {"image": b64(big)}), ("/retrieval/rank", {"image": b64(big), "texts": ["a red circle"]})):
        message = assert_error(post(server, path, json=body), 413, "too_many_pixels")
        assert f"{PHOTO[0]}x{PHOTO[1] + 1}" in message and str(MAX_PIXELS) in message
    message = assert_error(post(server, "/caption", files={"image": ("big.jpg", big, "image/jpeg")}), 413, "too_many_pixels")
    assert str(MAX_PIXELS) in message


def test_a_caption_longer_than_the_decoders_positions_is_422(server, blip384, photo):
    r = post(server, "/caption", json={"image": b64(photo), "max_length": POSITIONS})  # every position used: fine
    assert r.status_code == 200, r.text
    for beams in (1, 2):
        body = {"image": b64(photo), "max_length": POSITIONS + 1, "num_beams": beams}
        message = assert_error(post(server, "/caption", json=body), 422, "invalid_request")
        assert f"limit of {POSITIONS}" in message and "positions" in message, message
    # the service's own cap (TRIMVLM_MAX_CAPTION_LENGTH, 64) still answers beyond both
    message = assert_error(post(server, "/caption", json={"image": b64(photo), "max_length": 65}), 422, "invalid_request")
    assert f"limit of {POSITIONS}" in message
    manifest = json.loads((blip384["models"] / "blip-384" / "1" / "manifest.json").read_text())
    assert manifest["preprocessing"]["max_positions"] == POSITIONS  # recorded at import, carried by the export
    # and the import refuses a default caption length the decoder cannot reach
    res = import_cli(blip384["hf"], blip384["root"] / "too-long", "--max-caption-length", str(POSITIONS + 1))
    assert res.exit_code == 1 and f"max_caption_length {POSITIONS + 1} exceeds the decoder's {POSITIONS} positions" in res.output


def _no_weights(src: Path) -> None:
    (src / "model.safetensors").unlink()


def _config(data: dict) -> Callable[[Path], None]:
    return lambda src: (src / "config.json").write_text(json.dumps(data))


def _lfs_pointer(src: Path) -> None:
    (src / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 1234567\n")


def _truncated(src: Path) -> None:
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 3])


def _garbage_bin(src: Path) -> None:
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x00not a pickle or a zip\n" * 8)


def _missing_shard(src: Path) -> None:
    (src / "model.safetensors").unlink()
    index = {"weight_map": {"vision_model.post_layernorm.weight": "model-00001-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


BERT = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 768, "vocab_size": 30522}
CLIP = {"model_type": "clip", "architectures": ["CLIPModel"], "text_config": {}, "vision_config": {}, "projection_dim": 512}


@pytest.mark.parametrize(
    "damage, message",
    [
        (None, "is not a folder"),
        (_no_weights, "no weights (model.safetensors"),
        (_config(BERT), "model_type is 'bert', expected 'blip'"),
        (_config(CLIP), "model_type is 'clip', expected 'blip'"),
        (lambda src: (src / "config.json").write_text('{"model_type": "blip",'), "config.json is not valid JSON"),
        (_lfs_pointer, "model.safetensors is a Git LFS pointer, not the weights"),
        (_truncated, "model.safetensors cannot be read as weights"),
        (_garbage_bin, "pytorch_model.bin cannot be read as weights"),
        (_missing_shard, "model-00001-of-00002.safetensors is missing"),
    ],
    ids=["missing-folder", "no-weights", "bert", "clip", "broken-json", "lfs-pointer", "truncated", "garbage-bin", "no-shard"],
)
def test_a_bad_checkpoint_folder_fails_the_import_in_one_line(blip384, tmp_path, damage, message):
    src = tmp_path / "checkpoint"
    if damage is not None:
        shutil.copytree(blip384["hf"], src)
        damage(src)
    res = import_cli(src, tmp_path / "out")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (tmp_path / "out").exists()
