"""The model server's request errors: one exception, rendered as ``{"error": message}`` with its status.

Handlers raise :class:`ApiError` (or the shorthands :func:`bad`, :func:`not_found`); the
dispatcher (serve_app.py) turns it into the response. Anything else that escapes a handler is
a bug: it is logged with its traceback and answered with :data:`INTERNAL_ERROR`, a fixed text
that never carries exception details to the client.
"""
from __future__ import annotations

INTERNAL_ERROR = "internal error (the server logged the details)"


class ApiError(Exception):
    """A request that cannot be served: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)
