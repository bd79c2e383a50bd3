"""Request image decoding and URL fetching: every fixture is generated here, in memory."""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile

from service.images import (
    STATUS_BY_CODE,
    ImageError,
    ImageLimits,
    OpenedImage,
    decode_base64_image,
    fetch_url,
    host_matches,
    is_public_address,
    load_request_image,
    open_image,
    open_request_image,
)
from service.preprocess import ImageSpec

SPEC = ImageSpec(size=16)
LIMITS = ImageLimits()
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noisy(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature and an IHDR chunk: it claims a size but holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def rgb_at(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def assert_close(actual, expected, tol: int = 12) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= tol, (actual, expected)


def error_of(fn, *args, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args, **kwargs)
    assert info.value.status == STATUS_BY_CODE[info.value.code]
    return info.value


# ---------------------------------------------------------------- formats that decode


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), RED)
    out = open_image(encode(img, fmt), LIMITS)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert_close(rgb_at(out, (20, 15)), RED, tol=20)


def test_load_request_image_array_and_stats():
    data = encode(noisy(), "PNG")
    loaded = load_request_image(data, LIMITS, SPEC)
    assert loaded.array.shape == (16, 16, 3) and loaded.array.dtype == np.uint8
    assert (loaded.source, loaded.nbytes, loaded.format, loaded.original_size) == ("multipart", len(data), "PNG", (64, 48))
    assert load_request_image(bytearray(data), LIMITS, SPEC).source == "multipart"


def test_base64_variants_all_decode_to_the_same_bytes():
    data = encode(noisy(), "PNG")
    std = base64.b64encode(data).decode()
    assert "+" in std or "/" in std  # so the url-safe case below really differs
    variants = {
        "base64": std,
        "no padding": std.rstrip("="),
        "url-safe": base64.urlsafe_b64encode(data).decode(),
        "newlines": base64.encodebytes(data).decode(),
        "spaces": " ".join(std[i : i + 10] for i in range(0, len(std), 10)),
    }
    for name, text in variants.items():
        assert decode_base64_image(text, LIMITS) == data, name
    loaded = load_request_image("\n" + variants["newlines"], LIMITS, SPEC)
    assert (loaded.source, loaded.nbytes) == ("base64", len(data))


def test_data_uri():
    data = encode(noisy(), "JPEG")
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    assert decode_base64_image(uri, LIMITS) == data
    assert decode_base64_image("DATA:image/jpeg;charset=x;BASE64," + base64.b64encode(data).decode(), LIMITS) == data
    loaded = load_request_image(uri, LIMITS, SPEC)
    assert (loaded.source, loaded.format, loaded.nbytes) == ("data_uri", "JPEG", len(data))


@pytest.mark.parametrize(
    "text", ["not base64!!!", "QUJD=RA==", "AAAAA", "ÄÖÜ=", "data:image/png,rawdata", "data:image/png;base64"]
)
def test_bad_base64(text):
    err = error_of(decode_base64_image, text, LIMITS)
    assert (err.code, err.status) == ("invalid_base64", 400)


@pytest.mark.parametrize("payload", [b"", "", "  \n", "data:image/png;base64,", "===="])
def test_empty(payload):
    err = error_of(load_request_image, payload, LIMITS, SPEC)
    assert (err.code, err.status) == ("empty_image", 400)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "data",
    [np.random.default_rng(1).bytes(2000), b"hello, this is a text file\nnot a picture\n", b"<svg xmlns='x'></svg>"],
    ids=["random", "text", "svg"],
)
def test_not_an_image(data):
    err = error_of(open_image, data, LIMITS)
    assert (err.code, err.status) == ("not_an_image", 415)


