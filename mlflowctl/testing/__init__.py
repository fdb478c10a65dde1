"""mlflowctl's conformance kit: the contract suites a plugin's own tests run (a pytest plugin).

Enable it in your tests with ``pytest -p mlflowctl.testing`` or, in ``conftest.py``,
``pytest_plugins = ("mlflowctl.testing",)``; then import the suite for what your plugin provides
and give it the one fixture it needs:

=====================================  ===============================  ===================================
suite                                  fixture you provide              what it gets
=====================================  ===============================  ===================================
``mlflowctl.testing.serving_contract``  ``serving_kit`` (module scope)   :func:`make_serving_kit` of your target
``mlflowctl.testing.backend_contract``  ``backend``                      your backend, preflighted
``mlflowctl.testing.store_contract``    ``store``                        your store, preflighted
=====================================  ===============================  ===================================

For example, a serving target's tests::

    import pytest
    from mlflowctl.testing import make_serving_kit
    from mlflowctl.testing.serving_contract import *  # noqa: F401,F403 - the suite's tests

    @pytest.fixture(scope="module")
    def serving_kit(tmp_path_factory):
        with make_serving_kit(tmp_path_factory.mktemp("kit"), "mytarget", {"port": "0"}) as kit:
            yield kit

This package imports only the standard library and mlflowctl at import time.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from mlflowctl.testing.kit import ServingKit, make_serving_kit

__all__ = ["ServingKit", "fake_project", "make_serving_kit"]


def fake_project(root: Path) -> Any:
    """The few project attributes backends and stores read (for the backend and store suites)."""
    root = Path(root)
    state = root / ".mlflowctl"
    state.mkdir(parents=True, exist_ok=True)
    return types.SimpleNamespace(root=root, name="contract", model_name="m", state_dir=state,
                                 stage_code_dir=root / "image", config={})


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "mlflowctl_contract: a test of mlflowctl's conformance kit")
