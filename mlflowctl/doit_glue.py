"""The glue between doit and mlflowctl: one project per run, its pipeline as doit tasks.

``dodo.py`` holds one line of it::

    PIPELINE = doit_glue.load(ROOT)

:func:`load` builds the run's project (its stages from ``tasks/``, the
validated config, the plugins) and returns a :class:`DoitPipeline`, whose
``create_doit_tasks`` (doit's public loader protocol) yields one task per
stage. Every doit ``key=value`` variable is a config override
(``doit backend=docker <stage>.<setting>=<value>``), read through
doit's public ``get_var``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

from mlflowctl.errors import MlflowctlError
from mlflowctl.pipeline import Interrupted, Pipeline, Stage, install_interrupt_handler
from mlflowctl.plugin_manager import blame
from mlflowctl.state import STATE_DIR


def doit_config(root: str | Path) -> dict[str, Any]:
    """``DOIT_CONFIG`` for a project: doit's database in the state folder, live output, threads for ``-n``."""
    return {
        "dep_file": str(Path(root) / STATE_DIR / "doit.json"),
        "backend": "json",
        "verbosity": 2,
        "par_type": "thread",
        "action_string_formatting": "new",
    }


def command_line_overrides(argv: list[str] | None = None) -> dict[str, str]:
    """The ``key=value`` variables of doit's command line, as doit's public ``get_var`` gives them.

    doit takes every argument that does not start with ``-`` and holds ``=`` as a variable; the names come
    from the command line, the values from ``doit.get_var`` (None outside a doit command run).
    """
    import doit

    names = [arg.split("=", 1)[0] for arg in (sys.argv[1:] if argv is None else argv)
             if arg[:1] != "-" and "=" in arg]
    values = {name: doit.get_var(name) for name in dict.fromkeys(names)}
    return {name: value for name, value in values.items() if value is not None}


def load(root: str | Path, overrides: dict[str, str] | None = None, project: Any = None) -> "DoitPipeline":
    """This run's pipeline, for ``dodo.py``: exits with one line and its exit code on bad config."""
    from mlflowctl.project import Project

    try:
        if project is None:
            project = Project(Path(root), command_line_overrides() if overrides is None else overrides)
        pipeline = Pipeline(project)
    except MlflowctlError as exc:
        print(f"mlflowctl: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    _check_doit_database(Path(doit_config(project.root)["dep_file"]))
    install_interrupt_handler()
    return DoitPipeline(pipeline)


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


class DoitPipeline:
    """A project's pipeline as doit tasks: doit calls ``create_doit_tasks`` (one task per stage)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._preflight_done: set[int] = set()

    @property
    def project(self) -> Any:
        return self.pipeline.project

    def create_doit_tasks(self) -> Iterator[dict[str, Any]]:
        for stage in self.pipeline.stages.values():
            yield self.task(stage)

    def task(self, stage: Stage) -> dict[str, Any]:
        """A doit task dict that runs ``stage`` through the backend when its result is not in the store."""
        return {
            "basename": stage.name,
            "actions": [(self._run, [stage.name])],
            "uptodate": [_Uptodate(self, stage.name)],
            "task_dep": list(stage.upstream),
            "doc": stage.doc,
            "verbosity": 2,
            "meta": {"stage": stage},
        }

    def preflight(self, stage: Stage) -> bool:
        """Before the first stage of this run: take the project's run lock, check the store, sweep what killed
        runs left in it; check the backend if the stage runs on it. True when the lock had to be waited for."""
        from mlflowctl.state import run_lock

        p = self.pipeline
        waited = run_lock(p.project.state_dir)
        checks = [p.project.store] + ([p.project.backend] if stage.command else [])
        for plugin in checks:
            if id(plugin) not in self._preflight_done:
                plugin.preflight()
                self._preflight_done.add(id(plugin))
                if plugin is p.project.store:
                    for name in plugin.sweep():
                        print(f"mlflowctl: removed {name}, left in the store's staging by a run that was killed",
                              file=sys.stderr, flush=True)
        return waited

    def _run(self, name: str) -> Any:
        from doit.exceptions import TaskFailed

        p = self.pipeline
        try:
            self.preflight(p.stages[name])
            p.run(name)
        except MlflowctlError as exc:
            return TaskFailed(f"mlflowctl: {exc}")
        except Interrupted as exc:  # SIGTERM/Ctrl-C with no stage process to cancel: a failed task, not a traceback
            return TaskFailed(exc.line(name))
        except Exception as exc:
            line = blame(exc)
            if line is None:  # the core's own bug: doit shows its traceback
                raise
            return TaskFailed(f"mlflowctl: {line}")
        return None


class _Uptodate:
    """doit ``uptodate`` check: does the store hold a complete result for the stage's current key?"""

    def __init__(self, tasks: DoitPipeline, name: str) -> None:
        self.tasks = tasks
        self.name = name

    def __call__(self) -> bool:
        """Also the preflight: a stage about to run checks its store and backend first.

        doit asks this in its main thread before running anything of the
        stage, so an unreachable Docker daemon or kube context ends the run
        here with one line and its own exit code.
        """
        try:
            p = self.tasks.pipeline
            stage = p.stages[self.name]
            complete = p.is_complete(stage)
            if not complete and self.tasks.preflight(stage):  # waited for another run: it may have made the result
                complete = p.is_complete(stage)
            return complete
        except Exception as exc:
            line = exc if isinstance(exc, MlflowctlError) else blame(exc)
            if line is None:
                raise
            print(f"mlflowctl: {line}", file=sys.stderr)
            raise SystemExit(line.exit_code) from None
