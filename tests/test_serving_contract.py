"""The typed serving contract (mlflowctl/serving.py) and the core slips any target hit (issue 10).

Targets here are small real plugin classes (no server): they record what the core asks of them
in a JSON file, so a test can check what promote, deploy and ``mlflowctl serve`` did. A plugin
reaches the ``mlflowctl`` command the way a third party's does: an entry point of a distribution
on the path (a ``.dist-info`` folder on ``PYTHONPATH``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import VENV_BIN
from mlflowctl.errors import MlflowctlError, PluginError
from mlflowctl.project import Project
from mlflowctl.serving import Endpoint, ServingStatus, VersionStatus, endpoint_for_stages

# ----------------------------------------------------------------------------------- a recording target
RECORDING_TARGET = '''
import json
from pathlib import Path

from mlflowctl import hookimpl
from mlflowctl.errors import MlflowctlError
from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus


class Recording(ServingTarget):
    """Keeps its routing in <state>/<name>.json and logs every call; serves nothing over HTTP."""

    name = "recording"
    description = "records what mlflowctl asks of it (tests)"

    @property
    def file(self):
        return Path(self.project.state_dir) / f"{self.name}.json"

    def _state(self):
        try:
            return json.loads(self.file.read_text())
        except OSError:
            return {"versions": [], "labels": {}, "calls": [], "running": True}

    def _save(self, state, call):
        state["calls"].append(call)
        self.file.write_text(json.dumps(state))

    def _endpoint(self, number):
        return Endpoint("http://127.0.0.1:9", f"http://127.0.0.1:9/{self.name}/{number}", self.project.model_name,
                        number)

    def deploy(self, version, label="canary", weight=0.0):
        state = self._state()
        state["versions"] = sorted(set(state["versions"]) | {version.number})
        if label:
            state["labels"][label] = version.number
        self._save(state, ["deploy", version.number, label])
        return self._endpoint(version.number)

    def set_label(self, label, version):
        state = self._state()
        if version is None:
            state["labels"].pop(label, None)
        elif version not in state["versions"]:
            raise MlflowctlError(f"version {version} is not deployed")
        else:
            state["labels"][label] = version
        self._save(state, ["set_label", label, version])

    def undeploy(self, version):
        state = self._state()
        state["versions"] = [v for v in state["versions"] if v != version]
        state["labels"] = {k: v for k, v in state["labels"].items() if v != version}
        self._save(state, ["undeploy", version])

    def status(self):
        state = self._state()
        return ServingStatus(self.name, running=state["running"], model_name=self.project.model_name,
                             versions=[VersionStatus(v, "AVAILABLE") for v in state["versions"]],
                             labels=state["labels"])

    def endpoint(self, version=None, label=None):
        state = self._state()
        number = version if version is not None else state["labels"].get(label or "stable")
        if number is None or number not in state["versions"]:
            raise MlflowctlError(f"nothing deployed as {version or label or 'stable'}")
        return self._endpoint(number)

    def stop(self):
        state = self._state()
        state["running"] = False
        self._save(state, ["stop"])


class Other(Recording):
    name = "other"
    description = "a second recording target"


class Broken(Recording):
    name = "broken"
    description = "a target with a bug"

    def status(self):
        raise ValueError("list index out of range in the platform client")

    def deploy(self, version, label="canary", weight=0.0):
        return {}["missing"]


@hookimpl
def mlflowctl_add_serving_targets(registry):
    registry.add_serving_target(Recording)
    registry.add_serving_target(Other)
    registry.add_serving_target(Broken)
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A distribution ``recording-targets`` with an entry point in group ``mlflowctl``, on a path folder."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "recording_targets.py").write_text(RECORDING_TARGET)
    info = site / "recording_targets-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: recording-targets\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mlflowctl]\nrecording = recording_targets\n")
    return site


@pytest.fixture
def targets(plugin_path: Path):
    sys.path.insert(0, str(plugin_path))
    try:
        import importlib

        module = importlib.import_module("recording_targets")
        yield module
    finally:
        sys.path.remove(str(plugin_path))
        sys.modules.pop("recording_targets", None)


def project_with(root: Path, targets, target: str = "recording", **overrides: str) -> Project:
    return Project(root, {"serving.target": target, **overrides})  # the entry point on sys.path adds the targets


def mlflowctl(root: Path, plugin_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(plugin_path))
    env.pop("MLFLOWCTL_DISABLE_PLUGINS", None)
    return subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def registered(project: Project, tmp_path: Path, n: int) -> list:
    out = []
    for i in range(n):
        src = tmp_path / f"v{i}"
        src.mkdir()
        (src / "saved_model.pb").write_bytes(b"x" * (i + 1))
        out.append(project.models.register(src, {"metrics": {"accuracy": 0.5 + i / 10}}))
    return out


# ------------------------------------------------------------------------------------------ typed data
def test_status_is_a_dataclass_readable_by_key():
    status = ServingStatus("t", running=True, versions=[VersionStatus(1, "AVAILABLE"), VersionStatus(2, "LOADING")],
                           labels={"stable": 1, "canary": 2}, details={"pid": 42})
    assert status.available(1) and not status.available(2) and not status.available(3)
    assert status.labels_of(2) == ["canary"]
    assert status["pid"] == 42 and status["versions"][1] == {"version": 2, "state": "LOADING", "error": ""}
    assert status.get("nothing", "d") == "d"
    assert not ServingStatus("t", running=False, versions=[VersionStatus(1, "AVAILABLE")]).available(1)


def test_endpoint_protocol_is_checked_and_stage_fields_filled(targets, project_dir):
    with pytest.raises(MlflowctlError, match="protocol must be one of"):
        Endpoint("http://x", "http://x/p", "m", 1, protocol="grpc-web")
    project = project_with(project_dir, targets)
    ep = endpoint_for_stages(project.serving, Endpoint("http://x", "http://x/p", "m", 1))
    assert ep.target == "recording" and ep.drift_url == "" and ep.inputs_url == ""  # the target scores no drift
    local = Project(project_dir, {"serving.local.port": "8611"}).serving
    assert endpoint_for_stages(local, Endpoint("u", "p", "mnist", 3)).drift_url == \
        "http://127.0.0.1:8611/monitor/v1/models/mnist/drift"  # the built-in server scores drift


def test_a_plain_exception_from_a_target_is_one_line_naming_it(targets, project_dir, tmp_path):
    project = project_with(project_dir, targets, "broken")
    with pytest.raises(PluginError, match=r"serving target 'broken' failed in status\(\): ValueError: list index"):
        project.serving.status()
    with pytest.raises(PluginError, match=r"failed in deploy\(\): KeyError: 'missing'"):
        project.serving.deploy(SimpleNamespace(number=1, name="mnist", path="models/mnist/1"))
    assert project.serving.serves(1) is False  # serves() never raises


def test_cli_shows_a_broken_target_as_one_line(plugin_path, project_dir):
    proc = mlflowctl(project_dir, plugin_path, "serve", "status", "serving.target=broken")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mlflowctl: serving target 'broken' failed in status(): ValueError: list index out of range in the "
        "platform client (a bug in the plugin that provides it (mlflowctl plugins lists them))"]


# ------------------------------------------------------------------------- serve: key=value anywhere
def test_serve_accepts_overrides_after_the_action(plugin_path, project_dir):
    for args in (["serve", "status", "serving.target=recording"], ["serve", "serving.target=recording", "status"]):
        proc = mlflowctl(project_dir, plugin_path, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "recording server: running, no version deployed (deploy one with: doit)\n"
    proc = mlflowctl(project_dir, plugin_path, "serve", "stop", "serving.target=recording")
    assert proc.returncode == 0, proc.stderr
    state = json.loads((project_dir / ".mlflowctl" / "recording.json").read_text())
    assert state["calls"][-1] == ["stop"]  # the override reached the command: the recording target was stopped
    proc = mlflowctl(project_dir, plugin_path, "serve", "start", "serving.target=recording")
    assert proc.returncode == 2, proc.stderr  # cannot be started by mlflowctl: one line
    assert proc.stderr.startswith("mlflowctl: serving target 'recording' cannot be started by mlflowctl")
    assert len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["serve"], "expected one of start, stop, status"),
    (["serve", "restart"], "argument action: invalid choice: 'restart' (choose from start, stop, status)"),
    (["serve", "start", "stop"], "got 'start stop'"),
])
def test_serve_without_one_action_is_a_usage_error(plugin_path, project_dir, args, needle):
    proc = mlflowctl(project_dir, plugin_path, *args)
    assert proc.returncode == 3 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_serve_status_shows_each_label_of_a_version(targets, plugin_path, project_dir, tmp_path):
    project = project_with(project_dir, targets)
    (v1,) = registered(project, tmp_path, 1)
    project.serving.deploy(v1, label="stable")
    project.serving.set_label("canary", 1)
    proc = mlflowctl(project_dir, plugin_path, "serve", "status", "serving.target=recording")
    assert proc.returncode == 0, proc.stderr
    assert "version 1: AVAILABLE  [canary,stable]" in proc.stdout


# ------------------------------------------------------------------------------------ promote and deploy
def stage_ctx(tmp_path: Path, report: dict, endpoint: dict) -> SimpleNamespace:
    rep, ep, out = tmp_path / "report", tmp_path / "endpoint", tmp_path / "out"
    for d in (rep, ep, out):
        d.mkdir(exist_ok=True)
    (rep / "report.json").write_text(json.dumps(report))
    (ep / "endpoint.json").write_text(json.dumps(endpoint))
    lines: list[str] = []
    return SimpleNamespace(inputs={"REPORT_DIR": rep, "ENDPOINT_DIR": ep}, output=out,
                           log=SimpleNamespace(line=lines.append), lines=lines)


def test_promote_clears_the_canary_label_on_the_target(targets, project_dir, tmp_path):
    from mlflowctl.promotion import promote_version

    project = project_with(project_dir, targets)
    v1, v2 = registered(project, tmp_path, 2)
    project.serving.deploy(v1, label="stable")
    project.models.set_label("stable", 1)
    project.serving.deploy(v2, label="canary")
    project.models.set_label("canary", 2)
    ctx = stage_ctx(tmp_path, {"passed": True, "accuracy": 0.9, "min_accuracy": 0.8, "samples": 100},
                    {"version": 2})
    promote_version(project, ctx)
    status = project.serving.status()
    assert status.labels == {"stable": 2}  # not {"stable": 2, "canary": 2}: the stable version is no canary
    assert project.models.labels() == {"stable": 2}
    written = json.loads((ctx.output / "endpoint.json").read_text())
    assert written["version"] == 2 and written["target"] == "recording" and written["drift_url"] == ""


def test_switching_the_target_stops_the_old_one(targets, project_dir, tmp_path):
    from mlflowctl.promotion import retire_previous_target

    first = project_with(project_dir, targets, "recording")
    assert retire_previous_target(first) is None  # first deploy: nothing to retire, the target is recorded
    (v1,) = registered(first, tmp_path, 1)
    first.serving.deploy(v1, label="stable")
    assert first.serving.status().running

    second = project_with(project_dir, targets, "other")
    assert retire_previous_target(second) == "recording"
    old = json.loads((project_dir / ".mlflowctl" / "recording.json").read_text())
    assert old["running"] is False and old["calls"][-1] == ["stop"]
    assert retire_previous_target(second) is None  # recorded now: no second stop
    assert json.loads((project_dir / ".mlflowctl" / "serving-target.json").read_text()) == {"target": "other"}


def test_an_uninstalled_previous_target_is_left_alone(targets, project_dir):
    from mlflowctl.promotion import retire_previous_target

    (project_dir / ".mlflowctl").mkdir(exist_ok=True)
    (project_dir / ".mlflowctl" / "serving-target.json").write_text('{"target": "gone-plugin"}')
    assert retire_previous_target(project_with(project_dir, targets)) is None


# ------------------------------------------------------------------------------------------------ report
def test_report_never_pairs_the_stable_version_with_another_versions_accuracy(targets, project_dir, tmp_path):
    from mlflowctl.cli import _tested

    project = project_with(project_dir, targets)
    registered(project, tmp_path, 2)
    project.models.set_verdict(1, "promoted", "ok", report={"accuracy": 0.91, "min_accuracy": 0.8, "samples": 50})
    latest = {"accuracy": 0.42, "min_accuracy": 0.8, "samples": 1000, "endpoint": {"version": 2}}
    assert _tested(project, 1, latest)["accuracy"] == 0.91  # version 2's test is not version 1's
    assert _tested(project, 2, latest)["accuracy"] == 0.42
    assert _tested(project, 2, {}) == {}  # never tested, no verdict: nothing shown, not a neighbour's figures


# ------------------------------------------------------------------------------------ plugins, settings
def test_plugins_and_config_show_descriptions_and_settings_help(plugin_path, project_dir):
    proc = mlflowctl(project_dir, plugin_path, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "serving target recording: records what mlflowctl asks of it (tests)" in proc.stdout
    assert "serving target local: mlflowctl's model server on this machine" in proc.stdout
    assert "serving.local.port (int, default 8501, 1..65535): port of the model server" in proc.stdout
    assert "serving.local.runtime (str, default auto, one of auto|process|docker|k8s): where the server runs" \
        in proc.stdout
    assert "backend local:" in proc.stdout and "store file:" in proc.stdout


# ------------------------------------------------------------------------------ any plugin's hooks
def test_a_plain_exception_from_any_plugins_hook_is_one_line_naming_it(project_dir):
    from mlflowctl import hookimpl as impl

    class Noisy:
        __name__ = "noisy"

        @impl
        def mlflowctl_promotion_veto(self, version, report):
            raise ZeroDivisionError("division by zero")

    class Veto:
        __name__ = "veto"

        @impl
        def mlflowctl_promotion_veto(self, version, report):
            raise MlflowctlError("vetoed on purpose")  # the contract's way: passes through unchanged

    project = Project(project_dir, extra_plugins=(Noisy(),))
    with pytest.raises(PluginError, match=r'plugin "noisy" failed in mlflowctl_promotion_veto: ZeroDivisionError: '
                                          r'division by zero'):
        project.pm.hook.mlflowctl_promotion_veto(version=None, report={})
    project = Project(project_dir, extra_plugins=(Veto(),))
    with pytest.raises(MlflowctlError, match="vetoed on purpose") as caught:
        project.pm.hook.mlflowctl_promotion_veto(version=None, report={})
    assert not isinstance(caught.value, PluginError)
