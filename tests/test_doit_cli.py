"""doit and the mlflowctl CLI as a user runs them: overrides, errors, Ctrl-C, start-up imports."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import VENV_BIN, doit_env, make_project

DOIT = str(VENV_BIN / "doit")
MLFLOWCTL = str(VENV_BIN / "mlflowctl")


def slow_stage_code(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "download.py").write_text(
        "import os, subprocess, sys, time, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "pathlib.Path(os.environ['PID_FILE']).write_text(str(child.pid))\n"
        "print('downloading slowly', flush=True)\n"
        "time.sleep(120)\n")
    (code / "common.py").write_text("")
    return code


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("jobs", ["0", "2"])
def test_ctrl_c_stops_the_stage_process_group_and_publishes_nothing(tmp_path, jobs):
    root = make_project(tmp_path / "proj", stage_code=slow_stage_code(tmp_path))
    pid_file = tmp_path / "child.pid"
    env = {**doit_env(), "PID_FILE": str(pid_file)}
    proc = subprocess.Popen([DOIT, "-n", jobs, "data", "backends.local.pass_env=PID_FILE"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, output
    assert "Traceback" not in output, output
    assert "stage data cancelled" in output
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the stage's child process survived Ctrl-C"
    assert not (root / ".mlflowctl" / "store" / "results" / "data").exists()
    assert list((root / ".mlflowctl" / "store" / ".staging").iterdir()) == []


@pytest.mark.parametrize("args, code, message", [
    (["train_model.learning_rate=fast"], 3, "mlflowctl: mlflowctl.yaml: train_model.learning_rate: expected a number, got 'fast'"),
    (["trian_model.epochs=1"], 3, "mlflowctl: override trian_model.epochs=1: trian_model: unknown key; did you mean 'train_model'?"),
    (["backend=dokcer"], 3, "mlflowctl: backend: unknown backend 'dokcer'; did you mean 'docker'?"),
])
def test_bad_input_is_one_line_with_its_exit_code(project_dir, args, code, message):
    proc = subprocess.run([DOIT, *args], cwd=project_dir, env=doit_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_broken_yaml_and_missing_file(project_dir):
    (project_dir / "mlflowctl.yaml").write_text("train_model: [1, 2\n")
    proc = subprocess.run([DOIT, "list"], cwd=project_dir, env=doit_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stderr.startswith("mlflowctl: mlflowctl.yaml: line 2: not valid YAML")
    (project_dir / "mlflowctl.yaml").unlink()
    proc = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "models"], env=doit_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3 and "mlflowctl.yaml: not found" in proc.stderr and "Traceback" not in proc.stderr


def test_doit_list_shows_every_stage(project_dir):
    proc = subprocess.run([DOIT, "list"], cwd=project_dir, env=doit_env(), capture_output=True, text=True,
                          timeout=60, check=True)
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names == sorted(["data", "train_model", "train_concept", "register", "deploy", "integration_test",
                            "promote", "monitor"])


HEAVY = ("tensorflow", "docker", "kubernetes", "boto3", "numpy", "requests")


@pytest.mark.parametrize("argv", [["-m", "mlflowctl.cli", "--help"], ["-m", "mlflowctl.cli", "status"]])
def test_the_orchestrator_never_imports_heavy_libraries(project_dir, argv):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['mlflowctl'] + {argv[2:]!r}\n"
        "try:\n    runpy.run_module('mlflowctl.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=project_dir, env=doit_env(), capture_output=True,
                          text=True, timeout=60)
    assert "HEAVY:\n" in proc.stdout or proc.stdout.rstrip().endswith("HEAVY:"), proc.stdout + proc.stderr


def test_doit_list_does_not_import_heavy_libraries(project_dir):
    probe = (
        "import sys\n"
        "sys.argv = ['doit', 'list']\n"
        "from doit.__main__ import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=project_dir, env=doit_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.rstrip().endswith("HEAVY:"), proc.stdout + proc.stderr


def test_render_writes_each_stage_without_running_it(project_dir):
    proc = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "render", "--out", "rendered", "train_model.epochs=2"],
                          env=doit_env(), capture_output=True, text=True, timeout=60, check=True)
    written = [Path(line) for line in proc.stdout.splitlines()]
    assert {p.name for p in written} == {"data.sh", "train_model.sh", "train_concept.sh", "integration_test.sh",
                                         "monitor.sh"}
    script = (project_dir / "rendered" / "train_model.sh").read_text()
    assert "export EPOCHS=2" in script and "train_model.py" in script
    assert f"MNIST_DATA_DIR={project_dir / 'rendered' / 'pending' / 'data'}" in script
    assert not (project_dir / ".mlflowctl" / "store" / "results").exists()  # nothing ran
