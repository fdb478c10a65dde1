"""mlflowctl serving target ``tfserving``: TensorFlow Serving (docker container or k8s Deployment).

A distribution of its own, registered like any third-party plugin: the entry point
``tfserving = mlflowctl_tfserving`` in the ``mlflowctl`` group (see ``pyproject.toml``).
"""
from __future__ import annotations

from typing import Any

from mlflowctl import hookimpl


@hookimpl
def mlflowctl_add_serving_targets(registry: Any) -> None:
    from mlflowctl_tfserving.target import TFServingTarget

    registry.add_serving_target(TFServingTarget)
