"""The serving-target contract: put a registered model version behind an HTTP endpoint.

A serving target is a class: subclass :class:`ServingTarget`, name it (``name = "mytarget"``),
declare its settings, and add it from a plugin::

    from mlflowctl import hookimpl
    from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus

    class MyTarget(ServingTarget):
        name = "mytarget"
        description = "one line shown by `mlflowctl plugins`"
        settings = {"port": Setting(int, 9000, "port of the server", min=1, max=65535)}
        ...

    @hookimpl
    def mlflowctl_add_serving_targets(registry):
        registry.add_serving_target(MyTarget)

``serving.target: mytarget`` in ``mlflowctl.yaml`` (or ``doit serving.target=mytarget``) selects it;
``serving.mytarget.<key>`` holds its settings, validated before the target is built and handed to it
as ``self.config`` (a dict). ``self.project`` is the run's :class:`ProjectView`.

Labels follow TensorFlow Serving: ``stable`` is what clients get by default, ``canary`` is a version
under test. A target serves several versions at once and routes by version number, by label and
(for a canary) by traffic weight. Who calls what (the pipeline's deploy/promote stages, ``mlflowctl``):

============================  ==========================================================================
``preflight()``               before ``deploy`` (deploy stage): can the target work at all?
``deploy(v, "canary", 0.0)``  deploy stage: the new version beside ``stable``
``set_label("stable", N)``    promote stage (then ``set_label("canary", None)``)
``undeploy(N)``               promote stage (a rejected version), ``mlflowctl rollback``
``deploy(v, "stable")``       ``mlflowctl rollback`` (the restored version)
``endpoint()``                promote stage (written to ``endpoint.json``), ``mlflowctl report``
``serves(N)``                 every ``doit`` (is the deploy stage's result still true?)
``status()``                  ``mlflowctl serve status``, ``mlflowctl ui``
``start()`` / ``stop()``      ``mlflowctl serve start`` / ``stop``; ``stop()`` also when
                              ``serving.target`` changed away from this target
``drift_url(N)``              promote stage (written to ``endpoint.json`` for ``monitor``)
``live_inputs_url(N)``        promote stage (written to ``endpoint.json`` for ``monitor``)
============================  ==========================================================================

Errors: raise :class:`mlflowctl.errors.MlflowctlError` (or a subclass: ``UnavailableError`` when
the server or platform cannot be reached, exit 5; ``ConfigError`` for a bad setting, exit 3) with a
one-line message and a hint. Any other exception escaping a contract method is turned into a
:class:`~mlflowctl.errors.PluginError` (exit 4) naming the target and the method, printed on one
line: ``serving target 'x' failed in deploy(): ValueError: ...`` -- never a traceback.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

from mlflowctl.config import Configurable
from mlflowctl.errors import MlflowctlError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    from mlflowctl.model_registry import ModelRegistry, ModelVersion
    from mlflowctl.stores import Store

#: The predict protocols the integration test and the monitor speak (``Endpoint.protocol``):
#: ``tfserving`` (TF Serving REST ``{"instances": ...}`` -> ``{"predictions": ...}``),
#: ``v2`` (Open Inference Protocol ``{"inputs": [...]}`` -> ``{"outputs": [...]}``),
#: ``seldon`` (Seldon Core v1 ``{"data": {"ndarray": ...}}`` -> ``{"data": {"ndarray": ...}}``),
#: ``hydrosphere`` (the gateway's JSON, same shapes as ``seldon``'s ``data.ndarray``).
PROTOCOLS = ("tfserving", "v2", "seldon", "hydrosphere")

#: Version states (TF Serving's ``ModelVersionStatus.State`` plus ``STOPPED``: deployed, server down).
STATES = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END", "STOPPED", "UNKNOWN")

#: Labels mlflowctl itself sets. A target must accept any label name, though.
STABLE, CANARY = "stable", "canary"


# ----------------------------------------------------------------------------------- data
@dataclass
class Endpoint:
    """Where a deployed version answers; written as ``endpoint.json`` for the stage scripts.

    The integration test sends ``protocol``-shaped requests to ``predict_url`` (tagged with the
    header ``X-Mlflowctl-Traffic: test``, which a target should keep out of its live statistics).
    The monitor reads drift from ``drift_url`` or scores the live inputs at ``inputs_url`` (see
    :meth:`ServingTarget.drift_url` and :meth:`ServingTarget.live_inputs_url`); both empty: drift is
    not available for this target, which ``monitor`` reports without failing.
    """

    url: str            # base URL of the server, e.g. http://127.0.0.1:8501
    predict_url: str    # the full predict URL for this version or label
    model_name: str
    version: int
    protocol: str = "tfserving"  # one of PROTOCOLS
    grpc: str = ""      # host:port of TF Serving's gRPC API (PredictionService) for this version, if served
    drift_url: str = ""   # GET: the drift JSON of the served version (see ServingTarget.drift_url)
    inputs_url: str = ""  # GET: {"inputs": [[...], ...]}, recent live inputs (see ServingTarget.live_inputs_url)
    target: str = ""      # the serving target's name (filled in by mlflowctl when empty)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise MlflowctlError(f"endpoint protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VersionStatus:
    """One deployed version as the target sees it."""

    version: int
    state: str = "UNKNOWN"   # one of STATES; only AVAILABLE answers predictions
    error: str = ""          # why it is not AVAILABLE, one line ("" when it is)


@dataclass
class ServingStatus:
    """What :meth:`ServingTarget.status` returns.

    ``running`` is False when the server (or platform) is down or was never started; the other
    fields still say what is deployed (``versions`` in state ``STOPPED``). ``details`` holds what
    only this target knows (pid, container, runtime, log file, ...): shown, never interpreted.
    """

    target: str
    running: bool = False
    model_name: str = ""
    url: str = ""                      # base URL ("" when not running)
    predict_url: str = ""              # the stable (default) predict URL
    versions: list[VersionStatus] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    canary_weight: float = 0.0         # share of unlabelled traffic the canary gets
    metrics_url: str = ""              # Prometheus text format, if any
    grpc: str = ""                     # host:port of a TF Serving gRPC API, if any
    error: str = ""                    # one line: runs but does not answer, ...
    details: dict[str, Any] = field(default_factory=dict)

    def available(self, version: int) -> bool:
        """Is ``version`` served and AVAILABLE (and the server running)?"""
        return self.running and any(v.version == int(version) and v.state == "AVAILABLE" for v in self.versions)

    def labels_of(self, version: int) -> list[str]:
        return sorted(k for k, v in self.labels.items() if v == int(version))

    def to_dict(self) -> dict[str, Any]:
        """A flat dict (``details`` merged in): what ``mlflowctl serve status`` and the UI show."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        data["versions"] = [asdict(v) for v in self.versions]
        data["labels"] = dict(self.labels)
        return {**self.details, **data}

    # read access by key, as the free dict this replaced was read (``status["running"]``)
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


