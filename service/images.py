"""Request images -> model-ready arrays, safely: base64 / data URIs, raw uploads and (opt-in) URLs.

Everything here is synchronous and thread-safe; the service runs it in a thread pool. Every
refusal is an `ImageError` whose `code` is a stable machine string and whose `status` is the HTTP
status to answer with. The convention:

    400  the request field itself is malformed or refused by policy
         (invalid_base64, empty_image, invalid_url, url_not_allowed)
    413  too big: image_too_large (bytes), too_many_pixels (decompression-bomb guard)
    415  the bytes are not an image in a format we accept
         (not_an_image, unsupported_format: media-type problems, like a wrong Content-Type)
    422  an accepted format whose content cannot be used
         (truncated_image: truncated or corrupt data; image_too_small)
    502  the remote server failed us (url_fetch_failed: DNS, connect, TLS, non-200, redirect limit)
    504  the remote server was too slow (url_timeout: the whole fetch exceeded url_timeout_s)

URL fetching (off unless `allow_urls`) guards against SSRF: http/https only, no credentials in
the URL, host allowlist, every resolved address must be public (unless `allow_private_urls`),
redirects followed by hand with every hop re-checked, one deadline for the whole fetch, a
Content-Type that is neither image/* nor a generic binary type refused (415), the body streamed
and cut off at `max_image_bytes`. DNS rebinding: the host is resolved once, the
addresses are checked, and the TCP connection goes to a checked address (TLS still verifies the
certificate against the host name), so a second, different DNS answer is never used. Proxy
environment variables are ignored on purpose (a proxy would connect to wherever it likes).
Residual risks: the system resolver's own timeout bounds DNS lookups (getaddrinfo cannot be
interrupted), and a public address may itself forward to internal services.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Literal
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from pydantic import BaseModel, Field, field_validator

from service.errors import ServiceError
from service.preprocess import ImageSpec, image_to_uint8, load_image

log = logging.getLogger(__name__)

# Import every PIL plugin once so `formats` can be checked against what this Pillow can decode.
Image.init()
# A truncated image must fail loudly, never decode into a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MiB = 1024 * 1024
DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


class ImageLimits(BaseModel):
    """Per-image limits and URL policy; the service settings hold one."""

    max_image_bytes: int = Field(10 * MiB, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)  # decompression-bomb guard, checked from the header
    min_side: int = Field(1, ge=1)
    formats: frozenset[str] = DEFAULT_FORMATS  # PIL format names
    allow_urls: bool = False
    url_allowlist: list[str] = []  # "host" or "*.domain"; empty = any host (when allow_urls)
    allow_private_urls: bool = False
    url_timeout_s: float = Field(5.0, gt=0)  # for the whole fetch, redirects included
    url_max_redirects: int = Field(3, ge=0)

    @field_validator("formats")
    @classmethod
    def _upper_formats(cls, v: frozenset[str]) -> frozenset[str]:
        return frozenset(f.upper() for f in v)

    @field_validator("url_allowlist")
    @classmethod
    def _lower_hosts(cls, v: list[str]) -> list[str]:
        return [p.strip().lower().rstrip(".") for p in v if p.strip()]


STATUS_BY_CODE: dict[str, int] = {
    "invalid_base64": 400,
    "empty_image": 400,
    "invalid_url": 400,
    "url_not_allowed": 400,
    "image_too_large": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "unsupported_format": 415,
    "truncated_image": 422,
    "image_too_small": 422,
    "url_fetch_failed": 502,
    "url_timeout": 504,
}


class ImageError(ServiceError, ValueError):
    """A request image we refuse (the status follows from the code: STATUS_BY_CODE)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, STATUS_BY_CODE[code], message)


Source = Literal["base64", "data_uri", "multipart", "url"]


@dataclass(frozen=True)
class LoadedImage:
    """A decoded request image plus what metrics want to know about it."""

    array: np.ndarray  # uint8 [spec.size, spec.size, 3]
    source: Source
    nbytes: int  # encoded image size (after base64 decoding)
    format: str  # PIL format name, e.g. "JPEG"
    original_size: tuple[int, int]  # (width, height) after EXIF rotation


# ---------------------------------------------------------------- base64 and data URIs

# bytes.translate is fast: map the url-safe alphabet onto the standard one and drop whitespace.
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_WHITESPACE = b" \t\r\n\v\f"


def _too_large(nbytes: int, limits: ImageLimits) -> ImageError:
    return ImageError("image_too_large", f"image is {nbytes} bytes; the limit is {limits.max_image_bytes} bytes")


