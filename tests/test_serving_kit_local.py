"""The built-in ``local`` serving target passes the serving conformance kit (mlflowctl.testing)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlflowctl.testing import make_serving_kit
from mlflowctl.testing.serving_contract import *  # noqa: F401,F403 - the suite's tests
from serving_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serving_kit(tmp_path_factory):
    settings = {"port": free_port(), "grpc_port": 0, "runtime": "process", "python": sys.executable,
                "start_timeout": 90}
    with make_serving_kit(tmp_path_factory.mktemp("kit") / "proj", "local", settings, stage_code=REPO / "image") as kit:
        yield kit
