"""The ``tfserving`` serving target (plugins/tfserving, its own distribution) against a real Docker engine.

``tensorflow/serving`` cannot be pulled here: the container runs ``serving.tfserving.image: project``,
the project's stage image with ``image/tf_serving_entrypoint.py`` as ENTRYPOINT (a TF-Serving-REST
compatible stand-in that reads MODEL_NAME, MODEL_BASE_PATH and the model_config_file). What the target
writes is checked with TF Serving's own protobuf (``tensorflow_serving.config``).
"""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest
import requests

import serving_fixtures as fx
from conftest import REPO, make_project
from mlflowctl.errors import MlflowctlError
from mlflowctl.project import Project

NAME = "mnist"  # the repo's project/model name: the stage image is the cached one
BLANK = [0.0] * 784


def predict(url: str) -> int:
    r = requests.post(url, json={"instances": [BLANK]}, timeout=30)
    assert r.status_code == 200, r.text
    probs = r.json()["predictions"][0]
    return max(range(len(probs)), key=probs.__getitem__)


def test_model_config_is_tf_serving_text_protobuf():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    from mlflowctl_tfserving.target import render_model_config

    text = render_model_config("mnist", "/models/mnist", [3, 1, 3], {"stable": 1, "canary": 3})
    cfg = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = cfg.model_config_list.config
    assert model.name == "mnist" and model.base_path == "/models/mnist" and model.model_platform == "tensorflow"
    assert list(model.model_version_policy.specific.versions) == [1, 3]
    assert dict(model.version_labels) == {"stable": 1, "canary": 3}


def test_entrypoint_reads_the_config_like_tf_serving(tmp_path):
    sys.path.insert(0, str(REPO / "image"))
    try:
        import tf_serving_entrypoint as entry
    finally:
        sys.path.remove(str(REPO / "image"))
    from mlflowctl_tfserving.target import render_model_config

    for v in (1, 2, 5):
        (tmp_path / str(v)).mkdir()
        (tmp_path / str(v) / "saved_model.pb").write_bytes(b"x")
    model = entry.parse_model_config(render_model_config("m", str(tmp_path), [2], {"stable": 2}))
    assert entry.routing_for(model) == {"versions": [2], "labels": {"stable": 2}, "canary_weight": 0.0}
    latest = entry.parse_model_config(f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path}" }} }}')
    assert entry.routing_for(latest)["versions"] == [5]  # TF Serving's default policy: the highest version
    with pytest.raises(entry.ConfigProblem, match="exactly one model"):
        entry.parse_model_config('model_config_list { config { name: "a" } config { name: "b" } }')
    with pytest.raises(entry.ConfigProblem, match="text protobuf"):
        entry.parse_model_config("model_config_list { nonsense: 1 }")


@pytest.fixture(scope="module")
def project(tmp_path_factory, docker_client):
    root = make_project(tmp_path_factory.mktemp("tfserving") / "proj")
    fx.build_registry(root / ".mlflowctl" / "store" / "models" / NAME)
    proj = Project(root, {"backend": "docker", "serving.target": "tfserving", "serving.tfserving.image": "project",
                          "serving.tfserving.port": str(fx.free_port()),
                          "serving.tfserving.grpc_port": str(fx.free_port())})
    yield proj
    proj.serving.stop()


def test_lifecycle_in_a_tf_serving_container(project, docker_client):
    target = project.serving
    assert target.name == "tfserving" and target.runtime_name == "docker"
    V = SimpleNamespace  # noqa: N806 - a ModelVersion look-alike
    started = time.monotonic()
    ep1 = target.deploy(V(name=NAME, number=1, path=f"models/{NAME}/1", metadata={}), label="stable")
    print(f"container + version 1 in {time.monotonic() - started:.1f} s")
    assert ep1.protocol == "tfserving" and ep1.predict_url.endswith(f"/v1/models/{NAME}/versions/1:predict")
    assert predict(ep1.predict_url) == 1

    container = docker_client.containers.get(target.container_name())
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    assert env["MODEL_NAME"] == NAME and env["MODEL_BASE_PATH"] == "/models"
    assert any(a.startswith("--model_config_file=") for a in container.attrs["Args"])
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts[f"/models/{NAME}"]["RW"] is False and mounts["/config"]["RW"] is False
    ports = container.attrs["HostConfig"]["PortBindings"]
    assert set(ports) == {"8501/tcp", "8500/tcp"} and ports["8501/tcp"][0]["HostIp"] == "127.0.0.1"

    ep2 = target.deploy(V(name=NAME, number=2, path=f"models/{NAME}/2", metadata={}), label="canary")
    assert predict(ep2.predict_url) == 2
    assert predict(target.endpoint(label="canary").predict_url) == 2
    assert predict(target.endpoint().predict_url) == 1  # the stable label
    text = (target.config_dir / "models.config").read_text()
    assert "versions: 1" in text and "versions: 2" in text and '"canary"' in text

    target.set_label("stable", 2)
    target.set_label("canary", None)
    assert predict(target.endpoint().predict_url) == 2
    st = target.status()
    assert st["running"] and [v["state"] for v in st["versions"]] == ["AVAILABLE", "AVAILABLE"]
    assert st["labels"] == {"stable": 2}
    assert target.serves(2) and target.serves(1)

    target.undeploy(1)
    assert not target.serves(1) and target.serves(2)
    r = requests.post(f"{ep1.url}/v1/models/{NAME}/versions/1:predict", json={"instances": [BLANK]}, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    assert docker_client.containers.get(target.container_name()).id == container.id  # re-read, not restarted

    with pytest.raises(MlflowctlError, match="label only|version and label"):
        target.deploy(V(name=NAME, number=1, path=f"models/{NAME}/1", metadata={}), label="canary", weight=0.2)
    with pytest.raises(MlflowctlError, match="not deployed"):
        target.set_label("stable", 7)

    target.stop()
    assert not target.serves(2) and target.status()["running"] is False
    ep = target.start()  # the record brings the same versions and labels back
    assert ep is not None and predict(ep.predict_url) == 2
