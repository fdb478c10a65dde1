"""The routing state of the ``local`` serving target: ``.mlflowctl/serve/routing.json``.

``{"versions": [N, ...], "labels": {"stable": N, ...}, "canary_weight": w}``: the versions the
server loads, their labels and the canary's share of unlabelled traffic. Written atomically,
changed under a file lock (several mlflowctl processes may deploy at once), re-read by the server
on ``POST /admin/reload`` (or ``SIGHUP``; a cluster server watches its copy in the store).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflowctl_plugins.local_serving_runtime import read_json, write_json_atomic


class RoutingFile:
    """routing.json and its lock; ``default_weight()`` is the configured canary weight."""

    def __init__(self, path: Path, lock_file: Path, default_weight: Callable[[], float]) -> None:
        self.path = path
        self.lock_file = lock_file
        self.default_weight = default_weight

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise routing changes between mlflowctl processes."""
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as fh:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX
                yield
                return
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, Any]:
        """The routing, normalised (labels only of served versions); empty when there is no file."""
        data = read_json(self.path, None)
        if not isinstance(data, dict):
            data = {}
        versions = sorted({int(v) for v in data.get("versions", []) if isinstance(v, int)})
        labels = {str(k): int(v) for k, v in (data.get("labels") or {}).items()
                  if isinstance(v, int) and v in versions}
        weight = data.get("canary_weight", self.default_weight())
        return {"versions": versions, "labels": labels, "canary_weight": float(weight or 0.0)}

    def write(self, routing: dict[str, Any]) -> None:
        write_json_atomic(self.path, routing)
