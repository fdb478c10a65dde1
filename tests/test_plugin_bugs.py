"""A bug in a third-party backend or store is one line naming the plugin, never a traceback.

Hooks and serving targets are wrapped where they are called (test_plugin_manager, the serving kit); a
backend's and a store's methods are not (stores raise ``OSError`` by contract), so the CLI and the doit
tasks ask ``plugin_manager.blame`` about any other exception. Here a real distribution with an entry point
adds a backend whose ``run`` and a store whose ``list`` raise plain exceptions, and the real ``doit`` and
``mlflowctl`` run the linefit project with them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import VENV_BIN, doit_env
from mlflowctl.errors import EXIT_PLUGIN
from mlflowctl.plugin_manager import blame, build_plugin_manager

FIXTURE = Path(__file__).parent / "projects" / "linefit"

BUGGY = """
    from mlflowctl import hookimpl
    from mlflowctl.backends import Backend
    from mlflowctl_buggy_store import BuggyStore


    class BuggyBackend(Backend):
        name = "buggy"

        def run(self, run):
            return helper(run)


    def helper(run):
        return {}["no such key"]


    @hookimpl
    def mlflowctl_add_backends(registry):
        registry.add_backend(BuggyBackend)


    @hookimpl
    def mlflowctl_add_stores(registry):
        registry.add_store(BuggyStore)
"""

BUGGY_STORE = """
    from mlflowctl_plugins.local_store import LocalStore


    class BuggyStore(LocalStore):
        scheme = "buggy"

        def __init__(self, url, settings, project):
            super().__init__("file://" + url.split("://", 1)[1], settings, project)

        def list(self, prefix):
            return 1 / 0
"""


@pytest.fixture
def buggy(tmp_path):
    """linefit in ``tmp_path`` and an environment where the ``buggy`` distribution is installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "mlflowctl_buggy.py").write_text(textwrap.dedent(BUGGY))
    (site / "mlflowctl_buggy_store.py").write_text(textwrap.dedent(BUGGY_STORE))
    info = site / "mlflowctl_buggy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflowctl-buggy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlflowctl]\nbuggy = mlflowctl_buggy\n")
    (info / "RECORD").write_text("")
    root = tmp_path / "linefit"
    shutil.copytree(FIXTURE, root, ignore=shutil.ignore_patterns("__pycache__", ".mlflowctl"))
    env = doit_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return root, env


def one_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    return out


def test_a_backend_bug_fails_the_stage_with_one_line_naming_the_plugin(buggy):
    root, env = buggy
    proc = subprocess.run([str(VENV_BIN / "doit"), "points", "backend=buggy"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    out = one_line(proc)
    assert proc.returncode != 0
    assert 'plugin "buggy" failed in run(): KeyError: \'no such key\'' in out, out
    assert "MLFLOWCTL_DISABLE_PLUGINS=buggy" in out
    assert not list((root / ".mlflowctl").glob("store/**/points*/_manifest.json"))  # nothing published
    # the same project with a working backend is untouched by the failed run
    again = subprocess.run([str(VENV_BIN / "doit"), "points"], cwd=root, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_store_bug_is_exit_4_and_one_line_in_the_cli(buggy, tmp_path):
    root, env = buggy
    proc = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), "models", f"store=buggy://{tmp_path}/s"],
                          env=env, capture_output=True, text=True, timeout=120)
    out = one_line(proc)
    assert proc.returncode == EXIT_PLUGIN, out
    assert out.strip().splitlines() == [
        'mlflowctl: plugin "buggy" failed in list(): ZeroDivisionError: division by zero '
        "(a bug in that plugin; fix or uninstall it, or set MLFLOWCTL_DISABLE_PLUGINS=buggy)"]


def test_only_plugin_code_is_blamed():
    build_plugin_manager()  # the built-ins' modules are known
    try:
        {}["core"]
    except KeyError as exc:  # raised here, in no plugin's module: the core's bug keeps its traceback
        assert blame(exc) is None
