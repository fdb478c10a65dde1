"""``mlflowctl export argo``: the pipeline as one ``argoproj.io/v1alpha1`` Workflow (built with Hera).

The Workflow's DAG is the doit graph (``Pipeline.stages`` and their inputs):

* a stage with a command is a **resource template** creating the ``batch/v1`` Job (or, with
  ``workers`` > 1, the ``kubeflow.org/v1`` TFJob) that ``doit backend=k8s`` would submit: the same
  image, env, resources and pod settings (the k8s backend's own ``job_manifest``/``tfjob_manifest``),
  with success and failure conditions, owned by the Workflow (deleted with it);
* a stage that runs in the orchestrator (register, deploy, promote) is a **container template** in the
  *runner image* (the project image plus mlflowctl and the project's ``dodo.py``/``tasks/``, see
  :data:`RUNNER_DOCKERFILE`): ``python -m mlflowctl_plugins.argo_step STAGE`` runs that stage's action
  with the project's store and serving target, as the pod's service account;
* the hyperparameters (every stage setting that reaches a stage as an environment variable) are
  workflow parameters (``argo submit -p train_model-epochs=3``); ``workers`` is not one, it decides the
  template's kind.

Stages exchange results through a workspace of the run on the store's claim,
``<store path>/argo/<workflow name>/<stage>`` (the claim is the Workflow's volume); ``register``
(``argo_step``) records the version in the store's registry exactly as doit's register does, so
``mlflowctl models`` lists it. The orchestrator steps share one state folder, the project's ``.mlflowctl/``
(which version the serving target deployed, its routing claims): ``<store path>/argo/.mlflowctl`` on the
claim, mounted at ``/project/.mlflowctl`` (a ``subPath``; the kubelet creates it), kept across workflows
as a laptop keeps its ``.mlflowctl/``. Hera is imported only here, when the command runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflowctl.backends import StageRun, StoreLocation
from mlflowctl.errors import ConfigError, MlflowctlError
from mlflowctl.manifest import created_mode
from mlflowctl.state import STATE_DIR

WORKSPACE = "argo/{{workflow.name}}"     # on the claim, under the store's path
STORE_MOUNT = "/mnt/store"               # where container templates mount the claim
STATE = "argo/.mlflowctl"                # on the claim, under the store's path: the orchestrator steps' state folder
RUNNER_PROJECT = "/project"              # the project in the runner image (argo_step's PROJECT)
RUNNER_DOCKERFILE = """\
# the runner image of `mlflowctl export argo`: the project image + mlflowctl + the project's pipeline
FROM {image}
COPY mlflowctl-src /opt/mlflowctl-src
RUN pip install --no-cache-dir --no-deps /opt/mlflowctl-src \
 && pip install --no-cache-dir 'pluggy>=1.3' 'doit>=0.36' 'PyYAML>=6' 'requests>=2.28' 'kubernetes>=28'
COPY project /project
"""

#: A failed Job or TFJob: a ``Failed`` entry in ``status.conditions``. Argo reads a condition as gjson paths in
#: label-selector syntax, which cannot search a list, so each place the entry can take is named; it fails the
#: step when ANY failure requirement holds (``matchConditions`` in workflow/executor/resource.go, 3.6.18).
#: A condition type appears once in the list, and the operators keep fewer than six.
FAILED_CONDITION = ",".join(f"status.conditions.{i}.type == Failed" for i in range(6))


def param_name(section: str, key: str) -> str:
    """``train_model-epochs``: Argo parameter names allow letters, digits, '_' and '-' only."""
    return f"{section}-{key}"


def parameters(pipeline: Any) -> list[tuple[str, str, str, str]]:
    """(parameter, env var, value, description) of every stage setting a stage gets as environment."""
    from mlflowctl.config import Setting

    out: list[tuple[str, str, str, str]] = []
    seen: set[str] = set()
    config = pipeline.project.config
    for stage in pipeline.stages.values():
        section = stage.section  # the stage's own settings, as it declares them (tasks/)
        if not section or section in seen:
            continue
        seen.add(section)
        for key, spec in stage.settings.items():
            if not isinstance(spec, Setting) or spec.secret:
                continue
            if stage.replicas and key == stage.replicas:
                continue  # the replica count decides the template (Job or TFJob): fixed at export
            value = config[section][key]
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            out.append((param_name(section, key), spec.env or key.upper(), text, spec.help))
    return out


def _env_by_param(pipeline: Any, stage: Any) -> dict[str, str]:
    """env var -> ``{{workflow.parameters.X}}`` for the stage's section."""
    if not stage.section:
        return {}
    prefix = param_name(stage.section, "")
    return {env: "{{workflow.parameters.%s}}" % name for name, env, _, _ in parameters(pipeline)
            if name.startswith(prefix)}


