"""End to end with the real thing: doit, TensorFlow, the model server on 127.0.0.1, the gate.

One project, driven through the stories the issues promise: from an empty
state `doit -n 2` trains, registers, deploys, tests, promotes and monitors;
a second `doit` does nothing; one hyperparameter re-runs only what depends
on it; a bad model is blocked by the gate and the stable version keeps
answering; `mlflowctl rollback` restores the previous stable version.
"""
from __future__ import annotations

import json
import socket
import subprocess

import pytest
import requests

from conftest import VENV_BIN, doit_env, make_project

pytestmark = pytest.mark.slow

SMALL = """\
project: e2e
model_name: fmnist
data:
  dataset: fashion-mnist
train_model:
  epochs: 2
  steps: 60
train_concept:
  epochs: 1
  steps: 40
integration_test:
  min_accuracy: 0.6
  samples: 300
  batch_size: 50
monitor:
  max_drift_rate: 0.5
serving:
  target: local
  local:
    port: {port}
    grpc_port: {grpc_port}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def doit(root, *args, check=True, timeout=600):
    proc = subprocess.run([str(VENV_BIN / "doit"), *args], cwd=root, env=doit_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def mlflowctl(root, *args, check=True):
    proc = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), *args], env=doit_env(),
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlflowctl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran(proc) -> list[str]:
    """Tasks doit executed ('.  name'), not the up-to-date ones ('-- name')."""
    return [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")]


def stable_answers(port: int, name: str) -> list[int]:
    image = [[0.0] * 784]
    r = requests.post(f"http://127.0.0.1:{port}/v1/models/{name}:predict", json={"instances": image}, timeout=10)
    assert r.status_code == 200, r.text
    probs = r.json()["predictions"][0]
    assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-3
    status = requests.get(f"http://127.0.0.1:{port}/v1/models/{name}/labels/stable", timeout=10).json()
    return [int(s["version"]) for s in status["model_version_status"]]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    port = free_port()
    root = make_project(tmp_path_factory.mktemp("e2e") / "proj", SMALL.format(port=port, grpc_port=free_port()))
    yield root, port
    subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), "serve", "stop"], env=doit_env(),
                   capture_output=True, timeout=60)


def test_pipeline_from_empty_state_to_monitored_endpoint(project):
    root, port = project
    first = doit(root, "-n", "2")
    assert ran(first) == [] or set(ran(first)) == {"data", "train_model", "train_concept", "register", "deploy",
                                                  "integration_test", "promote", "monitor"}
    assert "[train_model]" in first.stdout and "[train_concept]" in first.stdout
    models = mlflowctl(root, "models").stdout
    assert "1  stable" in models, models
    assert stable_answers(port, "fmnist") == [1]
    status = mlflowctl(root, "serve", "status").stdout.splitlines()
    assert status[0] == f"http://127.0.0.1:{port}/v1/models/fmnist:predict"
    assert "  version 1: AVAILABLE  [stable]" in status
    assert any(line.startswith("  gRPC (TF Serving PredictionService): 127.0.0.1:") for line in status), status
    report = mlflowctl(root, "report").stdout
    assert f"endpoint:  http://127.0.0.1:{port}/v1/models/fmnist:predict" in report and "accuracy:  0." in report
    store = root / ".mlflowctl" / "store"
    version = store / "models" / "fmnist" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "concept" / "threshold.json").is_file()
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["params"]["steps"] == 60 and 0.6 <= meta["metrics"]["accuracy"] <= 1 and meta["data_digest"]
    monitor = next((store / "results" / "monitor").iterdir())
    assert (monitor / "drift.png").stat().st_size > 1000 and "drift" in (monitor / "report.md").read_text().lower()


def test_second_run_does_nothing(project):
    root, _ = project
    again = doit(root)
    assert ran(again) == [], again.stdout
    status = mlflowctl(root, "status").stdout
    assert status.count("up to date") == 8, status


def test_one_hyperparameter_reruns_only_its_dependents(project):
    root, port = project
    status = mlflowctl(root, "status", "train_model.learning_rate=0.002").stdout
    assert "train_model       will run: param learning_rate changed: 0.001 -> 0.002" in status
    assert "data              up to date" in status and "train_concept     up to date" in status
    proc = doit(root, "train_model.learning_rate=0.002")
    assert set(ran(proc)) == {"train_model", "register", "deploy", "integration_test", "promote", "monitor"}
    assert stable_answers(port, "fmnist") == [2]


def test_gate_blocks_a_bad_model_and_stable_keeps_serving(project):
    root, port = project
    bad = doit(root, "train_model.steps=1", "train_model.epochs=1", "train_model.learning_rate=0.00001", check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "version 3 not promoted: accuracy" in bad.stdout + bad.stderr
    assert "version 2 stays stable" in bad.stdout + bad.stderr
    assert stable_answers(port, "fmnist") == [2]
    models = mlflowctl(root, "models").stdout
    assert "3  rejected" in models and "below the floor" in models
    # version 3 was withdrawn: TF Serving reports an unloaded version as END and refuses to predict with it
    r = requests.get(f"http://127.0.0.1:{port}/v1/models/fmnist/versions/3", timeout=10)
    assert r.json()["model_version_status"][0]["state"] == "END"
    r = requests.post(f"http://127.0.0.1:{port}/v1/models/fmnist/versions/3:predict",
                      json={"instances": [[0.0] * 784]}, timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_rollback_restores_the_previous_stable_version(project):
    root, port = project
    out = mlflowctl(root, "rollback").stdout
    assert "version 1 is stable again" in out
    assert stable_answers(port, "fmnist") == [1]
    models = mlflowctl(root, "models").stdout
    assert "1  stable" in models and "2  rolled-back" in models


def test_doit_after_rollback_keeps_the_rolled_back_version_off_and_monitors_the_restored_one(project):
    """The rolled-back version's own config again: deploy does not revive version 2 (its result holds: the
    version was withdrawn on purpose), promote records version 1, the stable one, with version 1's own concept
    model, and monitor watches that one."""
    root, port = project
    proc = doit(root, "train_model.learning_rate=0.002", "monitor.max_drift_rate=1.0")
    assert set(ran(proc)) == {"promote", "monitor"}, proc.stdout
    assert "version 2 was rolled back (mlflowctl rollback): version 1 stays stable" in proc.stdout + proc.stderr
    assert stable_answers(port, "fmnist") == [1]
    served = requests.get(f"http://127.0.0.1:{port}/v1/models/fmnist/versions/2", timeout=10).json()
    assert served["model_version_status"][0]["state"] == "END", served  # not deployed again
    assert "2  rolled-back" in mlflowctl(root, "models").stdout
    store = root / ".mlflowctl" / "store"
    promoted = [json.loads(p.read_text()) for p in (store / "results" / "promote").glob("*/endpoint.json")]
    assert sorted(e["version"] for e in promoted) == [1, 1], promoted  # the base config's and this one's
    ours = next(p.parent for p in (store / "results" / "promote").glob("*/endpoint.json")
                if "was rolled back" in (p.parent / "_logs" / "promote.log").read_text())
    assert (ours / "concept" / "threshold.json").read_bytes() == \
        (store / "models" / "fmnist" / "1" / "concept" / "threshold.json").read_bytes()
    newest = max((store / "results" / "monitor").glob("*/drift.json"), key=lambda p: p.stat().st_mtime)
    assert json.loads(newest.read_text())["version"] == 1
    again = doit(root, "train_model.learning_rate=0.002", "monitor.max_drift_rate=1.0")
    assert ran(again) == [], again.stdout  # the rollback is respected, and nothing churns


def test_serve_stop_then_doit_redeploys_without_retesting(project):
    root, port = project
    mlflowctl(root, "serve", "stop")
    assert mlflowctl(root, "serve", "status").stdout.startswith("local server: not running")
    status = mlflowctl(root, "status").stdout
    assert "deploy            will run: its result no longer holds" in status, status
    proc = doit(root)
    # the deploy result is the same, so the tested and promoted results are reused
    assert ran(proc) == ["deploy"], proc.stdout


def test_monitor_on_demand_reads_live_traffic_and_gates_on_drift(project):
    root, port = project
    import random

    rng = random.Random(0)
    noise = [[rng.random() for _ in range(784)] for _ in range(20)]  # nothing like a Fashion-MNIST image
    r = requests.post(f"http://127.0.0.1:{port}/v1/models/fmnist:predict", json={"instances": noise}, timeout=10)
    assert r.status_code == 200
    proc = mlflowctl(root, "monitor", check=False)
    assert proc.returncode == 6, proc.stdout + proc.stderr  # all 20 live images are out of distribution
    assert "drift rate 1.00 > max 0.50" in proc.stdout + proc.stderr
    reports = sorted((root / ".mlflowctl" / "monitor").iterdir())
    assert (reports[-1] / "drift.png").is_file() and "1.00" in (reports[-1] / "report.md").read_text()
    ok = mlflowctl(root, "monitor", "monitor.max_drift_rate=1.0")
    assert "report:" in ok.stdout
