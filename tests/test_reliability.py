"""Registry and cache consistency, and bad configuration: each test is an attack that once broke (issue 11)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import mlflowctl
from conftest import example_stages
from mlflowctl.config import Setting, load_config
from mlflowctl.errors import EXIT_CONFIG, ConfigError, MlflowctlError
from mlflowctl.pipeline import Pipeline, Stage
from mlflowctl.plugin_manager import build_plugin_manager
from mlflowctl.project import Project


def _load_register_stage() -> Stage:
    """The real ``register`` stage of tasks/register.py (tasks/ is not a package on the test path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tasks_register", Path(__file__).parent.parent / "tasks" / "register.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.REGISTER


REGISTER = _load_register_stage()

TRAIN = """
import os, pathlib
out = pathlib.Path(os.environ["OUT"], "saved_model")
out.mkdir()
(out / "saved_model.pb").write_text("weights " + os.environ["STAGE_NAME"] + " " + os.environ["LEARNING_RATE"])
"""

SETTINGS = {"learning_rate": Setting(float, 0.001, "step size", min=1e-12, max=10)}
STAGES = [
    Stage("produce", command=("python", "train.py"), code=("train.py",), output="OUT", params="train_model"),
    Stage("train_model", command=("python", "train.py"), code=("train.py",), output="OUT", params="train_model",
          settings=SETTINGS),
    Stage("train_concept", command=("python", "train.py"), code=("train.py",), output="OUT",
          params="train_concept", settings=SETTINGS),
    REGISTER,
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "train.py").write_text(TRAIN)
    (tmp_path / "mlflowctl.yaml").write_text("model_name: m\n")
    return tmp_path


def make(root: Path, overrides: dict | None = None, plugins: tuple = ()) -> Pipeline:
    return Pipeline(Project(root, overrides or {}, extra_plugins=plugins, stages=STAGES), STAGES)


def registered(p: Pipeline) -> int:
    import json

    for name in ("train_model", "train_concept"):
        if not p.is_complete(p.stages[name]):
            p.run(name)
    if not p.is_complete(p.stages["register"]):
        p.run("register")
    return json.loads((p.current_result("register") / "version.json").read_text())["version"]


class PublishFirst:
    """A plugin that, while a stage runs, publishes another run's result under the same key."""

    __name__ = "publish_first"

    def __init__(self, project_ref: list, stage: str, hook=None) -> None:
        self.ref, self.stage, self.hook = project_ref, stage, hook

    @mlflowctl.hookimpl
    def mlflowctl_before_stage(self, stage, run):
        if stage != self.stage:
            return
        if self.hook is not None:
            self.hook(run)
            return
        store = self.ref[0].store
        with store.staging("theirs") as src:
            (src / "value.txt").write_text("theirs")
            assert store.publish(src, f"results/{stage}/{run.key}", manifest={"stage": stage})


def test_a_lost_publish_adopts_the_other_runs_result_and_says_so(root, capsys):
    ref: list = []
    p = make(root, plugins=(PublishFirst(ref, "produce"),))
    ref.append(p.project)
    p.run("produce")
    result = p.current_result("produce")
    assert (result / "value.txt").read_text() == "theirs"
    assert not (result / "saved_model").exists()
    err = capsys.readouterr().err
    assert "stage produce: another run published result" in err and "using that one" in err
    assert "another run published" in (root / ".mlflowctl" / "logs" / "produce.log").read_text()
    assert not list((root / ".mlflowctl" / "store" / ".staging").iterdir())


def test_rerun_after_a_kill_between_version_and_result_adopts_the_version(root):
    p = make(root)
    assert registered(p) == 1
    # what a kill -9 after the version's publish but before the result's leaves behind
    p.project.store.delete(p.resolve(p.stages["register"]).path)
    p = make(root)
    assert not p.is_complete(p.stages["register"])
    assert registered(p) == 1
    assert p.project.models.numbers() == [1]
    assert "adopting it" in (root / ".mlflowctl" / "logs" / "register.log").read_text()
    # different weights still make a new version
    p = make(root, {"train_model.learning_rate": "0.5"})
    assert registered(p) == 2
    assert p.project.models.numbers() == [1, 2]


def test_a_register_that_lost_the_race_removes_its_duplicate_version(root, monkeypatch):
    """Two runs register the same model at once: one version stays, both runs name it."""
    ref: list = []

    def other_run(run):
        assert registered(make(root)) == 1  # another doit registers version 1 and publishes its result first
        # ... after our run looked for an identical version: it registers the same files again, as 2
        monkeypatch.setattr(ref[0].models, "find_identical", lambda src: None)

    p = make(root, plugins=(PublishFirst(ref, "register", hook=other_run),))
    ref.append(p.project)
    for name in ("train_model", "train_concept"):
        p.run(name)
    p.run("register")
    assert p.project.models.numbers() == [1]
    assert registered(make(root)) == 1


def test_model_name_is_part_of_the_register_key(root):
    p = make(root)
    assert registered(p) == 1
    p = make(root, {"model_name": "m2"})
    assert not p.is_complete(p.stages["register"])
    assert registered(p) == 1
    assert p.project.models.base == "models/m2"
    assert (root / ".mlflowctl" / "store" / "models" / "m2" / "1").is_dir()
    # the train stages are not re-run for a new name
    assert p.is_complete(p.stages["train_model"])


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "-a", "a..b", "x" * 64, "²", "a b"])
def test_bad_model_names_are_refused_naming_the_key(tmp_path, name):
    registry = build_plugin_manager(load_entry_points=False).registry
    path = tmp_path / "mlflowctl.yaml"
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"model_name": name}, registry=registry)
    assert str(info.value).startswith("mlflowctl.yaml: model_name: expected a name"), str(info.value)
    assert info.value.exit_code == EXIT_CONFIG and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "fmnist", "m", "My_model-2.v1"])
