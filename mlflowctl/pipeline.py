"""Stages, their cache keys, and running one stage through the backend and the store.

A stage's cache key is the digest of exactly what decides its result: its
command, its code files, its parameters (after overrides), the backend's
profile, and the digests of its inputs' published results. A stage is up to
date when the store holds a complete result under that key, whoever put it
there, so any backend and any machine sharing the store share the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflowctl.backends import LogWriter, StageResult, StageRun, StoreLocation
from mlflowctl.config import Setting, public, stage_env, stage_sections
from mlflowctl.errors import Cancelled, ConfigError, MlflowctlError, StageFailed
from mlflowctl.stores import MANIFEST

RESULTS = "results"
KEY_LENGTH = 20


@dataclass(frozen=True)
class Registration:
    """What a registering stage copies into a new model version, by input (the stage's env var naming it).

    ``servable``: (input, folder in it) whose content becomes the version's top level (what a server loads);
    ``concept``: (input, folder in it) copied to ``concept/`` (the drift model, optional);
    ``files``: (input, file in it, path in the version) copied if present;
    ``metrics``: ``{metadata key: (input, JSON file in it)}`` read into the version's ``metadata.json``.
    The version's metadata also gets the params, code, input and result digests of the servable's and the
    concept's stage (from their results' manifests).
    """

    servable: tuple[str, str]
    concept: tuple[str, str] | None = None
    files: tuple[tuple[str, str, str], ...] = ()
    metrics: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def as_params(self) -> dict[str, Any]:
        return {"servable": list(self.servable), "concept": list(self.concept) if self.concept else None,
                "files": [list(f) for f in self.files], "metrics": {k: list(v) for k, v in sorted(self.metrics.items())}}


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, declared by the project (``tasks/``).

    Either ``command`` (run by the backend, from the stage code folder) or
    ``action`` (run in the orchestrator, for light steps that only move
    files or talk to a registry or a server) is set. ``settings`` are the
    stage's own section of ``mlflowctl.yaml`` (named after the stage, or
    ``params``): type, default, range and help of each key, and the
    environment variable the stage sees it as. A stage that reads another
    stage's section (or a core one, ``serving``) names it with ``params``
    and declares nothing.
    """

    name: str
    command: tuple[str, ...] = ()
    code: tuple[str, ...] = ()                  # files under image/ whose content is part of the key
    inputs: tuple[tuple[str, str], ...] = ()    # (env var, upstream stage)
    output: str = "OUTPUT_DIR"                  # env var naming the output directory
    settings: Mapping[str, Setting] = field(default_factory=dict)  # the stage's own config section
    params: str | None = None                   # config section (default: the stage name, if it declares settings)
    action: Callable[..., None] | None = None   # action(project, ctx: ActionContext)
    still_valid: Callable[..., bool] | None = None  # still_valid(project, result_dir): for results that
    #                                                 stand for outside state (a deployment), is it still so?
    #                                                 If not, the stage runs again; its new output replaces the
    #                                                 result only if its files differ (else downstream stays valid)
    superseded: Callable[..., None] | None = None  # superseded(project, ours, theirs): another run published
    #                                                the same key first; undo what only our output stands for
    keys: tuple[str, ...] = ()                      # top-level config keys that are part of the key (model_name)
    doc: str = ""
    replicas: str | None = None  # the setting of the section giving how many copies of ``command`` run as one
    #                              distributed job (StageRun.replicas); None: always one
    pass_env: tuple[str, ...] = ()  # variables of the orchestrator's environment a local stage sees as they are
    #                                 (names or patterns; not in the key: caches, credentials, never results)
    registers: Registration | None = None  # a registering action: which input is the servable, which the concept
    #                                        model (see mlflowctl.model_registry.register_model)

    @property
    def section(self) -> str | None:
        if self.params is not None:
            return self.params
        return self.name if self.settings else None

    @property
    def upstream(self) -> list[str]:
        return [up for _, up in self.inputs]


