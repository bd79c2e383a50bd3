"""Every user-facing error is JSON {"error": {"code", "message"}} with the right status."""

from __future__ import annotations


class ApiError(Exception):
    field: str | None = None  # the request field it is about (`image`, `question`): see routes.common.field

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
