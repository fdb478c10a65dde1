"""Issue 11, for the built-in ``local`` target: a server that cannot start never replaces the one that
answers, and a stale ``server.pid`` naming another project's server never stops that server."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import VENV_BIN
from mlflowctl.errors import UnavailableError
from mlflowctl.project import Project
from mlflowctl.testing import make_serving_kit
from serving_fixtures import free_port

REPO = Path(__file__).resolve().parents[1]


def test_a_stale_pid_file_naming_another_projects_server_stops_nothing(tmp_path, project_dir):
    # another project's server: a process running serve.py with ITS routing file
    other_routing = tmp_path / "other" / ".mlflowctl" / "serve" / "routing.json"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "serve.py", "--routing",
                              str(other_routing)])
    try:
        target = Project(project_dir, {"serving.local.runtime": "process"}).serving
        target.dir.mkdir(parents=True, exist_ok=True)
        target.pid_file.write_text(f"{other.pid}\n")  # our server died; its pid now names the other one
        target.info_file.write_text('{"runtime": "process", "port": 8501}')
        target.stop()
        assert other.poll() is None, "mlflowctl serve stop killed another project's server"
        assert target.status().running is False
        assert not target.pid_file.exists()  # the stale record is gone
    finally:
        other.kill()
        other.wait(timeout=10)


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    settings = {"port": free_port(), "grpc_port": 0, "runtime": "process", "python": sys.executable,
                "start_timeout": 90}
    with make_serving_kit(tmp_path_factory.mktemp("guard") / "proj", "local", settings,
                          stage_code=REPO / "image") as kit:
        kit.target.deploy(kit.versions[1], label="stable")
        yield kit, settings


def still_serving(kit) -> None:
    assert kit.target.serves(1)
    assert kit.predict(kit.target.endpoint()) == kit.answers[1]


def test_a_port_in_use_keeps_the_running_server(running):
    kit, settings = running
    pid = kit.target.status()["pid"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        moved = Project(kit.project.root, {"serving.local.port": str(port), "serving.local.grpc_port": "0",
                                           "serving.local.runtime": "process",
                                           "serving.local.python": sys.executable}).serving
        with pytest.raises(UnavailableError, match=f"cannot move to port {port}.*keeps serving"):
            moved.start()
        with pytest.raises(UnavailableError, match=f"cannot move to port {port}"):
            moved.deploy(kit.versions[2], label="canary")
    still_serving(kit)
    assert kit.target.status()["pid"] == pid  # not restarted


@pytest.mark.parametrize("port", ["99999", "0"])
def test_an_invalid_port_is_refused_before_anything_stops(running, port):
    kit, settings = running
    proc = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(kit.project.root), "serve", "start",
                           f"serving.local.port={port}", "serving.local.runtime=process"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "serving.local.port" in proc.stderr and len(proc.stderr.splitlines()) == 1
    still_serving(kit)