@dataclass
class ActionContext:
    """What an in-process stage action gets: local input dirs, its output dir, a log."""

    stage: str
    inputs: dict[str, Path]
    output: Path
    log: LogWriter
    components: dict[str, Any]  # what the stage's cache key was made of
    registration: Registration | None = None  # Stage.registers
    producers: dict[str, str] = field(default_factory=dict)  # input env var -> the stage that produced it


@dataclass
class KeyInfo:
    """A stage's cache key and the parts it was made of (``key`` is None while an input is missing)."""

    stage: str
    key: str | None
    components: dict[str, Any]
    missing_inputs: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{RESULTS}/{self.stage}/{self.key}"


_file_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, memoised on (path, mtime, size) for the life of the process."""
    st = path.stat()
    memo_key = (str(path), st.st_mtime_ns, st.st_size)
    digest = _file_digests.get(memo_key)
    if digest is None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        _file_digests[memo_key] = digest
    return digest


def digest_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Pipeline:
    """The stages of a project, resolved against its store and backend."""

    def __init__(self, project: Any, stages: list[Stage] | tuple[Stage, ...] | None = None) -> None:
        self.project = project
        if stages is None:
            stages = project.stages
        self.stages = {s.name: s for s in stages}
        # result digests by stage, valid until a stage of this pipeline publishes (run() clears it)
        self._digests: dict[str, str | None] = {}
        for s in stages:
            for _, up in s.inputs:
                if up not in self.stages:
                    raise MlflowctlError(f"stage {s.name}: input from unknown stage {up!r}")
        for s in stages:  # a replica count the backend cannot run fails before any stage runs
            if s.command:
                self.replicas(s)

    # -- keys -------------------------------------------------------------
    def code_digests(self, stage: Stage) -> dict[str, str]:
        digests = {}
        for rel in stage.code:
            path = self.project.stage_code_dir / rel
            try:
                digests[rel] = file_digest(path)
            except FileNotFoundError:
                raise MlflowctlError(f"stage {stage.name}: code file {path} not found") from None
        if stage.action is not None:
            src = Path(stage.action.__code__.co_filename)
            digests[f"action:{stage.action.__module__}.{stage.action.__qualname__}"] = file_digest(src)
        if stage.section == "serving":  # a stage acting through the serving target: its code (and the
            digests.update(target_code_digests(self.project.serving))  # files it serves with) join the key
        return digests

    def params(self, stage: Stage) -> dict[str, Any]:
        section = stage.section
        extra = {k: self.project.config[k] for k in stage.keys}
        if stage.registers is not None:
            extra["registers"] = stage.registers.as_params()
        if not section:
            return extra
        schema = self.project.config.schema
        if section not in schema:
            raise MlflowctlError(f"stage {stage.name}: reads the settings section {section!r}, which no stage of "
                                 f"this project declares", hint=f"declare its settings on the stage {section} "
                                                                f"(Stage(settings=...)) or fix params=")
        values = self.project.config[section]
        if section == "serving":  # only the selected target's settings matter
            values = {"target": values["target"], values["target"]: values.get(values["target"], {})}
        return {**public(values, schema[section]), **extra}

    def rerun_command(self, stage_name: str) -> str:
        """``doit STAGE key=value ...``: the command that runs the stage again with this run's overrides."""
        import shlex

        overrides = getattr(self.project.config, "overrides", None) or {}
        return shlex.join(["doit", stage_name, *(f"{k}={v}" for k, v in overrides.items())])

    def result_digest(self, stage_name: str) -> str | None:
        """Digest of the stage's current complete result, or None if it has none yet."""
        if stage_name in self._digests:
            return self._digests[stage_name]
        info = self.resolve(self.stages[stage_name])
        digest = None
        if info.key is not None:
            try:
                manifest = self.project.store.read_json(f"{info.path}/{MANIFEST}")
            except MlflowctlError:  # damaged: the stage's own check removes it and it is computed again
                manifest = None
            digest = manifest.get("digest") if isinstance(manifest, dict) else None
        if digest is not None:  # a missing result may appear any moment; a present one stays
            self._digests[stage_name] = digest
        return digest

    def resolve(self, stage: Stage) -> KeyInfo:
        inputs, missing = {}, []
        for env, up in stage.inputs:
            digest = self.result_digest(up)
            inputs[up] = digest
            if digest is None:
                missing.append(up)
        components = {
            "stage": stage.name,
            "command": list(stage.command),
            "code": self.code_digests(stage),
            "params": self.params(stage),
            "backend": self.project.backend.profile() if stage.command else {"backend": "orchestrator"},
            "inputs": inputs,
        }
        key = None if missing else digest_json(components)[:KEY_LENGTH]
        return KeyInfo(stage.name, key, components, missing)

    def intact(self, stage: Stage, info: KeyInfo, deep: bool = False) -> bool:
        """Does the stage's published result match its manifest? A damaged one is reported and removed,
        so it counts as missing and the stage computes it again."""
        store = self.project.store
        problem = store.damaged(info.path, deep=deep)
        if problem is None:
            return True
        print(f"mlflowctl: stage {stage.name}: result {info.key} is damaged ({problem}); removing it so it is "
              f"computed again", file=sys.stderr, flush=True)
        store.delete(info.path)
        self._digests.pop(stage.name, None)
        return False

    def is_complete(self, stage: Stage) -> bool:
        info = self.resolve(stage)
        if info.key is None or not self.project.store.exists(info.path) or not self.intact(stage, info):
            return False
        return stage.still_valid is None or bool(stage.still_valid(self.project, self.project.store.fetch(info.path)))

    def current_result(self, stage_name: str) -> Path:
        """A local directory with the stage's current result (raises if it has none)."""
        info = self.resolve(self.stages[stage_name])
        if (info.key is None or not self.project.store.exists(info.path)
                or not self.intact(self.stages[stage_name], info, deep=True)):
            raise MlflowctlError(f"stage {stage_name} has no current result", hint=self.rerun_command(stage_name))
        return self.project.store.fetch(info.path)

    # -- explaining -------------------------------------------------------
    def last_run_path(self, stage_name: str) -> Path:
        return self.project.state_dir / "stages" / f"{stage_name}.json"

    def run_state_path(self, stage_name: str) -> Path:
        """``{"state": "running"|"failed"|"succeeded", "key", "pid", "started_at", ...}`` of the latest run."""
        return self.project.state_dir / "stages" / f"{stage_name}.run.json"

    def _record_run_state(self, stage_name: str, **fields: Any) -> None:
        """Replace the run-state record at once (``mlflowctl ui`` reads it while a stage runs)."""
        path = self.run_state_path(stage_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(fields, sort_keys=True, default=str))
        os.replace(tmp, path)

    def explain(self, stage: Stage) -> tuple[bool, list[str]]:
        """(up to date?, reasons it will re-run)."""
        info = self.resolve(stage)
        if info.key is not None and self.project.store.exists(info.path):
            if self.is_complete(stage):
                return True, []
            if not self.project.store.exists(info.path):
                return False, ["its result was damaged (removed; it is computed again)"]
            return False, ["its result no longer holds (e.g. the model server is not running)"]
        if info.missing_inputs:
            return False, [f"input {up} will change first" for up in info.missing_inputs]
        try:
            last = json.loads(self.last_run_path(stage.name).read_text())
        except (OSError, ValueError):
            return False, ["never run with this store"]
        return False, diff_components(last.get("components", {}), info.components) or [
            "its result is not in the store (removed, or another store)"]

    # -- running ------------------------------------------------------------
    def run(self, stage_name: str) -> StageResult:
        """Run one stage to a published result; raise ``StageFailed`` if it fails."""
        stage = self.stages[stage_name]
        project, store = self.project, self.project.store
        info = self.resolve(stage)
        if info.key is None:
            raise MlflowctlError(f"stage {stage.name}: inputs {', '.join(info.missing_inputs)} have no result",
                                 hint=self.rerun_command(info.missing_inputs[0]))
        log_path = project.state_dir / "logs" / f"{stage.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        in_store = bool(stage.command) and getattr(project.backend, "runs_in_store", False)
        input_paths = {env: self.resolve(self.stages[up]).path for env, up in stage.inputs}
        staging = store.remote_staging(stage.name, key=info.key) if in_store else store.staging(stage.name)
        with staging as out:
            locations = {env: StoreLocation(store, path) for env, path in input_paths.items()}
            if in_store:  # the stage reads and writes the store itself (a pod with the store mounted)
                inputs, outputs = {}, {}
                locations[stage.output] = StoreLocation(store, out, read_only=False)
            else:
                inputs = {env: self.current_result(up) for env, up in stage.inputs}
                outputs = {stage.output: out}
            run = StageRun(
                stage=stage.name, command=list(stage.command), workdir=project.stage_code_dir,
                env=self.stage_env(stage), pass_env=stage.pass_env, replicas=self.replicas(stage), inputs=inputs, outputs=outputs, locations=locations,
                log_path=log_path, key=info.key,
            )
            hook = project.pm.hook
            begun = {"key": info.key, "pid": os.getpid(), "started_at": time.time()}
            self._record_run_state(stage.name, state="running", **begun)
            started = time.monotonic()
            try:
                hook.mlflowctl_before_stage(stage=stage.name, run=run)
            except BaseException as exc:  # a veto: the stage failed before it ran
                self._record_run_state(stage.name, state="failed", **begun, finished_at=time.time(),
                                       duration=0.0, error=str(exc) or type(exc).__name__)
                raise
            try:
                with _live(run):
                    if stage.action is not None:
                        result = self._run_action(stage, run, info, started)
                    else:
                        result = project.backend.run(run)
                if not result.ok:
                    tail = _tail(log_path)
                    raise StageFailed(
                        f"stage {stage.name} failed with exit code {result.exit_code}"
                        + (f": {tail}" if tail else ""),
                        hint=f"full log: {log_path}; re-run with: {self.rerun_command(stage.name)}")
                if run.cancelled.is_set():  # Ctrl-C/SIGTERM while an in-process action ran: publish nothing
                    raise Cancelled(f"stage {stage.name} cancelled")
                hook.mlflowctl_before_publish(stage=stage.name, run=run, path=info.path)
            except BaseException as exc:
                self._record_run_state(stage.name, state="failed", **begun, finished_at=time.time(),
                                       duration=round(time.monotonic() - started, 3),
                                       error=str(exc) or type(exc).__name__)
                hook.mlflowctl_on_stage_error(stage=stage.name, run=run, error=exc)
                raise
            manifest = {"stage": stage.name, "key": info.key, "components": info.components,
                        "duration": round(result.duration, 3), "finished_at": time.time(),
                        "run": {"backend": project.backend.name if stage.command else "orchestrator",
                                **{k: v for k, v in result.detail.items() if isinstance(v, (str, int, float, bool))}}}
            held = stage.still_valid is not None and store.exists(info.path)
            if held and not in_store and self._replaces(info, out):
                # it ran because its result no longer held, and says something else now (a promote after
                # mlflowctl rollback records the restored version): it replaces that one (the project's run lock
                # keeps other runs out meanwhile). The same content (a re-deploy) keeps the held result, so what
                # depends on it stays valid.
                store.delete(info.path)
                self._digests.clear()
                held = False
            if held:
                published = True  # restored what the held result describes (a re-deploy): that result stays
            elif in_store:
                store.put(log_path, f"{out}/_logs/{stage.name}.log")
                published = store.publish_staged(out, info.path, manifest=manifest)
            else:
                logs = out / "_logs"
                logs.mkdir(exist_ok=True)
                shutil.copyfile(log_path, logs / f"{stage.name}.log")
                published = store.publish(out, info.path, manifest=manifest)
            self._digests.clear()
            if not published:
                self._adopt(stage, info, out, log_path)
        record = self.last_run_path(stage.name)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"key": info.key, "components": info.components}, indent=2, sort_keys=True))
        self._record_run_state(stage.name, state="succeeded", **begun, finished_at=time.time(),
                               duration=round(result.duration, 3))
        hook.mlflowctl_after_stage(stage=stage.name, run=run, result=result)
        return result

    def _replaces(self, info: KeyInfo, out: Path) -> bool:
        """Do the files of the output ``out`` (logs aside) differ from those of the held result at ``info.path``?"""
        from mlflowctl.manifest import file_manifest

        def payload(files: dict[str, Any]) -> dict[str, Any]:
            return {name: entry.get("sha256") for name, entry in files.items() if not name.startswith("_logs/")}

        held = self.project.store.read_json(f"{info.path}/{MANIFEST}", default={}) or {}
        return payload(held.get("files") or {}) != payload(file_manifest(out)["files"])

    def _adopt(self, stage: Stage, info: KeyInfo, ours: Any, log_path: Path) -> None:
        """Another run published this key first: keep its result, say so, and undo what only ours stood for."""
        note = (f"mlflowctl: stage {stage.name}: another run published result {info.key} first; "
                f"using that one, this run's output is discarded")
        print(note, file=sys.stderr, flush=True)
        with contextlib.suppress(OSError), open(log_path, "a") as fh:
            fh.write(note + "\n")
        if stage.superseded is not None:
            local = ours if isinstance(ours, Path) else None
            stage.superseded(self.project, local, self.project.store.fetch(info.path))

    def render(self, folder: Path) -> list[Path]:
        """Write what the backend would execute for each command stage into ``folder``, running nothing.

        Inputs that have a result point at it; inputs still to be produced
        point at ``folder/pending/<stage>``; outputs go to ``folder/outputs/<stage>``.
        """
        written: list[Path] = []
        for stage in self.stages.values():
            if not stage.command:
                continue
            inputs, locations = {}, {}
            in_store = getattr(self.project.backend, "runs_in_store", False)
            for env, up in stage.inputs:
                info = self._resolve_for_render(self.stages[up])
                locations[env] = StoreLocation(self.project.store, info.path if info.key else f"pending/{up}")
                if not in_store:
                    try:
                        inputs[env] = self.current_result(up)
                    except MlflowctlError:
                        inputs[env] = folder / "pending" / up
            key = self._resolve_for_render(stage).key or ""
            locations[stage.output] = StoreLocation(self.project.store, f".staging/{stage.name}-{key or 'pending'}",
                                                    read_only=False)
            run = StageRun(stage=stage.name, command=list(stage.command), workdir=self.project.stage_code_dir,
                           env=self.stage_env(stage), pass_env=stage.pass_env, replicas=self.replicas(stage), inputs=inputs,
                           outputs={} if in_store else {stage.output: folder / "outputs" / stage.name},
                           locations=locations, log_path=folder / "logs" / f"{stage.name}.log", key=key)
            written += [p for p in self.project.backend.render(run, folder) if p not in written]
        return written

    def _resolve_for_render(self, stage: Stage) -> KeyInfo:
        """The stage's key, or none when the store cannot be read yet (rendering comes before set-up)."""
        try:
            return self.resolve(stage)
        except MlflowctlError:
            return KeyInfo(stage.name, None, {}, [up for _, up in stage.inputs])

    def run_uncached(self, stage_name: str, out: Path) -> StageResult:
        """Run a command stage now, whatever the cache says, writing into ``out`` (not the store).

        For stages that look at the outside world, such as ``monitor`` reading
        a server's live traffic: ``mlflowctl monitor`` runs it on demand.
        """
        stage = self.stages[stage_name]
        if not stage.command:
            raise MlflowctlError(f"stage {stage_name} runs in the orchestrator; run it with: "
                                 f"{self.rerun_command(stage_name)}")
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / "_logs" / f"{stage.name}.log"
        locations = {env: StoreLocation(self.project.store, self.resolve(self.stages[up]).path)
                     for env, up in stage.inputs}
        if getattr(self.project.backend, "runs_in_store", False):
            for env, up in stage.inputs:
                self.current_result(up)  # raises with a hint when an input has no result
            with self.project.store.remote_staging(stage.name) as staging:
                locations[stage.output] = StoreLocation(self.project.store, staging, read_only=False)
                run = StageRun(stage=stage.name, command=list(stage.command), workdir=self.project.stage_code_dir,
                               env=self.stage_env(stage), pass_env=stage.pass_env, replicas=self.replicas(stage), inputs={}, outputs={}, locations=locations,
                               log_path=log_path, key="uncached")
                with _live(run):
                    result = self.project.backend.run(run)
                self.project.store.get(staging, out)
                return result
        inputs = {env: self.current_result(up) for env, up in stage.inputs}
        run = StageRun(stage=stage.name, command=list(stage.command), workdir=self.project.stage_code_dir,
                       env=self.stage_env(stage), pass_env=stage.pass_env, replicas=self.replicas(stage), inputs=inputs, outputs={stage.output: out}, locations=locations,
                       log_path=log_path, key="uncached")
        with _live(run):
            return self.project.backend.run(run)

    def replicas(self, stage: Stage) -> int:
        """How many copies of the stage's command run together (1 unless the stage names a setting for it);
        a backend that cannot run several says so here, before anything runs."""
        if not stage.replicas or not stage.section:
            return 1
        count = int(self.project.config[stage.section][stage.replicas])
        backend = self.project.backend
        if count > 1 and not getattr(backend, "supports_replicas", False):
            raise ConfigError(f"{stage.section}.{stage.replicas}: {count}, but backend {backend.name} runs one "
                              f"process per stage", hint=f"set {stage.section}.{stage.replicas}: 1, or use a "
                                                         f"backend that runs replicas (local)")
        return count

    def stage_env(self, stage: Stage) -> dict[str, str]:
        """What the stage's process sees besides its folders: who it is, and its declared settings (a local
        backend adds an allowlist of its own environment and the stage's ``pass_env``, never the whole shell)."""
        env = {"STAGE_NAME": stage.name, "MLFLOWCTL_PROJECT": self.project.name,
               "MODEL_NAME": self.project.model_name, "PYTHONUNBUFFERED": "1"}
        declared = stage_sections(self.stages.values()).get(stage.section or "")
        if declared:
            env.update(stage_env(declared, self.project.config[stage.section]))
        return env

    def _run_action(self, stage: Stage, run: StageRun, info: KeyInfo, started: float) -> StageResult:
        with LogWriter(run) as log:
            ctx = ActionContext(stage.name, run.inputs, run.outputs[stage.output], log, info.components,
                                registration=stage.registers, producers=dict(stage.inputs))
            try:
                stage.action(self.project, ctx)
            except MlflowctlError as exc:
                log.line(f"error: {exc}")
                raise StageFailed(f"stage {stage.name} failed: {exc.message}", hint=exc.hint,
                                  exit_code=exc.exit_code) from exc
        return StageResult(0, time.monotonic() - started, run.log_path)