def test_good_model_names_pass(tmp_path, name):
    registry = build_plugin_manager(load_entry_points=False).registry
    path = tmp_path / "mlflowctl.yaml"
    path.write_text("")
    assert load_config(path, {"model_name": name}, registry=registry)["model_name"] == name


# -- damaged results and versions -------------------------------------------
def store_dir(root: Path) -> Path:
    return root / ".mlflowctl" / "store"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_file_deleted_from_a_result_makes_it_missing_and_recomputed(root, capsys):
    p = make(root)
    p.run("produce")
    result = p.current_result("produce")
    (result / "saved_model" / "saved_model.pb").unlink()
    p = make(root)
    assert not p.is_complete(p.stages["produce"])
    assert "is damaged (saved_model/saved_model.pb is missing)" in capsys.readouterr().err
    p.run("produce")
    assert (p.current_result("produce") / "saved_model" / "saved_model.pb").read_text().startswith("weights")
    assert make(root).is_complete(p.stages["produce"])


def test_flipped_bytes_are_caught_when_the_result_is_used(root, capsys):
    p = make(root)
    p.run("produce")
    flip_a_byte(p.current_result("produce") / "saved_model" / "saved_model.pb")
    p = make(root)
    assert p.is_complete(p.stages["produce"])  # sizes match: the cheap check passes
    with pytest.raises(MlflowctlError, match="stage produce has no current result"):
        p.current_result("produce")
    assert "does not match its sha256" in capsys.readouterr().err
    assert not p.is_complete(p.stages["produce"])  # removed: the next run computes it again
    p.run("produce")
    assert p.current_result("produce").is_dir()