def runner_image(pipeline: Any) -> str:
    image = pipeline.project.backend.manifest_image()
    repo, _, tag = image.rpartition(":")
    return f"{repo}-runner:{tag}" if repo and "/" not in tag else f"{image}-runner"


def build_workflow(pipeline: Any, targets: list[str] | None = None, runner: str = "") -> dict[str, Any]:
    """The Workflow as a dict (Hera's model, serialised)."""
    import yaml
    from hera.workflows import DAG, Container, Env, ExistingVolume, Parameter, Resource, Task, Workflow

    project = pipeline.project
    backend, store = project.backend, project.store
    if getattr(backend, "name", "") != "k8s":
        raise ConfigError(f"export argo: the Workflow runs the stages as the k8s backend's Jobs, and backend is "
                          f"{getattr(backend, 'name', '?')}", hint="add backend=k8s (and its backends.k8s settings)")
    if getattr(store, "scheme", "") != "pvc":
        raise ConfigError(f"export argo: the stages share results on a claim, and store is {store.url}",
                          hint="use a pvc:// store, e.g. store=pvc://mlflowctl/mnist")
    stages = _closure(pipeline, targets)
    image = backend.manifest_image()
    runner = runner or runner_image(pipeline)
    claim, _ = store.pod_volume("")
    claim_name = claim["persistentVolumeClaim"]["claimName"]
    base = store.base

    def workspace(stage_name: str) -> str:
        return f"{WORKSPACE}/{stage_name}"

    templates: dict[str, Any] = {}
    for name in stages:
        stage = pipeline.stages[name]
        env_params = _env_by_param(pipeline, stage)
        if stage.command:
            locations = {env: StoreLocation(store, workspace(up)) for env, up in stage.inputs}
            locations[stage.output] = StoreLocation(store, workspace(name), read_only=False)
            run = StageRun(stage=name, command=list(stage.command), workdir=project.stage_code_dir,
                           env=pipeline.stage_env(stage), replicas=pipeline.replicas(stage), inputs={}, outputs={},
                           locations=locations, log_path=Path("/dev/null"), key="argo")
            tfjob = run.replicas > 1
            manifest = (backend.tfjob_manifest if tfjob else backend.job_manifest)(run, "x", image)
            meta = manifest["metadata"]
            meta.pop("name", None)
            meta.pop("namespace", None)  # the Workflow's namespace
            meta["generateName"] = backend.job_name(run).rsplit("-", 1)[0] + "-"
            meta["labels"] = {k: v for k, v in meta["labels"].items() if k != "mlflowctl.io/key"}
            meta["labels"]["mlflowctl.io/argo-workflow"] = "{{workflow.name}}"
            pods = ([manifest["spec"]["tfReplicaSpecs"][r]["template"] for r in manifest["spec"]["tfReplicaSpecs"]]
                    if tfjob else [manifest["spec"]["template"]])
            for pod in pods:
                pod["metadata"]["labels"].pop("mlflowctl.io/key", None)
                for container in pod["spec"]["containers"]:
                    for item in container["env"]:
                        if item["name"] in env_params:
                            item["value"] = env_params[item["name"]]
            # success: the Job's pod, or the TFJob's Chief, succeeded; failure: the resource's own Failed
            # condition (a failed replica, the backoff limit, the deadline), as the k8s backend reads it
            ok = "status.replicaStatuses.Chief.succeeded > 0" if tfjob else "status.succeeded > 0"
            failed = FAILED_CONDITION
            templates[name] = (Resource, dict(
                name=_template_name(name), action="create", set_owner_reference=True,
                manifest=yaml.safe_dump(manifest, sort_keys=False), success_condition=ok, failure_condition=failed))
        else:
            env = [Env(name="MLFLOWCTL_ARGO_IMAGE", value=image),
                   Env(name="MLFLOWCTL_ARGO_WORKSPACE", value=f"{STORE_MOUNT}/{'/'.join(filter(None, [base, WORKSPACE]))}"),
                   Env(name="MLFLOWCTL_ARGO_INPUTS", value=json.dumps({e: up for e, up in stage.inputs})),
                   Env(name="MLFLOWCTL_ARGO_OUTPUT", value=name),
                   *[Env(name=f"MLFLOWCTL_ARGO_PARAM_{p.replace('-', '__')}", value="{{workflow.parameters.%s}}" % p)
                     for p, _, _, _ in parameters(pipeline)]]  # all: the action records its inputs' settings too
            templates[name] = (Container, dict(
                name=_template_name(name), image=runner, image_pull_policy=backend.setting("image_pull_policy"),
                command=["python", "-m", "mlflowctl_plugins.argo_step", name], env=env,
                volume_mounts=[{"name": "store", "mountPath": STORE_MOUNT},
                               # one .mlflowctl/ for every orchestrator step (and every workflow of this
                               # project): which version the serving target deployed, its routing, as on a laptop
                               {"name": "store", "mountPath": f"{RUNNER_PROJECT}/{STATE_DIR}",
                                "subPath": "/".join(filter(None, [base, STATE]))}]))
    project_name = str(project.name)
    with Workflow(
        generate_name=f"mlflowctl-{_dns(project_name)}-", entrypoint="pipeline", namespace=None,
        arguments=[Parameter(name=n, value=v, description=d) for n, _, v, d in parameters(pipeline)],
        volumes=[ExistingVolume(name="store", claim_name=claim_name)],
        labels={"app.kubernetes.io/managed-by": "mlflowctl", "mlflowctl.io/project": _dns(project_name)},
        service_account_name=backend.setting("service_account") or None,
    ) as workflow:
        made = {name: kind(**kwargs) for name, (kind, kwargs) in templates.items()}
        with DAG(name="pipeline"):
            for name in stages:
                deps = [_template_name(up) for up in pipeline.stages[name].upstream if up in stages]
                Task(name=_template_name(name), template=made[name], dependencies=deps or None)
    doc = workflow.to_dict()
    doc.setdefault("metadata", {}).pop("namespace", None)
    return doc


