"""``python -m mlflowctl_plugins.argo_step STAGE``: one orchestrator stage of an exported Argo Workflow.

Runs in the runner image (the project image + mlflowctl + the project's ``dodo.py``, ``tasks/`` and
``mlflowctl.yaml`` under ``/project``) with the store's claim mounted, and ``/project/.mlflowctl`` a folder on it
shared by every orchestrator step of the project (``argo_export.STATE``): the stage's action (register,
deploy, promote: the same function doit runs) gets its inputs from the run's workspace on the claim and
writes its output there. It works with the project's own store (``pvc://``: its store server) and serving
target through the API server, as the pod's service account (``mlflowctl setup`` creates one with exactly
the rights a run needs: ``backends.k8s.service_account: mlflowctl``).

Environment (set by ``mlflowctl export argo``): ``MLFLOWCTL_ARGO_IMAGE`` (the project image),
``MLFLOWCTL_ARGO_WORKSPACE`` (the run's folder), ``MLFLOWCTL_ARGO_INPUTS`` (JSON: env name -> upstream
stage), ``MLFLOWCTL_ARGO_OUTPUT`` (this stage's folder name) and ``MLFLOWCTL_ARGO_PARAM_<section>__<key>``
(every workflow parameter: the settings this run used, also those of the stages before). Exit codes are mlflowctl's (errors.py).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROJECT = Path(os.environ.get("MLFLOWCTL_ARGO_PROJECT", "/project"))


class _Log:
    def line(self, text: str) -> None:
        print(text.rstrip("\n"), flush=True)


def main(argv: list[str]) -> int:
    from mlflowctl.errors import EXIT_CONFIG, MlflowctlError

    if len(argv) != 1:
        print("usage: python -m mlflowctl_plugins.argo_step STAGE", file=sys.stderr)
        return EXIT_CONFIG
    name = argv[0]
    try:
        from mlflowctl.cli import load_pipeline
        from mlflowctl.pipeline import ActionContext

        # the project's own store and backend, reached from inside the cluster: this pod's service account
        # (no kubeconfig), its namespace, the image as the Workflow names it (nothing built or loaded here)
        overrides = {"backends.k8s.kubeconfig": "", "backends.k8s.context": "", "backends.k8s.namespace": "",
                     "backends.k8s.image_load": "", "backends.k8s.image": os.environ["MLFLOWCTL_ARGO_IMAGE"]}
        for var, value in os.environ.items():
            if var.startswith("MLFLOWCTL_ARGO_PARAM_"):
                section, _, key = var[len("MLFLOWCTL_ARGO_PARAM_"):].partition("__")
                overrides[f"{section}.{key}"] = value
        pipeline = load_pipeline(PROJECT, overrides)
        if name not in pipeline.stages or pipeline.stages[name].action is None:
            raise MlflowctlError(f"argo_step: {name!r} is not a stage that runs in the orchestrator")
        stage = pipeline.stages[name]
        workspace = Path(os.environ["MLFLOWCTL_ARGO_WORKSPACE"])
        inputs = {env: workspace / up for env, up in json.loads(os.environ.get("MLFLOWCTL_ARGO_INPUTS", "{}")).items()}
        for env, path in inputs.items():
            if not path.is_dir():
                raise MlflowctlError(f"argo_step {name}: input {env} ({path}) is missing: did its stage run?")
        for env, up in json.loads(os.environ.get("MLFLOWCTL_ARGO_INPUTS", "{}")).items():
            _describe(pipeline, up, inputs[env])
        output = workspace / os.environ.get("MLFLOWCTL_ARGO_OUTPUT", name)
        output.mkdir(parents=True, exist_ok=True)
        ctx = ActionContext(name, inputs, output, _Log(), {},  # type: ignore[arg-type]
                            registration=stage.registers, producers=dict(stage.inputs))  # as Pipeline._run_action
        stage.action(pipeline.project, ctx)
        return 0
    except MlflowctlError as exc:
        print(f"mlflowctl: {exc}", file=sys.stderr)
        return exc.exit_code


def _describe(pipeline, stage_name: str, folder: Path) -> None:
    """What doit's published result carries and the workspace's lacks: ``_manifest.json`` with the parts of
    the stage's key the workflow knows (command, code digests, params as this run set them), so what an
    action records from its inputs (register: the version's params and code digests) is what doit records."""
    path = folder / "_manifest.json"
    if path.exists() or stage_name not in pipeline.stages:
        return
    stage = pipeline.stages[stage_name]
    components = {"stage": stage_name, "command": list(stage.command), "code": pipeline.code_digests(stage),
                  "params": pipeline.params(stage)}
    path.write_text(json.dumps({"stage": stage_name, "components": components}, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
