"""``StageRun.replicas`` > 1 on the k8s backend: a kubeflow.org/v1 TFJob run by the REAL Kubeflow
training operator (v1.7.0, built from its Go module by scripts/ensure-tfjob-operator.sh, running beside
the test cluster's control plane).

Most stage commands here are tiny: they read the ``TF_CONFIG`` the operator gives each replica and exit.
One test trains for real with 2 workers (the project image, MultiWorkerMirroredStrategy): the replicas find
each other by the Service names in ``TF_CONFIG``, resolved by the test cluster's CoreDNS. Bad input (no CRD,
no operator, cancel, a bad worker count) is one line each and leaves nothing on the cluster.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kube_fixtures import leftovers
from mlflowctl.errors import ConfigError, StageFailed
from test_k8s_backend import make_backend, store_run, write_stage

REPO = Path(__file__).resolve().parents[1]


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


# -- bad input: one line each, nothing left on the cluster ----------------------------------------------------

def tfjobs_left(kube_cluster, namespace: str, group: str = "kubeflow.org") -> list[str]:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_cluster.api)
    try:
        items = custom.list_namespaced_custom_object(group, "v1", namespace, "tfjobs")["items"]
    except client.exceptions.ApiException as exc:
        if exc.status == 404:  # no such resource: nothing can be left
            return []
        raise
    return [f"tfjob/{i['metadata']['name']}" for i in items if not i["metadata"].get("deletionTimestamp")]


@pytest.fixture
def operatorless_group(kube_cluster, monkeypatch):
    """A real CRD shaped like the TFJob one (tfjobs, v1) in a group no operator watches: the API server
    accepts the object, and nothing ever gives it a status. The backend is pointed at that group."""
    from kubernetes import client

    from mlflowctl_plugins import k8s_backend

    group = "nooperator.mlflowctl.test"
    ext = client.ApiextensionsV1Api(kube_cluster.api)
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"tfjobs.{group}"},
           "spec": {"group": group, "scope": "Namespaced",
                    "names": {"plural": "tfjobs", "singular": "tfjob", "kind": "TFJob", "listKind": "TFJobList"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                                                 "x-kubernetes-preserve-unknown-fields": True}}}]}}
    try:
        ext.create_custom_resource_definition(crd)
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = ext.read_custom_resource_definition(f"tfjobs.{group}")
        if any(c.type == "Established" and c.status == "True" for c in got.status.conditions or []):
            break
        time.sleep(0.2)
    monkeypatch.setattr(k8s_backend, "TFJOB_GROUP", group)
    return group


def test_a_cluster_without_the_tfjob_crd_is_one_config_line(tmp_path, pvc_claim, docker_client, kube_cluster,
                                                              monkeypatch):
    """The backend asks the real API server for a TFJob resource it does not serve (a group without a CRD:
    the shared cluster's real CRD stays installed for the other tests)."""
    from mlflowctl_plugins import k8s_backend

    monkeypatch.setattr(k8s_backend, "TFJOB_GROUP", "absent.mlflowctl.test")
    namespace, claim = pvc_claim
    backend = make_backend(tmp_path, namespace, claim)
    write_stage(tmp_path, REPLICA)
    run = store_run(backend, tmp_path)
    run.replicas = 2
    with pytest.raises(ConfigError) as err:
        backend.run(run)
    message = f"{err.value} {err.value.hint}"
    assert "no TFJob CRD" in str(err.value) and "make tfjob-operator" in message, message
    assert "\n" not in str(err.value) and err.value.exit_code == 3
    assert leftovers(kube_cluster, namespace) == []


def test_a_tfjob_no_operator_picks_up_fails_at_the_deadline_and_is_deleted(tmp_path, pvc_claim, docker_client,
                                                                            kube_cluster, operatorless_group):
    namespace, claim = pvc_claim
    backend = make_backend(tmp_path, namespace, claim, start_timeout=4.0)
    write_stage(tmp_path, REPLICA)
    run = store_run(backend, tmp_path)
    run.replicas = 2
    started = time.monotonic()
    with pytest.raises(StageFailed) as err:
        backend.run(run)
    assert time.monotonic() - started < 60
    assert "no training operator picked up tfjob" in str(err.value) and "within 4s" in str(err.value)
    assert "make tfjob-operator" in err.value.hint and "\n" not in str(err.value)
    assert tfjobs_left(kube_cluster, namespace, operatorless_group) == []
    assert leftovers(kube_cluster, namespace) == []


def test_cancelling_a_running_tfjob_deletes_it_and_its_replicas(backend, tmp_path, kube_cluster, pvc_claim):
    """What Ctrl-C does (the run's cancel event, as the pipeline sets it on SIGINT): TFJob and pods go."""
    write_stage(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    run = store_run(backend, tmp_path)
    run.replicas = 2
    lines: list[str] = []
    run.echo = lines.append
    threading.Thread(target=lambda: (_wait_for(lambda: any("up" in l for l in lines), 120), run.cancelled.set()),
                     daemon=True).start()
    with pytest.raises(StageFailed):
        backend.run(run)
    assert any("up" in l for l in lines), lines
    assert tfjobs_left(kube_cluster, pvc_claim[0]) == []
    assert leftovers(kube_cluster, pvc_claim[0]) == []


def _wait_for(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.1)


def test_render_writes_a_tfjob_for_workers_above_one_that_the_crd_schema_accepts(tmp_path, kube_namespace,
                                                                                  kube_cluster, tfjob_operator):
    """`mlflowctl render backend=k8s train_model.workers=2`: the train_model stage is a TFJob (Chief + 1 Worker),
    valid against the CRD's schema (server-side dry run), the other stages stay Jobs."""
    import yaml
    from kubernetes import dynamic

    from conftest import make_project
    from kube_fixtures import k8s_settings
    from test_e2e import mlflowctl

    config = {"project": "render2", "model_name": "fmnist", "backend": "k8s", "store": "pvc://store/r",
              "backends": {"k8s": k8s_settings(kube_namespace)}}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    out = mlflowctl(root, "render", "--out", "rendered", "train_model.workers=2").stdout.split()
    docs = {Path(p).name: yaml.safe_load(Path(p).read_text()) for p in out if p.endswith(".yaml")}
    assert "tfjob-train-model.yaml" in docs and "job-train-model.yaml" not in docs, sorted(docs)
    assert "job-train-concept.yaml" in docs  # workers is train_model's setting only
    tfjob = docs["tfjob-train-model.yaml"]
    specs = tfjob["spec"]["tfReplicaSpecs"]
    assert specs["Chief"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    client = dynamic.DynamicClient(kube_cluster.api)
    resource = client.resources.get(api_version="kubeflow.org/v1", kind="TFJob")
    resource.create(body=tfjob, namespace=kube_namespace, dry_run="All")
    role = next(d for name, d in docs.items() if name.endswith(".yaml") and d.get("kind") == "Role") \
        if any(d.get("kind") == "Role" for d in docs.values()) else None
    assert role is None or any("tfjobs" in r["resources"] for r in role["rules"])
    # one line for a bad worker count, nothing written
    bad = mlflowctl(root, "render", "--out", "rendered-bad", "train_model.workers=0", check=False)
    lines = [l for l in bad.stderr.splitlines() if l.strip()]
    assert bad.returncode == 3 and len(lines) == 1 and "train_model.workers" in lines[0], bad.stderr
    assert not (root / "rendered-bad").exists()


# -- real distributed training: chief + worker as a TFJob, their ring formed through the cluster's DNS ---------

@pytest.mark.slow
def test_two_workers_train_as_a_tfjob_and_the_model_passes_the_gate(tmp_path, pvc_claim, docker_client, kube_cluster,
                                                                   tfjob_operator):
    """`doit backend=k8s train_model.workers=2`: the real operator runs a Chief and a Worker of the project's
    image; TF_CONFIG names them by their Services' DNS names (resolved by the test cluster's CoreDNS); they
    train as one MultiWorkerMirroredStrategy job; the registered version passes integration_test and is promoted."""
    import yaml

    from conftest import make_project
    from kube_fixtures import k8s_settings
    from test_e2e import doit, mlflowctl, ran
    from test_k8s_e2e import SMALL

    namespace, claim = pvc_claim
    config = {**SMALL, "project": "k8sdist", "store": f"pvc://{claim}/dist",
              "train_model": {**SMALL["train_model"], "workers": 2},
              "backends": {"k8s": k8s_settings(namespace, start_timeout=240.0)}}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    try:
        proc = doit(root, "-n", "2", timeout=1800)
    finally:
        mlflowctl(root, "serve", "stop", check=False)
    assert {"train_model", "register", "integration_test", "promote"} <= set(ran(proc)), proc.stdout[-3000:]
    assert "[train_model] tfjob mlflowctl-k8sdist-train-model-" in proc.stdout
    from mlflowctl.project import Project

    store = Project(root).store
    (key,) = store.list("results/train_model")
    metrics = json.loads(store.read_bytes(f"results/train_model/{key}/metrics.json"))
    assert metrics["workers"] == 2 and metrics["accuracy"] >= 0.5, metrics
    log = store.read_bytes(f"results/train_model/{key}/_logs/train_model.log").decode()
    assert "worker-0: " in log and "2 replicas in sync" in log, log[-3000:]
    (test_key,) = store.list("results/integration_test")
    models = mlflowctl(root, "models").stdout
    assert "stable" in models, models
    assert tfjobs_left(kube_cluster, namespace) == [] and leftovers(kube_cluster, namespace) == []


def test_cluster_dns_answers_cluster_names_only_and_pods_reach_the_api_server(kube_cluster, kube_namespace):
    """The test cluster's CoreDNS (scripts/ensure-cluster.sh): a pod resolves Services by the short names a
    TFJob's TF_CONFIG uses, gets NXDOMAIN for any outside name (nothing is forwarded), and reaches the API
    server through the kubernetes Service (what Argo's executor needs)."""
    script = (
        "import socket, ssl, urllib.request\n"
        "print('svc', socket.gethostbyname('kubernetes.default.svc'))\n"
        "try:\n    socket.gethostbyname('example.com'); print('outside resolved')\n"
        "except OSError as e:\n    print('outside', type(e).__name__)\n"
        "sa = '/var/run/secrets/kubernetes.io/serviceaccount/'\n"
        "ctx = ssl.create_default_context(cafile=sa + 'ca.crt')\n"
        "req = urllib.request.Request('https://kubernetes.default.svc/version',"
        " headers={'Authorization': 'Bearer ' + open(sa + 'token').read()})\n"
        "print('api', urllib.request.urlopen(req, context=ctx, timeout=10).status)\n")
    kube_cluster.core.create_namespaced_pod(kube_namespace, {
        "metadata": {"name": "dnsprobe"},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "probe", "image": "python:3.11-slim", "imagePullPolicy": "Never",
            "command": ["python", "-c", script]}]}})
    deadline = time.monotonic() + 120
    phase = None
    while time.monotonic() < deadline:
        phase = kube_cluster.core.read_namespaced_pod("dnsprobe", kube_namespace).status.phase
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    log = kube_cluster.core.read_namespaced_pod_log("dnsprobe", kube_namespace)
    assert phase == "Succeeded", (phase, log)
    assert "svc 10.96.0.1" in log and "outside gaierror" in log and "api 200" in log, log


