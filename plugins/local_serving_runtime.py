"""What the ``local`` serving target and its runtimes say to each other, and what they share.

A runtime (``process``, ``docker``, ``k8s``) starts the model server (:meth:`Runtime.spawn`), tells
whether the recorded one runs (``alive``), stops it (``stop``) and signals it (``hangup``).
``LocalServing`` does the rest -- routing, readiness, reloads -- the same way for all. A runtime
uses the target only through :class:`RuntimeHost`. ``info`` is the content of ``server.json``.

Standard library only at import time.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Protocol

from mlflowctl.target_state import write_json_atomic  # noqa: F401  (shared; the runtimes import it from here)

SERVER_SCRIPT = "serve.py"
STOP_TIMEOUT = 10.0


class RuntimeHost(Protocol):
    """What a runtime may use of the ``local`` target (nothing private)."""

    project: Any          # the run's project (mlflowctl.serving.ProjectView)
    dir: Path             # .mlflowctl/serve/
    pid_file: Path        # server.pid
    info_file: Path       # server.json
    log_file: Path        # server.log
    routing_file: Path    # routing.json

    @property
    def model_name(self) -> str: ...

    def setting(self, key: str) -> Any:
        """The value of ``serving.local.<key>`` (its default when unset)."""

    def forget(self) -> None:
        """Drop the record of the running server (server.pid, server.json)."""

    def port_hint(self, port: int) -> str:
        """What to do when ``port`` is taken."""


class Runtime(Protocol):
    """What the ``local`` target asks of a runtime."""

    name: str
    missing_module_hint: str

    def alive(self, info: dict[str, Any]) -> bool: ...
    def describe(self, info: dict[str, Any]) -> dict[str, Any]: ...
    def log_hint(self, info: dict[str, Any]) -> str: ...
    def spawn(self, args: list[str], base: Any) -> dict[str, Any]: ...
    def exit_code(self) -> int | None: ...
    def serves(self, ready: dict[str, Any]) -> bool: ...
    def discard(self, info: dict[str, Any]) -> None: ...
    def stop(self, info: dict[str, Any], timeout: float = STOP_TIMEOUT) -> None: ...
    def hangup(self, info: dict[str, Any]) -> None: ...


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def is_our_server(pid: int, routing_file: Path | None = None) -> bool:
    """Guard against pid reuse: on Linux, the process must be running serve.py -- and, given
    ``routing_file``, be the server of that routing file (this project folder's, not another's)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.joinpath("self").exists():
        return True  # no /proc: trust the pid file
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    if not any(arg.endswith(SERVER_SCRIPT.encode()) for arg in args):
        return False
    return routing_file is None or str(routing_file).encode() in args


def log_gist(path: Path, offset: int = 0, lines: int = 3) -> str:
    """The last meaningful lines of the server log (from byte ``offset`` on), on one line."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "no log"
    keep = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
    # prefer our own "serve: ..." lines and the final exception line over TF's chatter
    ours = [ln for ln in keep if ln.startswith("serve:") or "Error" in ln or "error" in ln]
    tail = (ours or keep)[-lines:]
    return " | ".join(tail)[-600:] or "empty log"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def port_in_use(host: str, port: int) -> bool:
    """Does something listen on ``host:port`` already? (the bind test ``serve.py`` fails on)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False
