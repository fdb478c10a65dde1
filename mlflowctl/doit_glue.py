"""The glue between doit and mlflowctl: the project of this run, and stage tasks.

``dodo.py`` calls :func:`load` once; each module in ``tasks/`` turns a
:class:`~mlflowctl.pipeline.Stage` into a doit task with :func:`stage_task`.
Every doit ``key=value`` variable is a config override
(``doit backend=docker train_model.learning_rate=0.002``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from mlflowctl.errors import MlflowctlError
from mlflowctl.pipeline import Interrupted, Pipeline, Stage, install_interrupt_handler
from mlflowctl.state import STATE_DIR

_project: Any = None
_stages: dict[str, Stage] = {}
_pipeline: Pipeline | None = None


def doit_config(root: str | Path) -> dict[str, Any]:
    """``DOIT_CONFIG`` for a project: doit's database in the state folder, live output, threads for ``-n``."""
    return {
        "dep_file": str(Path(root) / STATE_DIR / "doit.json"),
        "backend": "json",
        "verbosity": 2,
        "par_type": "thread",
        "action_string_formatting": "new",
    }


def command_line_overrides() -> dict[str, str]:
    """The ``key=value`` variables doit parsed from its command line."""
    from doit import doit_cmd

    return dict(getattr(doit_cmd, "_CMDLINE_VARS", None) or {})


def load(root: str | Path, overrides: dict[str, str] | None = None) -> Any:
    """Build this run's project (plugins, validated config, state folder); exit with one line on error."""
    global _project, _pipeline
    from mlflowctl.project import Project

    if _project is not None and _project.root == Path(root).resolve():
        return _project  # set by the CLI or a test with use_project()
    try:
        _project = Project(Path(root), command_line_overrides() if overrides is None else overrides)
    except MlflowctlError as exc:
        print(f"mlflowctl: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    _pipeline = None
    _check_doit_database(Path(doit_config(root)["dep_file"]))
    install_interrupt_handler()
    return _project


def _check_doit_database(path: Path) -> None:
    """A truncated ``doit.json`` (a run killed while doit saved it) would be a traceback in doit: set it aside.

    It only records doit's own bookkeeping; what is up to date is decided by the store.
    """
    import json

    try:
        with open(path, "rb") as fh:
            json.load(fh)
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        aside = path.with_name(path.name + ".damaged")
        try:
            os.replace(path, aside)
        except OSError as exc:
            print(f"mlflowctl: {path} is damaged and cannot be set aside: {exc.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"mlflowctl: {path} was damaged (not valid JSON): moved to {aside.name}; the store decides what is "
              f"up to date", file=sys.stderr, flush=True)


def use_project(project: Any) -> None:
    """Make ``project`` the current one (the CLI and tests build their own)."""
    global _project, _pipeline
    _project, _pipeline = project, None


def project() -> Any:
    if _project is None:
        raise MlflowctlError("no mlflowctl project loaded", hint="dodo.py must call mlflowctl.doit_glue.load(__file__)")
    return _project


def pipeline() -> Pipeline:
    """The pipeline of every stage task created so far (all of them, once doit has loaded the tasks)."""
    global _pipeline
    if _pipeline is None or set(_pipeline.stages) != set(_stages):
        _pipeline = Pipeline(project(), list(_stages.values()))
    return _pipeline


def stage_task(stage: Stage) -> dict[str, Any]:
    """A doit task dict that runs ``stage`` through the backend when its result is not in the store."""
    _stages[stage.name] = stage
    return {
        "actions": [(_run, [stage.name])],
        "uptodate": [_Uptodate(stage.name)],
        "task_dep": list(stage.upstream),
        "doc": stage.doc,
        "verbosity": 2,
        "meta": {"stage": stage},
    }


class _Uptodate:
    """doit ``uptodate`` check: does the store hold a complete result for the stage's current key?"""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> bool:
        """Also the preflight: a stage about to run checks its store and backend first.

        doit asks this in its main thread before running anything of the
        stage, so an unreachable Docker daemon or kube context ends the run
        here with one line and its own exit code.
        """
        try:
            p = pipeline()
            stage = p.stages[self.name]
            complete = p.is_complete(stage)
            if not complete and _preflight(p, stage):  # waited for another run: it may have made the result
                complete = p.is_complete(stage)
            return complete
        except MlflowctlError as exc:
            print(f"mlflowctl: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None


_preflight_done: set[int] = set()


def _preflight(p: Pipeline, stage: Stage) -> bool:
    """Before the first stage of this run: take the project's run lock, check the store, sweep what killed
    runs left in it; check the backend if the stage runs on it. True when the lock had to be waited for."""
    from mlflowctl.state import run_lock

    waited = run_lock(p.project.state_dir)
    checks = [p.project.store] + ([p.project.backend] if stage.command else [])
    for plugin in checks:
        if id(plugin) not in _preflight_done:
            plugin.preflight()
            _preflight_done.add(id(plugin))
            if plugin is p.project.store:
                for name in plugin.sweep():
                    print(f"mlflowctl: removed {name}, left in the store's staging by a run that was killed",
                          file=sys.stderr, flush=True)
    return waited


def _run(name: str) -> Any:
    from doit.exceptions import TaskFailed

    p = pipeline()
    try:
        stage = p.stages[name]
        _preflight(p, stage)
        p.run(name)
    except MlflowctlError as exc:
        return TaskFailed(f"mlflowctl: {exc}")
    except Interrupted as exc:  # SIGTERM/Ctrl-C with no stage process to cancel: a failed task, not a traceback
        return TaskFailed(exc.line(name))
    return None
