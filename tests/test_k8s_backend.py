"""The k8s backend against the real test cluster (kube-apiserver, scheduler, kubelet, containerd).

Stages run as Jobs of a tiny image (``FROM python:3.11-slim`` + the stage script), built by the
docker backend's code and loaded into the node with ``scripts/ensure-cluster.sh load-image``;
inputs and outputs live on a ``pvc://`` store whose claim is bound to a hostPath volume.
"""
from __future__ import annotations

import threading
import time
import types
from pathlib import Path

import pytest

from kube_fixtures import KUBECONFIG, k8s_settings, leftovers
from mlflowctl.backends import StageRun, StoreLocation
from mlflowctl.errors import ConfigError, StageFailed, UnavailableError

DOCKERFILE = """\
FROM python:3.11-slim
WORKDIR /app
COPY *.py ./
"""


def make_backend(tmp_path: Path, namespace: str, claim: str, **settings):
    from mlflowctl_plugins.k8s_backend import KubeBackend
    from mlflowctl_plugins.pvc_store import PvcStore

    code = tmp_path / "image"
    code.mkdir(exist_ok=True)
    (code / "Dockerfile").write_text(DOCKERFILE)  # the contract suite writes stage.py itself
    state = tmp_path / ".mlflowctl"
    state.mkdir(exist_ok=True)
    k8s = k8s_settings(namespace, **settings)
    project = types.SimpleNamespace(root=tmp_path, name="k8stest", model_name="m", state_dir=state,
                                    stage_code_dir=code, config={"backends": {"k8s": k8s, "docker": {}}})
    project.store = PvcStore(f"pvc://{claim}/t", {}, project)
    backend = KubeBackend(k8s, project)
    backend.contract_store = project.store
    return backend


@pytest.fixture
def backend(tmp_path, pvc_claim, docker_client):
    """The contract suite's ``backend`` fixture here: a k8s backend on the test cluster."""
    namespace, claim = pvc_claim
    b = make_backend(tmp_path, namespace, claim)
    b.preflight()
    return b


try:
    import test_backend_contract as _contract
except ImportError:  # pragma: no cover
    _contract = None
else:
    for _name in dir(_contract):
        if _name.startswith("test_"):
            globals()[f"test_contract_{_name[5:]}"] = getattr(_contract, _name)


def write_stage(tmp_path: Path, source: str) -> None:
    (tmp_path / "image").mkdir(exist_ok=True)
    (tmp_path / "image" / "stage.py").write_text(source)


def store_run(backend, tmp_path: Path, env: dict[str, str] | None = None, key: str = "", timeout=None) -> StageRun:
    store = backend.contract_store
    staging = store.remote_staging("t", key=key).__enter__()
    return StageRun(stage="probe", command=["python", "stage.py"], workdir=tmp_path / "image", env=env or {},
                    inputs={}, outputs={}, locations={"OUT_DIR": StoreLocation(store, staging, read_only=False)},
                    log_path=tmp_path / "logs" / "probe.log", key=key, timeout=timeout)


