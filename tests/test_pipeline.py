"""Cache keys, re-run decisions, publishing and lifecycle hooks, with tiny stage scripts (no TensorFlow)."""
from __future__ import annotations

from pathlib import Path

import pytest

import mlflowctl
from mlflowctl.config import Setting
from mlflowctl.errors import StageFailed, MlflowctlError
from mlflowctl.pipeline import Pipeline, Stage
from mlflowctl.project import Project

PRODUCE = """
import os, pathlib
out = pathlib.Path(os.environ["OUT"])
(out / "value.txt").write_text(os.environ["LEARNING_RATE"] + "/" + os.environ["EPOCHS"])
print("produced", flush=True)
"""
CONSUME = """
import os, pathlib, sys
src = pathlib.Path(os.environ["SRC"], "value.txt").read_text()
pathlib.Path(os.environ["OUT"], "seen.txt").write_text(src)
if os.environ.get("FAIL_CONSUME"):
    print("consumer exploded", flush=True)
    sys.exit(3)
"""


class Recorder:
    """A plugin implementing every lifecycle hook, recording the calls."""

    __name__ = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @mlflowctl.hookimpl
    def mlflowctl_before_stage(self, stage, run):
        self.calls.append(("before", stage))

    @mlflowctl.hookimpl
    def mlflowctl_after_stage(self, stage, run, result):
        assert result.ok
        self.calls.append(("after", stage))

    @mlflowctl.hookimpl
    def mlflowctl_on_stage_error(self, stage, run, error):
        self.calls.append(("error", f"{stage}:{type(error).__name__}"))

    @mlflowctl.hookimpl
    def mlflowctl_model_registered(self, version):
        self.calls.append(("registered", str(version.number)))

    @mlflowctl.hookimpl
    def mlflowctl_deployed(self, version, endpoint):
        self.calls.append(("deployed", str(version.number)))

    @mlflowctl.hookimpl
    def mlflowctl_promotion_veto(self, version, report):
        return None


SETTINGS = {"learning_rate": Setting(float, 0.001, "step size", min=1e-12, max=10),
            "epochs": Setting(int, 5, "passes", min=1)}
STAGES = [
    Stage("produce", command=("python", "produce.py"), code=("produce.py",), output="OUT", params="train_model",
          settings=SETTINGS),
    Stage("consume", command=("python", "consume.py"), code=("consume.py",), inputs=(("SRC", "produce"),),
          output="OUT", params="train_model", pass_env=("FAIL_CONSUME",)),
    Stage("other", command=("python", "produce.py"), code=("produce.py",), output="OUT", params="train_concept",
          settings=SETTINGS),
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "produce.py").write_text(PRODUCE)
    (tmp_path / "image" / "consume.py").write_text(CONSUME)
    (tmp_path / "mlflowctl.yaml").write_text("train_model:\n  learning_rate: 0.01\n")
    return tmp_path


def make(root: Path, overrides: dict | None = None, recorder: Recorder | None = None) -> Pipeline:
    project = Project(root, overrides or {}, extra_plugins=(recorder,) if recorder else (), stages=STAGES)
    return Pipeline(project, STAGES)


def run_all(p: Pipeline) -> list[str]:
    ran = []
    for name, stage in p.stages.items():
        if not p.is_complete(stage):
            p.run(name)
            ran.append(name)
    return ran


def test_first_run_runs_everything_then_nothing(root):
    p = make(root)
    assert run_all(p) == ["produce", "consume", "other"]
    assert run_all(make(root)) == []
    seen = p.current_result("consume") / "seen.txt"
    assert seen.read_text() == "0.01/5"
    # the log is published with the artifacts
    assert "produced" in (p.current_result("produce") / "_logs" / "produce.log").read_text()


def test_changing_a_param_reruns_only_its_dependents(root):
    run_all(make(root))
    p = make(root, {"train_model.learning_rate": "0.02"})
    fresh = {name: p.explain(stage) for name, stage in p.stages.items()}
    assert fresh["other"] == (True, [])
    assert fresh["produce"] == (False, ["param learning_rate changed: 0.01 -> 0.02"])
    assert fresh["consume"] == (False, ["input produce will change first"])
    assert run_all(p) == ["produce", "consume"]
    assert (p.current_result("consume") / "seen.txt").read_text() == "0.02/5"
    # going back finds the old results in the store: nothing runs
    assert run_all(make(root)) == []


def test_changing_code_reruns_the_stage(root):
    run_all(make(root))
    (root / "image" / "consume.py").write_text(CONSUME + "\n# changed\n")
    p = make(root)
    assert p.explain(p.stages["consume"]) == (False, ["code consume.py changed"])
    assert run_all(p) == ["consume"]


def test_same_key_for_same_inputs_and_a_digest_of_results(root):
    a, b = make(root), make(root)
    assert a.resolve(a.stages["produce"]).key == b.resolve(b.stages["produce"]).key
    assert a.resolve(a.stages["consume"]).key is None  # input has no result yet
    run_all(a)
    assert b.result_digest("produce") == a.result_digest("produce") is not None


def test_failure_publishes_nothing_and_reports_one_line(root, monkeypatch):
    rec = Recorder()
    monkeypatch.setenv("FAIL_CONSUME", "1")
    p = make(root, recorder=rec)
    p.run("produce")
    with pytest.raises(StageFailed) as info:
        p.run("consume")
    message = str(info.value)
    assert "stage consume failed with exit code 3: consumer exploded" in message and "\n" not in message
    assert "doit consume" in message
    assert not p.is_complete(p.stages["consume"])
    assert not list((root / ".mlflowctl" / "store" / ".staging").iterdir())  # no half-written output
    assert rec.calls == [("before", "produce"), ("after", "produce"), ("before", "consume"),
                         ("error", "consume:StageFailed")]


def test_a_plugin_can_veto_a_stage(root):
    class Veto:
        __name__ = "veto"

        @mlflowctl.hookimpl
        def mlflowctl_before_stage(self, stage, run):
            if stage == "other":
                raise MlflowctlError("change freeze: no training on Fridays")

    p = Pipeline(Project(root, {}, extra_plugins=(Veto(),), stages=STAGES), STAGES)
    with pytest.raises(MlflowctlError, match="change freeze"):
        p.run("other")
    assert not p.is_complete(p.stages["other"])


def test_unknown_input_stage_is_rejected(root):
    with pytest.raises(MlflowctlError, match="input from unknown stage 'nope'"):
        Pipeline(Project(root, {}, stages=STAGES), [Stage("x", command=("true",), inputs=(("A", "nope"),))])


def test_state_folder_is_marked_as_a_cache(root):
    make(root)
    state = root / ".mlflowctl"
    assert (state / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert (state / ".gitignore").read_text().strip().endswith("*")
