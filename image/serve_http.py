"""HTTP plumbing of the ASGI app: the request a handler sees, raw responses, reading a body
within the size limit, and sending JSON.

One :class:`Request` per HTTP request carries everything request-specific (the path, the
headers, the body, the traffic class); nothing per request lives on the app object.
"""
from __future__ import annotations

from typing import Any, Callable

import orjson

from serve_errors import ApiError, bad

JSON_HEADERS = [(b"content-type", b"application/json")]


class Request:
    """What a route handler gets: ``path``, ``headers`` (ASGI pairs), ``body`` (POST), ``test``
    (``X-Mlflowctl-Traffic: test``: counted apart from live traffic) and the ASGI ``scope``."""

    __slots__ = ("scope", "path", "headers", "body", "test")

    def __init__(self, scope: dict, body: bytes = b"", test: bool = False):
        self.scope = scope
        self.path: str = scope["path"]
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self.body = body
        self.test = test


class Raw:
    """A response body that is not JSON (metrics text, V2 binary outputs), with its headers."""

    __slots__ = ("data", "headers")

    def __init__(self, data: bytes, headers: list[tuple[bytes, bytes]]):
        self.data = data
        self.headers = headers


async def read_body(scope: dict, receive: Callable, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                raise bad("invalid Content-Length header") from None
            if n > limit:
                raise ApiError(413, f"request body of {n} bytes is larger than the limit of {limit} bytes")
            break
    msg = await receive()
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
        return body
    chunks = [body]
    size = len(body)
    while msg.get("more_body"):
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ApiError(400, "client disconnected")
        body = msg.get("body", b"")
        size += len(body)
        if size > limit:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
        chunks.append(body)
    return b"".join(chunks)


async def send_raw(send: Callable, status: int, data: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def send_json(send: Callable, status: int, payload: Any, extra: list | None = None) -> None:
    data = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.start", "status": status,
                "headers": JSON_HEADERS + extra if extra else JSON_HEADERS})
    await send({"type": "http.response.body", "body": data})
