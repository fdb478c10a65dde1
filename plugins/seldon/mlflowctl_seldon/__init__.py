"""mlflowctl serving target ``seldon``: Seldon Core v1 (the real Python wrapper locally, a
SeldonDeployment on Kubernetes).

A distribution of its own, registered like any third-party plugin: the entry point
``seldon = mlflowctl_seldon`` in the ``mlflowctl`` group (see ``pyproject.toml``).
"""
from __future__ import annotations

from typing import Any

from mlflowctl import hookimpl


@hookimpl
def mlflowctl_add_serving_targets(registry: Any) -> None:
    from mlflowctl_seldon.target import SeldonTarget

    registry.add_serving_target(SeldonTarget)
