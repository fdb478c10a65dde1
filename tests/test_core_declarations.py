"""The core knows no project: stages declare their settings, the schema is assembled, registration is declared.

Also the core slips of issues 10 and 11 that live in config and pipeline: an uninstalled plugin's section, the
serving target's code in the deploy key, the re-run hint keeping the run's overrides, and the shell's
environment (SEED) never reaching a stage.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlflowctl
from conftest import REPO, VENV_BIN, doit_env, example_stages, make_project
from mlflowctl.config import SCHEMA, Setting, load_config
from mlflowctl.errors import EXIT_CONFIG, ConfigError, StageFailed
from mlflowctl.pipeline import Pipeline, Stage
from mlflowctl.plugin_manager import build_plugin_manager
from mlflowctl.project import Project, load_stages

MLFLOWCTL = str(VENV_BIN / "mlflowctl")

ECHO = """
import json, os, pathlib
out = pathlib.Path(os.environ["OUT"])
keys = ("SEED", "RATE", "COUNT", "NAMES", "HOME_GROWN", "STAGE_NAME")
(out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
if os.environ.get("COUNT") == "13":
    print("unlucky count", flush=True)
    raise SystemExit(4)
"""

SETTINGS = {
    "rate": Setting(float, 0.5, "a rate", min=0, max=1),
    "count": Setting(int, 3, "a count", min=1, max=100),
    "names": Setting(list, ["a"], "some names"),
}
STAGES = (Stage("echo", command=("python", "echo.py"), code=("echo.py",), output="OUT", settings=SETTINGS),)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "echo.py").write_text(ECHO)
    (tmp_path / "mlflowctl.yaml").write_text("echo:\n  rate: 0.25\n")
    return tmp_path


def pipeline(root: Path, overrides: dict | None = None, **kw) -> Pipeline:
    return Pipeline(Project(root, overrides or {}, stages=STAGES, **kw))


# ---------------------------------------------------------------- the schema is assembled
def test_the_core_schema_has_no_stage_section():
    assert set(SCHEMA) == {"project", "model_name", "backend", "store", "backends", "stores", "serving"}


def test_a_declared_setting_travels_from_the_command_line_to_the_stage_with_one_type(root):
    p = pipeline(root, {"echo.count": "7", "echo.names": "x,y"})
    assert p.project.config["echo"] == {"rate": 0.25, "count": 7, "names": ["x", "y"]}
    assert p.stage_env(p.stages["echo"])["COUNT"] == "7"
    p.run("echo")
    seen = json.loads((p.current_result("echo") / "env.json").read_text())
    assert seen["RATE"] == "0.25" and seen["COUNT"] == "7" and json.loads(seen["NAMES"]) == ["x", "y"]
    # the one default: the declaration's, when the file does not set it
    assert Pipeline(Project(root, {}, stages=STAGES)).project.config["echo"]["count"] == 3


@pytest.mark.parametrize("key, value, expected", [
    ("echo.count", "0", "expected a number between 1 and 100, got 0"),
    ("echo.rate", "1.5", "expected a number between 0 and 1, got 1.5"),
    ("echo.count", "many", "expected an integer, got 'many'"),
])
def test_a_declared_range_fails_at_config_load_with_the_key_path(root, key, value, expected):
    with pytest.raises(ConfigError) as info:
        pipeline(root, {key: value})
    assert str(info.value) == f"mlflowctl.yaml: {key}: {expected}"
    assert info.value.exit_code == EXIT_CONFIG


def test_a_section_no_stage_declares_is_an_unknown_key(root):
    (root / "mlflowctl.yaml").write_text("echo:\n  rate: 0.25\nfit:\n  ridge: 1\n")
    with pytest.raises(ConfigError, match=r"^mlflowctl.yaml: fit: unknown key"):
        pipeline(root)


def test_two_stages_declaring_one_section_differently_are_refused(root):
    other = Stage("other", command=("python", "echo.py"), params="echo", settings={"rate": Setting(float, 0.1)})
    with pytest.raises(ConfigError, match="section 'echo' is declared twice"):
        Project(root, {}, stages=STAGES + (other,))


def test_a_stage_cannot_take_a_core_key_as_its_section(root):
    with pytest.raises(ConfigError, match="'store': the name is a key of mlflowctl itself"):
        Project(root, {}, stages=(Stage("store", command=("true",), settings={"x": Setting(int, 1)}),))


def test_every_setting_is_listed_with_its_type_default_range_and_help(project_dir):
    proc = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "config", "--settings"], env=doit_env(),
                          capture_output=True, text=True, timeout=60, check=True)
    lines = proc.stdout.splitlines()
    assert "train_model.epochs (int, default 5, 1..100000): training epochs" in lines
    assert any(line.startswith("serving.local.port (int, default 8501, 1..65535): ") for line in lines)
    assert any(line.startswith("project (str, default ") for line in lines)


def test_the_example_declares_every_key_of_its_mlflowctl_yaml():
    cfg = load_config(REPO / "mlflowctl.yaml", registry=build_plugin_manager(load_entry_points=False).registry,
                      stages=load_stages(REPO))
    assert cfg["train_model"]["epochs"] == 5 and cfg["data"]["dataset"] == "fashion-mnist"
    # the yaml sets nothing the declarations do not default to the same value (one default per setting)
    sections = {s.section: s.settings for s in example_stages() if s.settings}
    for section, settings in sections.items():
        for key, spec in settings.items():
            assert cfg[section][key] == spec.default, f"{section}.{key}: the yaml repeats a different default"


def test_a_broken_tasks_package_is_one_line(tmp_path):
    root = make_project(tmp_path / "proj")
    (root / "tasks" / "__init__.py").write_text("from .data import DATA\nraise RuntimeError('half-written')\n")
    proc = subprocess.run([MLFLOWCTL, "-C", str(root), "status"], env=doit_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mlflowctl: {root / 'tasks' / '__init__.py'}: cannot load the pipeline: RuntimeError: half-written "
        f"(fix the stage declarations in tasks/)"]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- issue 10's core slips
def test_a_section_of_a_plugin_that_is_not_installed_says_so(project_dir):
    text = (project_dir / "mlflowctl.yaml").read_text()
    assert "\nserving:\n  target: local" in text
    (project_dir / "mlflowctl.yaml").write_text(text.replace("\nserving:\n", "\nserving:\n  acme_cloud:\n    region: eu\n"))
    proc = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "config"], env=doit_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == EXIT_CONFIG, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("mlflowctl: mlflowctl.yaml: serving.acme_cloud: unknown key: no installed plugin "
                               "provides the serving target 'acme_cloud' (installed: "), lines[0]
    installed = lines[0].split("(installed: ", 1)[1].split(")", 1)[0].split(", ")
    assert "local" in installed and "acme_cloud" not in installed, lines[0]
    assert "install the plugin that provides the serving target 'acme_cloud'" in lines[0]
    # a typo of an installed plugin still gets its "did you mean"
    (project_dir / "mlflowctl.yaml").write_text(text.replace("\nserving:\n", "\nserving:\n  locl:\n    port: 1\n"))
    proc = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "config"], env=doit_env(), capture_output=True,
                          text=True, timeout=60)
    assert "serving.locl: unknown key; did you mean 'local'?" in proc.stderr


def _target_module(folder: Path, body: str = "") -> object:
    path = folder / "acme_target.py"
    path.write_text(
        "from mlflowctl.serving import ServingTarget\n"
        "class AcmeTarget(ServingTarget):\n"
        "    name = 'acme'\n"
        f"    {body or 'pass'}\n")
    spec = importlib.util.spec_from_file_location(f"acme_target_{abs(hash(body))}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Adds:
    __name__ = "acme-plugin"

    def __init__(self, cls):
        self.cls = cls

    @mlflowctl.hookimpl
    def mlflowctl_add_serving_targets(self, registry):
        registry.add_serving_target(self.cls)


def test_the_serving_targets_code_is_in_the_deploy_stages_key(root, tmp_path):
    deploy = Stage("deploy", action=lambda project, ctx: None, params="serving")

    def key(module) -> tuple[str, dict]:
        project = Project(root, {"serving.target": "acme"}, extra_plugins=(_Adds(module.AcmeTarget),),
                          stages=STAGES + (deploy,))
        info = Pipeline(project).resolve(deploy)
        return info.key, info.components

    (tmp_path / "t").mkdir()
    before, components = key(_target_module(tmp_path / "t"))
    assert any(name.startswith("target:acme_target") for name in components["code"]), components["code"]
    after, changed = key(_target_module(tmp_path / "t", "description = 'an updated target'"))
    assert before != after
    from mlflowctl.pipeline import diff_components

    assert [r for r in diff_components(components, changed) if r.startswith("code target:")]


def test_the_rerun_hint_keeps_the_runs_overrides(root):
    p = pipeline(root, {"echo.count": "13", "echo.names": "a b,c"})
    with pytest.raises(StageFailed) as info:
        p.run("echo")
    assert "stage echo failed with exit code 4: unlucky count" in str(info.value)
    assert info.value.hint.endswith("re-run with: doit echo echo.count=13 'echo.names=a b,c'"), info.value.hint


# ---------------------------------------------------------------- issue 11: the environment of a stage
def test_seed_from_the_shell_neither_reaches_a_stage_nor_changes_its_key(root, monkeypatch):
    monkeypatch.delenv("SEED", raising=False)
    quiet = pipeline(root)
    key = quiet.resolve(quiet.stages["echo"]).key
    monkeypatch.setenv("SEED", "7")
    monkeypatch.setenv("HOME_GROWN", "yes")
    p = pipeline(root)
    assert p.resolve(p.stages["echo"]).key == key
    p.run("echo")
    seen = json.loads((p.current_result("echo") / "env.json").read_text())
    assert seen["SEED"] is None and seen["HOME_GROWN"] is None and seen["STAGE_NAME"] == "echo"
    # what the user passes on purpose reaches it (not part of the key: documented as not changing results)
    monkeypatch.setenv("HOME_GROWN", "on purpose")
    out = root / "again"
    result = pipeline(root, {"backends.local.pass_env": "HOME_GROWN"}).run_uncached("echo", out)
    assert result.ok and json.loads((out / "env.json").read_text())["HOME_GROWN"] == "on purpose"


def test_the_example_declares_the_seed_of_each_stage_that_reads_one():
    seeded = {s.name for s in example_stages() if "seed" in s.settings}
    reads_seed = {s.name for s in example_stages() for rel in s.code
                  if rel != "common.py" and '"SEED"' in (REPO / "image" / rel).read_text()}
    assert reads_seed and reads_seed <= seeded


# ---------------------------------------------------------------- the core knows no project
EXAMPLE_WORDS = [
    # stage names (those that are not also plain words of the product: data, register, deploy, promote, monitor)
    "train_model", "train_concept", "integration_test",
    # dataset names and their environment
    "mnist", "idx3", "MNIST_",
    # the example's model file layout and settings
    # (``concept/threshold.json`` is not: it is the built-in server's format of a version's drift model)
    "saved_model", "metrics.json", "learning_rate", "epochs", "autoencoder",
]


def test_the_core_names_nothing_of_the_example():
    hits = []
    for path in sorted((REPO / "mlflowctl").rglob("*")):
        # mlflowctl/testing/ is the conformance kit: its fixtures build a small model to deploy, on purpose
        if path.suffix not in (".py", ".html", ".js", ".css", ".txt", ".md") or "__pycache__" in path.parts \
                or path.relative_to(REPO / "mlflowctl").parts[0] == "testing":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for word in EXAMPLE_WORDS:
                if re.search(re.escape(word), line, re.IGNORECASE):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {word}: {line.strip()}")
    assert not hits, "the core knows the example:\n" + "\n".join(hits)


def test_the_grep_would_find_a_leak(tmp_path):
    """The word list is not vacuous: each word is in the example project itself."""
    example = "\n".join(p.read_text(errors="replace") for p in [*(REPO / "tasks").glob("*.py"),
                                                                 *(REPO / "image").glob("*.py")])
    assert all(re.search(re.escape(w), example, re.IGNORECASE) for w in EXAMPLE_WORDS)


def test_doit_reads_overrides_through_its_public_variables(project_dir):
    proc = subprocess.run([str(VENV_BIN / "doit"), "list", "train_model.epochs=0"], cwd=project_dir,
                          env=doit_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_CONFIG
    assert proc.stderr.strip() == ("mlflowctl: mlflowctl.yaml: train_model.epochs: expected a number between 1 and "
                                   "100000, got 0")
    dodo = (REPO / "dodo.py").read_text() + (REPO / "mlflowctl" / "doit_glue.py").read_text()
    assert "_CMDLINE_VARS" not in dodo and "runpy" not in (REPO / "mlflowctl" / "cli.py").read_text()
    assert sys.modules.get("tasks") is None or not hasattr(sys.modules["tasks"], "STAGES")


def test_the_example_scripts_standalone_defaults_agree_with_the_declarations():
    """The stage scripts keep defaults for running them by hand (the pipeline always passes the declared
    value): they must be the declared ones, or a script run by hand would differ from the pipeline."""
    checked = 0
    for stage in example_stages():
        env_names = {(spec.env or key.upper()): spec for key, spec in stage.settings.items()}
        for rel in stage.code:
            text = (REPO / "image" / rel).read_text()
            for name, default in re.findall(r'env_(?:int|float|str)\(\s*"([A-Z_]+)",\s*([^,)]+)', text):
                if name in env_names:
                    declared = env_names[name].default
                    assert type(declared)(eval(default)) == declared, f"{rel}: {name} defaults to {default}, " \
                                                                      f"the stage {stage.name} declares {declared!r}"
                    checked += 1
    assert checked >= 10
