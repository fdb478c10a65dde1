"""The ``file://`` artifact store: a folder on this machine, published by rename."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from mlflowctl import hookimpl
from mlflowctl.errors import ConfigError, UnavailableError
from mlflowctl.stores import (MANIFEST, ReplacingWriter, Store, created_mode, file_manifest, folder_problem,
                              staging_dir, sweep_staging)

STAGING = ".staging"


class _AtomicWriter(ReplacingWriter):
    """A temporary file beside the target, renamed over it on a clean close."""

    def __init__(self, target: Path, mode: str) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.fchmod(fd, created_mode())  # mkstemp's 0600 would hide registry files from a shared store's readers
        super().__init__(os.fdopen(fd, mode))
        self._target = target

    def _commit(self) -> None:
        self._fh.close()
        os.replace(self._tmp, self._target)

    def _discard(self) -> None:
        self._fh.close()
        os.unlink(self._tmp)


class LocalStore(Store):
    """Results and models under a local folder (``file://relative/or/absolute/path``)."""

    scheme = "file"
    description = "a folder on this machine; publish is a rename, so it is atomic"

    def __init__(self, url: str, settings: dict[str, Any], project: Any) -> None:
        super().__init__(url, settings, project)
        rest = url[len("file://"):] if url.startswith("file://") else url
        if not rest:
            raise ConfigError(f"store: {url!r} names no folder", hint="e.g. file://.mlflowctl/store")
        path = Path(os.path.expanduser(rest))
        self.root = path if path.is_absolute() else Path(project.root) / path

    def _path(self, path: str) -> Path:
        parts = [p for p in path.split("/") if p]
        if any(p == ".." for p in parts):
            raise ValueError(f"store path {path!r} leaves the store")
        return self.root.joinpath(*parts)

    def preflight(self) -> None:
        import uuid

        try:
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
            probe = self.root / STAGING / f".probe-{uuid.uuid4().hex}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UnavailableError(f"store {self.url}: folder {self.root} is not writable: {exc.strerror}",
                                   hint="fix its permissions or choose another store in mlflowctl.yaml") from None

    def exists(self, path: str) -> bool:
        return self._path(path).exists()

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(p.name for p in self._path(prefix).iterdir() if not p.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        target = self._path(path)
        if "w" in mode:
            return _AtomicWriter(target, mode)  # type: ignore[return-value]
        return open(target, mode)

    def put(self, src: Path, path: str) -> None:
        with self.open(path, "wb") as out, open(src, "rb") as fh:
            shutil.copyfileobj(fh, out)

    def get(self, path: str, dest: Path) -> Path:
        source = self._path(path)
        if source.is_dir():
            shutil.copytree(source, dest, dirs_exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        return dest

    def delete(self, path: str) -> None:
        target = self._path(path)
        if target.is_dir():
            import uuid

            # rename first so readers never see a half-deleted result
            trash = self.root / STAGING / f"deleted-{uuid.uuid4().hex}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    def fetch(self, path: str) -> Path:
        target = self._path(path)
        if not target.is_dir():
            raise FileNotFoundError(f"{self.url}: {path} is not a published folder")
        return target

    def sweep(self) -> list[str]:
        return sweep_staging(self.root / STAGING)

    def damaged(self, path: str, deep: bool = False) -> str | None:
        return damaged_folder(self._path(path), deep)

    def staging(self, label: str = "out") -> contextlib.AbstractContextManager[Path]:
        return staging_dir(self.root / STAGING, label)

    def publish(self, src: Path, path: str, manifest: dict[str, Any] | None = None) -> bool:
        dest = self._path(path)
        if dest.exists():
            return False
        (src / MANIFEST).write_text(_dumps(file_manifest(src, manifest)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dest)  # atomic; fails if dest appeared meanwhile (never empty: it has a manifest)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                (src / MANIFEST).unlink(missing_ok=True)
                return False
            raise
        return True


def damaged_folder(folder: Path, deep: bool = False) -> str | None:
    """What is wrong with a local published folder against its ``_manifest.json`` (sizes; sha256 if ``deep``,
    memoised per file)."""
    from mlflowctl.pipeline import file_digest

    return folder_problem(folder, deep, digest=file_digest)


def _dumps(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True) + "\n"


@hookimpl
def mlflowctl_add_stores(registry: Any) -> None:
    registry.add_store(LocalStore)