def _template_name(stage: str) -> str:
    return _dns(stage)


def _dns(text: str) -> str:
    from mlflowctl_plugins.kube import dns_name

    return dns_name(text)


def _closure(pipeline: Any, targets: list[str] | None) -> list[str]:
    """The stages ``targets`` need (all of them without targets), in the pipeline's order."""
    names = list(pipeline.stages)
    if not targets:
        return names
    unknown = [t for t in targets if t not in pipeline.stages]
    if unknown:
        raise ConfigError(f"export argo: no stage {unknown[0]!r}", hint=f"stages: {', '.join(names)}")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += pipeline.stages[name].upstream
    return [n for n in names if n in needed]


def write(doc: dict[str, Any], out: str | None) -> str | None:
    """YAML to ``out`` (written whole, or not at all) or returned for stdout."""
    import os
    import tempfile

    import yaml

    text = yaml.safe_dump(doc, sort_keys=False)
    if not out or out == "-":
        return text
    path = Path(out)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"export argo: --out {out} is a folder", hint="give a file name, e.g. --out workflow.yaml")
    if not folder.is_dir():
        raise ConfigError(f"export argo: cannot write {out}: folder {folder} does not exist",
                          hint="create it, or choose another --out")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise ConfigError(f"export argo: cannot write {out}: {exc.strerror or exc}",
                          hint="choose a writable --out, or - for stdout") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, created_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"export argo: cannot write {out}: {exc.strerror or exc}",
                          hint="choose a writable --out, or - for stdout") from None
    return None


def runner_context(pipeline: Any, folder: Path, image: str = "") -> Path:
    """The build context of the runner image: ``docker build -t <runner image> folder``.

    The project image (``image``, default the k8s backend's) plus this mlflowctl (its source, installed
    without the heavy SDKs, which the orchestrator stages do not import) and the project's pipeline
    (``dodo.py``, ``tasks/``, ``mlflowctl.yaml``; ``image/`` for the code digests) under ``/project``."""
    import shutil

    import mlflowctl

    project = pipeline.project
    backend = project.backend
    image = image or backend.setting("image") or backend.images.image_ref()
    source = Path(mlflowctl.__file__).resolve().parent.parent
    if not (source / "setup.py").is_file():
        raise ConfigError(f"export argo: the runner image needs mlflowctl's source tree, and {source} has no setup.py",
                          hint="install mlflowctl from a checkout (pip install -e)")
    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mlflowctl", ".venv", ".git", "*.egg-info")
    src = folder / "mlflowctl-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for part in ("setup.py", "README.md", "mlflowctl", "plugins"):
        if (source / part).is_dir():
            shutil.copytree(source / part, src / part, ignore=ignore)
        elif (source / part).is_file():
            shutil.copy2(source / part, src / part)
    dest = folder / "project"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    for part in ("dodo.py", "mlflowctl.yaml", "tasks", "image"):
        path = Path(project.root) / part
        if path.is_dir():
            shutil.copytree(path, dest / part, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, dest / part)
    (folder / "Dockerfile").write_text(RUNNER_DOCKERFILE.format(image=image))
    return folder


def export(pipeline: Any, out: str | None, targets: list[str] | None = None, runner: str = "") -> str | None:
    try:
        doc = build_workflow(pipeline, targets, runner)
    except ImportError as exc:
        raise MlflowctlError(f"export argo needs Hera: {exc}", hint="pip install hera (mlflowctl's setup.py "
                                                                    "installs it)") from None
    return write(doc, out)
