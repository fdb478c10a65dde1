"""``doit serving.target=<target>`` runs deploy -> integration_test -> promote -> monitor through each
of the seeds' targets (plugins/tfserving, plugins/seldon, plugins/hydrosphere), on one project:
trained once (tiny settings), then served by Hydrosphere (its documented-API stand-in), then by the
real Seldon wrapper, then by a TF Serving container (the project's stand-in image) -- switching the
target re-runs only the serving stages and stops the previous target.
The last test runs the whole pipeline with ``backend=docker`` and ``serving.target=tfserving``.
"""
from __future__ import annotations

import json

import pytest
import requests
import yaml

from conftest import make_project

from hydrosphere_server import hydrosphere  # noqa: F401 - the fixture
from serving_fixtures import free_port
from test_e2e import SMALL as E2E_SMALL
from test_e2e import doit, mlflowctl, ran
from test_seldon_target import seldon_executable

pytestmark = pytest.mark.slow

def small_config(hydro: str, seldon: str, port: int, project: str = "targets", target: str = "hydrosphere") -> str:
    """test_e2e's tiny pipeline, served by ``target`` (the three targets' settings given)."""
    config = yaml.safe_load(E2E_SMALL.format(port=0, grpc_port=0))
    config["project"] = project
    config["serving"] = {"target": target, "hydrosphere": {"url": hydro, "start_timeout": 120},
                         "seldon": {"executable": seldon},
                         "tfserving": {"image": "project", "runtime": "docker", "port": port, "grpc_port": 0}}
    return yaml.safe_dump(config, sort_keys=False)


SERVING = ("deploy", "integration_test", "promote", "monitor")
BLANK = [0.0] * 784


@pytest.fixture(scope="module")
def project(tmp_path_factory, hydrosphere):
    port = free_port()
    root = make_project(tmp_path_factory.mktemp("targets") / "proj",
                        small_config(hydrosphere.url, seldon_executable(), port))
    yield root, port
    for target in ("tfserving", "seldon", "hydrosphere"):
        mlflowctl(root, "serve", "stop", f"serving.target={target}", check=False)


