"""The execution-backend contract: every backend must pass these tests.

Use it from your own tests: import the tests and give them a ``backend`` fixture (an instance of
your :class:`~mlflowctl.backends.Backend`, preflighted)::

    from mlflowctl.testing.backend_contract import *  # noqa: F401,F403

    @pytest.fixture
    def backend(tmp_path):
        b = MyBackend({}, fake_project(tmp_path))
        b.preflight()
        return b

A backend whose stages run on store locations (``runs_in_store = True``) also sets
``backend.contract_store`` (a store its stages can mount) in that fixture.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mlflowctl.backends import StageRun, StoreLocation
from mlflowctl.errors import Cancelled

SCRIPT = r'''
import os, sys, time, pathlib
mode = os.environ["MODE"]
out = pathlib.Path(os.environ["OUT_DIR"])
if mode == "ok":
    data = pathlib.Path(os.environ["IN_DIR"], "input.txt").read_text()
    for i in range(3):
        print(f"line {i}", flush=True)
    (out / "result.txt").write_text(data.upper() + os.environ["GREETING"])
elif mode == "fail":
    print("about to fail", flush=True)
    print("the reason", file=sys.stderr, flush=True)
    sys.exit(7)
elif mode == "sleep":
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / "child.pid").write_text(str(child.pid))
    print("sleeping", flush=True)
    time.sleep(120)
'''


def make_run(backend, tmp_path: Path, mode: str, lines: list[str] | None = None,
             timeout: float | None = None) -> StageRun:
    """A run of the contract script: local folders, or (``runs_in_store`` backends) store locations."""
    code = tmp_path / "image"
    code.mkdir(exist_ok=True)
    (code / "stage.py").write_text(SCRIPT)
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    (inp / "input.txt").write_text("hello ")
    inputs, outputs, locations = {"IN_DIR": inp}, {"OUT_DIR": out}, {}
    if getattr(backend, "runs_in_store", False):
        store = backend.contract_store  # set by the backend's fixture: a store its stages can mount
        where = f"contract/{tmp_path.name}"
        store.publish(inp, f"{where}/in")
        staging = store.remote_staging("contract")
        locations = {"IN_DIR": StoreLocation(store, f"{where}/in"),
                     "OUT_DIR": StoreLocation(store, staging.__enter__(), read_only=False)}
        inputs, outputs = {}, {}
    run = StageRun(stage="contract", command=["python", "stage.py"], workdir=code,
                   env={"MODE": mode, "GREETING": "world"}, inputs=inputs, outputs=outputs,
                   log_path=tmp_path / "logs" / "contract.log", key="", timeout=timeout, locations=locations)
    if lines is not None:
        run.echo = lines.append
    return run


def output_bytes(run: StageRun, name: str) -> bytes | None:
    """A file the stage wrote into its output (read back from the store for ``runs_in_store`` backends)."""
    if run.outputs:
        path = run.outputs["OUT_DIR"] / name
        return path.read_bytes() if path.exists() else None
    loc = run.locations["OUT_DIR"]
    rel = f"{loc.path}/{name}"
    if not loc.store.exists(rel):
        return None
    with loc.store.open(rel, "rb") as fh:
        return fh.read()


def test_runs_with_env_inputs_and_outputs(backend, tmp_path):
    lines: list[str] = []
    run = make_run(backend, tmp_path, "ok", lines)
    result = backend.run(run)
    assert result.ok and result.exit_code == 0
    assert output_bytes(run, "result.txt") == b"HELLO world"
    if run.outputs:  # local folders: written as the user, not root
        assert (run.outputs["OUT_DIR"] / "result.txt").stat().st_uid == os.getuid()
    assert [l for l in lines if l.startswith("line")] == ["line 0", "line 1", "line 2"]
    assert "line 2" in run.log_path.read_text()


def test_default_echo_prefixes_the_stage_name(backend, tmp_path, capsys):
    backend.run(make_run(backend, tmp_path, "ok"))
    assert "[contract] line 0" in capsys.readouterr().out


def test_failure_reports_exit_code_and_keeps_the_log(backend, tmp_path):
    run = make_run(backend, tmp_path, "fail", [])
    result = backend.run(run)
    assert not result.ok and result.exit_code == 7
    log = run.log_path.read_text()
    assert "about to fail" in log and "the reason" in log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_cancel_stops_promptly_and_leaves_nothing_running(backend, tmp_path):
    run = make_run(backend, tmp_path, "sleep", [])
    threading.Timer(1.5, run.cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        backend.run(run)
    assert time.monotonic() - started < 15
    pid_file = run.outputs["OUT_DIR"] / "child.pid" if run.outputs else Path("/nonexistent")
    if pid_file.exists() and getattr(backend, "name", "") == "local":
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the stage's child process survived the cancel"


def test_timeout_cancels(backend, tmp_path):
    run = make_run(backend, tmp_path, "sleep", [], timeout=1.0)
    with pytest.raises(Cancelled, match="timed out"):
        backend.run(run)


def test_render_writes_an_equivalent_script(backend, tmp_path):
    run = make_run(backend, tmp_path, "ok")
    files = backend.render(run, tmp_path / "rendered")
    assert files and all(f.exists() for f in files)
    text = "\n".join(f.read_text() for f in files)
    assert "stage.py" in text and "GREETING" in text