def test_disallowed_format():
    jpeg = encode(noisy(), "JPEG")
    err = error_of(open_image, jpeg, ImageLimits(formats={"png"}))
    assert (err.code, err.status) == ("unsupported_format", 415) and "JPEG" in err.message
    # A format PIL knows but the defaults leave out: its decoder is never even tried.
    err = error_of(open_image, encode(noisy(), "PPM"), LIMITS)
    assert (err.code, err.status) == ("unsupported_format", 415) and "PPM" in err.message


def test_unknown_format_name_in_limits_is_ignored():
    assert open_image(encode(noisy(), "PNG"), ImageLimits(formats={"PNG", "HEIC"})).size == (64, 48)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt):
    data = encode(noisy((128, 128)), fmt)
    err = error_of(open_image, data[: len(data) // 2], LIMITS)
    assert (err.code, err.status) == ("truncated_image", 422)


def test_truncated_still_fails_if_someone_enabled_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(noisy((128, 128)), "PNG")
    assert error_of(open_image, data[: len(data) // 2], LIMITS).code == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decompression_bomb_header_is_refused_before_decoding():
    huge = png_header(100_000, 100_000)  # 10 gigapixels claimed in ~70 bytes: PIL's own guard fires
    assert len(huge) < 100
    err = error_of(open_image, huge, LIMITS)
    assert (err.code, err.status) == ("too_many_pixels", 413)
    big = png_header(8000, 8000)  # 64 MP: under PIL's default guard, over our 40 MP
    err = error_of(open_image, big, LIMITS)
    assert (err.code, err.status) == ("too_many_pixels", 413) and "8000x8000" in err.message


def test_highly_compressible_bomb_with_a_small_pixel_budget():
    data = encode(Image.new("1", (3000, 3000)), "PNG")  # 9 MP in about a kilobyte
    assert len(data) < 5000
    assert error_of(open_image, data, ImageLimits(max_pixels=1_000_000)).code == "too_many_pixels"


def test_image_too_large_bytes():
    data = encode(noisy((64, 64)), "PNG")
    limits = ImageLimits(max_image_bytes=len(data) - 1)
    for payload in (data, base64.b64encode(data).decode(), "data:image/png;base64," + base64.b64encode(data).decode()):
        err = error_of(load_request_image, payload, limits, SPEC)
        assert (err.code, err.status) == ("image_too_large", 413)
    # A huge base64 string is refused from its length, before any decoding.
    err = error_of(decode_base64_image, "A" * 50_000_000, ImageLimits())
    assert err.code == "image_too_large"


def test_image_too_small():
    err = error_of(open_image, encode(Image.new("RGB", (4, 20)), "PNG"), ImageLimits(min_side=8))
    assert (err.code, err.status) == ("image_too_small", 422)


# ---------------------------------------------------------------- colour modes, alpha, frames, EXIF


def test_cmyk_jpeg():
    out = open_image(encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), LIMITS)
    assert out.mode == "RGB"
    assert_close(rgb_at(out, (16, 16)), RED, tol=20)


def test_16bit_png_is_scaled_not_clipped():
    a = np.full((16, 16), 128 * 257, dtype=np.uint16)
    a[:, 8:] = 65535
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = open_image(encode(img, "PNG"), LIMITS)
    assert rgb_at(out, (2, 2)) == (128, 128, 128) and rgb_at(out, (12, 2)) == WHITE


def test_grayscale_and_one_bit():
    assert rgb_at(open_image(encode(Image.new("L", (8, 8), 77), "PNG"), LIMITS), (1, 1)) == (77, 77, 77)
    assert rgb_at(open_image(encode(Image.new("1", (8, 8), 0), "PNG"), LIMITS), (1, 1)) == (0, 0, 0)


def test_rgba_transparent_pixels_become_white():
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (8, 0, 16, 16))  # right half: fully transparent blue
    for fmt in ("PNG", "WEBP"):
        out = open_image(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), LIMITS)
        assert rgb_at(out, (2, 2)) == RED and rgb_at(out, (12, 2)) == WHITE, fmt


def test_la_transparency_becomes_white():
    img = Image.new("LA", (16, 16), (0, 255))
    img.paste((0, 0), (8, 0, 16, 16))
    out = open_image(encode(img, "PNG"), LIMITS)
    assert rgb_at(out, (2, 2)) == (0, 0, 0) and rgb_at(out, (12, 2)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    img.paste(0, (8, 0, 16, 16))
    out = open_image(encode(img, fmt, transparency=0), LIMITS)
    assert rgb_at(out, (2, 2)) == RED and rgb_at(out, (12, 2)) == WHITE


def test_rgb_png_with_trns_colour_key_becomes_white():
    img = Image.new("RGB", (16, 16), RED)
    img.paste(GREEN, (8, 0, 16, 16))
    out = open_image(encode(img, "PNG", transparency=GREEN), LIMITS)
    assert rgb_at(out, (2, 2)) == RED and rgb_at(out, (12, 2)) == WHITE


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(fmt):
    frames = [Image.new("RGB", (24, 24), c) for c in (RED, GREEN, BLUE)]
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    with Image.open(BytesIO(data)) as check:
        assert check.n_frames == 3
    assert_close(rgb_at(open_image(data, LIMITS), (12, 12)), RED)


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = open_image(data, LIMITS)
    assert out.size == (20, 40)
    assert_close(rgb_at(out, (10, 5)), RED, tol=30)  # stored left is displayed on top
    assert_close(rgb_at(out, (10, 35)), BLUE, tol=30)
    assert load_request_image(data, LIMITS, SPEC).original_size == (20, 40)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns "Corrupt EXIF data" and carries on
def test_corrupt_exif_still_decodes():
    for exif in (b"Exif\x00\x00garbage", b"Exif\x00\x00II*\x00\xff\xff\xff\x00"):
        out = open_image(encode(Image.new("RGB", (12, 8), RED), "JPEG", exif=exif), LIMITS)
        assert out.size == (12, 8)
        assert_close(rgb_at(out, (6, 4)), RED, tol=20)


def test_decoding_from_many_threads():
    payloads = [encode(noisy(seed=i), "JPEG") for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        arrays = list(pool.map(lambda p: load_request_image(p, LIMITS, SPEC).array, payloads))
    assert all(a.shape == (16, 16, 3) for a in arrays)


def test_limits_normalise_and_error_shape():
    limits = ImageLimits(formats={"png", "Jpeg"}, url_allowlist=[" Images.Example.com. ", ""])
    assert limits.formats == {"PNG", "JPEG"} and limits.url_allowlist == ["images.example.com"]
    err = ImageError("too_many_pixels", "x")
    assert err.to_dict() == {"error": {"code": "too_many_pixels", "message": "x"}} and isinstance(err, ValueError)


# ---------------------------------------------------------------- URL policy (no network)

URLS_ON = ImageLimits(allow_urls=True)


@pytest.mark.parametrize("payload", ["http://images.example.com/a.png", "https://x.test/a.jpg", "file:///etc/passwd"])
def test_urls_disabled_by_default(payload):
    err = error_of(load_request_image, payload, LIMITS, SPEC)
    assert (err.code, err.status) == ("url_not_allowed", 400)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/", "http://user:pw@example.com/a.png"]
)
def test_only_plain_http_urls(url):
    assert error_of(fetch_url, url, URLS_ON).code == "url_not_allowed"


@pytest.mark.parametrize("url", ["http:///nohost", "http://example.com:99999/", "http://exa mple.com/", "http://x/" + "a" * 5000])
def test_invalid_urls(url):
    err = error_of(fetch_url, url, URLS_ON)
    assert (err.code, err.status) == ("invalid_url", 400)


def test_allowlist_patterns():
    patterns = ["images.example.com", "*.cdn.example.org"]
    assert host_matches("images.example.com", patterns) and host_matches("IMAGES.example.com.", patterns)
    assert host_matches("a.cdn.example.org", patterns) and host_matches("a.b.cdn.example.org", patterns)
    assert not host_matches("cdn.example.org", patterns)
    assert not host_matches("evilcdn.example.org", patterns)
    assert not host_matches("a.cdn.example.org.evil.com", patterns)
    assert not host_matches("images.example.com.evil.com", patterns)


def test_allowlist_mismatch_refused_before_resolving():
    limits = ImageLimits(allow_urls=True, url_allowlist=["images.example.com", "*.cdn.example.org"])

    def resolver(host, port):
        raise AssertionError(f"resolved {host} though it is not allowed")

    for url in ("http://evil.com/a.png", "http://images.example.com.evil.com/a.png", "http://127.0.0.1/a.png"):
        err = error_of(fetch_url, url, limits, resolver=resolver)
        assert err.code == "url_not_allowed" and "allowlist" in err.message
    # An allowed name still has to resolve to a public address.
    err = error_of(fetch_url, "http://a.cdn.example.org/x.png", limits, resolver=lambda h, p: ["10.0.0.8"])
    assert err.code == "url_not_allowed" and "non-public" in err.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1.2.3:8080/a.png",
        "http://10.1.2.3/a.png",
        "http://192.168.0.1/",
        "http://172.16.5.5/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a00:1]/",
        "http://[fe80::1%25eth0]/",
        "http://[fd00::1]/",
        "http://localhost/",
        "http://2130706433/",  # 127.0.0.1 written as one number: the resolver turns it into 127.0.0.1
    ],
)
def test_private_addresses_refused(url):
    err = error_of(fetch_url, url, URLS_ON)
    assert (err.code, err.status) == ("url_not_allowed", 400), err.message


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.31.255.255", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("239.1.2.3", False),
        ("255.255.255.255", False),
        ("240.0.0.1", False),
        ("::", False),
        ("::1", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_any_private_answer_refuses_the_host():
    resolver = {"mixed.test": ["93.184.216.34", "127.0.0.1"]}
    err = error_of(fetch_url, "http://mixed.test/a.png", URLS_ON, resolver=lambda h, p: resolver[h])
    assert err.code == "url_not_allowed"


def test_resolution_failure():
    err = error_of(fetch_url, "http://nowhere.invalid/a.png", URLS_ON, resolver=lambda h, p: [])
    assert (err.code, err.status) == ("url_fetch_failed", 502)

    def failing(host, port):
        raise socket.gaierror("no such host")

    assert error_of(fetch_url, "http://nowhere.invalid/a.png", URLS_ON, resolver=failing).code == "url_fetch_failed"


# ---------------------------------------------------------------- URL fetching against a local server

PNG_BYTES = encode(noisy((32, 32)), "PNG")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        try:
            if parts.path == "/ok.png":
                self._send(200, PNG_BYTES, {"Content-Type": "image/png", "X-Host-Seen": self.headers["Host"]})
            elif parts.path == "/chunked.png":
                self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                for i in range(0, len(PNG_BYTES), 1000):
                    piece = PNG_BYTES[i : i + 1000]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            elif parts.path == "/redirect":
                self._send(302, headers={"Location": query["to"][0]})
            elif parts.path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif parts.path == "/missing":
                self._send(404, b"nope")
            elif parts.path == "/empty":
                self._send(200, b"")
            elif parts.path == "/slow":
                time.sleep(2.0)
                self._send(200, PNG_BYTES)
            elif parts.path == "/trickle":
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif parts.path == "/endless":  # no Content-Length: the client must count
                self.send_response(200)
                self.end_headers()
                for _ in range(400):
                    self.wfile.write(b"\0" * 16384)
            elif parts.path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
            else:
                self._send(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


LOCAL = ImageLimits(allow_urls=True, allow_private_urls=True, url_timeout_s=2.0)


def test_fetch_from_local_server(server):
    base, _ = server
    assert fetch_url(f"{base}/ok.png", LOCAL) == PNG_BYTES
    assert fetch_url(f"{base}/chunked.png", LOCAL) == PNG_BYTES
    loaded = load_request_image(f"  {base}/ok.png  ", LOCAL, SPEC)
    assert (loaded.source, loaded.nbytes, loaded.format, loaded.array.shape) == ("url", len(PNG_BYTES), "PNG", (16, 16, 3))


def test_local_server_refused_without_allow_private(server):
    base, _ = server
    assert error_of(fetch_url, f"{base}/ok.png", URLS_ON).code == "url_not_allowed"


def test_fetch_http_errors(server):
    base, _ = server
    err = error_of(fetch_url, f"{base}/missing", LOCAL)
    assert (err.code, err.status) == ("url_fetch_failed", 502) and "404" in err.message
    assert error_of(fetch_url, f"{base}/empty", LOCAL).code == "empty_image"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert error_of(fetch_url, f"http://127.0.0.1:{closed_port}/a.png", LOCAL).code == "url_fetch_failed"


def test_slow_server_times_out(server):
    base, _ = server
    limits = ImageLimits(allow_urls=True, allow_private_urls=True, url_timeout_s=0.5)
    for path in ("/slow", "/trickle"):  # silent for too long; and alive but never finishing
        start = time.monotonic()
        err = error_of(fetch_url, f"{base}{path}", limits)
        assert (err.code, err.status) == ("url_timeout", 504), path
        assert time.monotonic() - start < 1.5, path


def test_oversize_body_is_cut_off(server):
    base, _ = server
    limits = ImageLimits(allow_urls=True, allow_private_urls=True, max_image_bytes=100_000)
    for path in ("/endless", "/declared-huge"):
        err = error_of(fetch_url, f"{base}{path}", limits)
        assert (err.code, err.status) == ("image_too_large", 413), path


def test_redirects_followed_and_limited(server):
    base, _ = server
    assert fetch_url(f"{base}/redirect?to=/ok.png", LOCAL) == PNG_BYTES  # relative Location
    err = error_of(fetch_url, f"{base}/loop", LOCAL)
    assert (err.code, err.status) == ("url_fetch_failed", 502) and "redirected more than 3" in err.message
    no_redirects = ImageLimits(allow_urls=True, allow_private_urls=True, url_max_redirects=0)
    assert error_of(fetch_url, f"{base}/redirect?to=/ok.png", no_redirects).code == "url_fetch_failed"


def test_every_redirect_hop_is_rechecked(server):
    """A public-looking first hop (test resolver + connector pointing at the local server) may not
    redirect to an internal address, a disallowed host or another scheme."""
    _, port = server
    fake_public = "93.184.216.34"
    names = {"public.test": [fake_public], "internal.test": ["10.0.0.7"], "other.test": [fake_public]}
    connected: list[str] = []

    def resolver(host, port):
        return names[host]

    def connect(ip, p, timeout):
        connected.append(ip)
        assert ip == fake_public, f"connected to unchecked address {ip}"
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def fetch(url, limits=URLS_ON):
        return fetch_url(url, limits, resolver=resolver, connect=connect)

    first = f"http://public.test:{port}"
    assert fetch(f"{first}/ok.png") == PNG_BYTES  # the seam works: the first hop is fine
    assert fetch(f"{first}/redirect?to=http://other.test:{port}/ok.png") == PNG_BYTES
    for target in (
        f"http://127.0.0.1:{port}/ok.png",
        "http://internal.test/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "file:///etc/passwd",
    ):
        assert error_of(fetch, f"{first}/redirect?to={target}").code == "url_not_allowed", target
    allow_public_only = ImageLimits(allow_urls=True, url_allowlist=["public.test"])
    err = error_of(fetch, f"{first}/redirect?to=http://other.test:{port}/ok.png", allow_public_only)
    assert err.code == "url_not_allowed" and "allowlist" in err.message
    assert set(connected) == {fake_public}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 whose certificate names only public.test (needs the openssl CLI)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=public.test", "-addext", "subjectAltName=DNS:public.test"],
        check=True,
        capture_output=True,
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    yield httpd.server_address[1], client_ctx
    httpd.shutdown()
    httpd.server_close()


def test_https_verifies_the_host_name_while_connecting_to_the_checked_address(tls_server, monkeypatch):
    import service.images as images

    port, trusted = tls_server
    fake_public = "93.184.216.34"

    def fetch(url):
        return fetch_url(
            url,
            URLS_ON,
            resolver=lambda h, p: [fake_public],
            connect=lambda ip, p, t: socket.create_connection(("127.0.0.1", port), timeout=t),
        )

    monkeypatch.setattr(images, "_SSL_CONTEXT", trusted)
    assert fetch(f"https://public.test:{port}/ok.png") == PNG_BYTES
    err = error_of(fetch, f"https://other.test:{port}/ok.png")  # certificate names public.test only
    assert (err.code, err.status) == ("url_fetch_failed", 502) and "TLS" in err.message
    monkeypatch.setattr(images, "_SSL_CONTEXT", None)  # the system CA store does not know our test CA
    assert error_of(fetch, f"https://public.test:{port}/ok.png").code == "url_fetch_failed"


# ---------------------------------------------------------------- inline preprocessing


def test_open_request_image_reads_the_header_only():
    big = encode(Image.new("RGB", (300, 200), RED), "PNG")
    for payload, source in (
        (big, "multipart"),
        (base64.b64encode(big).decode(), "base64"),
        ("data:image/png;base64," + base64.b64encode(big).decode(), "data_uri"),
    ):
        opened = open_request_image(payload, LIMITS)
        assert (opened.pixels, opened.source, opened.format, opened.data) == (60_000, source, "PNG", big)
        loaded = load_request_image(opened, LIMITS, SPEC)  # continues from the header: same as from the payload
        again = load_request_image(payload, LIMITS, SPEC)
        assert np.array_equal(loaded.array, again.array)
        assert (loaded.source, loaded.nbytes, loaded.format, loaded.original_size) == (source, len(big), "PNG", (300, 200))
    assert open_request_image("https://example.com/cat.png", LIMITS) is None  # never fetched here
    bomb = png_header(20_000, 20_000)  # a header alone: refused before any decoding
    with pytest.raises(ImageError) as e:
        open_request_image(bomb, LIMITS)
    assert e.value.code == "too_many_pixels"


def test_only_small_images_are_preprocessed_on_the_event_loop():
    from service.settings import Settings
    from service.state import AppState

    st = AppState.create(Settings(inline_preprocess_max_pixels=64 * 64))
    try:
        small = base64.b64encode(encode(Image.new("RGB", (64, 64), RED), "PNG")).decode()
        large = base64.b64encode(encode(Image.new("RGB", (65, 64), RED), "PNG")).decode()
        prepared, inline = st.prepare_image(small)
        assert inline and isinstance(prepared, OpenedImage)  # decoded once: handed on to decode_image
        assert st.prepare_image(encode(Image.new("RGB", (64, 64), RED), "PNG"))[1]  # multipart bytes
        assert st.prepare_image(large) == (large, False)  # the pool decodes it from the payload
        assert st.prepare_image("http://example.com/a.png") == ("http://example.com/a.png", False)  # fetched in the pool
        assert st.prepare_image("A" * 50_000) == ("A" * 50_000, False)  # big on the wire: not even base64-decoded here
        assert st.prepare_image("not base64!") == ("not base64!", True)  # refused from the header: the error at once
    finally:
        st.preprocess_pool.shutdown()
        st.inference_pool.shutdown()
    off = AppState.create(Settings(inline_preprocess_max_pixels=0))
    try:
        assert off.prepare_image(small) == (small, False)
    finally:
        off.preprocess_pool.shutdown()
        off.inference_pool.shutdown()
