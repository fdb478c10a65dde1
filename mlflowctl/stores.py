"""The artifact-store contract: where stage results and model versions live.

Paths inside a store are ``/``-separated and relative to the store root
(``results/<stage>/<key>``, ``models/<name>/3``). Stage code never sees a
store: the orchestrator asks the store for a *local* directory holding an
input (:meth:`Store.fetch`) and for a fresh local directory to write an output
into (:meth:`Store.staging`), then publishes that directory atomically
(:meth:`Store.publish`). A result is either completely there or not at all.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import IO, Any, ClassVar, Iterator

from mlflowctl.config import Configurable
from mlflowctl.errors import MlflowctlError
from mlflowctl.manifest import (MANIFEST, created_mode, file_manifest, folder_problem,  # noqa: F401 - store contract
                                manifest_files)


class Store(Configurable):
    """Base class of artifact stores; subclass it and add it with ``registry.add_store``.

    ``scheme`` is the URL scheme it serves (``file``, ``s3``, ``pvc``);
    ``settings`` declares the keys of ``stores.<scheme>`` in ``mlflowctl.yaml``.
    """

    scheme: ClassVar[str] = ""

    def __init__(self, url: str, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self.url = url

    # -- objects --------------------------------------------------------
    def exists(self, path: str) -> bool:  # pragma: no cover - abstract
        """True when a file or a published directory exists at ``path``."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:  # pragma: no cover - abstract
        """Names of the direct children of ``prefix`` (files and directories), sorted."""
        raise NotImplementedError

    def open(self, path: str, mode: str = "rb") -> IO[Any]:  # pragma: no cover - abstract
        """Open one small file for reading (``rb``/``r``) or replacing it atomically (``wb``/``w``)."""
        raise NotImplementedError

    def put(self, src: Path, path: str) -> None:  # pragma: no cover - abstract
        """Copy a local file to ``path``, replacing it atomically."""
        raise NotImplementedError

    def get(self, path: str, dest: Path) -> Path:  # pragma: no cover - abstract
        """Copy the file or directory at ``path`` to the local ``dest``; returns ``dest``."""
        raise NotImplementedError

    def delete(self, path: str) -> None:  # pragma: no cover - abstract
        """Remove a file or directory; missing is not an error."""
        raise NotImplementedError

    # -- directories ----------------------------------------------------
    def fetch(self, path: str) -> Path:  # pragma: no cover - abstract
        """A local directory with the content of the published directory ``path`` (read only)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def staging(self, label: str = "out") -> Iterator[Path]:  # pragma: no cover - abstract
        """A fresh, empty local directory, removed on exit unless it was published."""
        raise NotImplementedError
        yield Path()

    def publish(self, src: Path, path: str, manifest: dict[str, Any] | None = None) -> bool:  # pragma: no cover
        """Make the local directory ``src`` appear at ``path`` all at once.

        Writes ``_manifest.json`` (``manifest`` plus the files' sizes and
        sha256, see :func:`file_manifest`) into it. On success ``src`` is
        consumed (moved or removed). Returns ``False`` when ``path`` already
        exists (someone else published first), changing nothing there and
        leaving ``src`` in place.
        """
        raise NotImplementedError

    def damaged(self, path: str, deep: bool = False) -> str | None:
        """What is wrong with the published directory ``path`` against its ``_manifest.json``, or None.

        Cheap by default (every file there with its size); ``deep`` also
        checks every sha256. The default checks nothing: a store that
        verifies what it downloads (``s3://``) or that cannot do it cheaply
        keeps it.
        """
        return None

    def sweep(self) -> list[str]:
        """Remove the staging folders of runs on this machine that were killed; returns their names.

        Called once per ``doit`` run, under the project's run lock, before a
        stage runs. The default has nothing to sweep.
        """
        return []

    # -- stages that run where the store is (pods) -----------------------
    # A backend whose stages cannot see the orchestrator's folders (``Backend.runs_in_store``, e.g.
    # ``k8s``) asks the store how a pod reaches a store path, and has the stage write into a staging
    # folder *inside* the store, which the pipeline then publishes there. A store that cannot be
    # mounted by pods keeps the defaults: such a backend then refuses it with one line.
    def pod_volume(self, path: str) -> tuple[dict[str, Any], str]:
        """How a pod mounts store path ``path``: (a Kubernetes ``volumes`` entry, its ``subPath``).

        Raises ``ConfigError`` when pods cannot reach this store (the default).
        """
        from mlflowctl.errors import ConfigError

        raise ConfigError(f"store {self.url}: pods cannot mount a {self.scheme}:// store",
                          hint="use a store the cluster reaches, e.g. store=pvc://claim/path")

    @contextlib.contextmanager
    def remote_staging(self, label: str = "out", key: str = "") -> Iterator[str]:
        """A fresh, empty folder *in the store* (its store path), removed on exit unless published.

        With a ``key``, the same key gives the same folder (a re-submitted stage adopts its work).
        """
        from mlflowctl.errors import ConfigError

        raise ConfigError(f"store {self.url}: a {self.scheme}:// store has no staging that pods can write")
        yield ""

    def publish_staged(self, staging: str, path: str, manifest: dict[str, Any] | None = None) -> bool:
        """Publish the store-side folder ``staging`` (from :meth:`remote_staging`) at ``path``, all at once.

        Same semantics as :meth:`publish`: ``_manifest.json`` is written, ``False`` when ``path`` exists.
        """
        raise NotImplementedError

    # -- conveniences shared by every store -----------------------------
    def read_json(self, path: str, default: Any = None) -> Any:
        import json

        if not self.exists(path):
            return default
        with self.open(path, "r") as fh:
            return loads_json(fh.read(), self, path)

    def write_json(self, path: str, data: Any) -> None:
        import json

        with self.open(path, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")


class DamagedFile(MlflowctlError, ValueError):
    """A store file that is not what it should be (truncated JSON): one line naming it.

    Also a ``ValueError``, so readers that show a damaged file in place (``mlflowctl ui``) keep doing so.
    """

    def __init__(self, message: str, cause: ValueError | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.cause = cause


def loads_json(data: str | bytes, store: Any, path: str) -> Any:
    """Parse a JSON file read from ``store``: a truncated or garbled one is one line naming it, not a traceback."""
    import json

    try:
        return json.loads(data)
    except ValueError as exc:
        detail = f": {exc.msg} at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise DamagedFile(f"store {store.url}: {path} is damaged (not valid JSON{detail})", exc,
                          hint="restore it from a backup, or delete it if it can be rebuilt") from exc


class ReplacingWriter:
    """What :meth:`Store.open` returns for writing: the target is replaced on a clean close, untouched otherwise.

    A store subclasses it with the file to write into (``fh``) and says how
    to commit it (``_commit``: rename, upload) and drop it (``_discard``).
    ``with store.open(p, "w") as fh:`` commits unless the block raised;
    ``close()`` commits, ``abort()`` drops.
    """

    def __init__(self, fh: IO[Any]) -> None:
        self._fh = fh
        self._done = False

    def __getattr__(self, name: str) -> Any:
        if name == "_fh":
            raise AttributeError(name)
        return getattr(self._fh, name)

    def __enter__(self) -> Any:
        return self._fh

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._commit()

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._discard()

    def _commit(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _discard(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@contextlib.contextmanager
def staging_dir(base: Path, label: str = "out") -> Iterator[Path]:
    """A fresh, empty directory under ``base`` (created), removed on exit: the body of most ``staging()``."""
    import shutil
    import tempfile

    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{label}-{_owner()}-", dir=base))
    tmp.chmod(created_mode(0o777))  # mkdtemp's 0700 would survive the publish (a rename)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owner() -> str:
    """``p<pid>@<host>``: who made a staging folder, so a later run can tell a killed run's leftovers."""
    import os
    import socket

    return f"p{os.getpid()}@{socket.gethostname()}"


def sweep_staging(base: Path) -> list[str]:
    """Remove the folders under ``base`` that :func:`staging_dir` made for processes of this host that are gone."""
    import re
    import shutil
    import socket

    from mlflowctl.state import pid_alive

    removed = []
    host = socket.gethostname()
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = re.search(r"-p(\d+)@(.+)-[^-]*$", entry.name)
        if m and m.group(2) == host and entry.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed
