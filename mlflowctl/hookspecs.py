"""The plugin contract: every hook mlflowctl calls.

A plugin is a module (or object) with functions decorated by
``mlflowctl.hookimpl`` whose names match these specifications. Hooks are
always called with keyword arguments, so an implementation may accept any
subset of the parameters listed here. Built-in plugins (``plugins/``) are
registered through exactly the same path as third-party ones (the
``mlflowctl`` entry-point group), see :mod:`mlflowctl.plugin_manager`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflowctl.backends import StageResult, StageRun
    from mlflowctl.model_registry import ModelVersion
    from mlflowctl.plugin_manager import Registry
    from mlflowctl.serving import Endpoint

hookspec = pluggy.HookspecMarker("mlflowctl")


# -- registration -----------------------------------------------------------

@hookspec
def mlflowctl_add_backends(registry: Registry) -> None:
    """Add execution backends.

    Called once per run, when the plugin manager is built, before any stage
    runs. Call ``registry.add_backend(cls)`` for each backend class (a
    subclass of :class:`mlflowctl.backends.Backend`; its ``name`` is what
    ``backend=`` selects). Adding a name twice is an error.

    :param registry: the run's registry of backends, stores and targets.
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_add_stores(registry: Registry) -> None:
    """Add artifact stores.

    Called once per run, when the plugin manager is built. Call
    ``registry.add_store(cls)`` for each store class (a subclass of
    :class:`mlflowctl.stores.Store`; its ``scheme``, e.g. ``file`` or
    ``s3``, is matched against the ``store:`` URL in ``mlflowctl.yaml``).

    :param registry: the run's registry of backends, stores and targets.
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_add_serving_targets(registry: Registry) -> None:
    """Add serving targets.

    Called once per run, when the plugin manager is built. Call
    ``registry.add_serving_target(cls)`` for each target class (a subclass
    of :class:`mlflowctl.serving.ServingTarget`; its ``name`` is what
    ``serving.target`` selects). The contract -- every method, when it is
    called, what it returns, how drift and errors work -- is documented in
    :mod:`mlflowctl.serving`; ``mlflowctl.testing.serving_contract`` checks it.

    :param registry: the run's registry of backends, stores and targets.
    :returns: nothing; all implementations are called.
    """


# -- lifecycle --------------------------------------------------------------

@hookspec
def mlflowctl_before_stage(stage: str, run: StageRun) -> None:
    """Called just before a stage is handed to its backend.

    The stage's cache key, inputs and output location are known (``run``).
    Raising :class:`mlflowctl.errors.MlflowctlError` vetoes the stage: it
    is reported as failed and nothing is published.

    :param stage: the stage name, as the project declares it (``tasks/``).
    :param run: what the backend is about to run.
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_before_publish(stage: str, run: StageRun, path: str) -> None:
    """Called when a stage's output is complete, just before it is published at store path ``path``.

    Nothing of the result is in the store yet (for ``register``, the new model version already is:
    a re-run adopts it). Raising vetoes the publish: the stage fails and nothing is published. The
    point where a crash is the most expensive, which is why the fault-injection tests stop here.

    :param stage: the stage name.
    :param run: what the backend ran.
    :param path: where the result is about to appear, ``results/<stage>/<key>``.
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_after_stage(stage: str, run: StageRun, result: StageResult) -> None:
    """Called after a stage succeeded and its outputs were published.

    :param stage: the stage name.
    :param run: what the backend ran.
    :param result: exit code, duration and log location.
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_on_stage_error(stage: str, run: StageRun, error: BaseException) -> None:
    """Called when a stage failed, could not run, or was cancelled.

    Nothing of the stage was published. Takes the arguments of
    :func:`mlflowctl_before_stage` plus the error.

    :param stage: the stage name.
    :param run: what the backend was running.
    :param error: the exception (a :class:`~mlflowctl.errors.MlflowctlError`
        for expected failures, ``KeyboardInterrupt`` on Ctrl-C).
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_model_registered(version: ModelVersion) -> None:
    """Called after a trained model became a new registry version.

    The version directory (``models/<name>/<N>/``) and its
    ``metadata.json`` are complete when this is called.

    :param version: the new version (name, number, metadata).
    :returns: nothing; all implementations are called.
    """


@hookspec
def mlflowctl_deployed(version: ModelVersion, endpoint: Endpoint) -> None:
    """Called after a serving target reports a version as deployed.

    :param version: the deployed version.
    :param endpoint: where it answers (base URL, predict URL, protocol).
    :returns: nothing; all implementations are called.
    """


@hookspec(firstresult=True)
def mlflowctl_promotion_veto(version: ModelVersion, report: dict[str, Any]) -> str | None:
    """Asked before a version that passed the integration test becomes ``stable``.

    :param version: the candidate version.
    :param report: the integration test report (accuracy, drift rate, ...).
    :returns: a reason string to block the promotion, or ``None`` to allow
        it. The first non-``None`` result wins.
    """