def target_code_digests(target: Any) -> dict[str, str]:
    """Digests of a serving target's own module and of the files it says it serves with
    (``code_files()``, optional): an updated target or server re-runs the stages that use it."""
    digests = {}
    module = getattr(sys.modules.get(type(target).__module__), "__file__", None)
    if module and Path(module).is_file():
        digests[f"target:{type(target).__module__}"] = file_digest(Path(module))
    code_files = getattr(target, "code_files", None)
    for path in (code_files() if callable(code_files) else ()):
        with contextlib.suppress(OSError):
            digests[f"target:{Path(path).name}"] = file_digest(Path(path))
    return digests


def diff_components(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human reasons for a key change: which param, code file, input or backend setting changed."""
    reasons = []
    for key in sorted(set(old.get("params", {})) | set(new.get("params", {}))):
        a, b = old.get("params", {}).get(key), new.get("params", {}).get(key)
        if a != b:
            reasons.append(f"param {key} changed: {a!r} -> {b!r}")
    for name in sorted(set(old.get("code", {})) | set(new.get("code", {}))):
        if old.get("code", {}).get(name) != new.get("code", {}).get(name):
            reasons.append(f"code {name.removeprefix('action:')} changed")
    for up in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        if old.get("inputs", {}).get(up) != new.get("inputs", {}).get(up):
            reasons.append(f"input {up} has a new result")
    if old.get("backend") != new.get("backend"):
        changed = sorted(k for k in set(old.get("backend", {})) | set(new.get("backend", {}))
                         if old.get("backend", {}).get(k) != new.get("backend", {}).get(k))
        reasons.append(f"backend changed ({', '.join(changed)})")
    if old.get("command") != new.get("command"):
        reasons.append("command changed")
    return reasons


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())[:400]


# -- cancellation: Ctrl-C reaches every live run, whichever thread runs it ----
_LIVE: dict[int, StageRun] = {}
_LIVE_LOCK = threading.Lock()
_INTERRUPTED = False


class _live:
    def __init__(self, run: StageRun) -> None:
        self.run = run

    def __enter__(self) -> None:
        with _LIVE_LOCK:
            _LIVE[id(self.run)] = self.run

    def __exit__(self, *exc: object) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(id(self.run), None)


def _on_sigint(signum: int, frame: Any) -> None:
    """First Ctrl-C (or SIGTERM): cancel every live run and let their stages fail cleanly; second: interrupt."""
    global _INTERRUPTED
    with _LIVE_LOCK:
        live = [run for run in _LIVE.values() if not run.cancelled.is_set()]
        for run in live:
            run.cancelled.set()
    if live and not _INTERRUPTED:
        _INTERRUPTED = True
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nmlflowctl: {what}: cancelling {', '.join(r.stage for r in live)} (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        return
    handler = _PREVIOUS_HANDLERS.get(signum)
    if callable(handler):
        handler(signum, frame)
    else:
        raise Interrupted(signum)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM when no stage process could be cancelled (between stages, in a hook, in an action
    already cancelled once): stops the run; every result is published whole or not at all."""

    def __init__(self, signum: int) -> None:
        self.what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        super().__init__(self.what)

    def line(self, stage: str | None = None) -> str:
        where = f" during stage {stage}" if stage else ""
        return (f"mlflowctl: {self.what}: stopped{where} (results are published whole or not at all; "
                f"a re-run continues from there)")


def _excepthook(kind: type, value: BaseException, tb: Any) -> None:
    """An interruption outside a stage (doit's own bookkeeping) is one line, not a traceback."""
    if isinstance(value, Interrupted):
        print(value.line(), file=sys.stderr, flush=True)
        return
    _PREVIOUS_EXCEPTHOOK[0](kind, value, tb)


_PREVIOUS_EXCEPTHOOK: list[Any] = []


_PREVIOUS_HANDLERS: dict[int, Any] = {}


def install_interrupt_handler() -> None:
    """Make Ctrl-C and SIGTERM (timeout, CI cancel, service managers) cancel every live stage run
    (their backends stop and clean up; nothing is published)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if sys.excepthook is not _excepthook:
        _PREVIOUS_EXCEPTHOOK[:] = [sys.excepthook]
        sys.excepthook = _excepthook
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is _on_sigint:
            continue
        _PREVIOUS_HANDLERS[signum] = current
        signal.signal(signum, _on_sigint)