@pytest.mark.slow
def test_ctrl_c_on_doit_deletes_the_running_tfjob(tmp_path, pvc_claim, docker_client, kube_cluster, tfjob_operator):
    """A real SIGINT to `doit train_model` while its TFJob runs: one line, no traceback, no TFJob or pod left."""
    import signal

    import yaml

    from conftest import VENV_BIN, doit_env, make_project
    from kube_fixtures import k8s_settings
    from test_k8s_e2e import SMALL

    namespace, claim = pvc_claim
    config = {**SMALL, "project": "k8sintr", "store": f"pvc://{claim}/intr",
              "train_model": {**SMALL["train_model"], "workers": 2, "steps": 5000},
              "backends": {"k8s": k8s_settings(namespace, start_timeout=240.0)}}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    proc = subprocess.Popen([str(VENV_BIN / "doit"), "train_model"], cwd=root, env=doit_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            pods = kube_cluster.core.list_namespaced_pod(namespace, label_selector="training.kubeflow.org/job-name").items
            if len([p for p in pods if p.status and p.status.phase == "Running"]) == 2:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the TFJob's replicas never ran")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Traceback" not in out, out[-2000:]
    assert "cancelling train_model" in out, out[-2000:]
    assert tfjobs_left(kube_cluster, namespace) == [] and leftovers(kube_cluster, namespace) == []
