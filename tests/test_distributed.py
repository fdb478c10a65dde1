"""``train_model.workers``: N replicas trained as one MultiWorkerMirroredStrategy job.

The local backend runs N real processes with a TF_CONFIG on loopback ports;
the trained model goes through the real pipeline and its integration gate.
The replica mechanics (one failure stops all, cancel stops all) are checked
with tiny stage commands, so they fail in seconds if broken.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import make_project
from contract_fixtures import local_backend
from mlflowctl.backends import StageRun
from test_e2e import SMALL, doit, free_port, mlflowctl, ran


def replica_run(tmp_path: Path, code: str, replicas: int = 2) -> StageRun:
    work = tmp_path / "image"
    work.mkdir(exist_ok=True)
    (work / "stage.py").write_text(code)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return StageRun(stage="s", command=["python", "stage.py"], workdir=work, env={}, inputs={},
                    outputs={"OUT_DIR": out}, log_path=tmp_path / "s.log", replicas=replicas, echo=lambda line: None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_each_replica_gets_tf_config_and_only_the_chief_writes_the_output(tmp_path):
    code = """
import json, os
cfg = json.loads(os.environ["TF_CONFIG"])
index = cfg["task"]["index"]
open(os.path.join(os.environ["OUT_DIR"], f"from-{index}"), "w").write(json.dumps(cfg))
"""
    run = replica_run(tmp_path, code, replicas=3)
    result = local_backend(tmp_path).run(run)
    assert result.exit_code == 0, run.log_path.read_text()
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["from-0"]  # workers 1 and 2 wrote into their throwaway folders
    cfg = json.loads((tmp_path / "out" / "from-0").read_text())
    addresses = cfg["cluster"]["worker"]
    assert cfg["task"] == {"type": "worker", "index": 0} and len(set(addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in addresses)


def test_a_failing_replica_stops_the_others_and_names_itself(tmp_path):
    code = """
import json, os, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"pid-{index}"), "w").write(str(os.getpid()))
if index == 1:
    time.sleep(0.5)
    print("replica one: out of patience", flush=True)
    sys.exit(7)
time.sleep(120)  # the chief would wait for its peer forever
"""
    run = replica_run(tmp_path, code)
    started = time.monotonic()
    result = local_backend(tmp_path).run(run)
    assert result.exit_code == 7
    assert time.monotonic() - started < 60
    chief = int((tmp_path / "image" / "pid-0").read_text())
    assert not alive(chief)
    tail = run.log_path.read_text().splitlines()[-2:]
    assert tail[0] == "worker 1: replica one: out of patience"
    assert tail[1] == "worker 1 exited with code 7 (replica one: out of patience); stopped the other replicas"


def test_cancel_stops_every_replica(tmp_path):
    code = """
import json, os, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"pid-{index}"), "w").write(str(os.getpid()))
time.sleep(120)
"""
    run = replica_run(tmp_path, code)
    pids = [tmp_path / "image" / f"pid-{i}" for i in range(2)]

    def cancel_when_started():
        for _ in range(200):
            if all(p.exists() and p.read_text() for p in pids):
                break
            time.sleep(0.05)
        run.cancelled.set()

    threading.Thread(target=cancel_when_started, daemon=True).start()
    from mlflowctl.errors import Cancelled

    with pytest.raises(Cancelled):
        local_backend(tmp_path).run(run)
    for p in pids:
        assert not alive(int(p.read_text()))


def _project(tmp_path: Path, workers: int) -> Path:
    text = SMALL.format(port=free_port(), grpc_port=free_port()).replace(
        "  steps: 60\n", f"  steps: 60\n  workers: {workers}\n", 1)
    return make_project(tmp_path / "proj", text)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_workers_below_one_is_a_config_error(tmp_path, value):
    root = _project(tmp_path, 1)
    proc = doit(root, "train_model", f"train_model.workers={value}", check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train_model.workers" in lines[0] and "at least 1" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_backend_without_replicas_refuses_workers_above_one(tmp_path):
    root = _project(tmp_path, 2)
    proc = doit(root, "train_model", "backend=docker", check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "backend docker" in lines[0] and "workers: 1" in lines[0], proc.stderr


@pytest.mark.slow
def test_two_local_workers_train_a_model_the_gate_accepts(tmp_path):
    root = _project(tmp_path, 2)
    try:
        proc = doit(root, "-n", "2", timeout=900)
    finally:  # the pipeline deployed a model server: stop it
        mlflowctl(root, "serve", "stop", check=False)
    assert "promote" in ran(proc)
    models = root / ".mlflowctl" / "store" / "results" / "train_model"
    (key_dir,) = list(models.iterdir())
    metrics = json.loads((key_dir / "metrics.json").read_text())
    assert metrics["workers"] == 2 and metrics["accuracy"] >= 0.6
    assert (key_dir / "saved_model" / "saved_model.pb").is_file()
    log = (key_dir / "_logs" / "train_model.log").read_text()
    assert "worker 1: " in log and "2 replicas in sync" in log
    # same layout as a single-worker run, and workers is part of the cache key: one worker trains anew
    proc = doit(root, "train_model", "train_model.workers=1", timeout=600)
    assert ran(proc) == ["train_model"]
    single = [d for d in models.iterdir() if d != key_dir]
    assert len(single) == 1
    assert sorted(p.name for p in single[0].iterdir()) == sorted(p.name for p in key_dir.iterdir())
