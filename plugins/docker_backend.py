"""The ``docker`` backend: every stage runs in a container of the project's image.

The image is built from the build context (``image/`` by default) and tagged
``mlflowctl/<project>:<context digest>``: the first 12 hex digits of a digest
of every file the build would send (``.dockerignore`` honoured) plus the
Dockerfile. A tag that already exists is reused without calling the builder,
so an unchanged context never rebuilds, and a changed script rebuilds only the
layers after its ``COPY`` (the requirements layer stays cached). The built
image's content id joins every stage's cache key (:meth:`DockerBackend.profile`).

A stage runs as ``docker run --init --user <uid>:<gid> --network host`` with
each input directory bind-mounted read-only at ``/mnt/inputs/<VAR>``, the
output directory read-write at ``/mnt/outputs/<VAR>``, and those container
paths in the variables; its output streams live, line by line. Cancelling
(Ctrl-C, ``run.cancelled``, the timeout) stops and removes the container.

The ``docker`` SDK is imported inside the methods that need it, so
``mlflowctl --help`` and ``doit list`` never import it.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from mlflowctl import hookimpl
from mlflowctl.backends import Backend, Cancelled, LogWriter, StageResult, StageRun
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError

POLL_SECONDS = 0.1
INPUTS_ROOT = "/mnt/inputs"
OUTPUTS_ROOT = "/mnt/outputs"
LABEL_PROJECT = "mlflowctl.project"
LABEL_STAGE = "mlflowctl.stage"
LABEL_KEY = "mlflowctl.key"
LABEL_DIGEST = "mlflowctl.context-digest"
# Never part of an image: Python caches and test/bench droppings in the stage code folder.
# (Also excluded from the digest, so running stages locally does not change the image tag.)
DEFAULT_IGNORE = ("**/__pycache__", "**/*.pyc", "**/*.pyo", "**/.pytest_cache", "**/.benchmarks", ".git")
# Bump when the digest recipe changes, so old tags are not taken for new contexts.
DIGEST_RECIPE = "mlflowctl-docker-context/1"
UNREACHABLE_HINT = "start it (e.g. `sudo dockerd &` or `make docker`) or set backends.docker.base_url"


# Containers started and not yet disposed of, for the exit hook: doit's parallel runner (-n) runs stages
# in daemon threads, which die with the interpreter on Ctrl-C before they can clean up after themselves.
_LIVE: dict[str, Any] = {}
_LIVE_LOCK = threading.Lock()
_EXIT_HOOK: list[bool] = []


def _track(container: Any) -> None:
    with _LIVE_LOCK:
        _LIVE[container.id] = container
        if not _EXIT_HOOK:
            import atexit

            atexit.register(_remove_live_containers)
            _EXIT_HOOK.append(True)


def _untrack(container: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(container.id, None)


def _remove_live_containers() -> None:
    """At interpreter exit: force-remove the stage containers whose run did not get to clean up."""
    with _LIVE_LOCK:
        left = list(_LIVE.values())
        _LIVE.clear()
    for container in left:
        _quiet(lambda c=container: c.remove(force=True))


class DockerBackend(Backend):
    """Runs each stage in a container of an image built (once, cached by content) from the stage code."""

    name = "docker"
    description = "stages run in containers of an image built from image/ (cached by content digest)"
    settings = {
        "base_url": Setting(str, "", "Docker daemon URL, e.g. unix:///var/run/docker.sock or tcp://host:2375 "
                                      "(empty: DOCKER_HOST or the default socket)"),
        "image": Setting(str, "", "use this image as is instead of building one "
                                  "(empty: build mlflowctl/<project>:<context digest>)"),
        "context": Setting(str, "image", "build context folder, relative to the project root"),
        "dockerfile": Setting(str, "Dockerfile", "Dockerfile, relative to the build context"),
        "network": Setting(str, "host", "network mode of builds and stage containers (host: proxies and "
                                        "loopback services work as on this machine)"),
        "cpus": Setting(float, 0.0, "CPUs per stage container (0: no limit)"),
        "memory": Setting(str, "", "memory limit per stage container, e.g. 4g (empty: no limit)"),
        "gpus": Setting(int, 0, "GPUs per stage container (needs the NVIDIA container toolkit)"),
        "user": Setting(str, "", "user:group stages run as (empty: yours, so outputs are not root-owned)"),
        "mounts": Setting(list, ["/usr/share/datasets:/usr/share/datasets:ro"],
                          "extra bind mounts host:container[:ro|rw]; host paths missing here are skipped"),
        "init": Setting(bool, True, "run an init process (docker --init) so stop signals reach the stage"),
        "stop_timeout": Setting(float, 3.0, "seconds between SIGTERM and SIGKILL when a stage is cancelled"),
        "keep_containers": Setting(bool, False, "keep finished stage containers (for docker logs/inspect)"),
        "pull": Setting(bool, False, "pull the base image when building (or `image` when it is missing)"),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self._lock = threading.RLock()
        self._client: Any = None
        self._image: Any = None          # docker Image of this run, once resolved
        self._context: ContextInfo | None = None
        #: how the image was obtained: tag, id, built (bool), seconds, lines (build output)
        self.build_info: dict[str, Any] = {}

    # -- settings ------------------------------------------------------------
    def setting(self, key: str) -> Any:
        value = self.config.get(key)
        return self.settings[key].default if value is None else value

    @property
    def project_name(self) -> str:
        return str(getattr(self.project, "name", "") or "project")

    @property
    def repository(self) -> str:
        """``mlflowctl/<project>``, the project name made a valid repository name."""
        return f"mlflowctl/{_slug(self.project_name, sep='-') or 'project'}"

    # -- the daemon ----------------------------------------------------------
    def daemon_url(self) -> str:
        return self.setting("base_url") or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    def client(self) -> Any:
        """The Docker client (created once; raises ``UnavailableError`` when the daemon does not answer)."""
        with self._lock:
            if self._client is None:
                import docker

                try:
                    base_url = self.setting("base_url")
                    if base_url:
                        client = docker.DockerClient(base_url=base_url, timeout=60, max_pool_size=32)
                    else:
                        client = docker.from_env(timeout=60, max_pool_size=32)
                    client.ping()
                except Exception as exc:  # DockerException, requests errors, OSError
                    raise UnavailableError(f"cannot reach the Docker daemon at {self.daemon_url()}: {_reason(exc)}",
                                           hint=UNREACHABLE_HINT) from None
                self._client = client
            return self._client

    def preflight(self) -> None:
        self.client()
        if not self.setting("image"):
            self.check_context()

    def check_context(self) -> None:
        """Raise ``ConfigError`` naming the path when the build context or its Dockerfile is missing."""
        root, dockerfile = self.context_dir(), self.dockerfile_path()
        if not root.is_dir():
            raise ConfigError(f"backends.docker.context: build context {root} is not a directory",
                              hint="set backends.docker.context (relative to the project root)")
        if not dockerfile.is_file():
            raise ConfigError(f"backends.docker.dockerfile: {dockerfile} not found",
                              hint="set backends.docker.dockerfile (relative to the build context)")

    # -- the image -------------------------------------------------------------
    def context_dir(self) -> Path:
        return (Path(self.project.root) / self.setting("context")).resolve()

    def dockerfile_path(self) -> Path:
        return (self.context_dir() / self.setting("dockerfile")).resolve()

    def context_info(self) -> "ContextInfo":
        """The build context's files and digest (computed once per process)."""
        with self._lock:
            if self._context is None:
                self.check_context()
                self._context = context_info(self.context_dir(), self.dockerfile_path())
            return self._context

    def image_ref(self) -> str:
        """The image stages run in: ``image`` if set, else ``mlflowctl/<project>:<context digest[:12]>``."""
        return self.setting("image") or f"{self.repository}:{self.context_info().digest[:12]}"

    def ensure_image(self, echo: Callable[[str], None] | None = None) -> Any:
        """The stage image, built if its tag does not exist yet (once per backend instance, thread-safe)."""
        with self._lock:
            if self._image is None:
                self._image = self._resolve_image(echo or _print_build_line)
            return self._image

    def _resolve_image(self, echo: Callable[[str], None]) -> Any:
        import docker.errors

        client = self.client()
        ref = self.image_ref()
        try:
            image = client.images.get(ref)
            self.build_info = {"tag": ref, "id": image.id, "built": False, "seconds": 0.0, "lines": []}
            return image
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            raise UnavailableError(f"docker: cannot inspect image {ref}: {_api_reason(exc)}") from None
        if self.setting("image"):
            if not self.setting("pull"):
                raise ConfigError(f"backends.docker.image: image {ref} is not on this Docker host",
                                  hint="build or load it, or set backends.docker.pull=true")
            try:
                image = client.images.pull(ref)
            except docker.errors.APIError as exc:
                raise UnavailableError(f"docker: cannot pull {ref}: {_api_reason(exc)}") from None
            self.build_info = {"tag": ref, "id": image.id, "built": False, "pulled": True, "seconds": 0.0, "lines": []}
            return image
        return self._build(ref, echo)

    def build_log_path(self) -> Path:
        return Path(self.project.state_dir) / "logs" / "docker-build.log"

    def _build(self, tag: str, echo: Callable[[str], None]) -> Any:
        import docker.errors
        import requests
        from docker.utils.build import create_archive

        ctx = self.context_info()
        log_path = self.build_log_path()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        image_id = None
        error = None
        started = time.monotonic()
        echo(f"building {tag} from {ctx.root} ({len(ctx.files)} files, network {self.setting('network')})")
        extra = [(ctx.dockerfile_name, ctx.dockerfile.read_text())] if ctx.dockerfile_outside else []
        with open(log_path, "w", encoding="utf-8") as log, \
                create_archive(str(ctx.root), files=ctx.tar_members, extra_files=extra) as fileobj:
            try:
                stream = self.client().api.build(
                    fileobj=fileobj, custom_context=True, dockerfile=ctx.dockerfile_name, tag=tag,
                    network_mode=self.setting("network"), rm=True, forcerm=True, decode=True,
                    pull=bool(self.setting("pull")),
                    labels={LABEL_PROJECT: self.project_name, LABEL_DIGEST: ctx.digest},
                )
                for chunk in _build_lines(stream):
                    kind, text = chunk
                    if kind == "id":
                        image_id = text
                        continue
                    if kind == "error":
                        error = text
                    lines.append(text)
                    log.write(text + "\n")
                    log.flush()
                    echo(text)
            except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
                error = _reason(exc)
        seconds = time.monotonic() - started
        if error is not None:
            tail = " | ".join(line.strip() for line in lines[-5:] if line.strip())
            raise MlflowctlError(f"docker build of {tag} failed: {tail or error}"[:1000],
                                 hint=f"full build log: {log_path}")
        try:
            image = self.client().images.get(image_id or tag)
        except docker.errors.APIError as exc:
            raise MlflowctlError(f"docker build of {tag} reported success but the image is missing: "
                                 f"{_api_reason(exc)}", hint=f"full build log: {log_path}") from None
        echo(f"built {tag} ({image.short_id}) in {seconds:.1f} s")
        self.build_info = {"tag": tag, "id": image.id, "built": True, "seconds": seconds, "lines": lines}
        return image

    def profile(self) -> dict[str, Any]:
        """What of the image joins every stage's key: its environment, not its stage scripts.

        The digest covers the Dockerfile, requirements and every other file of
        the build context except the top-level ``*.py`` stage scripts, which
        each stage already keys by its own ``code`` files. So a new base,
        new requirements or a changed Dockerfile re-run every stage, while a
        changed ``train_model.py`` rebuilds only the top layer and re-runs
        only the stages that depend on it. With a fixed ``image`` setting, the
        image's id is used instead. The backend's name is not part of it: a
        stage computed in a container is the same result wherever the same
        image ran it (the ``k8s`` backend keys its Jobs the same way).
        """
        if self.setting("image"):
            return {"image_digest": self.ensure_image().id}
        # no backend name: the k8s backend runs the same image and shares these results both ways
        return {"image_environment": self.context_info().environment_digest[:20]}

    # -- running a stage ---------------------------------------------------------
    def container_name(self, stage: str) -> str:
        """``mlflowctl-<project>-<stage>-<random>``: unique, DNS-safe, at most 63 characters."""
        project = _slug(self.project_name, sep="-")[:20].strip("-") or "project"
        stage = _slug(stage, sep="-")[:24].strip("-") or "stage"
        return f"mlflowctl-{project}-{stage}-{secrets.token_hex(4)}"

    def user(self) -> str:
        return self.setting("user") or f"{os.getuid()}:{os.getgid()}"

    def mounts(self, run: StageRun) -> list[tuple[str, str, bool]]:
        """(host path, container path, read only) of the stage's inputs, output and extra mounts."""
        mounts = [(os.path.realpath(path), f"{INPUTS_ROOT}/{var}", True) for var, path in run.inputs.items()]
        mounts += [(os.path.realpath(path), f"{OUTPUTS_ROOT}/{var}", False) for var, path in run.outputs.items()]
        for spec in self.setting("mounts") or []:
            host, target, read_only = _parse_mount(str(spec))
            if os.path.exists(host):
                mounts.append((os.path.realpath(host), target, read_only))
        return mounts

    def environment(self, run: StageRun) -> dict[str, str]:
        env = {"HOME": "/tmp", **run.env}
        env.update({var: f"{INPUTS_ROOT}/{var}" for var in run.inputs})
        env.update({var: f"{OUTPUTS_ROOT}/{var}" for var in run.outputs})
        return env

    def labels(self, run: StageRun) -> dict[str, str]:
        return {LABEL_PROJECT: self.project_name, LABEL_STAGE: run.stage, LABEL_KEY: run.key or ""}

    def run(self, run: StageRun) -> StageResult:
        import docker.errors
        from docker.types import DeviceRequest, Mount

        image = self.ensure_image()  # (not part of the stage's time or timeout)
        client = self.client()
        started = time.monotonic()
        name = self.container_name(run.stage)
        for spec in self.setting("mounts") or []:
            host, _, _ = _parse_mount(str(spec))
            if not os.path.exists(host) and spec not in self.settings["mounts"].default:
                run.emit(f"note: backends.docker.mounts: {host} does not exist here, not mounted")
        kwargs: dict[str, Any] = dict(
            image=image.id, command=list(run.command), name=name, detach=True,
            environment=self.environment(run), user=self.user(), network_mode=self.setting("network"),
            mounts=[Mount(target=target, source=host, type="bind", read_only=ro)
                    for host, target, ro in self.mounts(run)],
            labels=self.labels(run), init=bool(self.setting("init")), stdin_open=False, tty=False,
        )
        if self.setting("cpus"):
            kwargs["nano_cpus"] = int(float(self.setting("cpus")) * 1e9)
        if self.setting("memory"):
            kwargs["mem_limit"] = self.setting("memory")
        if self.setting("gpus"):
            kwargs["device_requests"] = [DeviceRequest(count=int(self.setting("gpus")), capabilities=[["gpu"]])]

        container = None
        status: dict[str, Any] = {}
        try:
            with LogWriter(run) as log:
                try:
                    container = client.containers.create(**kwargs)
                    _track(container)
                    container.start()
                except docker.errors.APIError as exc:
                    raise MlflowctlError(f"stage {run.stage}: cannot start container {name} from "
                                         f"{self.build_info.get('tag') or image.id}: {_api_reason(exc)}",
                                         hint="check backends.docker in mlflowctl.yaml") from None
                pump = _LogPump(container, log)
                reader = threading.Thread(target=pump.follow, daemon=True, name=f"logs-{name}")
                reader.start()
                done = threading.Event()
                waiter = threading.Thread(target=_wait_exit, args=(container, status, done), daemon=True,
                                          name=f"wait-{name}")
                waiter.start()
                try:
                    while not done.wait(POLL_SECONDS):
                        run.raise_if_stopped(started)
                except KeyboardInterrupt:
                    self._stop(container)
                    reader.join(timeout=2)
                    raise Cancelled(f"stage {run.stage} interrupted") from None
                except BaseException:
                    self._stop(container)
                    reader.join(timeout=2)
                    raise
                reader.join(timeout=10)
                if not reader.is_alive():
                    pump.finish()
                if "error" in status:
                    raise UnavailableError(f"stage {run.stage}: lost the container {name}: {status['error']}")
                exit_code = int(status.get("StatusCode", -1))
                if exit_code != 0:
                    try:
                        container.reload()
                        if container.attrs.get("State", {}).get("OOMKilled"):
                            log.line(f"container {name} was killed: out of memory "
                                     f"(backends.docker.memory={self.setting('memory') or 'unlimited'})")
                    except docker.errors.APIError:
                        pass
        finally:
            if container is None:  # interrupted between create and its return: find it by name
                container = _find_container(client, name)
            if container is not None:
                self._dispose(container, run)
                _untrack(container)
        detail = {"container": name, "image": image.id, "tag": self.build_info.get("tag", "")}
        return StageResult(exit_code, time.monotonic() - started, run.log_path, detail)

    def _stop(self, container: Any) -> None:
        """SIGTERM (through the init process), SIGKILL after stop_timeout; tolerate a vanished container."""
        import docker.errors

        try:
            container.stop(timeout=max(0, int(round(float(self.setting("stop_timeout"))))))
        except KeyboardInterrupt:
            _quiet(container.kill)
        except (docker.errors.APIError, docker.errors.NotFound):
            pass

    def _dispose(self, container: Any, run: StageRun) -> None:
        if self.setting("keep_containers"):
            run.emit(f"kept container {container.name} (docker logs {container.name}; docker rm {container.name})")
            return
        for _ in range(3):  # a second Ctrl-C must not leave the container behind
            try:
                _quiet(lambda: container.remove(force=True))
                return
            except KeyboardInterrupt:
                continue

    # -- rendering ---------------------------------------------------------------------
    def docker_run_args(self, run: StageRun, name: str | None = None) -> list[str]:
        """The ``docker run`` command line equivalent to what :meth:`run` does for ``run``."""
        args = ["docker"]
        if self.setting("base_url"):
            args += ["--host", self.setting("base_url")]
        args += ["run"]
        if not self.setting("keep_containers"):
            args.append("--rm")
        args += ["--name", name or self.container_name(run.stage)]
        if self.setting("init"):
            args.append("--init")
        args += ["--user", self.user(), "--network", self.setting("network")]
        if self.setting("cpus"):
            args += ["--cpus", f"{float(self.setting('cpus')):g}"]
        if self.setting("memory"):
            args += ["--memory", self.setting("memory")]
        if self.setting("gpus"):
            args += ["--gpus", str(int(self.setting("gpus")))]
        for key, value in sorted(self.labels(run).items()):
            args += ["--label", f"{key}={value}"]
        for key, value in sorted(self.environment(run).items()):
            args += ["--env", f"{key}={value}"]
        for host, target, ro in self.mounts(run):
            args += ["--mount", f"type=bind,source={host},target={target}" + (",readonly" if ro else "")]
        return args + [self.image_ref(), *run.command]

    def docker_build_args(self) -> list[str]:
        ctx = self.context_info()
        args = ["docker"] + (["--host", self.setting("base_url")] if self.setting("base_url") else [])
        return args + ["build", "--network", self.setting("network"), "--tag", self.image_ref(),
                       "--label", f"{LABEL_PROJECT}={self.project_name}", "--label", f"{LABEL_DIGEST}={ctx.digest}",
                       "--file", str(ctx.dockerfile), str(ctx.root)]

    def render(self, run: StageRun, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if not self.setting("image"):
            dockerfile = folder / "Dockerfile"
            shutil.copyfile(self.dockerfile_path(), dockerfile)
            written.append(dockerfile)
        script = folder / f"{run.stage}.sh"
        lines = ["#!/bin/sh", f"# stage {run.stage} in a container of {self.image_ref()} (mlflowctl docker backend)",
                 "set -e"]
        ref = shlex.quote(self.image_ref())
        if self.setting("image"):
            lines.append(f"docker image inspect {ref} >/dev/null 2>&1 || docker pull {ref}")
        else:
            lines.append(f"docker image inspect {ref} >/dev/null 2>&1 || {shlex.join(self.docker_build_args())}")
        lines.append("exec " + shlex.join(self.docker_run_args(run)))
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        return written + [script]

    # -- housekeeping --------------------------------------------------------------------
    def prune(self, keep: int = 1) -> list[str]:
        """Remove this project's images but the newest ``keep`` and the current one; return what was removed."""
        import docker.errors

        client = self.client()
        images = client.images.list(filters={"label": f"{LABEL_PROJECT}={self.project_name}"})
        images = [im for im in images if any(t.startswith(self.repository + ":") for t in im.tags)]
        images.sort(key=_created, reverse=True)
        protected = {im.id for im in images[:max(0, keep)]}
        try:
            protected.add(client.images.get(self.image_ref()).id)
        except (docker.errors.ImageNotFound, MlflowctlError):
            pass
        in_use = {c.attrs.get("Image") for c in client.containers.list(all=True)}
        removed = []
        for image in images:
            if image.id in protected or image.id in in_use:
                continue
            for tag in image.tags:
                try:
                    client.images.remove(tag, noprune=False)
                    removed.append(tag)
                except docker.errors.APIError:
                    pass
        return removed

    def prune_containers(self, running: bool = False) -> list[str]:
        """Remove this project's leftover stage containers (``running=True``: running ones too)."""
        return remove_leftover_containers(self.client(), self.project_name, running=running)


def remove_leftover_containers(client: Any = None, project: str | None = None, running: bool = False) -> list[str]:
    """Remove stage containers labelled ``mlflowctl.project`` (of ``project``, or of every project).

    Running containers (a pipeline in progress) are left alone unless ``running``.
    """
    import docker
    import docker.errors

    client = client or docker.from_env()
    label = f"{LABEL_PROJECT}={project}" if project else LABEL_PROJECT
    removed = []
    for container in client.containers.list(all=True, filters={"label": label}):
        if container.status in ("running", "restarting") and not running:
            continue
        try:
            container.remove(force=True)
            removed.append(container.name)
        except docker.errors.APIError:
            pass
    return removed


# -- the build context ---------------------------------------------------------------------
class ContextInfo:
    """The files of a build context (after ``.dockerignore``) and their digest."""

    def __init__(self, root: Path, dockerfile: Path, files: list[str], digest: str) -> None:
        self.root = root
        self.dockerfile = dockerfile
        self.files = files              # regular files and symlinks, relative, sorted
        self.digest = digest
        try:
            self.dockerfile_name = dockerfile.relative_to(root).as_posix()
            self.dockerfile_outside = False
        except ValueError:
            self.dockerfile_name = ".mlflowctl.Dockerfile"
            self.dockerfile_outside = True
        self.tar_members: list[str] = []  # files and directories sent to the builder
        self.environment_digest = digest  # the context without the stage scripts (see is_stage_script)


def is_stage_script(rel: str) -> bool:
    """Top-level ``*.py`` files are stage code: each stage keys the ones it runs by their own digests."""
    return "/" not in rel and rel.endswith(".py")


def read_dockerignore(root: Path) -> list[str]:
    try:
        text = (root / ".dockerignore").read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def context_info(root: Path, dockerfile: Path) -> ContextInfo:
    """Digest the context as the builder will see it: sorted paths, kinds, exec bits, contents, and the Dockerfile."""
    from docker.utils.build import exclude_paths

    patterns = list(DEFAULT_IGNORE) + read_dockerignore(root)
    try:
        df_rel = dockerfile.relative_to(root).as_posix()
    except ValueError:
        df_rel = None
    members = sorted(exclude_paths(str(root), patterns, dockerfile=df_rel or "Dockerfile"))
    h = hashlib.sha256(DIGEST_RECIPE.encode() + b"\0")
    env = hashlib.sha256(DIGEST_RECIPE.encode() + b"\0environment\0")
    files = []
    for rel in members:
        path = root / rel
        if path.is_symlink():
            entry = {"path": rel, "link": os.readlink(path)}
        elif path.is_file():
            with open(path, "rb") as f:
                content = hashlib.file_digest(f, "sha256").hexdigest()
            entry = {"path": rel, "exec": bool(path.stat().st_mode & 0o111), "sha256": content}
        else:
            continue
        files.append(rel)
        h.update(json.dumps(entry, sort_keys=True).encode() + b"\n")
        if not is_stage_script(rel):
            env.update(json.dumps(entry, sort_keys=True).encode() + b"\n")
    h.update(b"dockerfile\0" + dockerfile.read_bytes())
    env.update(b"dockerfile\0" + dockerfile.read_bytes())
    info = ContextInfo(root, dockerfile, files, h.hexdigest())
    info.environment_digest = env.hexdigest()
    info.tar_members = members
    return info


# -- helpers ---------------------------------------------------------------------------------
def _slug(text: str, sep: str = "-") -> str:
    return re.sub(r"[^a-z0-9]+", sep, text.lower()).strip(sep)


def _parse_mount(spec: str) -> tuple[str, str, bool]:
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("ro")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith("/") or parts[2] not in ("ro", "rw"):
        raise ConfigError(f"backends.docker.mounts: {spec!r}: expected host:container[:ro|rw], "
                          "with an absolute container path")
    return os.path.expanduser(parts[0]), parts[1], parts[2] == "ro"


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _created(image: Any) -> str:
    """An image's creation time as a sortable string (the API trims trailing zeros of the nanoseconds)."""
    stamp = str(image.attrs.get("Created", "")).rstrip("Z")
    whole, _, frac = stamp.partition(".")
    return f"{whole}.{frac[:9]:0<9}"


def _print_build_line(text: str) -> None:
    print(f"[docker build] {text}", flush=True)


def _build_lines(stream: Iterable[dict[str, Any]]) -> Iterable[tuple[str, str]]:
    """("line", text) / ("error", text) / ("id", image id) from the builder's JSON stream."""
    pending = ""
    for item in stream:
        if "error" in item:
            if pending:
                yield "line", pending
                pending = ""
            detail = item.get("errorDetail", {}).get("message") or item["error"]
            yield "error", str(detail).strip()
            continue
        aux = item.get("aux")
        if isinstance(aux, dict) and aux.get("ID"):
            yield "id", aux["ID"]
        text = item.get("stream")
        if text is None and item.get("status"):
            text = " ".join(str(item[k]) for k in ("id", "status", "progress") if item.get(k)) + "\n"
        if not text:
            continue
        pending += _ANSI.sub("", text)
        *complete, pending = re.split(r"\r?\n", pending)
        for line in complete:
            if line.strip():
                yield "line", line
    if pending.strip():
        yield "line", pending


class _LogPump:
    """Follow the container's stdout+stderr and hand complete lines to the log writer.

    The daemon's follow stream can end before the last bytes a container wrote
    (typically a final line without a newline) are delivered; :meth:`finish`
    compares with the complete log and passes on what the stream missed.
    """

    def __init__(self, container: Any, log: LogWriter) -> None:
        self.container = container
        self.log = log
        self.seen = 0
        self.pending = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        self.pending += self.decoder.decode(chunk)
        *complete, self.pending = self.pending.split("\n")
        for line in complete:
            self.log.line(line.rstrip("\r"))

    def follow(self) -> None:
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                self.feed(chunk)
        except Exception:  # the container was removed under us (cancel) or the stream broke
            pass

    def finish(self) -> None:
        """After the container exited and :meth:`follow` returned: what the stream missed, then the last line."""
        try:
            full = self.container.logs(stdout=True, stderr=True, stream=False)
        except Exception:  # noqa: BLE001 - the log is as complete as it can be
            full = b""
        if len(full) > self.seen:
            self.feed(full[self.seen:])
        self.pending += self.decoder.decode(b"", final=True)
        if self.pending:
            self.log.line(self.pending.rstrip("\r"))
            self.pending = ""


def _wait_exit(container: Any, status: dict[str, Any], done: threading.Event) -> None:
    try:
        status.update(container.wait())
    except Exception as exc:  # pragma: no cover - daemon died or container removed
        status["error"] = _reason(exc)
    finally:
        done.set()


def _find_container(client: Any, name: str) -> Any:
    try:
        found = client.containers.list(all=True, filters={"name": f"^/?{name}$"})
    except Exception:  # noqa: BLE001 - nothing more we can do
        return None
    return found[0] if found else None


def _quiet(fn: Callable[[], Any]) -> None:
    import docker.errors

    try:
        fn()
    except (docker.errors.APIError, docker.errors.NotFound):
        pass
    except Exception:  # connection trouble while cleaning up: nothing better to do
        pass


def _api_reason(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc).strip().splitlines()[0][:300]


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a connection failure (the innermost OS error if there is one)."""
    seen, cur, inner = set(), exc, None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            inner = cur.strerror
        for arg in getattr(cur, "args", ()):
            if isinstance(arg, BaseException) and id(arg) not in seen:
                reason = getattr(arg, "reason", None)
                if isinstance(reason, BaseException):
                    cur_arg = reason
                else:
                    cur_arg = arg
                if isinstance(cur_arg, OSError) and cur_arg.strerror:
                    inner = cur_arg.strerror
        cur = cur.__cause__ or cur.__context__
    if inner:
        return inner
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    match = re.search(r"(\[Errno -?\d+\] [^'\")]+|Connection refused|No such file or directory|timed out)", text)
    return (match.group(1) if match else text)[:300]


@hookimpl
def mlflowctl_add_backends(registry: Any) -> None:
    registry.add_backend(DockerBackend)
