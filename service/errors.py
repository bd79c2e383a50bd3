"""Every user-facing error is JSON {"error": {"code", "message"}} with the right status.

Every error the service raises for a client is a ServiceError: it carries (code, status, message),
optional response headers (Retry-After, WWW-Authenticate) and the request field it is about; one
handler in service/app.py answers them all. Modules raise the subclass that says what went wrong
(ImageError, GalleryError, LevelError, QueueFull, ...); none of them builds a response.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A refusal the client is told about: `code` for machines and metrics, `status` for HTTP,
    `message` for people."""

    field: str | None = None  # the request field it is about (`image`, `question`): see routes.common.field

    def __init__(self, code: str, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.status, self.message, self.headers = code, status, message, headers or {}

    def to_dict(self) -> dict:
        return error_body(self.code, self.message)


class ModelUnavailable(ServiceError):
    """No model is ready to answer yet (loading, or loading failed): retry later."""

    def __init__(self, message: str):
        super().__init__("model_not_ready", 503, message, {"Retry-After": "1"})


class UnknownModel(ServiceError):
    def __init__(self, message: str):
        super().__init__("unknown_model", 404, message)


class InvalidRequest(ServiceError):
    """A request the schema accepted but whose values the service refuses (422 unless told)."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 422):
        super().__init__(code, status, message)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
