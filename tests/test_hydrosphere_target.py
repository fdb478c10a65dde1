"""The ``hydrosphere`` serving target (plugins/hydrosphere, its own distribution) against a stand-in
written from Hydrosphere 3.x's documented API (tests/hydrosphere_server.py, on 127.0.0.1): the platform
is unmaintained and cannot run here. The stand-in really loads the uploaded SavedModels (TensorFlow)
and predicts through its gateway; the conformance kit runs against it, weights included.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests
import yaml

import serving_fixtures as fx
from conftest import make_project
from hydrosphere_server import hydrosphere  # noqa: F401 - the fixture
from mlflowctl.errors import ConfigError, UnavailableError
from mlflowctl.project import Project
from mlflowctl.testing import make_serving_kit
from mlflowctl.testing.serving_contract import *  # noqa: F401,F403 - the suite's tests

NAME = "mnist"
BLANK = [0.0] * 784


@pytest.fixture(scope="module")
def serving_kit(tmp_path_factory, hydrosphere):
    with make_serving_kit(tmp_path_factory.mktemp("kit") / "proj", "hydrosphere",
                          {"url": hydrosphere.url, "start_timeout": 60}) as kit:
        yield kit


def test_models_metric_applications_and_hs_yaml(tmp_path, hydrosphere):
    root = make_project(tmp_path / "proj")
    fx.build_registry(root / ".mlflowctl" / "store" / "models" / NAME)
    target = Project(root, {"serving.target": "hydrosphere", "serving.hydrosphere.url": hydrosphere.url,
                            "serving.hydrosphere.application": "fmnist"}).serving
    V = SimpleNamespace  # noqa: N806 - a ModelVersion look-alike
    ep = target.deploy(V(name=NAME, number=2, path=f"models/{NAME}/2", metadata={}), label="stable")
    assert ep.protocol == "hydrosphere" and ep.predict_url == f"{hydrosphere.url}/gateway/application/fmnist-v2"
    r = requests.post(target.endpoint().predict_url, json={"images": [BLANK, [1.0] * 784]}, timeout=30)
    assert r.status_code == 200, r.text
    probs = r.json()["probabilities"]
    assert max(range(10), key=probs[0].__getitem__) == 2 and max(range(10), key=probs[1].__getitem__) == 9

    # the concept model went up as its own model, attached to the classifier as a metric with its threshold
    cluster = hydrosphere.cluster
    classifier = next(v for v in cluster.versions.values() if v["model"]["name"] == NAME)
    concept = next(v for v in cluster.versions.values() if v["model"]["name"] == f"{NAME}-concept")
    (spec,) = [s for s in cluster.metricspecs.values() if s["modelVersionId"] == classifier["id"]]
    assert spec["config"] == {"modelVersionId": concept["id"], "threshold": fx.CONCEPT_THRESHOLD,
                              "thresholdCmpOperator": {"kind": "Less"}}
    # ... and scores live requests: a blank image is healthy, a white one is not
    assert [v["health"] for v in cluster.metric_values[-2:]] == [True, False]

    # the contract's fields are checked by the gateway
    bad = requests.post(ep.predict_url, json={"pixels": [BLANK]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "ContractViolationError"

    # what `hs apply` would take: the seeds' kind: Application with the Autoencoder check
    app = yaml.safe_load((target.state.dir / "hs" / "application.yaml").read_text())
    assert app["kind"] == "Application" and app["name"] == "fmnist"
    assert app["singular"]["model"] == f"{NAME}:{classifier['modelVersion']}"
    (check,) = app["singular"]["monitoring"]
    assert check["type"] == "Autoencoder" and check["healthcheck"] == {"enabled": True,
                                                                      "threshold": fx.CONCEPT_THRESHOLD}
    model = yaml.safe_load((target.state.dir / "hs" / "serving.yaml").read_text())
    assert model["kind"] == "Model" and model["contract"]["inputs"]["images"]["shape"] == [-1, 784]
    st = target.status()
    assert st.running and st.available(2) and st.details["hs_versions"] == {"2": f"{NAME}:{classifier['modelVersion']}"}
    target.stop()
    assert not target.serves(2) and not target.status().running


def test_no_url_and_unreachable_are_one_line(tmp_path):
    root = make_project(tmp_path / "proj")
    target = Project(root, {"serving.target": "hydrosphere"}).serving
    with pytest.raises(ConfigError, match="serving.hydrosphere.url is not set"):
        target.preflight()
    target = Project(root, {"serving.target": "hydrosphere",
                            "serving.hydrosphere.url": f"http://127.0.0.1:{fx.free_port()}"}).serving
    with pytest.raises(UnavailableError, match="unreachable"):
        target.preflight()
    assert target.status().running is False and "unreachable" in target.status().error
