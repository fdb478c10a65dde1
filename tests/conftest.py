"""Shared fixtures: a fresh project folder per test, and a fresh plugin manager per project."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest_plugins = ("kube_fixtures",)

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


def example_stages() -> tuple:
    """The example project's stage declarations (tasks/), whose settings its mlflowctl.yaml holds."""
    from mlflowctl.project import load_stages

    return load_stages(REPO)


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def doit_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOWCTL_DISABLE_PLUGINS", None)
    return env


@pytest.fixture(scope="session")
def docker_client():
    """The real Docker engine: skipped when unreachable on a workstation, a failure under CI (make docker runs it)."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable daemon
        message = f"Docker daemon unreachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must run dockerd: make docker)")
        pytest.skip(f"{message} (run scripts/ensure-docker.sh)")
    try:
        client.images.get("python:3.11-slim")
    except Exception:  # noqa: BLE001
        pytest.fail("base image python:3.11-slim missing: run scripts/ensure-base-image.sh (make docker)")
    return client


@contextlib.contextmanager
def exported(var: str, value: str):
    """``os.environ[var] = value`` for the block (session fixtures cannot use monkeypatch)."""
    previous = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = previous


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto's server, one request at a time: see tests/s3_server.py).

    Its URL is also put in ``MLFLOWCTL_TEST_S3`` so that processes the tests
    start (racing registrations, killed uploads) reach the same server.
    """
    import s3_server as server

    srv = server.start(serial=True)
    with exported("MLFLOWCTL_TEST_S3", srv.url):
        yield srv
    srv.stop()


SEAWEEDFS_BUILT = REPO / ".cache" / "seaweedfs" / "weed"


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """A second S3 implementation: SeaweedFS's S3 gateway, built from its Go module by ``make seaweedfs``.

    Skipped when no ``weed`` binary is found ($MLFLOWCTL_SEAWEEDFS, .cache/seaweedfs/weed, or PATH) on a
    workstation; a failure under CI (``make test`` builds it first).
    """
    import shutil as sh

    import s3_server as server

    binary = os.environ.get("MLFLOWCTL_SEAWEEDFS") or (str(SEAWEEDFS_BUILT) if SEAWEEDFS_BUILT.exists() else None) \
        or sh.which("weed")
    if not binary:
        message = "SeaweedFS not built (make seaweedfs builds it from its Go module)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must not skip the second S3 server's tests")
        pytest.skip(message)
    srv = server.start_seaweedfs(binary, str(tmp_path_factory.mktemp("seaweedfs")))
    with exported("MLFLOWCTL_TEST_SEAWEEDFS", srv.url):
        yield srv
    srv.stop()
