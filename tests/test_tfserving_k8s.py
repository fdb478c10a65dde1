"""The ``tfserving`` target's k8s runtime on the real test cluster: a Deployment + Service of TF Serving
(the project's stand-in image: ``tensorflow/serving`` cannot be pulled here), the registry and the
model_config_file on the claim, readiness probe on ``/v1/models/<name>``, reached through the API server.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

import serving_fixtures as fx
from conftest import make_project
from kube_fixtures import k8s_settings
from mlflowctl.project import Project

pytestmark = pytest.mark.slow
NAME = "mnist"  # the repo's project name: the stage image is the one the other k8s tests load
BLANK = [0.0] * 784


def predict(runtime, path: str) -> int:
    r = runtime.kube.proxy("POST", runtime.name, 8501, path, json={"instances": [BLANK]}, timeout=30)
    assert r.status_code == 200, r.text
    probs = r.json()["predictions"][0]
    return max(range(10), key=probs.__getitem__)


def test_tf_serving_deployment_in_the_cluster(tmp_path, pvc_claim, kube_cluster, docker_client):
    namespace, claim = pvc_claim
    config = {"project": NAME, "model_name": NAME, "backend": "k8s", "store": f"pvc://{claim}/tfs",
              "backends": {"k8s": k8s_settings(namespace)},
              "serving": {"target": "tfserving", "tfserving": {"image": "project", "start_timeout": 240}}}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    proj = Project(root)
    local = fx.build_registry(tmp_path / "registry")
    versions = {n: proj.models.register(local / str(n), {"fixture": n}) for n in (1, 2)}
    assert sorted(v.number for v in versions.values()) == [1, 2]
    target = proj.serving
    assert target.runtime_name == "k8s"
    try:
        target.preflight()
        ep1 = target.deploy(versions[1], label="stable")
        runtime = target._k8s_runtime()
        assert ep1.url.startswith("http://10.") and ep1.predict_url.endswith(f"/v1/models/{NAME}/versions/1:predict")
        assert predict(runtime, f"v1/models/{NAME}/versions/1:predict") == 1
        dep = kube_cluster.apps.read_namespaced_deployment(runtime.name, namespace)
        container = dep.spec.template.spec.containers[0]
        assert container.readiness_probe.http_get.path == f"/v1/models/{NAME}"
        assert {p.container_port for p in container.ports} == {8500, 8501}
        assert {e.name: e.value for e in container.env}["MODEL_BASE_PATH"] == "/models"
        mounts = {m.mount_path: m for m in container.volume_mounts}
        assert mounts[f"/models/{NAME}"].read_only and mounts[f"/models/{NAME}"].sub_path == f"tfs/models/{NAME}"

        target.deploy(versions[2], label="canary")
        assert predict(runtime, f"v1/models/{NAME}/labels/canary:predict") == 2
        assert predict(runtime, f"v1/models/{NAME}/labels/stable:predict") == 1
        target.set_label("stable", 2)
        target.set_label("canary", None)
        assert predict(runtime, f"v1/models/{NAME}/labels/stable:predict") == 2
        st = target.status()
        assert st.running and st.available(1) and st.available(2) and st.labels == {"stable": 2}
        target.undeploy(1)
        assert not target.serves(1) and target.serves(2)
    finally:
        target.stop()
    assert not target.serves(2)
    assert kube_cluster.apps.list_namespaced_deployment(namespace, label_selector="app.kubernetes.io/name=mlflowctl-tfserving").items == []
