"""Fixtures for the test Kubernetes of ``scripts/ensure-cluster.sh`` (``make cluster``).

Every test gets a namespace of its own (deleted afterwards, with everything in it); a claim is a
PVC pre-bound to a hostPath PersistentVolume of this single node, so no provisioner is needed.
Skipped when the cluster is down on a workstation; under ``CI`` that is a failure (make test
starts the cluster first).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER_DIR = Path(os.environ.get("MLFLOWCTL_CLUSTER_DIR", "/var/lib/mlflowctl/cluster"))
KUBECONFIG = str(CLUSTER_DIR / "admin.kubeconfig")
VOLUMES = CLUSTER_DIR / "volumes"
IMAGE_LOAD = f"{REPO}/scripts/ensure-cluster.sh load-image {{image}}"


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run the test cluster: make cluster)")
    pytest.skip(f"{message} (start it with: make cluster)")


@pytest.fixture(scope="session")
def kube_cluster():
    """The test cluster: its kubeconfig, and API clients (the official client, as the product uses it)."""
    if not Path(KUBECONFIG).is_file():
        _unavailable(f"no test cluster: {KUBECONFIG} missing")
    try:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=KUBECONFIG)
        nodes = client.CoreV1Api(api).list_node(_request_timeout=10).items
    except Exception as exc:  # noqa: BLE001 - any failure: no usable cluster
        _unavailable(f"test cluster unreachable: {type(exc).__name__}: {str(exc)[:200]}")
    ready = [n for n in nodes if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])]
    if not ready:
        _unavailable("test cluster has no Ready node")
    return types.SimpleNamespace(kubeconfig=KUBECONFIG, api=api, core=client.CoreV1Api(api),
                                 batch=client.BatchV1Api(api), apps=client.AppsV1Api(api))


@pytest.fixture
def kube_namespace(kube_cluster):
    """A fresh namespace, deleted (with its Jobs, pods and claims) after the test."""
    name = f"mlflowctl-t-{secrets.token_hex(4)}"
    kube_cluster.core.create_namespace({"metadata": {"name": name, "labels": {"mlflowctl.io/test": "1"}}})
    yield name
    kube_cluster.core.delete_namespace(name, propagation_policy="Background", grace_period_seconds=0)


def make_claim(kube_cluster, namespace: str, claim: str = "store") -> str:
    """A PVC in ``namespace`` bound to a fresh hostPath PV (removed when the namespace's test ends)."""
    pv = f"{namespace}-{claim}"
    path = VOLUMES / pv
    path.mkdir(parents=True, exist_ok=True)
    kube_cluster.core.create_persistent_volume({
        "metadata": {"name": pv, "labels": {"mlflowctl.io/test": "1"}},
        "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "mlflowctl-test",
                 "hostPath": {"path": str(path), "type": "Directory"},
                 "claimRef": {"namespace": namespace, "name": claim}}})
    kube_cluster.core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "mlflowctl-test", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pvc = kube_cluster.core.read_namespaced_persistent_volume_claim(claim, namespace)
        if pvc.status.phase == "Bound":
            return claim
        time.sleep(0.2)
    raise AssertionError(f"claim {claim} in {namespace} did not bind")


def drop_claims(kube_cluster, namespace: str) -> None:
    for pv in kube_cluster.core.list_persistent_volume(label_selector="mlflowctl.io/test=1").items:
        if pv.metadata.name.startswith(f"{namespace}-"):
            kube_cluster.core.delete_persistent_volume(pv.metadata.name)
            shutil.rmtree(VOLUMES / pv.metadata.name, ignore_errors=True)


@pytest.fixture
def pvc_claim(kube_cluster, kube_namespace):
    """(namespace, claim) of a bound claim in a fresh namespace."""
    claim = make_claim(kube_cluster, kube_namespace)
    yield kube_namespace, claim
    drop_claims(kube_cluster, kube_namespace)


def k8s_settings(namespace: str, **extra) -> dict:
    """``backends.k8s`` for the test cluster: its kubeconfig, the namespace, images loaded from Docker."""
    return {"kubeconfig": KUBECONFIG, "namespace": namespace, "image_load": IMAGE_LOAD,
            "host_mounts": ["/usr/share/datasets:/usr/share/datasets:ro"], "start_timeout": 60.0, **extra}


def leftovers(kube_cluster, namespace: str) -> list[str]:
    """Jobs and pods left in ``namespace`` (the store server and the model server excepted)."""
    jobs = [f"job/{j.metadata.name}" for j in kube_cluster.batch.list_namespaced_job(namespace).items]
    pods = [f"pod/{p.metadata.name}" for p in kube_cluster.core.list_namespaced_pod(namespace).items
            if not p.metadata.name.startswith("mlflowctl-store-") and "-serve-" not in p.metadata.name
            and p.metadata.deletion_timestamp is None]
    return jobs + pods


def cluster_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "ensure-cluster.sh"), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def local_registry(tmp_path, kube_cluster):
    """A real Docker registry (Debian's docker-registry, Docker's distribution) on 127.0.0.1, plain HTTP.

    The node's containerd is told to pull from it over HTTP (a hosts.toml under the cluster's
    certs.d, read at each pull); the Docker engine pushes to loopback registries over HTTP by default.
    Yields ``127.0.0.1:<port>``.
    """
    import socket

    binary = shutil.which("docker-registry")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-registry missing (make cluster installs it)")
        pytest.skip("docker-registry missing (apt-get install docker-registry)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
                      f"http: {{addr: {address}}}\n")
    hosts = CLUSTER_DIR / "certs.d" / address
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{address}"\n\n[host."http://{address}"]\n'
                                      f'  capabilities = ["pull", "resolve"]\n  skip_verify = true\n')
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import requests

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://{address}/v2/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        else:
            raise AssertionError(f"docker-registry did not start: {proc.stderr.read(2000) if proc.poll() else ''}")
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(hosts, ignore_errors=True)


@pytest.fixture(scope="session")
def tfjob_operator(kube_cluster):
    """The real Kubeflow training operator beside the control plane (scripts/ensure-tfjob-operator.sh)."""
    proc = subprocess.run([str(REPO / "scripts" / "ensure-tfjob-operator.sh"), "up"], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return True
