"""``mlflowctl plugin new serving NAME``: the scaffold is a distribution that passes the conformance kit
as generated, installed into a FRESH virtualenv (pip from this repo's folder and the shared pip cache)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, VENV_BIN


def mlflowctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "mlflowctl"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("name", ["Bad", "2fast", "has-dash", "a/b", ""])
def test_bad_names_are_one_line_exit_3(tmp_path, name):
    proc = mlflowctl("plugin", "new", "serving", name, "--dir", str(tmp_path / "out"))
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1 and "plugin name" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    proc = mlflowctl("plugin", "new", "serving", "toy", "--dir", str(tmp_path / "out"))
    assert proc.returncode == 3 and "exists and is not an empty folder" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]


def test_the_scaffold_lists_its_files_and_names_its_entry_point(tmp_path):
    proc = mlflowctl("plugin", "new", "serving", "my_target", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    dist = tmp_path / "mlflowctl-my-target"
    assert (dist / "src" / "mlflowctl_my_target" / "target.py").is_file()
    assert '[project.entry-points.mlflowctl]\nmy_target = "mlflowctl_my_target.target"' in \
        (dist / "pyproject.toml").read_text()
    assert "class MyTargetTarget(ServingTarget):" in (dist / "src" / "mlflowctl_my_target" / "target.py").read_text()
    assert "next: cd mlflowctl-my-target && pip install -e '.[test]' && pytest" in proc.stdout


@pytest.mark.slow
def test_the_scaffold_passes_the_kit_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "toy"
    proc = mlflowctl("plugin", "new", "serving", "toy_serve", "--dir", str(dist))
    assert proc.returncode == 0, proc.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([*pip, "wheel"], check=True, timeout=600, env=env)
    # the repo's mlflowctl (from its folder) and the scaffold; no build isolation: setuptools is in the venv
    done = subprocess.run([*pip, "--no-build-isolation", str(REPO), str(dist), "pytest"], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    test = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=dist,
                          capture_output=True, text=True, timeout=600, env=env)
    assert test.returncode == 0, test.stdout[-4000:] + test.stderr[-2000:]
    summary = test.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
    assert int(summary.split()[0]) >= 11  # the kit's 9 tests and the scaffold's own 2 ran
    listed = subprocess.run([str(venv / "bin" / "mlflowctl"), "plugins"], capture_output=True, text=True, timeout=60,
                            cwd=dist, env=env)
    assert "serving target toy_serve: toy_serve: registry versions behind a TF Serving REST server" in listed.stdout
