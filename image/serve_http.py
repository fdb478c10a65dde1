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
    """The request body, or a 413 as soon as it is known to exceed ``limit`` bytes (a body that
    stalls is answered 408 by the connection layer, serve_limits.py)."""
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


class Guard:
    """Host and Origin checks (DNS rebinding, cross-origin "simple" POSTs from web pages).

    * ``Host``, on every request: accepted when it is an IP literal (loopback, a pod IP, the
      Kubernetes API server's service proxy, a published docker port), ``localhost`` or a
      ``*.localhost`` name, a single-label name or a ``*.svc`` / ``*.cluster.local`` name (in-cluster
      service names; none of these can be registered on the internet, so a rebound attacker domain
      never matches), or listed in ``allowed_hosts`` (``name``, ``.suffix``, or ``*`` for any).
      A request without ``Host`` (HTTP/1.0) is accepted.
    * ``Origin``, on POST (scoring, reload): a browser sends it with every cross-origin POST, and this
      server serves no web page, so any Origin is refused unless listed in ``allowed_origins``
      (``*`` for any). Clients that are not browsers (curl, requests, gRPC, the monitor) send none.
    """

    SERVICE_SUFFIXES = (".localhost", ".svc", ".cluster.local")

    def __init__(self, allowed_hosts: list[str] | None = None, allowed_origins: list[str] | None = None):
        hosts = [h.strip().lower().rstrip(".") for h in allowed_hosts or [] if h.strip()]
        self.any_host = "*" in hosts
        self.hosts = {h for h in hosts if not h.startswith(".")}
        self.suffixes = tuple(h for h in hosts if h.startswith("."))
        origins = [o.strip().lower().rstrip("/") for o in allowed_origins or [] if o.strip()]
        self.any_origin = "*" in origins
        self.origins = set(origins)
        self._seen: dict[bytes, bool] = {}  # Host header -> verdict (bounded)

    def check(self, headers: list[tuple[bytes, bytes]], method: str) -> None:
        """Raise a 403 for a foreign Host, or an Origin on a POST."""
        host = origin = None
        for name, value in headers:
            if name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if host is not None and not self.any_host:
            ok = self._seen.get(host)
            if ok is None:
                ok = self.host_allowed(host.decode("latin-1"))
                if len(self._seen) < 1024:
                    self._seen[host] = ok
            if not ok:
                raise ApiError(403, f"Host {host[:100].decode('latin-1')!r} is not an allowed host of this server "
                                    f"(start it with --allowed-hosts NAME or $ALLOWED_HOSTS to accept it)")
        if origin is not None and method == "POST" and not self.any_origin:
            text = origin.decode("latin-1").strip().lower().rstrip("/")
            if text not in self.origins:
                raise ApiError(403, f"cross-origin request refused: Origin {text[:100]!r} is not allowed "
                                    f"(start the server with --allowed-origins ORIGIN or $ALLOWED_ORIGINS to accept it)")

    def host_allowed(self, host: str) -> bool:
        import ipaddress

        host = host.strip().lower()
        if host.startswith("["):  # [v6]:port
            end = host.find("]")
            rest = host[end + 1:] if end > 0 else "?"
            if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
                return False
            try:
                ipaddress.IPv6Address(host[1:end])
                return True
            except ValueError:
                return False
        name, sep, port = host.rpartition(":")
        if not sep:
            name = host
        elif not (port.isascii() and port.isdigit()):
            return False
        name = name.rstrip(".")
        if not name or len(name) > 253:
            return False
        try:
            ipaddress.IPv4Address(name)
            return True
        except ValueError:
            pass
        if not all(c.isascii() and (c.isalnum() or c in "-.") for c in name):
            return False
        if name in self.hosts or (self.suffixes and any(name.endswith(s) or "." + name == s for s in self.suffixes)):
            return True
        return name == "localhost" or "." not in name or name.endswith(self.SERVICE_SUFFIXES)
