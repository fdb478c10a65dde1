"""`mlflowctl render backend=k8s` and `mlflowctl setup`: manifests for people, checked twice.

Every rendered manifest passes ``kubernetes-validate`` (the 1.34 schemas, strict) and a server-side
dry-run against the test cluster; `setup` applies the prerequisites, and the Role it binds holds
exactly what a run needs: the backend's preflight (SelfSubjectAccessReviews) passes with the
ServiceAccount's token and fails without the binding.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import VENV_BIN, doit_env, make_project
from kube_fixtures import KUBECONFIG, k8s_settings
from test_e2e import mlflowctl


@pytest.fixture
def k8s_project(tmp_path, kube_namespace):
    config = {"project": "manifests", "model_name": "fmnist", "backend": "k8s", "store": "pvc://mlflowctl-data/demo",
              "backends": {"k8s": k8s_settings(kube_namespace, image_pull_secrets=["regcred"], cpu="1",
                                               memory="2Gi")}}
    return make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False)), kube_namespace


def rendered(root: Path) -> list[dict]:
    out = mlflowctl(root, "render", "--out", "rendered").stdout.split()
    docs = []
    for name in out:
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(Path(name).read_text()) if d]
    return docs


def test_render_writes_every_manifest_and_each_one_validates(k8s_project, kube_cluster):
    import kubernetes_validate
    from kubernetes import dynamic

    root, namespace = k8s_project
    docs = rendered(root)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Role", "RoleBinding", "Secret",
                     "Service", "ServiceAccount"], kinds
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert {j["metadata"]["labels"]["mlflowctl.io/stage"] for j in jobs} == {
        "data", "train-model", "train-concept", "integration-test", "monitor"}
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["stringData"] == {".dockerconfigjson": '{"auths": {}}'}  # a template: no credentials
    role = next(d for d in docs if d["kind"] == "Role")
    assert {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete", "get", "list", "watch"]} \
        in role["rules"]
    client = dynamic.DynamicClient(kube_cluster.api)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.34", strict=True)
        resource = client.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.create(body=doc, namespace=doc["metadata"].get("namespace"), dry_run="All")  # server-side check
    assert all(d["metadata"].get("namespace") == namespace for d in docs)


def test_setup_applies_the_prerequisites_with_exactly_the_rights_a_run_needs(k8s_project, kube_cluster, tmp_path):
    from mlflowctl.errors import UnavailableError
    from mlflowctl_plugins.kube import Kube
    from mlflowctl_plugins.k8s_backend import RBAC_RULES

    root, namespace = k8s_project
    dry = mlflowctl(root, "setup", "--dry-run").stdout
    assert "validated role/mlflowctl-runner" in dry
    assert kube_cluster.core.list_namespaced_service_account(namespace, field_selector="metadata.name=mlflowctl").items == []
    # the service account, before it is bound, may not run a stage
    applied = mlflowctl(root, "setup").stdout
    for item in ("serviceaccount/mlflowctl", "role/mlflowctl-runner", "rolebinding/mlflowctl-runner",
                 "secret/regcred", "persistentvolumeclaim/mlflowctl-data"):
        assert f"applied {item}" in applied, applied
    assert kube_cluster.core.read_namespaced_persistent_volume_claim("mlflowctl-data", namespace)
    token = kube_cluster.core.create_namespaced_service_account_token(
        "mlflowctl", namespace, {"spec": {"expirationSeconds": 600}}).status.token
    config = tmp_path / "sa.kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443",
                                               "certificate-authority": str(Path(KUBECONFIG).parent / "pki/ca.crt")}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa", "namespace": namespace}}]}))
    kube = Kube("", "", str(config))
    kube.check_access([(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs])  # every verb the backend uses
    with pytest.raises(UnavailableError, match="not allowed to create nodes"):
        kube.check_access([("", "nodes", "create")])  # and nothing cluster-wide
    # a second setup changes nothing and keeps the (now real) secret
    kube_cluster.core.patch_namespaced_secret("regcred", namespace, {"stringData": {".dockerconfigjson": '{"auths": {"r": {}}}'}})
    mlflowctl(root, "setup")
    import base64

    data = kube_cluster.core.read_namespaced_secret("regcred", namespace).data[".dockerconfigjson"]
    assert base64.b64decode(data) == b'{"auths": {"r": {}}}'


def test_bad_input_is_one_line_and_leaves_nothing(k8s_project, kube_cluster, tmp_path):
    root, namespace = k8s_project
    # a claim that does not exist: the store's preflight says which and how to create it
    proc = subprocess.run([str(VENV_BIN / "doit"), "data"], cwd=root, env=doit_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "claim 'mlflowctl-data' does not exist in namespace" in proc.stderr and "mlflowctl setup" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert kube_cluster.batch.list_namespaced_job(namespace).items == []
    # an unknown context, a missing namespace, an invalid quantity
    for override, code, text in (("backends.k8s.context=nope", 3, "no context 'nope'"),
                                 ("backends.k8s.namespace=no-such-namespace", 5, "namespace 'no-such-namespace' does not exist"),
                                 ("backends.k8s.memory=2Gb", 3, "backends.k8s.memory: expected a Kubernetes quantity")):
        proc = subprocess.run([str(VENV_BIN / "doit"), "data", override], cwd=root, env=doit_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, (override, proc.stdout, proc.stderr)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and text in lines[0] and "Traceback" not in proc.stderr, (override, proc.stderr)
    assert kube_cluster.batch.list_namespaced_job(namespace).items == []
    assert [s.metadata.name for s in kube_cluster.core.list_namespaced_service(namespace).items] == []
