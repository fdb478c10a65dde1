"""The ``docker`` runtime of the ``local`` serving target: the model server as a detached container.

The container is of the docker backend's image (``mlflowctl/<project>:<digest>``), named
``mlflowctl-<project>-serve-<port>``, on the host network (so it listens on 127.0.0.1 exactly like
the process, and ``POST /admin/reload`` comes from loopback), as your uid:gid, with the registry
folder (read-only) and ``.mlflowctl/serve/`` bind-mounted at the same paths. ``docker`` is imported
lazily.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl_plugins.local_serving_runtime import (
    SERVER_SCRIPT,
    STOP_TIMEOUT,
    RuntimeHost,
    port_in_use,
    read_json,
    slug,
)

LABEL_PROJECT = "mlflowctl.project"    # the docker backend's label: `mlflowctl prune` knows it
LABEL_ROLE = "mlflowctl.role"
LABEL_SERVE_DIR = "mlflowctl.serve-dir"  # which project folder's server a container is


class DockerRuntime:
    """The server as a detached container of the docker backend's image, on the host network.

    The registry folder (read-only) and ``.mlflowctl/serve/`` (routing.json) are bind-mounted at
    the paths they have here, so the server's arguments are the process runtime's. The container
    runs as your uid:gid (``backends.docker.user``) with ``HOME=/tmp``; its output is copied into
    ``server.log`` when it stops or fails (``docker logs <name>`` meanwhile).
    """

    name = "docker"
    missing_module_hint = "add the server's requirements to image/requirements.txt (the image is rebuilt)"

    def __init__(self, target: "RuntimeHost") -> None:
        self.target = target
        self.container: Any = None  # the container this object started
        self._backend: Any = None

    # -- the engine: through the docker backend (its settings, client, image and user) -----------
    @property
    def backend(self) -> Any:
        if self._backend is None:
            try:
                self._backend = self.target.project.backend_named("docker")
            except (MlflowctlError, AttributeError, KeyError, TypeError) as exc:
                raise ConfigError(f"serving.local.runtime=docker needs the docker backend plugin ({exc})",
                                  hint="set serving.local.runtime to process") from None
        return self._backend

    def client(self) -> Any:
        return self.backend.client()

    def container_name(self) -> str:
        """``mlflowctl-<project>-serve-<port>``: DNS-safe, at most 63 characters."""
        project = slug(str(getattr(self.target.project, "name", "") or ""))[:20].strip("-") or "project"
        return f"mlflowctl-{project}-serve-{int(self.target.setting('port'))}"

    def _get(self, ref: str) -> Any:
        """The container ``ref`` (id or name), or None when it is gone."""
        import docker.errors

        try:
            return self.client().containers.get(ref)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise UnavailableError(f"docker: cannot inspect container {ref}: {api_reason(exc)}") from None

    # -- the contract ------------------------------------------------------------------------------
    def alive(self, info: dict[str, Any]) -> bool:
        """Is the recorded container running? A record whose container exited or vanished is cleaned up."""
        ref = info.get("container")
        if not ref:
            return False
        container = self._get(ref)
        if container is not None and container.status == "running":
            return True
        if container is not None:
            self._dispose(container)
        if read_json(self.target.info_file, {}).get("container") == ref:  # not a newer server's record
            self.target.forget()
        return False

    def describe(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"pid": None, "container": info.get("container_name") or info.get("container")}

    def log_hint(self, info: dict[str, Any]) -> str:
        return f"docker logs {info.get('container_name') or info.get('container')}"

    def spawn(self, args: list[str], base: Path) -> dict[str, Any]:
        import docker.errors

        from mlflowctl_plugins.docker_container import BindMount, ContainerSpec

        t = self.target
        host, port = str(t.setting("host")), int(t.setting("port"))
        image = self.backend.ensure_image()
        tag = self.backend.build_info.get("tag") or image.id
        name = self.container_name()
        self._remove_leftover(name)
        if port_in_use(host, port):  # else another server on the port could answer our readiness probe
            raise UnavailableError(f"the model server cannot start: port {port} on {host} is already in use",
                                   hint=t.port_hint(port))
        serve_dir = t.dir.absolute()
        command = ["python", SERVER_SCRIPT, *args]
        with open(t.log_file, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting container {name} of {tag}: "
                      f"{' '.join(command)}\n".encode())
        try:
            spec = ContainerSpec(
                image=image.id, command=command, name=name, user=self.backend.user() or "", network="host",
                environment={"HOME": "/tmp", "PYTHONUNBUFFERED": "1",
                             "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")},
                mounts=[BindMount(source=os.path.realpath(base), target=str(base), read_only=True),
                        BindMount(source=os.path.realpath(serve_dir), target=str(serve_dir), read_only=False)],
                labels={LABEL_PROJECT: str(getattr(t.project, "name", "") or "project"), LABEL_ROLE: "serve",
                        LABEL_SERVE_DIR: str(serve_dir)})
            container = self.client().containers.run(**spec.sdk_kwargs())  # the one container specification
        except docker.errors.APIError as exc:
            leftover = self._get(name)  # created, but it would not start
            if leftover is not None:
                self._dispose(leftover)
            raise UnavailableError(f"cannot start the model server container {name} of {tag}: {api_reason(exc)}",
                                   hint="check backends.docker in mlflowctl.yaml") from None
        self.container = container
        return {"container": container.id, "container_name": name, "image": image.id, "image_tag": tag}

    def exit_code(self) -> int | None:
        """The exit code of the container :meth:`spawn` started, or None while it runs."""
        import docker.errors

        if self.container is None:
            return None
        try:
            self.container.reload()
        except docker.errors.NotFound:
            return -1
        if self.container.status in ("exited", "dead"):
            return int(self.container.attrs.get("State", {}).get("ExitCode", -1))
        return None

    def serves(self, ready: dict[str, Any]) -> bool:
        """The ready answer's pid is the container's; ours is the one if our container runs (the port was free)."""
        return self.exit_code() is None

    def discard(self, info: dict[str, Any]) -> None:
        container = self.container or (self._get(info["container"]) if info.get("container") else None)
        if container is not None:
            self._dispose(container)
        self.container = None

    def stop(self, info: dict[str, Any], timeout: float = STOP_TIMEOUT) -> None:
        import docker.errors

        container = self.container or (self._get(info["container"]) if info.get("container") else None)
        if container is None:
            return
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.stop(timeout=int(timeout))
        self._dispose(container)
        self.container = None

    def hangup(self, info: dict[str, Any]) -> None:
        container = self._get(info["container"]) if info.get("container") else None
        if container is not None:
            container.kill(signal="SIGHUP")  # docker-init passes it on to serve.py

    def sweep(self) -> None:
        """Remove this folder's server container when nothing records it (``.mlflowctl/serve`` was wiped)."""
        try:
            container = self._get(self.container_name())
        except UnavailableError:
            return
        if container is not None and container.labels.get(LABEL_SERVE_DIR) == str(self.target.dir.absolute()):
            with contextlib.suppress(Exception):
                container.stop(timeout=int(STOP_TIMEOUT))
            self._dispose(container)

    # -- helpers -------------------------------------------------------------------------------------
    def _remove_leftover(self, name: str) -> None:
        """A container of that name from an earlier server of this folder goes; anyone else's is an error."""
        container = self._get(name)
        if container is None:
            return
        if container.labels.get(LABEL_SERVE_DIR) != str(self.target.dir.absolute()):
            raise UnavailableError(f"the model server cannot start: a container named {name} exists "
                                   f"({container.status}, not this project folder's server)",
                                   hint=f"docker rm -f {name}, or set serving.local.port")
        with contextlib.suppress(Exception):
            container.stop(timeout=int(STOP_TIMEOUT))
        self._dispose(container)

    def _dispose(self, container: Any) -> None:
        """Copy the container's output into server.log, then remove it (a vanished container is fine)."""
        import docker.errors

        with contextlib.suppress(docker.errors.APIError, OSError):
            data = container.logs(stdout=True, stderr=True)
            with open(self.target.log_file, "ab") as log:
                log.write(data if not data or data.endswith(b"\n") else data + b"\n")
                log.write(f"--- container {container.name} ended\n".encode())
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


def api_reason(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc).strip().splitlines()[0][:300]
