"""mlflowctl serving target ``hydrosphere``: Hydrosphere Serving 3.x through its manager API and gateway.

A distribution of its own, registered like any third-party plugin: the entry point
``hydrosphere = mlflowctl_hydrosphere`` in the ``mlflowctl`` group (see ``pyproject.toml``).
"""
from __future__ import annotations

from typing import Any

from mlflowctl import hookimpl


@hookimpl
def mlflowctl_add_serving_targets(registry: Any) -> None:
    from mlflowctl_hydrosphere.target import HydrosphereTarget

    registry.add_serving_target(HydrosphereTarget)
