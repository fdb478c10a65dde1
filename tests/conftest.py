"""Shared fixtures: a fresh project folder per test, and a fresh plugin manager per project."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs real TensorFlow training (still part of make test)")


def make_project(dest: Path, yaml_text: str | None = None, stage_code: Path | None = None) -> Path:
    """A project folder like the repo's: dodo.py, tasks/, image/ (symlinked) and mlflowctl.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", dest / "dodo.py")
    shutil.copytree(REPO / "tasks", dest / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    if stage_code is None:
        shutil.copytree(REPO / "image", dest / "image", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copytree(stage_code, dest / "image")
    (dest / "mlflowctl.yaml").write_text(yaml_text if yaml_text is not None else (REPO / "mlflowctl.yaml").read_text())
    return dest


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def doit_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOWCTL_DISABLE_PLUGINS", None)
    return env
