"""Hostile images and payloads, one place for the whole list.

Most cases already run in tests/e2e/test_service.py (BAD_INPUTS: 4xx JSON error and the server
keeps serving; GOOD_VARIANTS: decoded and answered correctly). `HOSTILE` below names every case
the reliability promise covers and where it runs; `test_every_hostile_case_is_covered` keeps the
index honest (a renamed or removed case fails it). The cases not covered elsewhere run here:
a real 20000x20000 PNG bomb with the process's peak memory measured, palette images, an
EXIF-rotated JPEG end to end, lone surrogates and invalid UTF-8 in text, a PNG text-chunk bomb."""

from __future__ import annotations

import base64
import io
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, PngImagePlugin

from tests.e2e.test_service import (
    BAD_INPUTS,
    BLUE,
    GOOD_VARIANTS,
    RED,
    RED_CIRCLE,
    RED_CIRCLE_PNG,
    SHAPE_Q,
    assert_error,
    assert_serves,
    b64,
    encode,
    shape,
)

SERVICE_TESTS = "tests/e2e/test_service.py"
BAD = f"{SERVICE_TESTS}::test_bad_input_gets_json_error_and_server_keeps_serving"
GOOD = f"{SERVICE_TESTS}::test_image_variants_decode_and_answer"
HERE = "tests/reliability/test_hostile_inputs.py"

# The promise's list -> where each case runs: (test id, case key, expected status, expected code or answer)
HOSTILE: dict[str, list[tuple[str, str, int, str]]] = {
    "truncated PNG": [(BAD, "truncated_png", 422, "truncated_image"), (BAD, "truncated_upload", 422, "truncated_image")],
    "truncated JPEG": [(BAD, "truncated_jpeg", 422, "truncated_image")],
    "0-byte file": [(BAD, "empty_image", 400, "empty_image"), (BAD, "empty_upload", 400, "empty_image")],
    "non-image bytes": [(BAD, "non_image_bytes", 415, "not_an_image"), (BAD, "non_image_upload", 415, "not_an_image")],
    "decompression bomb": [
        (BAD, "bomb_header", 413, "too_many_pixels"),
        (BAD, "bomb_compressible", 413, "too_many_pixels"),
        (f"{HERE}::test_real_png_bomb_is_refused_with_bounded_memory", "20000x20000", 413, "too_many_pixels"),
        (f"{HERE}::test_new_hostile_payloads", "png_text_chunk_bomb", 422, "truncated_image"),
    ],
    "CMYK": [(GOOD, "cmyk_jpeg", 200, "red")],
    "16-bit": [(GOOD, "png_16bit_shape", 200, "triangle"), (GOOD, "png_16bit_color", 200, "gray")],
    "palette": [(f"{HERE}::test_palette_images", "palette", 200, "circle")],
    "alpha": [(GOOD, "rgba_alpha", 200, "circle")],
    "animated GIF": [(GOOD, "animated_gif_first_frame_shape", 200, "circle")],
    "EXIF-rotated JPEG": [(f"{HERE}::test_exif_rotated_jpeg_is_served_upright", "exif", 200, "orientation applied")],
    "invalid base64": [(BAD, "bad_base64", 400, "invalid_base64"), (BAD, "data_uri_bad_payload", 400, "invalid_base64")],
    "body over the limit": [
        (BAD, "oversize_body", 413, "payload_too_large"),
        (BAD, "oversize_chunked_body", 413, "payload_too_large"),
        (BAD, "oversize_multipart", 413, "payload_too_large"),
    ],
    "overlong text": [(BAD, "overlong_question", 422, "text_too_long"), (BAD, "overlong_rank_text", 422, "text_too_long")],
    "invalid UTF-8 text": [
        (BAD, "not_utf8_json", 400, "invalid_json"),
        (f"{HERE}::test_new_hostile_payloads", "invalid_utf8_in_json_string", 400, "invalid_json"),
        (f"{HERE}::test_new_hostile_payloads", "lone_surrogate_question", 422, "invalid_request"),
        (f"{HERE}::test_new_hostile_payloads", "lone_surrogate_rank_text", 422, "invalid_text"),
        (f"{HERE}::test_new_hostile_payloads", "lone_surrogate_search_text", 422, "invalid_text"),
    ],
    "too many items": [(BAD, "too_many_items", 413, "too_many_items"), (BAD, "too_many_candidates", 413, "too_many_items")],
}


