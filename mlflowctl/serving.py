"""The serving-target contract: put a registered model version behind an HTTP endpoint.

Labels follow TensorFlow Serving: ``stable`` is what clients get by default,
``canary`` is a version under test. A target serves several versions at once
and routes by version number, by label and (for a canary) by traffic weight.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from mlflowctl.config import Configurable

if TYPE_CHECKING:  # pragma: no cover
    from mlflowctl.model_registry import ModelVersion


@dataclass
class Endpoint:
    """Where a deployed version answers."""

    url: str            # base URL of the server, e.g. http://127.0.0.1:8501
    predict_url: str    # the full predict URL for this version or label
    model_name: str
    version: int
    protocol: str = "tfserving"  # tfserving | seldon | v2 | hydrosphere
    grpc: str = ""      # host:port of TF Serving's gRPC API (PredictionService) for this version, if served

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ServingTarget(Configurable):
    """Base class of serving targets; subclass it and add it with ``registry.add_serving_target``.

    ``settings`` declares the keys of ``serving.<name>`` in ``mlflowctl.yaml``.
    """

    name: ClassVar[str] = ""

    def deploy(self, version: ModelVersion, label: str = "canary", weight: float = 0.0) -> Endpoint:  # pragma: no cover
        """Serve ``version`` beside what is already served, under ``label``.

        ``weight`` (0..1) is the share of unlabelled traffic the label gets
        (only meaningful for ``canary``). Returns once the version answers.
        """
        raise NotImplementedError

    def set_label(self, label: str, version: int | None) -> None:  # pragma: no cover
        """Point ``label`` at ``version`` (``None`` removes the label)."""
        raise NotImplementedError

    def undeploy(self, version: int) -> None:  # pragma: no cover
        """Stop serving ``version``; the others keep answering."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:  # pragma: no cover
        """Served versions, their states and labels, and the base URL (empty when not running)."""
        raise NotImplementedError

    def serves(self, version: int) -> bool:
        """Does the target answer with ``version`` right now? Asked on every ``doit`` (keep it cheap).

        The default reads :meth:`status`; a target overrides it with one light request.
        """
        status = self.status()
        if not status.get("running"):
            return False
        versions = status.get("versions") or []
        if isinstance(versions, dict):
            versions = [{"version": v, "state": s} for v, s in versions.items()]
        return any(int(v.get("version", -1)) == int(version) and str(v.get("state", "")).upper() == "AVAILABLE"
                   for v in versions)

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:  # pragma: no cover
        """The endpoint of a version or label (the stable one by default)."""
        raise NotImplementedError

    def start(self) -> Endpoint | None:
        """Make sure the server runs and serves the labelled versions (``mlflowctl serve start``)."""
        raise NotImplementedError(f"serving target {self.name!r} cannot be started by mlflowctl")

    def stop(self) -> None:
        """Shut the server down cleanly (``mlflowctl serve stop``)."""
        raise NotImplementedError(f"serving target {self.name!r} cannot be stopped by mlflowctl")

    def metrics_url(self) -> str | None:
        """Where Prometheus-format metrics (drift counters) are exposed, if anywhere."""
        return None
