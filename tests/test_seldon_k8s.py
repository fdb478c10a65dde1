"""The ``seldon`` target's k8s runtime against the test cluster's REAL API server, with the real
SeldonDeployment CRD (``make seldon-crd``: from Seldon Core's operator Go module, installed here).

The Seldon operator cannot be built or run here (license and unbuildable parts), so nothing reconciles
the SeldonDeployments into pods: the API server checks every manifest against the CRD's schema (create,
replace, a server-side dry-run of a broken one), and a stand-in in this test plays the operator's one
documented move the target waits for -- ``status.state: Available`` for the new generation (through the
status subresource). No model pod runs and no prediction goes through Seldon's ingress here.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, make_project
from kube_fixtures import KUBECONFIG
from mlflowctl.errors import MlflowctlError
from mlflowctl.project import Project

CRD = REPO / ".cache" / "seldon" / "machinelearning.seldon.io_seldondeployments.yaml"
CRD_PATCH = CRD.with_name("graph_children.yaml")  # Seldon's kustomize patch: the graph's nested children


def crd_body() -> dict:
    """The CRD as Seldon's kustomization builds it: the base plus its JSON-6902 ``replace`` of the graph."""
    body = yaml.safe_load(CRD.read_text())
    body.pop("status", None)
    for op in yaml.safe_load(CRD_PATCH.read_text()):
        assert op["op"] == "replace", op
        *parents, last = [p for p in op["path"].split("/") if p]
        node = body
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = op["value"]
    return body
GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"


@pytest.fixture(scope="module")
def seldon_crd(kube_cluster):
    from kubernetes import client

    if not CRD.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CRD} missing (make seldon-crd)")
        pytest.skip(f"{CRD} missing: make seldon-crd")
    ext = client.ApiextensionsV1Api(kube_cluster.api)
    name = f"{PLURAL}.{GROUP}"
    try:
        ext.read_custom_resource_definition(name)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        try:
            ext.create_custom_resource_definition(crd_body())
        except client.ApiException as exc2:
            if exc2.status != 409:  # another test session installed it meanwhile
                raise
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conds):
            return client.CustomObjectsApi(kube_cluster.api)
        time.sleep(0.3)
    raise AssertionError("the SeldonDeployment CRD did not become Established")


class OperatorStandIn:
    """Marks every SeldonDeployment of ``namespace`` Available for its generation (what the operator does
    once its pods are ready) -- or Failed when its name says so."""

    def __init__(self, api, namespace: str) -> None:
        self.api, self.namespace, self.stop = api, namespace, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                items = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]
            except Exception:  # noqa: BLE001 - a hiccup: try again
                continue
            for obj in items:
                gen = obj["metadata"]["generation"]
                if (obj.get("status") or {}).get("observedGeneration") == gen:
                    continue
                state = "Failed" if "fail" in obj["metadata"]["name"] else "Available"
                status = {"state": state, "observedGeneration": gen, "description": "stand-in"}
                try:
                    self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL,
                                                                   obj["metadata"]["name"], {"status": status})
                except Exception:  # noqa: BLE001 - replaced meanwhile: next round
                    pass


def test_seldon_deployment_checked_by_the_api_server(tmp_path, kube_cluster, kube_namespace, seldon_crd):
    from kubernetes import client

    root = make_project(tmp_path / "proj")
    proj = Project(root, {"serving.target": "seldon", "serving.seldon.runtime": "k8s",
                          "serving.seldon.model_uri": "pvc://models-claim/registry/models/mnist",
                          "serving.seldon.ingress_url": "http://ingress.example",
                          "serving.seldon.start_timeout": "30",
                          "backends.k8s.kubeconfig": KUBECONFIG, "backends.k8s.namespace": kube_namespace})
    target = proj.serving
    assert target.runtime_name == "k8s"
    operator = OperatorStandIn(seldon_crd, kube_namespace)
    V = SimpleNamespace  # noqa: N806 - a ModelVersion look-alike
    try:
        target.preflight()
        ep1 = target.deploy(V(name="mnist", number=1, path="models/mnist/1", metadata={}), label="stable")
        assert ep1.protocol == "seldon" and ep1.predict_url.endswith("-v1.%s.svc:8000/api/v1.0/predictions" % kube_namespace)
        target.deploy(V(name="mnist", number=2, path="models/mnist/2", metadata={}), label="canary", weight=0.25)
        name = target._k8s_runtime().name
        obj = seldon_crd.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, name)
        preds = {p["name"]: p for p in obj["spec"]["predictors"]}
        assert {k: p["traffic"] for k, p in preds.items()} == {"v1": 75, "v2": 25}  # canary: two predictors
        assert preds["v2"]["graph"]["modelUri"] == "pvc://models-claim/registry/models/mnist/2"
        assert preds["v2"]["graph"]["implementation"] == "TENSORFLOW_SERVER"
        assert obj["status"]["state"] == "Available"
        default = target.endpoint()
        assert default.predict_url == f"http://ingress.example/seldon/{kube_namespace}/{name}/api/v1.0/predictions"
        assert target.serves(2) and target.status().available(2)

        target.set_label("stable", 2)
        target.set_label("canary", None)
        obj = seldon_crd.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, name)
        assert {p["name"]: p["traffic"] for p in obj["spec"]["predictors"]} == {"v1": 0, "v2": 100}
        target.undeploy(1)
        obj = seldon_crd.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, name)
        assert [p["name"] for p in obj["spec"]["predictors"]] == ["v2"] and not target.serves(1)

        # the CRD's schema is enforced by the API server: a broken manifest is refused (server-side dry-run)
        bad = target._k8s_runtime().manifest(target._record())
        bad["metadata"] = {"name": "broken", "namespace": kube_namespace}
        bad["spec"]["predictors"][0]["traffic"] = "lots"
        with pytest.raises(client.ApiException) as refused:
            seldon_crd.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, bad, dry_run="All")
        assert refused.value.status == 422 and "traffic" in refused.value.body

        target.stop()
        assert not target.serves(2) and target.status().running is False
    finally:
        operator.stop.set()


def test_a_failed_seldon_deployment_is_one_line(tmp_path, kube_cluster, kube_namespace, seldon_crd):
    root = make_project(tmp_path / "proj")
    proj = Project(root, {"project": "fail", "serving.target": "seldon", "serving.seldon.runtime": "k8s",
                          "serving.seldon.model_uri": "s3://bucket/models/mnist", "serving.seldon.start_timeout": "30",
                          "backends.k8s.kubeconfig": KUBECONFIG, "backends.k8s.namespace": kube_namespace})
    operator = OperatorStandIn(seldon_crd, kube_namespace)
    try:
        with pytest.raises(MlflowctlError, match="SeldonDeployment mlflowctl-fail-mnist failed: stand-in"):
            proj.serving.deploy(SimpleNamespace(name="mnist", number=1, path="", metadata={}), label="stable")
    finally:
        operator.stop.set()
        proj.serving.stop()
