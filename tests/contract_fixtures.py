"""Implementations the contract suites run against: every backend and store must pass the same tests.

A new backend or store joins by adding a factory here (a third-party plugin
can import these suites and parametrize them with its own factory).
"""
from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Callable


def fake_project(root: Path) -> Any:
    """The few project attributes backends and stores read."""
    state = root / ".mlflowctl"
    state.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(root=root, name="contract", model_name="m", state_dir=state,
                                 stage_code_dir=root / "image", config={})


def local_store(root: Path) -> Any:
    from mlflowctl_plugins.local_store import LocalStore

    return LocalStore("file://store", {}, fake_project(root))


def local_backend(root: Path) -> Any:
    from mlflowctl_plugins.local_backend import LocalBackend

    return LocalBackend({"python": "", "stop_timeout": 5.0}, fake_project(root))


STORES: dict[str, Callable[[Path], Any]] = {"file": local_store}
BACKENDS: dict[str, Callable[[Path], Any]] = {"local": local_backend}

if os.environ.get("MLFLOWCTL_CONTRACT_ONLY"):
    only = set(os.environ["MLFLOWCTL_CONTRACT_ONLY"].split(","))
    STORES = {k: v for k, v in STORES.items() if k in only}
    BACKENDS = {k: v for k, v in BACKENDS.items() if k in only}
