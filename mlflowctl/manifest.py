"""``_manifest.json``: the sizes and sha256 of every file of a published result.

Standard library only, on purpose: the ``pvc://`` store's server runs this very file inside the
cluster (shipped in a ConfigMap), so results are described the same way on both sides.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

MANIFEST = "_manifest.json"


def file_manifest(root: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sizes and sha256 of every file under ``root`` (the ``_manifest.json`` content)."""
    files = {}
    for p in manifest_files(Path(root)):
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size, "sha256": h.hexdigest()}
    digest = hashlib.sha256(repr(sorted((k, v["sha256"]) for k, v in files.items())).encode()).hexdigest()
    return {**(extra or {}), "files": files, "digest": digest}


def manifest_files(root: Path) -> list[Path]:
    """The files a manifest lists: every file under ``root`` except ``_manifest.json`` files, sorted."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
