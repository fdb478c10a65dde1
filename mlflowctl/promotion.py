"""Deploy, promote, roll back: the serving side of the pipeline, through the configured target.

Only a version that passed the integration test becomes ``stable``; a failed
one is withdrawn and the previous stable version keeps serving. Every
decision is recorded as the version's verdict (``mlflowctl models``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflowctl.errors import GateFailed, MlflowctlError
from mlflowctl.serving import CANARY, STABLE, endpoint_for_stages

ENDPOINT_FILE = "endpoint.json"
REPORT_INPUT = "REPORT_DIR"  # promote's input holding the gate's report.json ({"passed", "accuracy", ...})


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MlflowctlError(f"cannot read {path}: {exc}") from None


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def deploy_version(project: Any, ctx: Any) -> None:
    """Stage action of ``deploy``: serve the newly registered version as ``canary`` beside ``stable``."""
    number = _read(ctx.inputs["VERSION_DIR"] / "version.json")["version"]
    version = project.models.servable(number)
    target = project.serving
    target.preflight()
    retire_previous_target(project)
    endpoint = endpoint_for_stages(target, target.deploy(version, label=CANARY, weight=0.0))
    project.models.set_label(CANARY, number)
    ctx.log.line(f"{version.name} version {number} answers at {endpoint.predict_url}")
    _write(ctx.output / ENDPOINT_FILE, endpoint.to_dict())
    project.pm.hook.mlflowctl_deployed(version=version, endpoint=endpoint)


TARGET_FILE = "serving-target.json"


def retire_previous_target(project: Any) -> str | None:
    """Switching ``serving.target``: stop what the previously used target serves for this project.

    The deploy stage records the target it deployed with in ``.mlflowctl/serving-target.json``;
    when that name differs from the selected one, the old target's :meth:`stop` runs first (a
    target that is no longer installed is reported and left alone). Returns the retired name.
    """
    record = Path(project.state_dir) / TARGET_FILE
    try:
        previous = json.loads(record.read_text()).get("target")
    except (OSError, ValueError, AttributeError):
        previous = None
    current = project.serving.name
    retired = None
    if isinstance(previous, str) and previous and previous != current:
        try:
            cls = project.pm.registry.serving_target(previous)
        except MlflowctlError:
            cls = None  # uninstalled: nothing mlflowctl can stop
        if cls is not None:
            cls(project.settings("serving", previous), project).stop()
            retired = previous
    if previous != current:
        _write(record, {"target": current})
    return retired


ROLLED_BACK = "rolled-back"  # the verdict of a version ``mlflowctl rollback`` took off


def deployment_holds(project: Any, result_dir: Path) -> bool:
    """Is the version this ``deploy`` result stands for still served? (re-deploy if not).

    A version ``mlflowctl rollback`` took off holds as it is: deploying it again would undo the rollback.
    (A version the gate rejected is deployed again: a changed gate re-tests it against a live endpoint.)
    """
    try:
        number = int(json.loads((result_dir / ENDPOINT_FILE).read_text())["version"])
        return project.models.verdict(number).get("state") == ROLLED_BACK or project.serving.serves(number)
    except (OSError, ValueError, KeyError, TypeError, MlflowctlError):
        return False


def promotion_holds(project: Any, result_dir: Path) -> bool:
    """Does this ``promote`` result still name a served stable version? Not once ``mlflowctl rollback`` took
    its version off: ``promote`` then runs again, and records the stable version the rollback restored
    (so ``monitor`` watches the version that serves, with that version's own concept model)."""
    try:
        number = int(json.loads((result_dir / ENDPOINT_FILE).read_text())["version"])
        return project.models.verdict(number).get("state") != ROLLED_BACK
    except (OSError, ValueError, KeyError, TypeError, MlflowctlError):
        return False


def promote_version(project: Any, ctx: Any) -> None:
    """Stage action of ``promote``: make the tested version ``stable``, or withdraw it."""
    report = _read(ctx.inputs[REPORT_INPUT] / "report.json")
    number = int(_read(ctx.inputs["ENDPOINT_DIR"] / ENDPOINT_FILE)["version"])
    models, target = project.models, project.serving
    version = models.get(number)
    previous = models.labels().get("stable")
    if models.verdict(number).get("state") == ROLLED_BACK:  # taken off by mlflowctl rollback: not promoted again
        if previous is None:
            raise MlflowctlError(f"{version.name} version {number} was rolled back and no version is stable",
                                 hint="mlflowctl models; change a setting to train a new version")
        ctx.log.line(f"version {number} was rolled back (mlflowctl rollback): version {previous} stays stable")
        _record_stable(project, ctx, previous, report=None)
        return
    accuracy, floor = report.get("accuracy"), report.get("min_accuracy")
    reason = None
    if not report.get("passed"):
        reason = f"accuracy {accuracy:.4f} below the floor {floor:.4f}" if isinstance(accuracy, (int, float)) \
            else "integration test did not pass"
    else:
        veto = project.pm.hook.mlflowctl_promotion_veto(version=version, report=report)
        if veto:
            reason = f"vetoed: {veto}"
    if reason:
        if previous != number:
            target.undeploy(number)
        else:
            target.set_label(CANARY, None)
        models.set_label(CANARY, None)
        models.set_verdict(number, "rejected", reason, report=_summary(report))
        ctx.log.line(f"version {number} rejected: {reason}")
        keeps = f"version {previous} stays stable" if previous else "no version is stable yet"
        raise GateFailed(f"{version.name} version {number} not promoted: {reason}; {keeps}",
                         hint="mlflowctl models shows every version and why")
    target.set_label(STABLE, number)
    target.set_label(CANARY, None)  # the stable version is no canary any more (on the target as in the registry)
    models.set_label(STABLE, number)
    models.set_label(CANARY, None)
    if previous and previous != number:
        models.set_verdict(previous, "superseded", f"version {number} promoted")
    models.set_verdict(number, "promoted", f"accuracy {accuracy:.4f} >= floor {floor:.4f}", report=_summary(report))
    _record_stable(project, ctx, number, report=_summary(report), previous=previous)


def _record_stable(project: Any, ctx: Any, number: int, report: dict[str, Any] | None, previous: Any = None) -> None:
    """promote's result: the stable version's endpoint (``endpoint.json``), ``promotion.json``, and the version's
    own concept model (``concept/``, as the registry holds it) for the stages that score drift themselves."""
    import shutil

    from mlflowctl.model_registry import CONCEPT_DIR

    target = project.serving
    stable = endpoint_for_stages(target, target.endpoint())  # the URL a client without a label calls
    ctx.log.line(f"version {number} is stable: {stable.predict_url}")
    concept = project.store.fetch(project.models.get(number).path) / CONCEPT_DIR
    if concept.is_dir():
        shutil.copytree(concept, ctx.output / CONCEPT_DIR)
    _write(ctx.output / ENDPOINT_FILE, {**stable.to_dict(), "version": number})
    _write(ctx.output / "promotion.json", {"version": number, "previous": previous, "report": report})


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report.get(k) for k in ("accuracy", "min_accuracy", "ood_rate", "latency_ms", "samples") if k in report}


def rollback(project: Any) -> int:
    """Make the most recently promoted version before the current stable one stable again."""
    models, target = project.models, project.serving
    current = models.labels().get("stable")
    candidates = []
    for number in models.numbers():
        if number == current:
            continue
        verdict = models.verdict(number)
        promoted = [h["time"] for h in verdict.get("history", []) if h.get("state") == "promoted"]
        if promoted and verdict.get("state") != "rejected":
            candidates.append((max(promoted), number))
    if not candidates:
        raise MlflowctlError(f"model {models.name}: no earlier promoted version to roll back to",
                             hint="mlflowctl models")
    _, number = max(candidates)
    target.deploy(models.servable(number), label="stable")
    models.set_label("stable", number)
    if current is not None:
        models.set_verdict(current, ROLLED_BACK, f"mlflowctl rollback restored version {number}")
        target.undeploy(current)
    models.set_verdict(number, "promoted", f"restored by rollback from version {current}")
    return number
