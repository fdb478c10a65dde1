"""The ``docker`` backend: every stage runs in a container of the project's image.

Three modules, one concern each: :mod:`docker_image` (the build context's digest, building the image),
:mod:`docker_container` (ONE container specification, :class:`ContainerSpec`, used by :meth:`DockerBackend.run`,
:meth:`DockerBackend.render` and meant for the model server's docker runtime; running a container to its end),
and this one, the backend: settings, the daemon, the stage's spec, its cache-key profile, housekeeping.

A stage runs as ``docker run --init --user <uid>:<gid> --network host`` with
each input directory bind-mounted read-only at ``/mnt/inputs/<VAR>``, the
output directory read-write at ``/mnt/outputs/<VAR>``, and those container
paths in the variables; its output streams live, line by line. Cancelling
(Ctrl-C, ``run.cancelled``, the timeout) stops and removes the container.

The ``docker`` SDK is imported inside the methods that need it, so
``mlflowctl --help`` and ``doit list`` never import it.
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mlflowctl import hookimpl
from mlflowctl.backends import Backend, StageResult, StageRun
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl_plugins.docker_container import (  # noqa: F401 - re-exported: the backend's public names
    LABEL_KEY, LABEL_PROJECT, LABEL_STAGE, POLL_SECONDS, BindMount, ContainerSpec, _api_reason, _find_container,
    _quiet, _reason, dispose_container, remove_leftover_containers, run_container, stop_container,
)
from mlflowctl_plugins.docker_image import (  # noqa: F401 - re-exported
    DEFAULT_IGNORE, DIGEST_RECIPE, LABEL_DIGEST, ContextInfo, _print_build_line, build_args, build_image,
    context_info, is_stage_script, prune_images, read_dockerignore,
)

INPUTS_ROOT = "/mnt/inputs"
OUTPUTS_ROOT = "/mnt/outputs"
UNREACHABLE_HINT = "start it (e.g. `sudo dockerd &` or `make docker`) or set backends.docker.base_url"


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
        image, self.build_info = build_image(
            self.client(), self.context_info(), tag, network=self.setting("network"), pull=bool(self.setting("pull")),
            project=self.project_name, log_path=self.build_log_path(), echo=echo)
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

    def mounts(self, run: StageRun) -> list[BindMount]:
        """The stage's inputs (read only), outputs and the extra mounts that exist here."""
        mounts = [BindMount(os.path.realpath(path), f"{INPUTS_ROOT}/{var}", True) for var, path in run.inputs.items()]
        mounts += [BindMount(os.path.realpath(path), f"{OUTPUTS_ROOT}/{var}", False) for var, path in run.outputs.items()]
        for spec in self.setting("mounts") or []:
            host, target, read_only = _parse_mount(str(spec))
            if os.path.exists(host):
                mounts.append(BindMount(os.path.realpath(host), target, read_only))
        return mounts

    def environment(self, run: StageRun) -> dict[str, str]:
        env = {"HOME": "/tmp", **run.env}
        env.update({var: f"{INPUTS_ROOT}/{var}" for var in run.inputs})
        env.update({var: f"{OUTPUTS_ROOT}/{var}" for var in run.outputs})
        return env

    def labels(self, run: StageRun) -> dict[str, str]:
        return {LABEL_PROJECT: self.project_name, LABEL_STAGE: run.stage, LABEL_KEY: run.key or ""}

    def container_spec(self, run: StageRun, image: str | None = None, name: str | None = None) -> ContainerSpec:
        """The one specification of a stage's container, for :meth:`run` and :meth:`render` alike."""
        return ContainerSpec(
            image=image or self.image_ref(), command=list(run.command), name=name or self.container_name(run.stage),
            environment=self.environment(run), user=self.user(), network=self.setting("network"),
            mounts=self.mounts(run), labels=self.labels(run), init=bool(self.setting("init")),
            cpus=float(self.setting("cpus") or 0), memory=self.setting("memory") or "", gpus=int(self.setting("gpus") or 0),
            remove=not self.setting("keep_containers"))

    def run(self, run: StageRun) -> StageResult:
        image = self.ensure_image()  # (not part of the stage's time or timeout)
        client = self.client()
        started = time.monotonic()
        for spec in self.setting("mounts") or []:
            host, _, _ = _parse_mount(str(spec))
            if not os.path.exists(host) and spec not in self.settings["mounts"].default:
                run.emit(f"note: backends.docker.mounts: {host} does not exist here, not mounted")
        container = self.container_spec(run, image=image.id)
        exit_code = run_container(client, container, run, shown_image=self.build_info.get("tag") or image.id,
                                  stop_timeout=float(self.setting("stop_timeout")),
                                  keep=bool(self.setting("keep_containers")),
                                  memory_note=f"backends.docker.memory={self.setting('memory') or 'unlimited'}")
        detail = {"container": container.name, "image": image.id, "tag": self.build_info.get("tag", "")}
        return StageResult(exit_code, time.monotonic() - started, run.log_path, detail)

    # -- rendering ---------------------------------------------------------------------
    def docker_run_args(self, run: StageRun, name: str | None = None) -> list[str]:
        """The ``docker run`` command line equivalent to what :meth:`run` does for ``run`` (the same spec)."""
        return self.container_spec(run, name=name).cli_args(self.setting("base_url"))

    def docker_build_args(self) -> list[str]:
        return build_args(self.context_info(), self.image_ref(), network=self.setting("network"),
                          project=self.project_name, base_url=self.setting("base_url"))

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
        try:
            current: str | None = self.image_ref()
        except MlflowctlError:
            current = None
        return prune_images(self.client(), self.project_name, self.repository, current, keep)

    def prune_containers(self, running: bool = False) -> list[str]:
        """Remove this project's leftover stage containers (``running=True``: running ones too)."""
        return remove_leftover_containers(self.client(), self.project_name, running=running)


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



@hookimpl
def mlflowctl_add_backends(registry: Any) -> None:
    registry.add_backend(DockerBackend)
