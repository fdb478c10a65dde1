"""A second project through the same core: tests/projects/linefit/ shares nothing with the example.

Its own stages (points -> fit -> register -> deploy -> check -> promote), settings, generated data and a tiny
model (a least-squares plane exported as a tf.Module SavedModel), run with the real doit, the local backend and
the built-in model server on 127.0.0.1: caching, versions, deploy and the gate, without a line of mlflowctl/
knowing it. The server is the built-in serving target's (it runs the project's ``image/serve.py``): the test
copies it, and the modules it imports, next to linefit's own stage scripts.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import REPO, VENV_BIN, doit_env

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "projects" / "linefit"
DOIT = str(VENV_BIN / "doit")
MLFLOWCTL = str(VENV_BIN / "mlflowctl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_files(name: str = "serve.py", seen: set[str] | None = None) -> set[str]:
    """serve.py and the modules of image/ it imports, transitively (whatever they are split into)."""
    seen = set() if seen is None else seen
    seen.add(name)
    text = (REPO / "image" / name).read_text()
    for module in re.findall(r"^\s*(?:from|import)\s+(\w+)", text, re.MULTILINE):
        if (REPO / "image" / f"{module}.py").is_file() and f"{module}.py" not in seen:
            server_files(f"{module}.py", seen)
    return seen


@pytest.fixture
def linefit(tmp_path):
    root = tmp_path / "linefit"
    shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns("__pycache__", ".mlflowctl"))
    for name in server_files():
        assert not (root / "image" / name).exists(), f"linefit has its own {name}"
        shutil.copyfile(REPO / "image" / name, root / "image" / name)
    port = free_port()
    text = (root / "mlflowctl.yaml").read_text().replace(
        "serving:\n  target: local\n", f"serving:\n  target: local\n  local:\n    port: {port}\n    grpc_port: 0\n")
    (root / "mlflowctl.yaml").write_text(text)
    yield root, port
    subprocess.run([MLFLOWCTL, "-C", str(root), "serve", "stop"], env=doit_env(), capture_output=True, timeout=120)


def doit(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOIT, *args], cwd=root, env=doit_env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    """The stages doit ran (``.  name``), not those up to date (``-- name``)."""
    return [line.split()[1] for line in proc.stdout.splitlines() if line.startswith(".  ")]


def stable_predicts(port: int, x: list[float]) -> float:
    r = requests.post(f"http://127.0.0.1:{port}/v1/models/line:predict", json={"instances": [x]}, timeout=30)
    assert r.status_code == 200, r.text
    value = r.json()["predictions"][0]
    return float(value[0] if isinstance(value, list) else value)


def models(root: Path) -> str:
    return subprocess.run([MLFLOWCTL, "-C", str(root), "models"], env=doit_env(), capture_output=True, text=True,
                          timeout=120, check=True).stdout


def test_linefit_runs_end_to_end_through_the_same_core(linefit):
    root, port = linefit
    listed = subprocess.run([DOIT, "list"], cwd=root, env=doit_env(), capture_output=True, text=True, timeout=60,
                            check=True).stdout
    assert sorted(line.split()[0] for line in listed.splitlines()) == sorted(
        ["points", "fit", "register", "deploy", "check", "promote"])

    first = doit(root)
    assert ran(first) == ["points", "fit", "register", "deploy", "check", "promote"], first.stdout
    assert "R² 0.9" in first.stdout  # the gate asked the live endpoint
    store = root / ".mlflowctl" / "store"
    version = store / "models" / "line" / "1"
    assert (version / "saved_model.pb").is_file() and not (version / "concept").exists()
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["metrics"]["ridge"] == 0.0 and meta["params"] == {"ridge": 0.0} and meta["points_digest"]
    plane = json.loads(next((store / "results" / "points").glob("*/plane.json")).read_text())
    x = [0.5, -0.25, 0.75]
    truth = sum(w * v for w, v in zip(plane["w"], x)) + plane["b"]
    assert abs(stable_predicts(port, x) - truth) < 0.1
    assert re.search(r"^\s+1\s+stable\s", models(root), re.MULTILINE)

    # caching: a second run runs nothing
    again = doit(root)
    assert ran(again) == [], again.stdout

    # a setting from the command line: only what depends on it re-runs, as version 2, which passes the gate
    second = doit(root, "fit.ridge=2.0")
    assert ran(second) == ["fit", "register", "deploy", "check", "promote"], second.stdout
    assert json.loads((store / "models" / "line" / "2" / "metadata.json").read_text())["params"] == {"ridge": 2.0}
    labels = json.loads((store / "models" / "line" / "labels.json").read_text())
    assert labels.get("stable") == 2

    # the gate: a plane flattened by a huge penalty is rejected and version 2 keeps answering
    bad = doit(root, "fit.ridge=1000000", check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "line version 3 not promoted" in bad.stdout + bad.stderr and "version 2 stays stable" in bad.stdout + bad.stderr
    assert json.loads((store / "models" / "line" / "labels.json").read_text()).get("stable") == 2
    assert abs(stable_predicts(port, x) - truth) < 0.15
    listing = models(root)
    assert re.search(r"^\s+3\s+rejected\s", listing, re.MULTILINE), listing
    assert "ridge=" in listing  # the setting that tells the versions apart

    # mlflowctl reads the same declaration without doit
    status = subprocess.run([MLFLOWCTL, "-C", str(root), "status"], env=doit_env(), capture_output=True, text=True,
                            timeout=120, check=True).stdout
    assert status.splitlines()[0].split() == ["points", "up", "to", "date"]
    config = json.loads(subprocess.run([MLFLOWCTL, "-C", str(root), "config"], env=doit_env(), capture_output=True,
                                       text=True, timeout=60, check=True).stdout)
    assert config["fit"] == {"ridge": 0.0} and config["points"]["count"] == 400 and "train_model" not in config


def test_linefit_settings_are_checked_at_load_with_their_key_path(linefit):
    root, _ = linefit
    proc = doit(root, "list", "points.count=3", check=False)
    assert proc.returncode == 3
    assert proc.stderr.strip() == "mlflowctl: mlflowctl.yaml: points.count: expected a number between 10 and 100000, got 3"
    proc = doit(root, "list", "train_model.epochs=1", check=False)  # the example's settings mean nothing here
    assert proc.returncode == 3 and "train_model: unknown key" in proc.stderr
