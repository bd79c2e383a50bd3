"""Errors in the shape of the protocol a route speaks.

TrimVLM's own routes answer `{"error": {"code", "message"}}` (service/errors.py). The routes that speak
another protocol answer in that protocol's shape, so its clients read them:

- OpenAI-compatible routes (/v1/chat/completions, /v1/embeddings, /openai/v1/...):
  `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API (the `openai` package raises
  BadRequestError, NotFoundError, ... from it);
- Open Inference Protocol routes (/v2, /v2/models/..., anything under /v2/ but the health aliases):
  `{"error": "<message>"}` (KServe v2; tritonclient raises InferenceServerException with the message).

Both protocols call an invalid request 400, so TrimVLM's 422 (a request the schema accepted but whose
values are refused) is 400 there; every other status (401, 404, 405, 413, 415, 429, 503, 504) is kept.
The app's one error handler (service/app.py `_error`) and the two answers given before the app runs (an
oversized body, admission's 429) ask `error_response` here; it answers None for TrimVLM's own paths.
"""

from __future__ import annotations

import re

# The new protocol routes. The existing /v1/models and /v2/health/* keep TrimVLM's own shape.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/embeddings")
OPENAI_PREFIX = "/openai/"
V2_PREFIX = "/v2"
V2_OWN = "/v2/health/"  # TrimVLM's health aliases (service/routes/ops.py) keep TrimVLM's shape

_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_WHERE = re.compile(r"^body\.(?P<param>[^:\s]+): (?P<msg>.*)$", re.S)
# pydantic's union branches in an error location (input.str, content.list[...].ImagePart), not request fields
_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]|[A-Z]\w*)$")


def field_path(dotted: str) -> str:
    """`messages.0.content.list[...].ImagePart.image_url` -> `messages[0].content[...]`-style: the request's
    field names and indices, without pydantic's union branch names."""
    out = ""
    for part in dotted.split("."):
        if part.isdigit():
            out += f"[{part}]"
        elif not _BRANCH.match(part):
            out += f".{part}" if out else part
    return out


def protocol_of(path: str) -> str | None:
    """'openai', 'v2' or None (TrimVLM's own shape) for a request path."""
    if path in OPENAI_PATHS or path.startswith(OPENAI_PREFIX):
        return "openai"
    if path == V2_PREFIX or (path.startswith(V2_PREFIX + "/") and not path.startswith(V2_OWN)):
        return "v2"
    return None


def status_for(protocol: str | None, status: int) -> int:
    return 400 if protocol is not None and status == 422 else status


def openai_error(status: int, code: str, message: str, param: str | None = None) -> dict:
    """OpenAI's error object. A validation message `body.<field>: <why>` names the field as `param`."""
    where = _WHERE.match(message)
    if where and param is None:
        param, why = field_path(where["param"]), where["msg"]
        if why.startswith("Extra inputs are not permitted"):
            why = "unsupported parameter (see docs/PROTOCOLS.md for what this server supports)"
        message = f"{param}: {why}"
    if status >= 500:
        kind = "server_error"
    else:
        kind = _OPENAI_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def v2_error(message: str) -> dict:
    return {"error": message}


def error_response(path: str, status: int, code: str, message: str, param: str | None = None) -> tuple[int, dict] | None:
    """(status, body) in the shape of the protocol `path` speaks; None for TrimVLM's own routes."""
    protocol = protocol_of(path)
    if protocol is None:
        return None
    status = status_for(protocol, status)
    if protocol == "openai":
        return status, openai_error(status, code, message, param)
    return status, v2_error(message)