# ---------------------------------------------------------------------------- the project
@runtime_checkable
class ProjectView(Protocol):
    """What a plugin may use of the run's project (``self.project``); nothing else is promised.

    * ``name``, ``model_name``: the project and the model it serves (``mlflowctl.yaml``).
    * ``root``: the project folder; ``state_dir``: ``<root>/.mlflowctl`` -- keep a target's own
      files (pid files, logs, routing) under ``state_dir / "serve"`` or ``state_dir / <name>``.
    * ``stage_code_dir``: the folder with the stage scripts (``image/``), also the model server's.
    * ``config``: the validated configuration (read only), e.g. ``config["backend"]``.
    * ``store``: the artifact store. A :class:`~mlflowctl.model_registry.ModelVersion`'s ``path``
      is a *store path* (``models/<name>/<N>``), not a folder: ``store.fetch(version.path)`` gives a
      local folder holding the servable the producing stage declared (for TensorFlow, a SavedModel)
      and, if one was declared, ``concept/`` (the drift model and ``threshold.json``). ``store.url``
      says where it is.
    * ``models``: the model registry (``labels()``, ``versions()``, ``servable(N)``).
    * ``backend``: the selected execution backend (its ``name``); ``backend_named(name)`` builds
      another one with its configured settings (e.g. a docker runtime of a serving target).
    """

    name: str
    model_name: str
    root: Path
    state_dir: Path
    stage_code_dir: Path

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def store(self) -> Store: ...

    @property
    def models(self) -> ModelRegistry: ...

    @property
    def backend(self) -> Any: ...

    def backend_named(self, name: str) -> Any: ...


