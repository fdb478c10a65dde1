"""The core's own stages, ready for a project to declare: register, deploy, promote.

They run in the orchestrator (stage actions) and work with any serving target; a project lists them in its
``STAGES`` beside its command stages, naming what feeds them::

    REGISTER = register_stage(Registration(servable=("FIT_DIR", "plane")), inputs=(("FIT_DIR", "fit"),))
    DEPLOY = deploy_stage()                     # serves the version "register" made, as canary
    PROMOTE = promote_stage(gate="check")       # stable if the gate's report.json passed
"""
from __future__ import annotations

from mlflowctl.pipeline import Registration, Stage


def register_stage(registration: Registration, inputs: tuple[tuple[str, str], ...], name: str = "register",
                   doc: str = "register the trained model as the next version under models/<name>/<N>/") -> Stage:
    """Copies what ``registration`` names (from ``inputs``) into the next model version."""
    from mlflowctl.model_registry import drop_superseded_version, register_model

    return Stage(name=name, action=register_model, inputs=inputs, registers=registration, keys=("model_name",),
                 superseded=drop_superseded_version, doc=doc)


def deploy_stage(register: str = "register", name: str = "deploy",
                 doc: str = "serve the registered version (as canary) on the configured serving target") -> Stage:
    """Serves the version the ``register`` stage made as ``canary`` (keyed by the serving settings and the
    target's code; re-deployed when the target no longer serves it)."""
    from mlflowctl.promotion import deploy_version, deployment_holds

    return Stage(name=name, action=deploy_version, still_valid=deployment_holds, inputs=(("VERSION_DIR", register),),
                 params="serving", doc=doc)


def promote_stage(gate: str, deploy: str = "deploy", name: str = "promote",
                  doc: str = "promote the version to stable if it passed the gate, else roll it back") -> Stage:
    """Makes the deployed version ``stable`` if the ``gate`` stage's ``report.json`` says ``passed``; keyed by the
    gate's settings. Its result holds the stable version's ``endpoint.json`` and ``concept/`` (the concept model
    the version was registered with); after ``mlflowctl rollback`` it runs again and records the restored one."""
    from mlflowctl.promotion import REPORT_INPUT, promote_version, promotion_holds

    return Stage(name=name, action=promote_version, still_valid=promotion_holds,
                 inputs=((REPORT_INPUT, gate), ("ENDPOINT_DIR", deploy)), params=gate, doc=doc)