def test_every_hostile_case_is_covered():
    """Each listed case exists where the index says, with the status and code it says."""
    tables = {BAD: BAD_INPUTS, GOOD: GOOD_VARIANTS}
    for name, places in HOSTILE.items():
        assert places, name
        for test_id, key, status, expected in places:
            if test_id in tables:
                assert key in tables[test_id], f"{name}: {test_id}[{key}] is gone"
                entry = tables[test_id][key]
                if test_id == BAD:
                    assert (entry[2], entry[3]) == (status, expected), (name, key, entry[2:])
                else:
                    assert entry[2] == expected, (name, key, entry[2])
            else:
                assert test_id.startswith(HERE) and test_id.split("::")[1] in globals(), (name, test_id)
                if "test_new_hostile_payloads" in test_id:
                    assert NEW_BAD[key][2:] == (status, expected), (name, key)


# ------------------------------------------------------------------------------ new bad payloads


def _png_with_text_bomb() -> bytes:
    """8x8 pixels carrying a zlib-compressed 64 MiB text chunk (65 KB on the wire)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * (64 * 2**20), zip=True)
    return encode(Image.new("RGB", (8, 8)), "PNG", pnginfo=info)


_JSON = {"content-type": "application/json"}
_IMG = RED_CIRCLE.encode()

NEW_BAD = {
    # name: (path, request kwargs, status, code)
    "png_text_chunk_bomb": ("/vqa", {"json": {"image": b64(_png_with_text_bomb()), "question": SHAPE_Q}}, 422, "truncated_image"),
    "invalid_utf8_in_json_string": (
        "/vqa",
        {"content": b'{"image": "%s", "question": "what \xc3\x28 shape \xff"}' % _IMG, "headers": _JSON},
        400,
        "invalid_json",
    ),
    # Lone surrogates are valid JSON escapes but not text: the tokenizer raised on them (a 500, fixed).
    "lone_surrogate_question": (
        "/vqa",
        {"content": b'{"image": "%s", "question": "what \\ud800 shape"}' % _IMG, "headers": _JSON},
        422,
        "invalid_request",
    ),
    "lone_surrogate_rank_text": (
        "/retrieval/rank",
        {"content": b'{"image": "%s", "texts": ["a red circle", "a \\udfff"]}' % _IMG, "headers": _JSON},
        422,
        "invalid_text",
    ),
    "lone_surrogate_search_text": (
        "/retrieval/search",
        {"content": b'{"text": "\\ud83d x"}', "headers": _JSON},
        422,
        "invalid_text",
    ),
}


@pytest.mark.parametrize("case", list(NEW_BAD))
def test_new_hostile_payloads(client, case):
    path, kwargs, status, code = NEW_BAD[case]
    error = assert_error(client.post(path, **kwargs), status, code)
    assert "Traceback" not in error["message"]
    assert_serves(client)


def test_invalid_utf8_in_a_multipart_field_is_read_as_latin1(client):
    """Form fields are decoded by Starlette: UTF-8, else Latin-1 (browsers' legacy form encoding), so
    invalid UTF-8 becomes (odd) text and is answered, never a crash."""
    head = b'--xyz\r\nContent-Disposition: form-data; name="question"\r\n\r\nwhat \xff\xfe\xc3( shape\r\n'
    image = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    body = head + image + RED_CIRCLE_PNG + b"\r\n--xyz--\r\n"
    r = client.post("/vqa", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 200, r.text
    assert r.json()["answer"]


# ------------------------------------------------------------------------------ the bomb, with memory measured


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


BOMB_SIDE = 20_000
MEMORY_BOUND = 48 * 2**20  # the decoded bomb would take 400 MB (one byte per pixel) to 1.2 GB (RGB)


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    data = encode(Image.new("1", (BOMB_SIDE, BOMB_SIDE)), "PNG", optimize=True)
    assert len(data) < 64 * 1024  # 400 megapixels in ~48 KB
    return data


def test_real_png_bomb_is_refused_with_bounded_memory(client, png_bomb):
    """A valid 20000x20000 PNG of ~48 KB (zeros deflate ~1000:1), as JSON base64 and as an upload:
    413 too_many_pixels from the header, and the process's peak RSS (the app runs in this process)
    and Python-heap peak (tracemalloc) stay far below what decoding it would take."""
    assert_serves(client)  # warm: the first request's one-off allocations are not the bomb's
    measured_rss = _reset_peak_rss()
    rss_before = _rss_bytes("VmRSS")
    tracemalloc.start()
    try:
        for kwargs in (
            {"json": {"image": b64(png_bomb), "question": SHAPE_Q}},
            {"files": {"image": ("bomb.png", png_bomb, "image/png")}, "data": {"question": SHAPE_Q}},
        ):
            assert_error(client.post("/vqa", **kwargs), 413, "too_many_pixels")
        _, heap_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = _rss_bytes("VmHWM") - rss_before
    print(
        f"bomb: {len(png_bomb)} bytes; peak RSS growth {rss_growth / 2**20:.1f} MiB; Python heap peak {heap_peak / 2**20:.1f} MiB"
    )
    assert heap_peak < MEMORY_BOUND, heap_peak
    if measured_rss:
        assert rss_growth < MEMORY_BOUND, rss_growth
    assert_serves(client)


# ------------------------------------------------------------------------------ valid but unusual images


def _palette(transparent: bool) -> bytes:
    img = shape("circle", RED).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    if not transparent:
        return encode(img)
    # Background index transparent: composited onto white it is the same picture
    background = img.getpixel((0, 0))
    return encode(img, transparency=background)


@pytest.mark.parametrize("transparent", [False, True], ids=["palette", "palette_transparent"])
def test_palette_images(client, transparent):
    data = _palette(transparent)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
    for kwargs in (
        {"json": {"image": b64(data), "question": SHAPE_Q}},
        {"files": {"image": ("p.png", data, "image/png")}, "data": {"question": SHAPE_Q}},
    ):
        r = client.post("/vqa", **kwargs)
        assert r.status_code == 200 and r.json()["answer"] == "circle", r.text


def _orientation_images() -> tuple[bytes, bytes, bytes]:
    """(EXIF-rotated JPEG, the picture as displayed, the pixels as stored). Stored 96x48: a red
    circle on the left, a blue bar on the right; EXIF orientation 6 (rotate 90 degrees clockwise)
    displays it 48x96 with the circle on top."""
    stored = Image.new("RGB", (96, 48), (255, 255, 255))
    draw = ImageDraw.Draw(stored)
    draw.ellipse((8, 8, 40, 40), fill=RED)
    draw.rectangle((60, 4, 90, 44), fill=BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    displayed = stored.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    assert displayed.size == (48, 96)
    return jpeg, encode(displayed), encode(stored)


def test_exif_rotated_jpeg_is_served_upright(client):
    """End to end: the EXIF-rotated JPEG embeds (POST /retrieval/search by image) like the picture as
    displayed, not like its stored pixels; so the orientation was applied before the model saw it."""
    jpeg, displayed, stored = _orientation_images()
    for item_id, data in (("orientation-displayed", displayed), ("orientation-stored", stored)):
        r = client.post("/retrieval/index", json={"image": b64(data), "id": item_id})
        assert r.status_code == 200, r.text
    for payload in (b64(jpeg), "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()):
        r = client.post("/retrieval/search", json={"image": payload, "top_k": 100})
        assert r.status_code == 200, r.text
        scores = {h["id"]: h["score"] for h in r.json()["results"]}
        print(f"EXIF JPEG vs displayed {scores['orientation-displayed']:.4f}, vs stored {scores['orientation-stored']:.4f}")
        assert scores["orientation-displayed"] > 0.97, scores
        assert scores["orientation-displayed"] - scores["orientation-stored"] > 0.02, scores
    for item_id in ("orientation-displayed", "orientation-stored"):
        assert client.delete(f"/retrieval/index/{item_id}").status_code == 200
