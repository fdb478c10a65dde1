"""The ``seldon`` target passes the serving conformance kit (mlflowctl.testing) with the real
``seldon-core-microservice`` (make seldon). Locally the wrapper has no router: no traffic weights.
"""
from __future__ import annotations

import pytest

from mlflowctl.testing import make_serving_kit
from mlflowctl.testing.serving_contract import *  # noqa: F401,F403 - the suite's tests
from test_seldon_target import seldon_executable


@pytest.fixture(scope="module")
def serving_kit(tmp_path_factory):
    settings = {"executable": seldon_executable(), "runtime": "local", "start_timeout": 90}
    with make_serving_kit(tmp_path_factory.mktemp("kit") / "proj", "seldon", settings, supports_weights=False) as kit:
        yield kit
