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
        files[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    digest = hashlib.sha256(repr(sorted((k, v["sha256"]) for k, v in files.items())).encode()).hexdigest()
    return {**(extra or {}), "files": files, "digest": digest}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_problem(folder: Path, deep: bool = False, digest: Any = sha256_file) -> str | None:
    """What is wrong with a published folder against its ``_manifest.json``, or None.

    Every listed file must be there with its size; with ``deep`` also with its sha256 (``digest(path)``,
    e.g. a memoising one). Used by every store that can look at the files: the ``file://`` store here,
    the ``pvc://`` store's server on the volume and on what it downloads.
    """
    import json

    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        entries = [(rel, int(info["bytes"]), info["sha256"]) for rel, info in files.items()]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for rel, size, sha in entries:
        target = folder / rel
        try:
            if target.stat().st_size != size:
                return f"{rel} has {target.stat().st_size} bytes, not {size}"
            if deep and digest(target) != sha:
                return f"{rel} does not match its sha256"
        except OSError:
            return f"{rel} is missing"
    return None


def manifest_files(root: Path) -> list[Path]:
    """The files a manifest lists: every file under ``root`` except ``_manifest.json`` files, sorted."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]


# -- file modes: what the store creates follows the umask, like any file a program writes -------------
def umask() -> int:
    """The process's umask, read without changing it where ``/proc`` allows (threads may be running)."""
    import os

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def created_mode(mode: int = 0o666) -> int:
    """``mode`` as the umask leaves it: what ``open()``/``mkdir()`` would give (``0o777`` for a folder).

    ``tempfile.mkstemp``/``mkdtemp`` make 0600/0700 whatever the umask; a store chmods what it
    publishes to this, so a registry file and a model file have the same, umask-respecting, mode.
    """
    return mode & ~umask()
