"""`doit backend=k8s store=pvc://...` on the real test cluster, from an empty state to a monitored endpoint.

data, train_model and train_concept run as Jobs of the project's image (real TensorFlow in pods),
their logs stream live and are kept with the results on the claim; register publishes version 1 on
the claim; the model server runs in the cluster (Deployment + Service); integration_test and
monitor run as Jobs against it; a second `doit` does nothing; Ctrl-C leaves no Job or pod; a failing
stage gives its one line. Also: results computed with `backend=docker` are reused by `backend=k8s`.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest
import yaml

from conftest import VENV_BIN, doit_env, make_project
from test_e2e import doit, mlflowctl, ran
from kube_fixtures import k8s_settings, leftovers

pytestmark = pytest.mark.slow

SMALL = {
    "project": "k8se2e", "model_name": "fmnist", "backend": "k8s",
    "data": {"dataset": "fashion-mnist"},
    "train_model": {"epochs": 1, "steps": 40},
    "train_concept": {"epochs": 1, "steps": 30},
    "integration_test": {"min_accuracy": 0.5, "samples": 200, "batch_size": 50},
    "monitor": {"max_drift_rate": 0.9},
    "serving": {"target": "local", "local": {"port": 8501, "start_timeout": 240}},
}


@pytest.fixture
def k8s_project(tmp_path, pvc_claim, docker_client):
    namespace, claim = pvc_claim
    config = {**SMALL, "store": f"pvc://{claim}/e2e", "backends": {"k8s": k8s_settings(namespace)}}
    return make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False)), namespace


def test_pipeline_on_kubernetes_from_empty_state(k8s_project, kube_cluster):
    root, namespace = k8s_project
    first = doit(root, "-n", "2", timeout=1500)
    assert set(ran(first)) == {"data", "train_model", "train_concept", "register", "deploy", "integration_test",
                               "promote", "monitor"}, first.stdout[-3000:]
    out = first.stdout
    assert "[train_model] job mlflowctl-k8se2e-train-model-" in out  # a Job, its log streamed live
    assert "wrote metrics.json" in out and "exported SavedModel to /mnt/outputs/MNIST_MODELS_DIR" in out  # pod logs
    assert "[data] " in out and "[integration_test] " in out
    models = mlflowctl(root, "models").stdout
    assert "stable" in models and " 1 " in f" {models} "
    # the server runs in the cluster, and answers through the API server
    status = mlflowctl(root, "serve", "status").stdout
    assert "deployment/mlflowctl-k8se2e-serve-fmnist" in status and "AVAILABLE" in status, status
    deployments = kube_cluster.apps.list_namespaced_deployment(namespace).items
    assert {d.metadata.name for d in deployments} >= {"mlflowctl-k8se2e-serve-fmnist", "mlflowctl-store-store"}
    # the full log of each Job is kept with its result on the claim
    from mlflowctl.project import Project

    store = Project(root).store
    logs = [p for p in store.list("results/train_model")]
    assert logs, "no train_model result on the claim"
    with store.open(f"results/train_model/{logs[0]}/_logs/train_model.log", "rb") as fh:
        assert b"wrote metrics.json" in fh.read()
    report = mlflowctl(root, "report").stdout
    assert "accuracy" in report.lower()
    # nothing left of the stages: Jobs and their pods are gone once their logs were saved
    assert leftovers(kube_cluster, namespace) == [], leftovers(kube_cluster, namespace)

    second = doit(root)
    assert ran(second) == [], second.stdout
    assert mlflowctl(root, "status").stdout.count("up to date") == 8

    mlflowctl(root, "serve", "stop")
    assert not [d for d in kube_cluster.apps.list_namespaced_deployment(namespace).items
                if d.metadata.name.startswith("mlflowctl-k8se2e-serve") and d.metadata.deletion_timestamp is None]


def test_ctrl_c_deletes_the_running_job_and_a_failing_stage_is_one_line(k8s_project, kube_cluster):
    root, namespace = k8s_project
    proc = subprocess.Popen([str(VENV_BIN / "doit"), "data"], cwd=root, env=doit_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(j.metadata.name.startswith("mlflowctl-k8se2e-data-")
               for j in kube_cluster.batch.list_namespaced_job(namespace).items):
            break
        time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError("the data Job never appeared")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in out, out[-2000:]
    assert leftovers(kube_cluster, namespace) == []

    bad = doit(root, "data", "data.sources=[\"/nonexistent/mirror\"]", "data.dataset=mnist", check=False)
    assert bad.returncode != 0
    line = [l for l in (bad.stdout + bad.stderr).splitlines() if "stage data failed" in l]
    assert line and "exit code" in line[0], bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
    assert leftovers(kube_cluster, namespace) == []


def test_results_computed_with_docker_are_reused_by_k8s(k8s_project, kube_cluster):
    """The backend's part of the key is the image environment: a result made in a container is the
    same result as one made by a Job of that image, and the other way round."""
    root, namespace = k8s_project
    in_docker = doit(root, "data", "backend=docker")
    assert ran(in_docker) == ["data"]
    on_k8s = doit(root, "data")
    assert ran(on_k8s) == [], on_k8s.stdout  # up to date: no Job
    assert leftovers(kube_cluster, namespace) == []