def test_a_damaged_model_version_is_reported_and_not_served(root, capsys):
    from mlflowctl.cli import main

    p = make(root)
    assert registered(p) == 1
    p.project.models.set_label("stable", 1)
    flip_a_byte(store_dir(root) / "models" / "m" / "1" / "saved_model.pb")
    with pytest.raises(MlflowctlError, match="model m version 1 is damaged .*sha256.*: not served"):
        p.project.models.servable(1)
    capsys.readouterr()
    assert main(["--project", str(root), "serve", "start"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlflowctl: model m version 1 is damaged") and "\n" not in err
    assert not (root / ".mlflowctl" / "serving").exists() or not any((root / ".mlflowctl" / "serving").glob("*.pid"))
    # a damaged version is never adopted by a re-registration either
    p.project.store.delete(p.resolve(p.stages["register"]).path)
    assert registered(make(root)) == 2


# -- doit runs: SIGTERM, the run lock, killed runs' leftovers, truncated state files --------------
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from conftest import doit_env, make_project  # noqa: E402
from test_doit_cli import DOIT, _alive, slow_stage_code  # noqa: E402


def start_slow_data(tmp_path: Path, root: Path, env_extra: dict | None = None):
    pid_file = tmp_path / "child.pid"
    env = {**doit_env(), "PID_FILE": str(pid_file), **(env_extra or {})}
    proc = subprocess.Popen([DOIT, "data", "backends.local.pass_env=PID_FILE"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    return proc, int(pid_file.read_text())


def stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_to_doit_stops_the_stage_and_publishes_nothing(tmp_path):
    root = make_project(tmp_path / "proj", stage_code=slow_stage_code(tmp_path))
    proc, child = start_slow_data(tmp_path, root)
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 1, output
    assert "Traceback" not in output and "SIGTERM: cancelling data" in output, output
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the stage's child process survived SIGTERM"
    assert not (root / ".mlflowctl" / "store" / "results" / "data").exists()
    assert list((root / ".mlflowctl" / "store" / ".staging").iterdir()) == []


def test_a_second_doit_waits_a_bounded_time_then_fails_with_one_line(tmp_path):
    root = make_project(tmp_path / "proj", stage_code=slow_stage_code(tmp_path))
    first, _ = start_slow_data(tmp_path, root)
    try:
        env = {**doit_env(), "PID_FILE": str(tmp_path / "second.pid"), "MLFLOWCTL_LOCK_TIMEOUT": "1"}
        second = subprocess.run([DOIT, "data", "backends.local.pass_env=PID_FILE"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    finally:
        stop(first)
    assert second.returncode == 5, second.stdout + second.stderr
    assert not (tmp_path / "second.pid").exists()  # its stage never started
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert lines[0] == f"mlflowctl: waiting for another doit run (pid {first.pid}) on this project (up to 1s)"
    assert lines[1].startswith(f"mlflowctl: another doit run (pid {first.pid}) is running stages of this project")
    assert len(lines) == 2 and "Traceback" not in second.stdout + second.stderr


def test_a_killed_runs_staging_is_swept_and_truncated_doit_json_is_one_line(tmp_path):
    root = make_project(tmp_path / "proj", stage_code=slow_stage_code(tmp_path))
    proc, _ = start_slow_data(tmp_path, root)
    time.sleep(0.5)
    staging = root / ".mlflowctl" / "store" / ".staging"
    left = [p.name for p in staging.iterdir()]
    proc.kill()  # kill -9: nothing cleans up
    proc.wait()
    assert left and [p.name for p in staging.iterdir()] == left
    doit_json = root / ".mlflowctl" / "doit.json"
    doit_json.write_text('{"data": {"_values_:": {')
    (root / "image" / "download.py").write_text("import sys; sys.exit(3)\n")
    out = subprocess.run([DOIT, "data"], cwd=root, env=doit_env(), capture_output=True, text=True, timeout=60)
    assert "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "doit.json was damaged (not valid JSON): moved to doit.json.damaged" in out.stderr
    assert f"mlflowctl: removed {left[0]}, left in the store's staging by a run that was killed" in out.stderr
    assert [p.name for p in staging.iterdir()] == []


@pytest.mark.parametrize("name", ["labels.json", "status/1.json", "1/metadata.json"])
def test_truncated_registry_files_are_one_line(root, capsys, name):
    from mlflowctl.cli import main

    p = make(root)
    assert registered(p) == 1
    p.project.models.set_label("stable", 1)
    p.project.models.set_verdict(1, "promoted", "test")
    target = store_dir(root) / "models" / "m" / name
    target.write_text(target.read_text()[:7])
    capsys.readouterr()
    assert main(["--project", str(root), "models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mlflowctl: store file://.mlflowctl/store: models/m/{name} is damaged (not valid JSON")
    assert "\n" not in err


# -- configuration and input ---------------------------------------------------
class _SecretPlugin:
    name = "fake"
    description = "a backend with a secret"


def _registry_with_secret(choices=()):
    from mlflowctl.config import Setting

    class Fake(_SecretPlugin):
        settings = {"token": Setting(str, "", "api token", secret=True, choices=choices),
                    "retries": Setting(int, 1, "retries", secret=True)}

    class Reg:
        backends = {"fake": Fake}
        stores: dict = {}
        serving_targets: dict = {}

    return Reg


def load_text(tmp_path: Path, text: str, registry=None, overrides=None):
    path = tmp_path / "mlflowctl.yaml"
    path.write_text(text)
    return load_config(path, overrides or {}, registry=registry or build_plugin_manager(load_entry_points=False).registry,
                       stages=example_stages())


@pytest.mark.parametrize("yaml_text", [
    'backend: fake\nbackends:\n  fake:\n    retries: {"$env": MY_TOKEN}\n',
    'backend: fake\nbackends:\n  fake:\n    token: {"$env": MY_TOKEN}\n',
])
def test_a_secret_is_never_echoed_in_an_error(tmp_path, monkeypatch, yaml_text):
    monkeypatch.setenv("MY_TOKEN", "s3cr3t-value")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, yaml_text, _registry_with_secret(choices=("a", "b")))
    assert "s3cr3t" not in str(info.value) and "a secret value" in str(info.value)


@pytest.mark.parametrize("ref, message", [
    ('{"$env": [A, B]}', 'backends.fake.token: {"$env": ...} takes a non-empty string (a variable name), got list'),
    ('{"$file": {a: 1}}', 'backends.fake.token: {"$file": ...} takes a non-empty string (a path), got dict'),
    ('{"$file": /dev/zero}', "backends.fake.token: secret file /dev/zero is larger than 64 KiB"),
    ('{"$env": A, "$file": b}', 'backends.fake.token: a secret is a string, {"$env": "VAR"} or {"$file": "path"}, '
                                "got a mapping with keys $env, $file"),
])
def test_bad_secret_references_are_one_line(tmp_path, ref, message):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, f"backend: fake\nbackends:\n  fake:\n    token: {ref}\n", _registry_with_secret())
    assert str(info.value) == f"mlflowctl.yaml: {message}"


def test_secrets_of_plugins_not_selected_are_not_resolved(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    text = 'backends:\n  fake:\n    token: {"$env": NOT_SET_ANYWHERE}\n'
    cfg = load_text(tmp_path, text, _registry_with_secret())  # backend: local
    assert cfg["backend"] == "local"
    with pytest.raises(ConfigError, match="environment variable NOT_SET_ANYWHERE is not set"):
        load_text(tmp_path, "backend: fake\n" + text, _registry_with_secret())


def test_yaml_alias_bombs_are_refused_with_a_short_error(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("train_model: {seed: *a8}")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "\n".join(lines) + "\n")
    assert str(info.value).startswith("mlflowctl.yaml: expands to more than 100000 values")
    assert len(str(info.value)) < 300
    assert not (tmp_path / ".mlflowctl" / "config.cache.json").exists()


@pytest.mark.parametrize("key, value, expected", [
    ("train_model.epochs", "-1", "expected a number between 1 and 100000, got -1"),
    ("train_model.learning_rate", "nan", "expected a finite number, got nan"),
    ("train_model.learning_rate", "1e26", "expected a number between 1e-12 and 10, got 1e+26"),
    ("train_concept.threshold_quantile", "1.5", "expected a number between 0 and 1, got 1.5"),
    ("serving.local.port", "99999", "expected a number between 1 and 65535, got 99999"),
    ("serving.local.port", "0", "expected a number between 1 and 65535, got 0"),
    ("serving.local.canary_weight", "-0.1", "expected a number between 0 and 1, got -0.1"),
    ("monitor.max_drift_rate", "2", "expected a number between 0 and 1, got 2.0"),
])
def test_ranges_are_checked_at_load_naming_the_key(tmp_path, key, value, expected):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "", overrides={key: value})
    assert str(info.value) == f"mlflowctl.yaml: {key}: {expected}"
    assert info.value.exit_code == EXIT_CONFIG


def test_cli_bad_input_exits_3_and_a_closed_pipe_is_not_an_error(root):
    from conftest import VENV_BIN

    mlflowctl_bin = str(VENV_BIN / "mlflowctl")
    bad = subprocess.run([mlflowctl_bin, "serve", "reboot"], cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("mlflowctl: argument action: invalid choice: 'reboot'")
    project = make_project(root / "proj")
    proc = subprocess.Popen(f"{mlflowctl_bin} status | head -c 1", shell=True, cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, executable="/bin/bash")
    out, err = proc.communicate(timeout=60)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert len(out) == 1
