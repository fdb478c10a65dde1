"""The execution-backend contract: run one stage, stream its log, cancel cleanly.

A backend receives a :class:`StageRun` whose paths are all local to the
orchestrator's machine (the store has already mapped its locations to
directories); it makes them visible to the stage (as they are, as bind
mounts, as volumes) and runs ``run.command`` with ``run.env`` plus one
variable per input and output directory.
"""
from __future__ import annotations

import fnmatch
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, TextIO

from mlflowctl.config import Configurable
from mlflowctl.errors import Cancelled


@dataclass
class StageRun:
    """Everything a backend needs to run one stage."""

    stage: str
    command: list[str]          # e.g. ["python", "train.py"], relative to workdir
    workdir: Path               # the stage code folder (image/)
    env: dict[str, str]         # parameters as environment variables
    inputs: dict[str, Path]     # env var -> local directory holding an upstream result (read only)
    outputs: dict[str, Path]    # env var -> local, empty directory the stage writes
    log_path: Path              # where the full log goes (published with the outputs)
    key: str = ""               # the cache key of this run
    # env var -> (store, store path) of every input and of the output; for backends whose stages run
    # where the store is (``Backend.runs_in_store``) these are the only locations, ``inputs`` and
    # ``outputs`` are then empty and the output path is a store-side staging folder.
    locations: dict[str, "StoreLocation"] = field(default_factory=dict)
    timeout: float | None = None
    # copies of ``command`` that run together as one distributed job (``Stage.replicas``). With more than
    # one, each copy gets ``TF_CONFIG`` (``{"cluster": {...}, "task": {"type", "index"}}``) naming them all;
    # the chief (type ``chief``, else ``worker`` 0) writes the outputs, the others a throwaway folder.
    # Only backends with ``supports_replicas`` get more than 1.
    replicas: int = 1
    # variables of the orchestrator's environment a stage on this machine sees as they are (``Stage.pass_env``:
    # names or patterns); backends running elsewhere (a container, a pod) ignore them
    pass_env: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    echo: Callable[[str], None] | None = None  # where live lines go; default: print with a prefix

    def raise_if_stopped(self, started: float) -> None:
        """Raise ``Cancelled`` if the run was cancelled or ran past ``timeout`` (backends poll this)."""
        if self.cancelled.is_set():
            raise Cancelled(f"stage {self.stage} cancelled")
        if self.timeout and time.monotonic() - started > self.timeout:
            raise Cancelled(f"stage {self.stage} timed out after {self.timeout:g} s")

    def emit(self, line: str) -> None:
        """Stream one line of stage output live, prefixed by the stage name."""
        line = line.rstrip("\n")
        if self.echo is not None:
            self.echo(line)
        else:
            print(f"[{self.stage}] {line}", flush=True)


#: What a stage process on this machine sees of the orchestrator's environment, besides its declared settings
#: and its folders: where programs and libraries are, the user, locale, temp folder, proxies, CA bundles and
#: cloud credentials. Never the whole shell: a ``SEED`` (or any variable a stage might read) exported there
#: must not change a result under the same cache key. More: ``Stage.pass_env`` or ``backends.local.pass_env``.
HOST_ENV_ALLOWLIST: tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_*",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "TF_CPP_MIN_LOG_LEVEL",
)


def environment_matching(patterns: tuple[str, ...] | list[str], environ: Any = None) -> dict[str, str]:
    """The variables of ``environ`` (default: this process's) named by ``patterns`` (names, or ``fnmatch``
    patterns such as ``LC_*``)."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def host_environment(extra: tuple[str, ...] | list[str] = (), environ: Any = None) -> dict[str, str]:
    """What a stage process on this machine inherits: :data:`HOST_ENV_ALLOWLIST` plus ``extra``."""
    return environment_matching(HOST_ENV_ALLOWLIST + tuple(extra), environ)


@dataclass(frozen=True)
class StoreLocation:
    """A stage input or output as a store path (``results/data/<key>``, ``.staging/<stage>-<key>``)."""

    store: Any
    path: str
    read_only: bool = True


@dataclass
class StageResult:
    """How a stage run ended."""

    exit_code: int
    duration: float
    log_path: Path
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Backend(Configurable):
    """Base class of execution backends; subclass it and add it with ``registry.add_backend``.

    ``settings`` declares the keys of ``backends.<name>`` in ``mlflowctl.yaml``.
    """

    name: ClassVar[str] = ""
    #: True when stages run where the orchestrator's folders are not visible (a cluster): they then
    #: get ``StageRun.locations`` only, read inputs from and write outputs into the store itself.
    runs_in_store: ClassVar[bool] = False
    #: True when ``run`` honours ``StageRun.replicas`` > 1 (the pipeline refuses such a run otherwise).
    supports_replicas: ClassVar[bool] = False

    def profile(self) -> dict[str, Any]:
        """What about this backend changes a stage's results: joins every stage's cache key."""
        return {"backend": self.name}

    def run(self, run: StageRun) -> StageResult:  # pragma: no cover - abstract
        """Run the stage to the end, streaming lines through ``run.emit`` and to ``run.log_path``.

        Must return (or raise ``KeyboardInterrupt``/``Cancelled``) promptly after
        ``run.cancelled`` is set, leaving no process or container behind.
        """
        raise NotImplementedError

    def render(self, run: StageRun, folder: Path) -> list[Path]:
        """Write what would be executed (scripts, manifests) into ``folder`` without running it."""
        return []

    def render_setup(self, folder: Path) -> list[Path]:
        """Write what must exist before any stage runs (e.g. RBAC, volumes) into ``folder``; optional."""
        return []

    def apply_setup(self, dry_run: bool = False) -> list[str]:
        """Create what must exist before any stage runs (``mlflowctl setup``); returns what was applied."""
        return []


class LogWriter:
    """Write stage output to the log file and stream it live, line by line."""

    def __init__(self, run: StageRun) -> None:
        self.run = run
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(run.log_path, "a", encoding="utf-8", errors="replace")
        self.tail: list[str] = []

    def line(self, text: str) -> None:
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()
        self.tail = (self.tail + [text.rstrip("\n")])[-20:]
        self.run.emit(text)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
