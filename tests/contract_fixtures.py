"""Implementations the contract suites run against: every backend and store must pass the same tests.

A new backend or store joins by adding a factory here (a third-party plugin
can import these suites and parametrize them with its own factory).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from mlflowctl.testing import fake_project


def local_store(root: Path) -> Any:
    from mlflowctl_plugins.local_store import LocalStore

    return LocalStore("file://store", {}, fake_project(root))


S3_BUCKET = "contract"


def s3_store(root: Path, endpoint_env: str = "MLFLOWCTL_TEST_S3") -> Any:
    """An S3 store on the test server (``MLFLOWCTL_TEST_S3``, set by the ``s3_server`` fixture).

    The prefix is derived from ``root``, so every process given the same
    root sees the same store, and tests never see each other's objects.
    """
    import hashlib

    from mlflowctl_plugins.s3_store import S3Store

    endpoint = os.environ[endpoint_env]
    settings = {"endpoint_url": endpoint, "region": "us-east-1", "access_key_id": "testing",
                "secret_access_key": "testing", "addressing_style": "path"}
    store = S3Store(f"s3://{S3_BUCKET}/t-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}",
                    settings, fake_project(root))
    client = store.tree.client
    try:
        client.head_bucket(Bucket=S3_BUCKET)
    except Exception:  # noqa: BLE001 - first use of the server
        try:
            client.create_bucket(Bucket=S3_BUCKET)
        except Exception as exc:  # noqa: BLE001 - a racing process created it
            if "BucketAlready" not in type(exc).__name__ + str(exc):
                raise
    return store


def seaweedfs_store(root: Path) -> Any:
    """The same, on SeaweedFS's S3 gateway (``MLFLOWCTL_TEST_SEAWEEDFS``, set by ``seaweedfs_server``)."""
    return s3_store(root, "MLFLOWCTL_TEST_SEAWEEDFS")


def local_backend(root: Path) -> Any:
    from mlflowctl_plugins.local_backend import LocalBackend

    return LocalBackend({"python": "", "stop_timeout": 5.0}, fake_project(root))


def pvc_store(root: Path) -> Any:
    """A ``pvc://`` store on the test cluster: one namespace and claim for the session, a path per test."""
    from mlflowctl_plugins.pvc_store import PvcStore

    namespace = _session_claim()
    project = fake_project(root)
    return PvcStore(f"pvc://store/{root.name}", {"kubeconfig": _kube().KUBECONFIG, "namespace": namespace,
                                                   "start_timeout": 120.0}, project)


def _kube() -> Any:
    import kube_fixtures

    return kube_fixtures


_CLAIM: list[str] = []


def _session_claim() -> str:
    """The contract suite's namespace with a bound claim ``store`` (made once; removed at exit)."""
    if _CLAIM:
        return _CLAIM[0]
    if os.environ.get("MLFLOWCTL_TEST_PVC_NAMESPACE"):  # a child process of a test: the parent's claim
        _CLAIM.append(os.environ["MLFLOWCTL_TEST_PVC_NAMESPACE"])
        return _CLAIM[0]
    import atexit
    import secrets
    import types

    kf = _kube()
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kf.KUBECONFIG)
    cluster = types.SimpleNamespace(core=client.CoreV1Api(api))
    namespace = f"mlflowctl-c-{secrets.token_hex(4)}"
    cluster.core.create_namespace({"metadata": {"name": namespace, "labels": {"mlflowctl.io/test": "1"}}})
    kf.make_claim(cluster, namespace)

    def cleanup() -> None:
        cluster.core.delete_namespace(namespace, propagation_policy="Background", grace_period_seconds=0)
        kf.drop_claims(cluster, namespace)

    atexit.register(cleanup)
    _CLAIM.append(namespace)
    os.environ["MLFLOWCTL_TEST_PVC_NAMESPACE"] = namespace  # inherited by the processes tests start
    return namespace


STORES: dict[str, Callable[[Path], Any]] = {"file": local_store, "s3": s3_store, "s3-seaweedfs": seaweedfs_store,
                                            "pvc": pvc_store}
# stores that need a server fixture before their factory runs
STORE_FIXTURES: dict[str, str] = {"s3": "s3_server", "s3-seaweedfs": "seaweedfs_server", "pvc": "kube_cluster"}
BACKENDS: dict[str, Callable[[Path], Any]] = {"local": local_backend}

if os.environ.get("MLFLOWCTL_CONTRACT_ONLY"):
    only = set(os.environ["MLFLOWCTL_CONTRACT_ONLY"].split(","))
    STORES = {k: v for k, v in STORES.items() if k in only}
    BACKENDS = {k: v for k, v in BACKENDS.items() if k in only}
