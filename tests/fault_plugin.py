"""A fault-injection plugin for tests/test_faults.py: hold ``doit`` at one hook so the test can kill it there.

Registered like any third-party plugin (an entry point in the ``mlflowctl`` group of a distribution
the test installs into a folder on ``PYTHONPATH``), implementing the real hook specifications.

``MLFLOWCTL_FAULT=<hook>:<stage>`` names the point (hooks: ``before_stage``, ``before_publish``,
``after_stage``, ``model_registered``); when ``doit`` reaches it, the plugin writes its pid to
``MLFLOWCTL_FAULT_MARK`` and waits (at most 120 s) for the test's signal. A first SIGTERM/Ctrl-C that
only cancels the running stage (the signal arrived inside an in-process action) ends the wait, so the
pipeline sees the cancellation as it would with a slow action.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import mlflowctl

_RUNS: dict[str, object] = {}


def _hold(hook: str, stage: str, run: object = None) -> None:
    if os.environ.get("MLFLOWCTL_FAULT") != f"{hook}:{stage}":
        return
    mark = Path(os.environ["MLFLOWCTL_FAULT_MARK"])
    tmp = mark.with_name(mark.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, mark)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        cancelled = getattr(run, "cancelled", None)
        if cancelled is not None and cancelled.is_set():
            return
        time.sleep(0.02)


@mlflowctl.hookimpl
def mlflowctl_before_stage(stage, run):
    _RUNS[stage] = run
    _hold("before_stage", stage, None)  # not yet a live run: a signal here interrupts at once


@mlflowctl.hookimpl
def mlflowctl_before_publish(stage, run, path):
    _hold("before_publish", stage, None)


@mlflowctl.hookimpl
def mlflowctl_after_stage(stage, run, result):
    _hold("after_stage", stage, None)


@mlflowctl.hookimpl
def mlflowctl_model_registered(version):
    # inside the register action (a live run): the version is published, the register result is not
    _hold("model_registered", "register", _RUNS.get("register"))
