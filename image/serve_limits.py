"""Connection limits, below the ASGI app: uvicorn's HTTP protocol classes with

* a **header size limit**: a request head (request line + headers) larger than ``max_header_bytes``
  is answered ``431`` and the connection closed, before the parser buffers more (httptools has no
  limit of its own: one 50 MB header used to cost ~47 MB of memory);
* an **idle timeout**: a connection with no request in progress for ``idle_timeout`` seconds --
  one that never sends anything, or sends its head too slowly (slowloris) -- is closed, and a
  request whose body stops arriving for that long is answered ``408`` and closed;
* **idle eviction**: when ``max_connections`` connections are open, a new one closes the connection
  that has been idle longest, so idle sockets can never starve new clients (they used to pile up to
  the fd limit, after which every new client got a reset);
* and uvicorn's own ``limit_concurrency`` (serve.py sets it to ``max_connections + 1``): a request
  that arrives while ``max_connections`` other connections are busy is answered ``503``.

A connection is *busy* while a request on it is being handled (headers received, response not
complete); the limits only ever close connections that are not busy.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
from typing import Any

log = logging.getLogger("serve")

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_IDLE_TIMEOUT = 10.0
DEFAULT_LIMIT_CONCURRENCY = 512
FD_RESERVE = 64  # descriptors kept free for the process itself (logs, model files, gRPC, TF threads)


def protocol_class(http: str) -> type:
    """uvicorn's protocol class for ``--http`` (auto: httptools when installed)."""
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:
            if http == "httptools":
                raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def connection_budget(wanted: int) -> int:
    """``wanted`` connections, or fewer when the fd limit cannot hold them (after raising the soft
    limit to the hard one): each connection is one descriptor."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + 4 * FD_RESERVE)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else FD_RESERVE
    except (OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(8, int(soft) - in_use - FD_RESERVE)
    if room < wanted:
        log.warning("connection limit lowered from %d to %d: the fd limit is %d with %d in use",
                    wanted, room, soft, in_use)
    return min(wanted, room)


def limited(base: type, max_header_bytes: int, idle_timeout: float, max_connections: int) -> type:
    """A subclass of uvicorn's protocol class ``base`` enforcing the limits above."""
    too_large = (b'{"error":"the request head (request line and headers) is larger than the limit of %d bytes"}'
                 % max_header_bytes)
    response_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(too_large)) + too_large
    stalled = b'{"error":"the request body stalled: nothing arrived for %g s"}' % idle_timeout
    response_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(stalled)) + stalled

    class Limited(base):  # type: ignore[misc, valid-type]
        _head_bytes = 0       # bytes received while no request is in progress (a head arriving)
        _head_parsed = 0      # request line + headers parsed so far (httptools callbacks)
        _head_too_large = False
        _last_active = 0.0    # when the connection was opened or last answered
        _last_data = 0.0      # when bytes last arrived
        _idle_timer: asyncio.TimerHandle | None = None

        # -- exact count of a head (httptools): a head that completes within one read is counted too
        def on_message_begin(self) -> None:
            self._head_parsed = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count_head(self, n: int) -> None:
            self._head_parsed += n
            if self._head_parsed > max_header_bytes:
                self._head_too_large = True
                raise ValueError("request head too large")  # the parser stops; uvicorn answers via send_400_response

        def send_400_response(self, msg: str) -> None:
            if self._head_too_large:
                self.transport.write(response_431)
                self.transport.close()
                return
            super().send_400_response(msg)

        def _busy(self) -> bool:
            cycle = self.cycle
            return cycle is not None and not cycle.response_complete

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._last_active = self._last_data = self.loop.time()
            self._idle_timer = self.loop.call_later(idle_timeout, self._check_idle)
            if len(self.connections) > max_connections:
                self._evict_one()

        def _evict_one(self) -> None:
            """Close the connection idle longest (not busy, not this one), if there is one."""
            oldest = None
            for conn in self.connections:
                if conn is self or not isinstance(conn, Limited) or conn._busy() or conn.transport.is_closing():
                    continue
                if oldest is None or conn._last_active < oldest._last_active:
                    oldest = conn
            if oldest is not None:
                self.connections.discard(oldest)  # counted out now: its connection_lost comes a loop turn later
                oldest.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._last_data = self.loop.time()
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self._busy():
                self._head_bytes = 0
                return
            self._head_bytes += len(data)  # no request in progress: these bytes are (part of) a head
            if self._head_bytes > max_header_bytes:
                self.transport.write(response_431)
                self.transport.close()

        def on_response_complete(self) -> None:
            self._head_bytes = 0
            self._last_active = self.loop.time()
            super().on_response_complete()

        def _check_idle(self) -> None:
            self._idle_timer = None
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            now = self.loop.time()
            left = idle_timeout
            if not self._busy():
                left = self._last_active + idle_timeout - now
                if left <= 0:
                    transport.close()
                    return
            elif getattr(self.cycle, "more_body", False):  # a request whose body is still arriving
                left = self._last_data + idle_timeout - now
                if left <= 0:  # stalled: answer 408 and free the slot (the app sees a disconnect)
                    transport.write(response_408)
                    transport.close()
                    return
            self._idle_timer = self.loop.call_later(max(left, 0.05), self._check_idle)

    Limited.__name__ = Limited.__qualname__ = f"Limited{base.__name__}"
    return Limited
