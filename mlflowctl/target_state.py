"""A serving target's own state folder: one JSON record, written atomically, changed under a lock;
and :class:`TargetBasics`, what the targets built on it share (the folder, the model name, the runtime).

Third-party targets (and the ``tfserving``, ``seldon``, ``hydrosphere`` distributions) keep what they
deployed in ``.mlflowctl/serve/<target>/``::

    state = TargetState(project.state_dir / "serve" / "mytarget")
    with state.locked():                    # one mlflowctl process at a time changes it
        record = state.read({"versions": []})
        record["versions"].append(3)
        state.write(record)                 # all or nothing (a rename)

Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from mlflowctl.errors import MlflowctlError
from mlflowctl.manifest import created_mode


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` all at once (temporary file + fsync + rename), mode as the umask gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, created_mode())  # the umask's mode, as open() gives, not mkstemp's 0600
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TargetState:
    """``<dir>/state.json`` plus ``<dir>/.lock``."""

    def __init__(self, directory: Path, name: str = "state.json") -> None:
        self.dir = Path(directory)
        self.file = self.dir / name

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (an ``flock``; the kernel drops it if the holder dies)."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def read(self, default: dict[str, Any]) -> dict[str, Any]:
        """The record, or a copy of ``default`` when there is none (or it is unreadable)."""
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return json.loads(json.dumps(default))
        return data if isinstance(data, dict) else json.loads(json.dumps(default))

    def write(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.file, data)

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            self.file.unlink()


class TargetBasics:
    """A mixin for :class:`mlflowctl.serving.ServingTarget` subclasses (put it first among the bases):
    ``state`` (``.mlflowctl/serve/<name>/``), ``model_name``, and :meth:`runtime_choice`."""

    name: str
    project: Any
    setting: Any

    @cached_property
    def state(self) -> TargetState:
        return TargetState(Path(self.project.state_dir) / "serve" / self.name)

    @property
    def model_name(self) -> str:
        return str(self.project.model_name)

    def checked_number(self, version: Any, weight: float) -> int:
        """``deploy``'s argument checks: the version is of this project's model and ``weight`` is a share
        (0..1); the version's number. One line (:class:`MlflowctlError`) otherwise."""
        if getattr(version, "name", self.model_name) != self.model_name:
            raise MlflowctlError(f"this project serves model {self.model_name!r}, not {version.name!r}")
        if not 0.0 <= float(weight or 0.0) <= 1.0:
            raise MlflowctlError(f"canary weight must be between 0 and 1, got {weight}")
        return int(version.number)

    def runtime_choice(self, default: str) -> str:
        """The ``runtime`` setting; ``auto`` is ``k8s`` when the project's backend is k8s, else ``default``."""
        runtime = str(self.setting("runtime"))
        if runtime == "auto":
            return "k8s" if self.project.config["backend"] == "k8s" else default
        return runtime
