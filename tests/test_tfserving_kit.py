"""The ``tfserving`` target passes the serving conformance kit (mlflowctl.testing) in a real container.

``tensorflow/serving`` cannot be pulled here: ``image: project`` runs the project's server through
``image/tf_serving_entrypoint.py`` (see test_tfserving_target.py). TF Serving has no traffic weights.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mlflowctl.testing import make_serving_kit
from mlflowctl.testing.serving_contract import *  # noqa: F401,F403 - the suite's tests
from serving_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serving_kit(tmp_path_factory, docker_client):
    settings = {"image": "project", "runtime": "docker", "port": free_port(), "grpc_port": 0, "start_timeout": 90}
    with make_serving_kit(tmp_path_factory.mktemp("kit") / "proj", "tfserving", settings, stage_code=REPO / "image",
                          supports_weights=False) as kit:
        yield kit
