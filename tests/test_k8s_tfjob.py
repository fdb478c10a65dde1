"""``StageRun.replicas`` > 1 on the k8s backend: a kubeflow.org/v1 TFJob run by the REAL Kubeflow
training operator (v1.7.0, built from its Go module by scripts/ensure-tfjob-operator.sh, running beside
the test cluster's control plane).

The stage commands here are tiny: they read the ``TF_CONFIG`` the operator gives each replica and exit,
without connecting to each other. The test cluster has no CoreDNS, so the operator's replica host names
(``<tfjob>-worker-0.<namespace>.svc``) do not resolve in its pods and a real multi-worker training
cannot form its ring there (see the README).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kube_fixtures import leftovers
from test_k8s_backend import make_backend, store_run, write_stage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tfjob_operator(kube_cluster):
    proc = subprocess.run([str(REPO / "scripts" / "ensure-tfjob-operator.sh"), "up"], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return True


@pytest.fixture
def backend(tmp_path, pvc_claim, docker_client, tfjob_operator):
    namespace, claim = pvc_claim
    b = make_backend(tmp_path, namespace, claim)
    b.preflight()
    return b


REPLICA = """\
import json, os, pathlib, sys, time
cfg = json.loads(os.environ["TF_CONFIG"])
task = cfg["task"]
print("task", task["type"], task["index"], "cluster", json.dumps(cfg["cluster"], sort_keys=True), flush=True)
pathlib.Path(os.environ["OUT_DIR"], f"{task['type']}-{task['index']}").write_text("x")
if task["type"] == os.environ.get("FAIL_TYPE"):
    print("this replica gives up", flush=True)
    sys.exit(5)
if os.environ.get("FAIL_TYPE"):  # the others wait for their peer, as a real training would
    time.sleep(90)
"""


def test_replicas_run_as_a_tfjob_with_the_operators_tf_config(backend, tmp_path, kube_cluster, pvc_claim):
    write_stage(tmp_path, REPLICA)
    run = store_run(backend, tmp_path)
    run.replicas = 3
    result = backend.run(run)
    log = run.log_path.read_text()
    assert result.ok, log
    assert result.detail["tfjob"].startswith("mlflowctl-k8stest-probe-") and result.detail["replicas"] == 3
    chief = next(line for line in log.splitlines() if line.startswith("task chief 0 "))
    cluster = json.loads(chief.split(" cluster ", 1)[1])
    name = result.detail["tfjob"]
    assert cluster == {"chief": [f"{name}-chief-0.{pvc_claim[0]}.svc:2222"],
                       "worker": [f"{name}-worker-{i}.{pvc_claim[0]}.svc:2222" for i in range(2)]}
    assert "worker-1: task worker 1 " in log
    # only the chief's output folder is the stage's: the workers wrote into their own emptyDir
    assert sorted(backend.contract_store.list(run.locations["OUT_DIR"].path)) == ["chief-0"]
    assert leftovers(kube_cluster, pvc_claim[0]) == []


def test_a_failing_worker_fails_the_tfjob_with_its_exit_code(backend, tmp_path, kube_cluster, pvc_claim):
    write_stage(tmp_path, REPLICA)
    run = store_run(backend, tmp_path, env={"FAIL_TYPE": "worker"})
    run.replicas = 2
    result = backend.run(run)
    assert result.exit_code == 5, run.log_path.read_text()
    assert "worker-0: this replica gives up" in run.log_path.read_text()
    assert result.detail["pod"].endswith("-worker-0")
    assert result.duration < 80  # the waiting chief was not waited for
    assert leftovers(kube_cluster, pvc_claim[0]) == []
