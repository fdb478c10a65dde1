"""The ``seldon`` serving target (plugins/seldon, its own distribution), locally: the REAL
``seldon-core-microservice`` of seldon-core 1.18 from PyPI (``make seldon`` builds .venv-seldon, with
the TensorFlow that fits its pins) serving the registry's SavedModels through the model class
``MlflowctlModel``, at Seldon v1's ``/api/v1.0/predictions``.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import requests

import serving_fixtures as fx
from conftest import REPO, make_project
from mlflowctl.errors import MlflowctlError
from mlflowctl.project import Project

NAME = "mnist"
BLANK = [0.0] * 784
SELDON = REPO / ".venv-seldon" / "bin" / "seldon-core-microservice"


def seldon_executable() -> str:
    if not SELDON.is_file():
        message = f"{SELDON} missing: make seldon creates it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(SELDON)


def predict(url: str) -> int:
    r = requests.post(url, json={"data": {"ndarray": [BLANK]}}, timeout=30)
    assert r.status_code == 200, r.text
    probs = r.json()["data"]["ndarray"][0]
    return max(range(len(probs)), key=probs.__getitem__)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    exe = seldon_executable()
    root = make_project(tmp_path_factory.mktemp("seldon") / "proj")
    fx.build_registry(root / ".mlflowctl" / "store" / "models" / NAME)
    proj = Project(root, {"serving.target": "seldon", "serving.seldon.executable": exe})
    yield proj
    proj.serving.stop()


def test_lifecycle_with_the_real_seldon_wrapper(project):
    target = project.serving
    assert target.name == "seldon" and target.runtime_name == "local"
    target.preflight()
    V = SimpleNamespace  # noqa: N806 - a ModelVersion look-alike
    ep1 = target.deploy(V(name=NAME, number=1, path=f"models/{NAME}/1", metadata={}), label="stable")
    assert ep1.protocol == "seldon" and ep1.predict_url.endswith("/api/v1.0/predictions")
    assert predict(ep1.predict_url) == 1
    r = requests.post(ep1.predict_url, json={"data": {"ndarray": [BLANK]}}, timeout=30)
    assert "meta" in r.json()  # Seldon's response envelope
    bad = requests.post(ep1.predict_url, json={"data": {"ndarray": [[1.0, 2.0]]}}, timeout=30)
    assert bad.status_code == 400 and "MICROSERVICE_BAD_DATA" in bad.text
    assert requests.get(ep1.url + "/health/ping", timeout=5).status_code == 200

    ep2 = target.deploy(V(name=NAME, number=2, path=f"models/{NAME}/2", metadata={}), label="canary")
    assert predict(ep2.predict_url) == 2
    assert predict(target.endpoint().predict_url) == 1
    assert predict(target.endpoint(label="canary").predict_url) == 2
    target.set_label("stable", 2)
    target.set_label("canary", None)
    assert predict(target.endpoint().predict_url) == 2
    st = target.status()
    assert st["running"] and [v["state"] for v in st["versions"]] == ["AVAILABLE", "AVAILABLE"]
    assert st["labels"] == {"stable": 2}
    assert target.serves(1) and target.serves(2)

    target.undeploy(1)
    assert not target.serves(1)
    with pytest.raises(requests.ConnectionError):
        requests.post(ep1.predict_url, json={"data": {"ndarray": [BLANK]}}, timeout=10)
    with pytest.raises(MlflowctlError, match="router"):
        target.deploy(V(name=NAME, number=1, path=f"models/{NAME}/1", metadata={}), label="canary", weight=0.3)
    with pytest.raises(MlflowctlError, match="not deployed"):
        target.set_label("stable", 9)

    target.stop()
    st = target.status()
    assert not target.serves(2) and not st["running"], st.get("processes")
    ep = target.start()
    assert ep is not None and ep.version == 2 and predict(ep.predict_url) == 2