# ----------------------------------------------------------------------------- the target
#: The methods of the contract; any non-MlflowctlError they raise becomes one PluginError line.
CONTRACT_METHODS = ("__init__", "preflight", "deploy", "set_label", "undeploy", "status", "serves", "endpoint",
                    "start", "stop", "metrics_url", "drift_url", "live_inputs_url")


def _guard(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(method, "__mlflowctl_guarded__", False):
        return method

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (MlflowctlError, NotImplementedError):
            raise
        except Exception as exc:  # noqa: BLE001 - the contract: one line naming the plugin, no traceback
            raise plugin_failure(type(self).name or type(self).__name__, name, exc) from exc

    guarded.__mlflowctl_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def plugin_failure(target: str, method: str, exc: BaseException) -> PluginError:
    """The one-line error for an unexpected exception of a target's ``method``."""
    text = " ".join(str(exc).split())[:300]
    where = f"{method}()" if method != "__init__" else "its constructor"
    return PluginError(f"serving target {target!r} failed in {where}: {type(exc).__name__}" + (f": {text}" if text else ""),
                       hint="a bug in the plugin that provides it (mlflowctl plugins lists them)")


class ServingTarget(Configurable):
    """Base class of serving targets; subclass it and add it with ``registry.add_serving_target``.

    ``name`` is what ``serving.target`` selects; ``description`` one line shown by ``mlflowctl
    plugins``; ``settings`` declares the keys of ``serving.<name>`` (each :class:`Setting` has a
    type, default, help, and optional ``choices``/``min``/``max``/``secret``).

    Required: :meth:`deploy`, :meth:`set_label`, :meth:`undeploy`, :meth:`status`, :meth:`endpoint`.
    Optional (sensible defaults): :meth:`preflight`, :meth:`serves`, :meth:`start`, :meth:`stop`,
    :meth:`metrics_url`, :meth:`drift_url`, :meth:`live_inputs_url`.

    Every method is called in the orchestrator process (never import TensorFlow; import heavy
    SDKs inside the methods that need them), may block, and must be idempotent where it says so.
    """

    name: ClassVar[str] = ""
    project: ProjectView

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in CONTRACT_METHODS:
            if method in cls.__dict__ and callable(cls.__dict__[method]):
                setattr(cls, method, _guard(method, cls.__dict__[method]))

    def __init__(self, settings: dict[str, Any], project: ProjectView) -> None:
        """Cheap: no network, no server. ``settings`` are already validated against ``self.settings``."""
        super().__init__(settings, project)

    # -- required ------------------------------------------------------------------------------
    def deploy(self, version: ModelVersion, label: str | None = CANARY, weight: float = 0.0) -> Endpoint:  # pragma: no cover
        """Serve ``version`` beside what is already served, and give it ``label``.

        ``version.path`` is a store path: ``self.project.store.fetch(version.path)`` is the local folder.
        ``label=None`` deploys without a label. ``weight`` (0..1) is the share of *unlabelled*
        traffic the ``canary`` label gets; 0 means "use the target's configured default" (often
        0: the canary is reached only by its version or label URL). Other labels ignore it.
        Re-deploying a served version is not an error (idempotent: it only moves the label).
        Blocks until the version answers (state AVAILABLE) or fails with an ``MlflowctlError``
        (``UnavailableError`` on a timeout); on failure the versions served before keep answering.
        Returns the endpoint of this version (by number).
        """
        raise NotImplementedError

    def set_label(self, label: str, version: int | None) -> None:  # pragma: no cover
        """Point ``label`` at the served ``version``; ``version=None`` removes the label (no error if absent).

        Blocks until the routing is in effect (a request to the label's URL afterwards reaches
        ``version``). Labelling a version that is not deployed is an ``MlflowctlError``.
        """
        raise NotImplementedError

    def undeploy(self, version: int) -> None:  # pragma: no cover
        """Stop serving ``version`` and drop its labels; the others keep answering.

        Undeploying a version that is not served is not an error. Blocks until it no longer answers.
        """
        raise NotImplementedError

    def status(self) -> ServingStatus:  # pragma: no cover
        """What is deployed and in which state; never raises because the server is down
        (``running=False`` instead)."""
        raise NotImplementedError

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:  # pragma: no cover
        """The endpoint of a version (by number), of a label, or (neither) the default (``stable``)
        one: the URL a client without any label calls. An unknown version or label, or nothing
        deployed, is an ``MlflowctlError``. Does not need the server to answer.
        """
        raise NotImplementedError

    # -- optional --------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Can the target work at all (daemon reachable, cluster answers, credentials present)?
        Raise an ``MlflowctlError`` saying what to do. Default: nothing to check."""

    def serves(self, version: int) -> bool:
        """Does the target answer with ``version`` right now? Asked on every ``doit`` (keep it cheap;
        never raise: False when unsure). The default reads :meth:`status`."""
        try:
            return self.status().available(version)
        except MlflowctlError:
            return False

    def start(self) -> Endpoint | None:
        """Make sure the server runs and serves the labelled versions (``mlflowctl serve start``);
        the stable endpoint, or None when nothing is deployed. Idempotent.
        Default: the target cannot be started by mlflowctl (an ``MlflowctlError``)."""
        raise MlflowctlError(f"serving target {self.name!r} cannot be started by mlflowctl",
                             hint="it runs on its own platform; mlflowctl serve status shows it")

    def stop(self) -> None:
        """Stop serving everything this project deployed (``mlflowctl serve stop``, and when
        ``serving.target`` moved to another target). Idempotent; nothing running is fine.
        Default: nothing to stop."""

    def metrics_url(self) -> str | None:
        """Where Prometheus-format metrics are exposed, if anywhere (shown by ``mlflowctl ui``)."""
        return None

    def drift_url(self, version: int) -> str | None:
        """Drift, way 1: the target scores drift itself. Return the URL of ``version``'s drift JSON.

        ``monitor`` GETs ``<url>?label=stable`` (then ``<url>?version=<N>`` on a 404) and expects
        a JSON object: ``{"model_name", "version", "drift_scoring": bool, "scored": int,
        "outliers": int, "window": {"size", "outliers", "capacity"}, "threshold": float}`` and
        optionally ``"test": {"scored", "outliers"}`` (test-tagged traffic, used by the integration
        test), ``"training_histogram"``/``"live_histogram"`` (``{"edges", "counts"}``) and
        ``"recent_errors"`` (a list of floats) for the plot. The drift rate is
        ``window.outliers / window.size``. Default: None (the target does not score drift).
        """
        return None

    def live_inputs_url(self, version: int) -> str | None:
        """Drift, way 2: the target keeps a sample of live inputs; ``monitor`` scores them with the
        version's concept model itself. Return the URL that answers ``GET`` with
        ``{"inputs": [[x, ...], ...]}`` -- the most recent live (not test-tagged) request rows of
        ``version``, oldest first, at most a few thousand. Default: None.

        A target that gives neither URL makes ``monitor`` report "drift not available for target
        <name>" and pass.
        """
        return None


def endpoint_for_stages(target: ServingTarget, endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with the target's name and drift URLs filled in: what ``endpoint.json`` holds."""
    from dataclasses import replace

    drift = endpoint.drift_url or target.drift_url(endpoint.version) or ""
    inputs = endpoint.inputs_url or target.live_inputs_url(endpoint.version) or ""
    return replace(endpoint, drift_url=drift, inputs_url=inputs, target=endpoint.target or target.name)


def as_status(target: ServingTarget, value: Any) -> ServingStatus:
    """A :class:`ServingStatus` from what ``status()`` returned (a plain dict is broken contract)."""
    if isinstance(value, ServingStatus):
        return value
    raise PluginError(f"serving target {target.name!r}: status() returned {type(value).__name__}, "
                      f"expected mlflowctl.serving.ServingStatus",
                      hint="a bug in the plugin that provides it (mlflowctl plugins lists them)")