def test_a_cancelled_run_leaves_no_job_or_pod(backend, tmp_path, kube_cluster, pvc_claim):
    write_stage(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    run = store_run(backend, tmp_path)
    lines: list[str] = []
    run.echo = lines.append
    threading.Thread(target=lambda: (_wait_for(lambda: "up" in lines, 60), run.cancelled.set())).start()
    with pytest.raises(StageFailed):
        backend.run(run)
    assert "up" in lines
    assert leftovers(kube_cluster, pvc_claim[0]) == []


def test_job_names_are_dns_labels_derived_from_the_key(backend):
    run = StageRun(stage="Train_Model.with.A_very_long_stage_name_indeed", command=["python", "x.py"],
                   workdir=Path("."), env={}, inputs={}, outputs={}, log_path=Path("x.log"), key="0123456789abcdefghij")
    name = backend.job_name(run)
    assert len(name) <= 63 and name == name.lower() and name[0].isalnum() and name[-1].isalnum()
    assert backend.job_name(run) == name  # the same key names the same Job (a re-run adopts it)
    assert "0123456789ab" in name


def test_a_failing_stage_reports_its_exit_code_and_log_tail(backend, tmp_path, kube_cluster, pvc_claim):
    write_stage(tmp_path, "import sys\nprint('about to fail', flush=True)\nprint('the reason', file=sys.stderr)\n"
                          "sys.exit(3)\n")
    run = store_run(backend, tmp_path)
    result = backend.run(run)
    assert result.exit_code == 3 and "the reason" in run.log_path.read_text()
    assert result.detail["job"].startswith("mlflowctl-k8stest-probe-")


def test_a_resubmitted_run_adopts_its_running_job(backend, tmp_path, kube_cluster, pvc_claim):
    write_stage(tmp_path, "import os, time, pathlib\ntime.sleep(3)\n"
                          "pathlib.Path(os.environ['OUT_DIR'], 'done').write_text('yes')\nprint('finished')\n")
    run = store_run(backend, tmp_path, key="adoptkey0001")
    name = backend.job_name(run)
    backend._create(run, name, backend.image())  # as if an earlier orchestrator submitted it, then died
    lines: list[str] = []
    run.echo = lines.append
    result = backend.run(run)
    assert result.ok and any("adopting job" in line for line in lines)
    assert not any(line.startswith("job ") and "submitted" in line for line in lines), lines  # no second Job
    assert "finished" in lines and leftovers(kube_cluster, pvc_claim[0]) == []  # done, then cleaned up
    with backend.contract_store.open(f"{run.locations['OUT_DIR'].path}/done") as fh:
        assert fh.read() == b"yes"


def test_deadline_exceeded_is_one_line(tmp_path, pvc_claim, docker_client, kube_cluster):
    b = make_backend(tmp_path, *pvc_claim, active_deadline_seconds=3)
    write_stage(tmp_path, "import time\ntime.sleep(60)\n")
    with pytest.raises(StageFailed, match="DeadlineExceeded"):
        b.run(store_run(b, tmp_path))
    assert leftovers(kube_cluster, pvc_claim[0]) == []


def test_an_image_the_cluster_does_not_have_fails_fast(tmp_path, pvc_claim, kube_cluster):
    b = make_backend(tmp_path, *pvc_claim, image="mlflowctl/not-there:1", image_pull_policy="Never",
                     image_load="")
    write_stage(tmp_path, "print('never')\n")
    started = time.monotonic()
    with pytest.raises(StageFailed, match="cannot get image mlflowctl/not-there:1: ErrImageNeverPull"):
        b.run(store_run(b, tmp_path))
    assert time.monotonic() - started < 60
    assert leftovers(kube_cluster, pvc_claim[0]) == []


def test_an_unschedulable_stage_names_the_schedulers_reason(tmp_path, pvc_claim, docker_client, kube_cluster):
    b = make_backend(tmp_path, *pvc_claim, cpu="64", start_timeout=3.0)
    write_stage(tmp_path, "print('never')\n")
    with pytest.raises(StageFailed, match=r"unschedulable for 3s: .*Insufficient cpu"):
        b.run(store_run(b, tmp_path))
    assert leftovers(kube_cluster, pvc_claim[0]) == []


def test_out_of_memory_is_reported(tmp_path, pvc_claim, docker_client, kube_cluster):
    b = make_backend(tmp_path, *pvc_claim, memory="48Mi")
    write_stage(tmp_path, "block = bytearray(400 * 1024 * 1024)\nblock[::4096] = b'x' * len(block[::4096])\n"
                          "print('survived')\n")
    with pytest.raises(StageFailed, match="out of memory"):
        b.run(store_run(b, tmp_path))


def test_invalid_quantities_fail_at_config_load_naming_the_key(tmp_path):
    from mlflowctl.config import load_config
    from mlflowctl.plugin_manager import build_plugin_manager

    (tmp_path / "mlflowctl.yaml").write_text("backends:\n  k8s:\n    memory: 2Gb\n")
    with pytest.raises(ConfigError, match=r"backends\.k8s\.memory: expected a Kubernetes quantity.*'2Gb'"):
        load_config(tmp_path / "mlflowctl.yaml", registry=build_plugin_manager(load_entry_points=False).registry)


def test_preflight_errors_are_one_line(tmp_path, kube_cluster, kube_namespace):
    from mlflowctl_plugins.kube import Kube

    with pytest.raises(ConfigError, match="no context 'nope' in the kubeconfig"):
        Kube("nope", "", KUBECONFIG).connect()
    with pytest.raises(UnavailableError, match="namespace 'no-such-ns' does not exist"):
        Kube("", "no-such-ns", KUBECONFIG).check_namespace()
    missing = tmp_path / "missing.kubeconfig"
    with pytest.raises(UnavailableError, match="no usable kube context"):
        Kube("", "", str(missing)).connect()


def test_a_service_account_without_rights_is_refused_at_preflight(tmp_path, kube_cluster, kube_namespace):
    """A kubeconfig holding the token of a service account with no Role: the SelfSubjectAccessReview says no."""
    from mlflowctl_plugins.kube import Kube

    core = kube_cluster.core
    core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", kube_namespace, {"spec": {"expirationSeconds": 600}}).status.token
    config = tmp_path / "nobody.kubeconfig"
    config.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:6443", certificate-authority: "{Path(KUBECONFIG).parent}/pki/ca.crt"}}}}]
users: [{{name: nobody, user: {{token: "{token}"}}}}]
contexts: [{{name: nobody, context: {{cluster: c, user: nobody, namespace: {kube_namespace}}}}}]
current-context: nobody
""")
    kube = Kube("", "", str(config))
    with pytest.raises(UnavailableError, match=f"not allowed to create jobs.batch in namespace {kube_namespace}"):
        kube.check_access([("batch", "jobs", "create")])


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_with_a_registry_the_image_is_pushed_and_the_node_pulls_it(tmp_path, pvc_claim, docker_client, kube_cluster,
                                                                   local_registry):
    """``backends.k8s.registry``: the built image is tagged and pushed there, and pods pull it (no image_load)."""
    import requests

    b = make_backend(tmp_path, *pvc_claim, registry=f"{local_registry}/team", image_load="", image_pull_policy="Always")
    write_stage(tmp_path, "import os, pathlib\npathlib.Path(os.environ['OUT_DIR'], 'pulled').write_text('yes')\n"
                          "print('ran from the registry')\n")
    run = store_run(b, tmp_path)
    lines: list[str] = []
    run.echo = lines.append
    result = b.run(run)
    assert result.ok and "ran from the registry" in lines, lines
    assert result.detail["image"].startswith(f"{local_registry}/team/k8stest:")
    tags = requests.get(f"http://{local_registry}/v2/team/k8stest/tags/list", timeout=10).json()["tags"]
    assert result.detail["image"].rsplit(":", 1)[1] in tags