def decode_base64_image(s: str, limits: ImageLimits) -> bytes:
    """Decode raw base64 (standard or url-safe, padding optional, whitespace ignored) or a data URI."""
    if s[:5].lower() == "data:":
        header, comma, s = s[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageError("invalid_base64", "a data URI must look like data:image/png;base64,<data>")
    # Cheap refusals before copying anything: whitespace may pad the text, but not double it.
    encoded_limit = (limits.max_image_bytes + 2) // 3 * 4
    if len(s) > 2 * encoded_limit + 1024:
        raise _too_large(len(s) * 3 // 4, limits)
    try:
        raw = s.encode("ascii")
    except UnicodeEncodeError:
        raise ImageError("invalid_base64", "base64 data contains non-ASCII characters") from None
    raw = raw.translate(_URLSAFE_TO_STD, _WHITESPACE).rstrip(b"=")
    if not raw:
        raise ImageError("empty_image", "the image data is empty")
    if len(raw) * 3 // 4 > limits.max_image_bytes:
        raise _too_large(len(raw) * 3 // 4, limits)
    if len(raw) % 4 == 1:
        raise ImageError("invalid_base64", "base64 data has an impossible length (truncated?)")
    try:
        data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except binascii.Error as e:
        raise ImageError("invalid_base64", f"invalid base64: {e}") from None
    if len(data) > limits.max_image_bytes:
        raise _too_large(len(data), limits)
    return data


# ---------------------------------------------------------------- decoding


def _identify_format(data: bytes) -> str | None:
    """Name the format of bytes we refused, for the error message; reads the header only."""
    try:
        with Image.open(BytesIO(data)) as img:
            return img.format
    except Exception:  # any failure here just means "not an image we can name"
        return None


def _open_checked(data: bytes, limits: ImageLimits) -> tuple[Image.Image, str]:
    """Image.open (header only) restricted to allowed formats, then the size checks."""
    if not data:
        raise ImageError("empty_image", "the image data is empty")
    if len(data) > limits.max_image_bytes:
        raise _too_large(len(data), limits)
    # Only plugins for accepted formats even look at the bytes (fewer parsers, less attack surface).
    allowed = tuple(sorted(f for f in limits.formats if f in Image.OPEN))
    try:
        img = Image.open(BytesIO(data), formats=allowed)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"image has too many pixels: {e}") from None
    except UnidentifiedImageError:
        fmt = _identify_format(data)
        if fmt is not None:
            raise ImageError(
                "unsupported_format", f"{fmt} images are not accepted; send one of {', '.join(sorted(limits.formats))}"
            ) from None
        raise ImageError("not_an_image", "the data is not a recognisable image") from None
    except Exception as e:  # a plugin recognised the signature but choked on the header
        raise ImageError("truncated_image", f"the image header is corrupt: {e}") from None
    fmt = "JPEG" if img.format == "MPO" else (img.format or "unknown")  # phone photos open as MPO
    width, height = img.size
    if width * height > limits.max_pixels:
        img.close()
        raise ImageError("too_many_pixels", f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        img.close()
        raise ImageError("image_too_small", f"image is {width}x{height}; each side must be at least {limits.min_side}")
    return img, fmt


def _decode_rgb(data: bytes, limits: ImageLimits, opened: tuple[Image.Image, str] | None = None) -> tuple[Image.Image, str]:
    """RGB pixels of image bytes; `opened`: their header already read and checked (_open_checked)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the global: truncated images must still fail
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was True; resetting it to False")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    img, fmt = opened or _open_checked(data, limits)
    with img:
        try:
            img.load()  # decodes the first frame of animated images; truncation shows up here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("too_many_pixels", f"image has too many pixels: {e}") from None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for bad data
            raise ImageError("truncated_image", f"the image data is truncated or corrupt: {e}") from None
        try:
            rgb = load_image(img)  # EXIF rotation, alpha onto white, any mode -> RGB
        except Exception as e:  # e.g. a colour mode PIL cannot convert to RGB
            raise ImageError("unsupported_format", f"cannot convert a {img.mode} {fmt} image to RGB: {e}") from None
        if rgb is img:  # load_image may hand back the object itself, which closing would destroy
            rgb = img.copy()
    return rgb, fmt


@dataclass
class OpenedImage:
    """A request image with its bytes decoded (base64, data URI) and its header read and checked, its
    pixels not yet: what the event loop looks at to decide where to decode it (its pixel count), handed
    on to load_request_image so that neither step is done twice."""

    source: Source
    data: bytes
    image: Image.Image
    format: str

    @property
    def pixels(self) -> int:
        width, height = self.image.size
        return width * height


def open_request_image(payload: str | bytes, limits: ImageLimits) -> OpenedImage | None:
    """The payload's bytes and image header, without decoding the pixels (base64, data URIs and raw
    bytes; None for URLs, which are never fetched here). Raises the ImageError that decoding would
    raise for a payload refused from its header."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        source, data = "multipart", bytes(payload)
    else:
        text = payload.strip()
        if _URL_RE.match(text):
            return None
        source = "data_uri" if text[:5].lower() == "data:" else "base64"
        data = decode_base64_image(text, limits)
    img, fmt = _open_checked(data, limits)
    return OpenedImage(source, data, img, fmt)


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Validate and decode image bytes into an RGB PIL image (first frame, EXIF-rotated)."""
    return _decode_rgb(data, limits)[0]


# ---------------------------------------------------------------- URLs

Resolver = Callable[[str, int], Sequence[str]]  # (host, port) -> IP address strings
Connector = Callable[[str, int, float], socket.socket]  # (ip, port, timeout) -> connected socket

_REDIRECTS = {301, 302, 303, 307, 308}
_BINARY_TYPES = {"application/octet-stream", "binary/octet-stream"}  # generic types object stores serve images as
_MAX_URL_LENGTH = 4096
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Addresses that carry an IPv4 address inside (NAT64 well-known prefix): check the IPv4 one too.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SSL_CONTEXT: ssl.SSLContext | None = None


def resolve_host(host: str, port: int) -> list[str]:
    """The system resolver: every address `host` resolves to, in preference order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _connect_tcp(ip: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((ip, port), timeout=timeout)


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses; False for private, loopback, link-local,
    multicast, reserved, unspecified and shared (CGNAT) ones, including IPv4 inside IPv6."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    """`host` equals a pattern, or is a subdomain of a "*.domain" pattern (not the domain itself)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, no brackets
    port: int
    path: str  # path + query, percent-encoded

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _parse_url(url: str, limits: ImageLimits) -> _Target:
    if len(url) > _MAX_URL_LENGTH or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ImageError("invalid_url", "the image URL is too long or contains whitespace/control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageError("invalid_url", f"invalid image URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError("url_not_allowed", "only http and https image URLs are accepted")
    if parts.username is not None or parts.password is not None:
        raise ImageError("url_not_allowed", "image URLs must not carry credentials")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ImageError("invalid_url", "the image URL has no host")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        try:
            host = host.encode("idna").decode("ascii")  # internationalised names compare as punycode
        except UnicodeError:
            raise ImageError("invalid_url", f"invalid host name {host!r}") from None
    if limits.url_allowlist and not host_matches(host, limits.url_allowlist):
        raise ImageError("url_not_allowed", f"host {host!r} is not on this server's image URL allowlist")
    path = quote(parts.path or "/", safe="/%!$&'()*+,;=:@-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/?%!$&'()*+,;=:@-._~")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def _checked_addresses(target: _Target, limits: ImageLimits, resolver: Resolver) -> list[str]:
    try:
        ipaddress.ip_address(target.host.split("%", 1)[0])
        addresses = [target.host]
    except ValueError:
        try:
            addresses = list(resolver(target.host, target.port))
        except OSError as e:
            raise ImageError("url_fetch_failed", f"could not resolve {target.host!r}: {e}") from None
    if not addresses:
        raise ImageError("url_fetch_failed", f"could not resolve {target.host!r}")
    if not limits.allow_private_urls:
        # Refuse if ANY answer is internal: an attacker controls the order of DNS answers.
        for address in addresses:
            if not is_public_address(address):
                raise ImageError("url_not_allowed", f"host {target.host!r} resolves to a non-public address")
    return addresses


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:  # loading the CA bundle costs milliseconds: once per process
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


def _get_once(target: _Target, addresses: list[str], limits: ImageLimits, deadline: float, connect: Connector) -> bytes | str:
    """One GET to a checked address: the body, or the Location of a redirect."""
    sock: socket.socket | None = None
    error: OSError | None = None
    for address in addresses:
        try:
            sock = connect(address, target.port, _remaining(deadline))
            break
        except TimeoutError:
            raise
        except OSError as e:  # try the next address, as browsers do
            error = e
    if sock is None:
        raise ImageError("url_fetch_failed", f"could not connect to {target.host!r}: {error}")
    conn = http.client.HTTPConnection(target.host, target.port)
    resp: http.client.HTTPResponse | None = None
    try:
        if target.scheme == "https":
            sock.settimeout(_remaining(deadline))
            # SNI and certificate checks use the host name, the socket goes to the checked address.
            sock = _ssl_context().wrap_socket(sock, server_hostname=target.host)
        conn.sock = sock  # a pre-set socket: http.client never opens its own
        headers = {
            "Host": target.host_header,
            "User-Agent": "trimvlm-image-fetch/1",
            "Accept": "image/*",
            "Accept-Encoding": "identity",  # we count and decode raw bytes; no gzip bombs
            "Connection": "close",
        }
        conn.request("GET", target.path, headers=headers)
        sock.settimeout(_remaining(deadline))
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise ImageError("url_fetch_failed", f"HTTP {resp.status} redirect without a Location header")
            return location
        if resp.status != 200:
            raise ImageError("url_fetch_failed", f"the image server answered HTTP {resp.status}")
        ctype = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype not in _BINARY_TYPES:
            # An HTML page, JSON, ...: refused before its body is read (no type at all: the bytes decide)
            raise ImageError("unsupported_format", f"the URL serves {ctype!r}, not an image")
        length = resp.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > limits.max_image_bytes:
            raise _too_large(int(length), limits)
        body = bytearray()
        while True:
            sock.settimeout(_remaining(deadline))
            chunk = resp.read1(64 * 1024)  # returns after one socket read: the deadline stays honest
            if not chunk:
                break
            body += chunk
            if len(body) > limits.max_image_bytes:
                raise ImageError("image_too_large", f"the image at the URL exceeds {limits.max_image_bytes} bytes")
        return bytes(body)
    finally:
        if resp is not None:
            resp.close()
        conn.close()
        # If getresponse() failed half-way, its unreachable file object still pins the socket (and
        # the exception's traceback keeps it alive): release the descriptor now.
        with contextlib.suppress(OSError):
            os.close(sock.detach())


def fetch_url(url: str, limits: ImageLimits, *, resolver: Resolver | None = None, connect: Connector | None = None) -> bytes:
    """Download an image URL under `limits` (blocking; run it in a thread).

    `resolver` (host, port -> addresses) and `connect` (address, port, timeout -> socket) are
    seams for tests; the defaults are the system resolver and a plain TCP connect.
    """
    if not limits.allow_urls:
        raise ImageError("url_not_allowed", "image URLs are disabled on this server; send base64 or upload the file")
    resolver = resolver or resolve_host
    connect = connect or _connect_tcp
    deadline = time.monotonic() + limits.url_timeout_s
    try:
        for _ in range(limits.url_max_redirects + 1):
            target = _parse_url(url, limits)  # every hop is checked like the first
            addresses = _checked_addresses(target, limits, resolver)
            result = _get_once(target, addresses, limits, deadline, connect)
            if isinstance(result, bytes):
                if not result:
                    raise ImageError("empty_image", "the image URL returned an empty body")
                return result
            url = urljoin(url, result)
    except TimeoutError:
        raise ImageError("url_timeout", f"fetching the image URL took longer than {limits.url_timeout_s:g} s") from None
    except ssl.SSLError as e:
        raise ImageError("url_fetch_failed", f"TLS error fetching the image URL: {e}") from None
    except (OSError, http.client.HTTPException) as e:
        raise ImageError("url_fetch_failed", f"fetching the image URL failed: {e}") from None
    raise ImageError("url_fetch_failed", f"the image URL redirected more than {limits.url_max_redirects} times")


# ---------------------------------------------------------------- one entry point


def load_request_image(payload: str | bytes | OpenedImage, limits: ImageLimits, spec: ImageSpec) -> LoadedImage:
    """A request image -> uint8 [spec.size, spec.size, 3] plus stats.

    str payloads are data URIs, http(s) URLs (only if `allow_urls`) or base64; bytes are raw
    uploads (multipart or a raw body); an OpenedImage continues where open_request_image stopped.
    """
    if not isinstance(payload, OpenedImage):
        opened = open_request_image(payload, limits)
        if opened is None:  # a URL: fetched here, in the preprocessing pool
            data = fetch_url(payload.strip(), limits)
            opened = OpenedImage("url", data, *_open_checked(data, limits))
        payload = opened
    rgb, fmt = _decode_rgb(payload.data, limits, (payload.image, payload.format))
    return LoadedImage(image_to_uint8(rgb, spec), payload.source, len(payload.data), fmt, rgb.size)
