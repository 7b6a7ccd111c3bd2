"""OpenAI's error object, the shape of every error the server sends: {"error": {"message", "type", "param",
"code"}}, the message one line. ApiError is raised inside routes (and the body reader); error_body builds the
response."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class ApiError(HTTPException):
    """An HTTP error with OpenAI's error fields (raised inside routes and the body reader)."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(status, message)
        self.kind, self.param = kind, param


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> JSONResponse:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


__all__ = ["ApiError", "error_body"]
