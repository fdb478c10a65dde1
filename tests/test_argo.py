"""`mlflowctl export argo`: the pipeline as an argoproj.io/v1alpha1 Workflow.

The output is validated against the Workflow CRD's full OpenAPI schema, taken from the Argo Workflows
Go module (github.com/argoproj/argo-workflows/v3@v3.6.18, downloaded into the Go module cache by
scripts/ensure-argo.sh), strictly: a field the schema does not know is an error. The DAG is the doit
graph, the templates are the k8s backend's own Jobs/TFJobs with the same image.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import VENV_BIN, doit_env, make_project
from mlflowctl_plugins.argo_export import FAILED_CONDITION

REPO = Path(__file__).resolve().parents[1]
ARGO_VERSION = os.environ.get("ARGO_VERSION", "v3.6.18")
GOMODCACHE = Path(os.environ.get("MLFLOWCTL_CACHE_DIR", "/var/cache/mlflowctl")) / "go" / "mod"
CRD = GOMODCACHE / f"github.com/argoproj/argo-workflows/v3@{ARGO_VERSION}/manifests/base/crds/full/argoproj.io_workflows.yaml"

CONFIG = {
    "project": "argoexp", "model_name": "fmnist", "backend": "k8s", "store": "pvc://store/exp",
    "train_model": {"epochs": 2, "steps": 30},
    "backends": {"k8s": {"namespace": "default", "kubeconfig": "/nonexistent/kubeconfig", "image": "example/img:1",
                         "cpu": "1", "memory": "2Gi"}},
}


def export(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), "export", "argo", *args], env=doit_env(),
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "proj", yaml.safe_dump(CONFIG, sort_keys=False))


@pytest.fixture(scope="session")
def workflow_schema():
    """The CRD's openAPIV3Schema, made strict (no unknown fields where the schema lists properties)."""
    if not CRD.is_file():
        proc = subprocess.run(["go", "mod", "download", f"github.com/argoproj/argo-workflows/v3@{ARGO_VERSION}"],
                              env={**os.environ, "GOMODCACHE": str(GOMODCACHE), "GOFLAGS": "-mod=mod",
                                   "GOTOOLCHAIN": "local", "PATH": f"{os.environ['PATH']}:/usr/local/go/bin"},
                              cwd="/tmp", capture_output=True, text=True, timeout=600)
        assert CRD.is_file(), f"cannot get the Argo CRD (make argo downloads it): {proc.stderr[-500:]}"
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(node):
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def validate(doc: dict, schema: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
    for template in doc["spec"]["templates"]:  # the manifests inside resource templates parse
        if "resource" in template:
            assert yaml.safe_load(template["resource"]["manifest"])["kind"] in ("Job", "TFJob")


def test_the_workflow_is_the_doit_graph_and_validates_against_the_crd(project, workflow_schema):
    doc = yaml.safe_load(export(project).stdout)
    validate(doc, workflow_schema)
    assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "Workflow"
    spec = doc["spec"]
    dag = next(t for t in spec["templates"] if t["name"] == spec["entrypoint"])["dag"]["tasks"]
    graph = {t["name"]: sorted(t.get("dependencies") or []) for t in dag}
    from mlflowctl.cli import load_pipeline

    pipeline = load_pipeline(project, {})
    dns = lambda s: s.replace("_", "-")  # noqa: E731
    assert graph == {dns(s.name): sorted({dns(up) for up in s.upstream}) for s in pipeline.stages.values()}, graph
    assert graph["register"] == ["train-concept", "train-model"] and graph["train-model"] == ["data"]
    templates = {t["name"]: t for t in spec["templates"]}
    # command stages: the k8s backend's Jobs, same image, conditions; orchestrator stages: the runner image
    for name in ("data", "train-model", "train-concept", "integration-test", "monitor"):
        resource = templates[name]["resource"]
        job = yaml.safe_load(resource["manifest"])
        assert job["kind"] == "Job" and resource["successCondition"] == "status.succeeded > 0"
        assert resource["failureCondition"] == FAILED_CONDITION and resource["setOwnerReference"] is True
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "example/img:1"
        assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
        assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "store"}
    for name in ("register", "deploy", "promote"):
        assert templates[name]["container"]["image"] == "example/img-runner:1"
        # every orchestrator step has the same .mlflowctl/: a folder on the claim, per project (not per workflow)
        mounts = {m["mountPath"]: m.get("subPath") for m in templates[name]["container"]["volumeMounts"]}
        assert mounts == {"/mnt/store": None, "/project/.mlflowctl": "exp/argo/.mlflowctl"}, mounts
    assert spec["volumes"] == [{"name": "store", "persistentVolumeClaim": {"claimName": "store"}}]
    # hyperparameters are workflow parameters, and the Job's env reads them
    params = {p["name"]: p["value"] for p in spec["arguments"]["parameters"]}
    assert params["train_model-epochs"] == "2" and params["train_model-steps"] == "30"
    assert "train_model-workers" not in params
    train = yaml.safe_load(templates["train-model"]["resource"]["manifest"])
    env = {e["name"]: e["value"] for e in train["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EPOCHS"] == "{{workflow.parameters.train_model-epochs}}"
    mounts = {m["mountPath"]: m["subPath"] for m in train["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/mnt/inputs/MNIST_DATA_DIR": "exp/argo/{{workflow.name}}/data",
                      "/mnt/outputs/MNIST_MODELS_DIR": "exp/argo/{{workflow.name}}/train_model"}


def test_workers_above_one_make_the_training_a_tfjob_template(project, workflow_schema):
    doc = yaml.safe_load(export(project, "train_model.workers=2", "--stage", "register").stdout)
    validate(doc, workflow_schema)
    templates = {t["name"]: t for t in doc["spec"]["templates"]}
    assert set(templates) == {"pipeline", "data", "train-model", "train-concept", "register"}  # --stage: what it needs
    resource = templates["train-model"]["resource"]
    tfjob = yaml.safe_load(resource["manifest"])
    assert tfjob["kind"] == "TFJob" and tfjob["apiVersion"] == "kubeflow.org/v1"
    assert tfjob["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 1
    assert resource["successCondition"] == "status.replicaStatuses.Chief.succeeded > 0"
    assert resource["failureCondition"] == FAILED_CONDITION
    assert yaml.safe_load(templates["train-concept"]["resource"]["manifest"])["kind"] == "Job"


def test_export_bad_input_is_one_line_and_writes_nothing(project, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (["--out", str(tmp_path / "missing" / "wf.yaml")], "folder", tmp_path / "missing"),
        (["--out", str(tmp_path)], "is a folder", None),
        (["backend=docker"], "backend is docker", None),
        (["store=file://.mlflowctl/store"], "pvc://", None),
        (["--stage", "nope"], "no stage 'nope'", None),
    ]
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops others
        cases.append((["--out", str(locked / "wf.yaml")], "cannot write", locked / "wf.yaml"))
    else:
        cases.append((["--out", "/proc/version"], "cannot write", None))
    for args, text, absent in cases:
        proc = export(project, *args, check=False)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert proc.returncode == 3 and len(lines) == 1 and text in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        if absent is not None:
            assert not absent.exists()
    assert list(locked.iterdir()) == [] and not list(tmp_path.glob(".wf.yaml*"))


def test_export_to_a_file_writes_the_same_workflow(project, tmp_path):
    out = tmp_path / "wf.yaml"
    export(project, "--out", str(out))
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(export(project).stdout)


# -- run for real: the exported Workflow on the test cluster's Argo 3.6 controller ------------------------------

@pytest.fixture(scope="session")
def argo_controller(kube_cluster):
    proc = subprocess.run([str(REPO / "scripts" / "ensure-argo.sh"), "up"], capture_output=True, text=True,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return True


EXECUTOR_RULES = [  # the emissary executor's minimum (Argo's quick-start Role) + what the resource templates do
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
    {"apiGroups": ["kubeflow.org"], "resources": ["tfjobs"], "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
]


def grant_executor_role(kube_cluster, namespace: str, service_account: str) -> None:
    """EXECUTOR_RULES for the workflow pods' ServiceAccount in ``namespace``."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(kube_cluster.api)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "argo-executor"}, "rules": EXECUTOR_RULES})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "argo-executor"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "argo-executor"},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}]})


def failed_logs(kube_cluster, namespace: str) -> dict:
    """The last lines of every failed pod's main container (what an assertion should show)."""
    logs = {}
    for pod in kube_cluster.core.list_namespaced_pod(namespace).items:
        if pod.status and pod.status.phase == "Failed":
            container = "main" if any(c.name == "main" for c in pod.spec.containers) else pod.spec.containers[0].name
            try:
                text = kube_cluster.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=container)
            except Exception as exc:  # noqa: BLE001 - no log: say why
                text = repr(exc)
            logs[pod.metadata.name] = text[-1500:]
    return logs


def wait_workflow(kube_cluster, namespace: str, name: str, seconds: float) -> dict:
    import time

    from kubernetes import client

    custom = client.CustomObjectsApi(kube_cluster.api)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        wf = custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", namespace, "workflows", name)
        if (wf.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Error"):
            return wf
        time.sleep(2)
    raise AssertionError(f"workflow {name} did not finish in {seconds}s: {json.dumps(wf.get('status'))[-3000:]}")


@pytest.mark.slow
def test_the_exported_workflow_runs_on_argo_to_promote_and_registers_what_doit_registers(
        tmp_path, pvc_claim, docker_client, kube_cluster, argo_controller):
    """`mlflowctl export argo | argo submit -` (the whole DAG) on the real controller: data, train_model,
    train_concept, integration_test and monitor run as the k8s backend's Jobs (resource templates); register,
    deploy and promote run in the runner image as the ServiceAccount `mlflowctl setup` creates, through the
    project's pvc:// store server, sharing one .mlflowctl/ on the claim (deploy's record of the version it
    deployed is what promote reads); every node succeeds, and the version promoted to stable is the one
    registered. `doit register backend=k8s` registers the same version of the same model (same settings and
    code, same step count, the same accuracy within TensorFlow's run-to-run noise)."""
    from kubernetes import client

    from kube_fixtures import cluster_script, k8s_settings
    from mlflowctl.cli import load_pipeline
    from mlflowctl.project import Project
    from mlflowctl_plugins.argo_export import runner_context, runner_image
    from test_e2e import doit, mlflowctl
    from test_k8s_e2e import SMALL

    namespace, claim = pvc_claim
    config = {**SMALL, "project": "argorun", "store": f"pvc://{claim}/argo",
              "stores": {"pvc": {"size": "1Gi", "storage_class": "mlflowctl-test"}},
              "backends": {"k8s": k8s_settings(namespace, image_pull_policy="Never", service_account="mlflowctl")}}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    mlflowctl(root, "setup")  # ServiceAccount mlflowctl + the Role a run needs (the claim exists already)
    pipeline = load_pipeline(root, {})
    image = pipeline.project.backend.image(print)  # built by the docker backend's code, loaded into the node
    runner = runner_image(pipeline)
    context = runner_context(pipeline, tmp_path / "runner", image)
    for _ in docker_client.api.build(path=str(context), tag=runner, network_mode="host", rm=True, decode=True):
        assert "error" not in _, _
    assert cluster_script("load-image", runner).returncode == 0
    grant_executor_role(kube_cluster, namespace, "mlflowctl")

    doc = yaml.safe_load(export(root).stdout)  # the whole DAG
    tasks = {t["name"] for t in next(t for t in doc["spec"]["templates"] if t["name"] == "pipeline")["dag"]["tasks"]}
    assert tasks == {s.replace("_", "-") for s in pipeline.stages}, tasks
    custom = client.CustomObjectsApi(kube_cluster.api)
    created = custom.create_namespaced_custom_object("argoproj.io", "v1alpha1", namespace, "workflows", doc)
    try:
        wf = wait_workflow(kube_cluster, namespace, created["metadata"]["name"], 2400)
        nodes = {n["displayName"]: n["phase"] for n in wf["status"].get("nodes", {}).values()}
        assert wf["status"]["phase"] == "Succeeded", f"{wf['status'].get('message')} {nodes}\n" + "\n".join(
            f"--- {pod}:\n{log}" for pod, log in failed_logs(kube_cluster, namespace).items())
        assert {nodes[t] for t in tasks} == {"Succeeded"}, nodes
    finally:  # the model server deploy started (the namespace goes at the end; free the CPU for doit now)
        apps = client.AppsV1Api(kube_cluster.api)
        for dep in apps.list_namespaced_deployment(namespace).items:
            if "-serve-" in dep.metadata.name:
                apps.delete_namespaced_deployment(dep.metadata.name, namespace, propagation_policy="Background")
    models = mlflowctl(root, "models").stdout
    assert "fmnist" in models and " 1 " in f" {models} ", models
    # promote made the registered version stable: it read deploy's record from the shared .mlflowctl/
    store = Project(root).store
    registered = json.loads(store.read_bytes(f"argo/{created['metadata']['name']}/register/version.json"))["version"]
    assert registered == 1 and Project(root).models.labels().get("stable") == registered, Project(root).models.labels()
    assert store.read_bytes("argo/.mlflowctl/serve/server.json"), "the orchestrator steps' state is not on the claim"

    # doit backend=k8s, the same project into another store path on the claim: the same version (1) of the same
    # model (TensorFlow's CPU training is not bit-reproducible, so the files differ; the metrics do not)
    argo_meta = json.loads(Project(root).store.read_bytes("models/fmnist/1/metadata.json"))
    proc = doit(root, "register", f"store=pvc://{claim}/doit", timeout=1500)
    assert "registered fmnist version 1" in proc.stdout, proc.stdout[-3000:]
    doit_meta = json.loads(Project(root, {"store": f"pvc://{claim}/doit"}).store.read_bytes("models/fmnist/1/metadata.json"))
    assert argo_meta["metrics"]["workers"] == doit_meta["metrics"]["workers"] == 1
    for key in ("epochs", "steps", "batch_size", "seed", "optimizer_steps", "train_count", "test_count"):
        assert argo_meta["metrics"][key] == doit_meta["metrics"][key], key
    assert abs(argo_meta["metrics"]["accuracy"] - doit_meta["metrics"]["accuracy"]) < 0.03, (argo_meta, doit_meta)
    assert argo_meta["concept_metrics"].keys() == doit_meta["concept_metrics"].keys()
    # the settings and code it was trained with, as doit records them
    assert argo_meta["params"] == doit_meta["params"] and argo_meta["params"]["steps"] == 40
    assert argo_meta["concept_params"] == doit_meta["concept_params"]
    assert argo_meta["code_digests"] == doit_meta["code_digests"]


@pytest.mark.slow
def test_failed_jobs_and_tfjobs_fail_their_exported_steps_by_their_own_verdict(
        tmp_path, kube_namespace, kube_cluster, argo_controller, tfjob_operator):
    """The exported resource templates on the real controller, the real Job controller and the real training
    operator, with trivial commands in the node's python:3.11-slim: a Job whose pod fails, with one retry
    (backoff_limit=1), fails its step only once the Job itself has failed (both pods), not at the first pod;
    a TFJob whose Worker fails while the Chief would wait for it fails its step (not a step that waits for the
    Chief's success forever)."""
    import time

    from kubernetes import client

    config = {**CONFIG, "backends": {"k8s": {**CONFIG["backends"]["k8s"], "namespace": kube_namespace}}}
    root = make_project(tmp_path / "proj", yaml.safe_dump(config, sort_keys=False))
    doc = yaml.safe_load(export(root, "train_model.workers=2", "backends.k8s.backoff_limit=1",
                                "--stage", "train_model").stdout)
    templates = {t["name"]: t for t in doc["spec"]["templates"]}
    commands = {"data": {"Job": ["sh", "-c", "exit 3"]},
                "train-model": {"Chief": ["sleep", "600"], "Worker": ["sh", "-c", "exit 3"]}}
    for name, replicas in commands.items():
        manifest = yaml.safe_load(templates[name]["resource"]["manifest"])
        for replica, command in replicas.items():
            pod = (manifest["spec"]["template"] if replica == "Job"
                   else manifest["spec"]["tfReplicaSpecs"][replica]["template"])["spec"]
            pod["volumes"] = []
            pod["containers"][0].update(image="python:3.11-slim", imagePullPolicy="Never", command=command, args=[],
                                        volumeMounts=[], resources={})
        templates[name]["resource"]["manifest"] = yaml.safe_dump(manifest, sort_keys=False)
    doc["spec"]["templates"] = [templates["data"], templates["train-model"], {"name": "only", "dag": {"tasks": [
        {"name": "data", "template": "data"}, {"name": "train-model", "template": "train-model"}]}}]
    doc["spec"]["entrypoint"] = "only"
    doc["spec"].pop("volumes", None)
    doc["spec"]["serviceAccountName"] = "default"
    grant_executor_role(kube_cluster, kube_namespace, "default")
    custom = client.CustomObjectsApi(kube_cluster.api)
    started = time.monotonic()
    created = custom.create_namespaced_custom_object("argoproj.io", "v1alpha1", kube_namespace, "workflows", doc)
    wf = wait_workflow(kube_cluster, kube_namespace, created["metadata"]["name"], 400)
    took = time.monotonic() - started
    nodes = {n["displayName"]: n for n in (wf["status"].get("nodes") or {}).values()}
    assert wf["status"]["phase"] == "Failed" and {"data", "train-model"} <= set(nodes), wf["status"]
    for name in ("data", "train-model"):
        assert nodes[name]["phase"] in ("Failed", "Error"), nodes[name]
        assert re.search(r"failure condition '\{status\.conditions\.\d\.type == \[Failed\]\}' evaluated true",
                         nodes[name].get("message", "")), nodes[name]
    job = client.BatchV1Api(kube_cluster.api).list_namespaced_job(kube_namespace).items
    assert [j.status.failed for j in job] == [2], [j.status for j in job]  # the retry ran before the step failed
    assert took < 400  # long before the Chief's 600 s sleep would have ended