def latest(root, stage: str, name: str) -> dict:
    """``name`` of the stage's most recent published result."""
    runs = sorted((root / ".mlflowctl" / "store" / "results" / stage).iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((runs[-1] / name).read_text())


def stable_entry(root) -> dict:
    return latest(root, "promote", "endpoint.json")


def latest_monitor(root) -> dict:
    return latest(root, "monitor", "drift.json")


def test_hydrosphere_pipeline(project, hydrosphere):
    root, _ = project
    proc = doit(root, "-n", "2", timeout=900)
    assert set(ran(proc)) >= {"register", *SERVING}, proc.stdout
    ep = stable_entry(root)
    assert ep["protocol"] == "hydrosphere" and ep["predict_url"] == f"{hydrosphere.url}/gateway/application/fmnist"
    r = requests.post(ep["predict_url"], json={"images": [BLANK]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["probabilities"][0]) == 10
    assert "1  stable" in mlflowctl(root, "models").stdout
    drift = latest_monitor(root)
    assert drift["available"] is False and drift["note"] == "drift not available for target hydrosphere"
    report = latest(root, "integration_test", "report.json")
    assert report["passed"] and report["accuracy"] >= 0.6
    # the gateway really carried the integration test's images (the metric scored them)
    assert len(hydrosphere.cluster.metric_values) >= 300


def test_seldon_pipeline(project, hydrosphere):
    root, _ = project
    proc = doit(root, "serving.target=seldon", timeout=900)
    assert set(ran(proc)) == set(SERVING), proc.stdout
    ep = stable_entry(root)
    assert ep["protocol"] == "seldon" and ep["predict_url"].endswith("/api/v1.0/predictions")
    r = requests.post(ep["predict_url"], json={"data": {"ndarray": [BLANK]}}, timeout=30)
    assert r.status_code == 200 and len(r.json()["data"]["ndarray"][0]) == 10
    assert latest_monitor(root)["note"] == "drift not available for target seldon"
    assert hydrosphere.cluster.apps == {}  # switching the target stopped the previous one
    assert "1  stable" in mlflowctl(root, "models", "serving.target=seldon").stdout
    again = doit(root, "serving.target=seldon")
    assert ran(again) == [], again.stdout


def test_tfserving_pipeline(project):
    root, port = project
    proc = doit(root, "serving.target=tfserving", timeout=900)
    assert set(ran(proc)) == set(SERVING), proc.stdout
    ep = stable_entry(root)
    assert ep["protocol"] == "tfserving"
    assert ep["predict_url"] == f"http://127.0.0.1:{port}/v1/models/fmnist/labels/stable:predict"
    r = requests.post(ep["predict_url"], json={"instances": [BLANK]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["predictions"][0]) == 10
    status = mlflowctl(root, "serve", "status", "serving.target=tfserving").stdout
    assert "version 1: AVAILABLE" in status, status


def test_tfserving_pipeline_with_backend_docker(tmp_path, docker_client):
    """Every stage in a container, TF Serving (the stand-in image) serving the registry folder."""
    port = free_port()
    text = small_config("http://127.0.0.1:1", "unused", port, project="targetsdocker", target="tfserving")
    root = make_project(tmp_path / "proj", text)
    try:
        proc = doit(root, "backend=docker", timeout=1500)
        assert set(ran(proc)) == {"data", "train_model", "train_concept", "register", *SERVING}, proc.stdout
        ep = stable_entry(root)
        assert ep["predict_url"] == f"http://127.0.0.1:{port}/v1/models/fmnist/labels/stable:predict"
        assert latest(root, "integration_test", "report.json")["passed"]
        container = docker_client.containers.get(f"mlflowctl-targetsdocker-tfserving-{port}")
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert env["MODEL_NAME"] == "fmnist" and env["MODEL_BASE_PATH"] == "/models"
        r = requests.post(ep["predict_url"], json={"instances": [BLANK]}, timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"][0]) == 10
    finally:
        mlflowctl(root, "serve", "stop", check=False)


def test_tfserving_pipeline_on_kubernetes(tmp_path, pvc_claim, kube_cluster, docker_client):
    """``doit backend=k8s``: stages as Jobs, TF Serving as a Deployment + Service on the claim's registry."""
    from kube_fixtures import k8s_settings

    namespace, claim = pvc_claim
    config = yaml.safe_load(small_config("http://127.0.0.1:1", "unused", 8501, project="mnist", target="tfserving"))
    config.update(backend="k8s", store=f"pvc://{claim}/tfs", backends={"k8s": k8s_settings(namespace)})
    config["serving"]["tfserving"] = {"image": "project", "start_timeout": 240}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    try:
        proc = doit(root, "-n", "2", timeout=1500)
        assert set(ran(proc)) == {"data", "train_model", "train_concept", "register", *SERVING}, proc.stdout[-3000:]
        ep = stable_entry_k8s(root)
        assert ep["protocol"] == "tfserving" and ep["predict_url"].endswith("/v1/models/fmnist/labels/stable:predict")
        deployments = {d.metadata.name for d in kube_cluster.apps.list_namespaced_deployment(namespace).items}
        assert "mlflowctl-mnist-tfserving-fmnist" in deployments, deployments
        status = mlflowctl(root, "serve", "status").stdout
        assert "version 1: AVAILABLE" in status, status
    finally:
        mlflowctl(root, "serve", "stop", check=False)


def stable_entry_k8s(root) -> dict:
    """The promote stage's endpoint.json, read from the claim through the project's store."""
    from mlflowctl.project import Project

    proj = Project(root)
    runs = proj.store.list("results/promote")
    assert runs, "no promote result"
    for run in runs:
        folder = proj.store.fetch(f"results/promote/{run}")
        return json.loads((folder / "endpoint.json").read_text())
    return {}
