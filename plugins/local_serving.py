"""The ``local`` serving target: mlflowctl's model server (``image/serve.py``) on this machine.

The server runs in one of two runtimes (``serving.local.runtime``):

* ``process`` -- a detached local process (its own session) of ``serving.local.python``;
* ``docker`` -- a detached container of the docker backend's image (``mlflowctl/<project>:<digest>``),
  named ``mlflowctl-<project>-serve-<port>``, on the host network (so it listens on 127.0.0.1
  exactly like the process, and ``POST /admin/reload`` comes from loopback), as your uid:gid,
  with the registry folder (read-only) and ``.mlflowctl/serve/`` bind-mounted at the same paths;
* ``k8s`` -- a Deployment + Service of the k8s backend's image in the cluster, the registry and the
  routing file on the store's volume (see ``k8s_serving.py``), reached through the API server;
* ``auto`` (default) -- ``docker`` or ``k8s`` when the project's backend is that, else ``process``.

Either way the server outlives the command that started it; ``mlflowctl serve stop`` ends it
(whatever the runtime it was started in: ``server.json`` records it). Everything about it lives
in ``.mlflowctl/serve/``:

* ``server.pid`` -- pid of the running server process (a stale one is detected and removed)
* ``server.json`` -- how it was started (runtime, container, host, port, base path), to reuse or restart it
* ``server.log`` -- its stdout and stderr (a container's are copied here when it stops or fails)
* ``routing.json`` -- the versions it loads, their labels and the canary weight;
  written atomically here, re-read by the server on ``POST /admin/reload`` (or ``SIGHUP``)

This module imports only the standard library at import time (``requests`` and ``docker``
lazily): the orchestrator never loads TensorFlow.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from mlflowctl import hookimpl
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus
from mlflowctl.state import pid_alive as _pid_alive

SERVER_SCRIPT = "serve.py"
STOP_TIMEOUT = 10.0
RUNTIMES = ("auto", "process", "docker", "k8s")
LABEL_PROJECT = "mlflowctl.project"    # the docker backend's label: `mlflowctl prune` knows it
LABEL_ROLE = "mlflowctl.role"
LABEL_SERVE_DIR = "mlflowctl.serve-dir"  # which project folder's server a container is


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _is_our_server(pid: int) -> bool:
    """Guard against pid reuse: on Linux, the process must be running serve.py."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.joinpath("self").exists():
        return True  # no /proc: trust the pid file
    try:
        return SERVER_SCRIPT.encode() in cmdline.read_bytes()
    except OSError:
        return False


def _log_gist(path: Path, offset: int = 0, lines: int = 3) -> str:
    """The last meaningful lines of the server log (from byte ``offset`` on), on one line."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return "no log"
    keep = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
    # prefer our own "serve: ..." lines and the final exception line over TF's chatter
    ours = [ln for ln in keep if ln.startswith("serve:") or "Error" in ln or "error" in ln]
    tail = (ours or keep)[-lines:]
    return " | ".join(tail)[-600:] or "empty log"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _port_in_use(host: str, port: int) -> bool:
    """Does something listen on ``host:port`` already? (the bind test ``serve.py`` fails on)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


# ------------------------------------------------------------------------------------ runtimes
# A runtime starts the server (``spawn``), tells whether the recorded one runs (``alive``), stops it
# (``stop``) and signals it (``hangup``). ``LocalServing`` does the rest -- routing, readiness, reloads --
# the same way for both. ``info`` is the content of server.json.
class _ProcessRuntime:
    """The server as a detached local process of ``serving.local.python``; ``server.pid`` names it."""

    name = "process"
    missing_module_hint = "install the server's requirements (image/requirements.txt) into serving.local.python"

    def __init__(self, target: "LocalServing") -> None:
        self.target = target
        self.proc: subprocess.Popen | None = None  # the server this object started

    def pid(self) -> int | None:
        """The pid of the running server, or None (a stale pid file is removed)."""
        pid_file = self.target.pid_file
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and _is_our_server(pid):
            return pid
        with contextlib.suppress(OSError):
            pid_file.unlink()
        return None

    def alive(self, info: dict[str, Any]) -> bool:
        return self.pid() is not None

    def describe(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"pid": self.pid(), "container": None}

    def log_hint(self, info: dict[str, Any]) -> str:
        return f"see {self.target.log_file}"

    def spawn(self, args: list[str], base: Path) -> dict[str, Any]:
        t = self.target
        script = Path(t.project.stage_code_dir) / SERVER_SCRIPT
        if not script.is_file():
            raise MlflowctlError(f"model server script {script} is missing", hint="is this an mlflowctl project folder?")
        python = str(t._cfg("python"))
        cmd = [python, str(script), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        with open(t.log_file, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=str(script.parent), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise UnavailableError(f"cannot start the model server with {python}: {exc.strerror or exc}",
                                       hint="set serving.local.python to an interpreter with tensorflow and uvicorn") from None
        self.proc = proc
        t.pid_file.write_text(f"{proc.pid}\n")
        return {"pid": proc.pid, "python": python}

    def exit_code(self) -> int | None:
        """The exit code of the server :meth:`spawn` started, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def serves(self, ready: dict[str, Any]) -> bool:
        """Is the server answering ready the one :meth:`spawn` started (not another on the port)?"""
        return self.proc is not None and ready.get("pid") == self.proc.pid

    def discard(self, info: dict[str, Any]) -> None:
        """Clean up after a server that exited by itself (a process leaves nothing behind)."""

    def stop(self, info: dict[str, Any], timeout: float = STOP_TIMEOUT) -> None:
        pid = self.pid()
        if pid is None and self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
        if pid is not None:
            self._terminate(pid, timeout)

    def hangup(self, info: dict[str, Any]) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    def _terminate(self, pid: int, timeout: float = STOP_TIMEOUT) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.1)
            else:
                time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
        if self.proc is not None and self.proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
            self.proc = None


class _DockerRuntime:
    """The server as a detached container of the docker backend's image, on the host network.

    The registry folder (read-only) and ``.mlflowctl/serve/`` (routing.json) are bind-mounted at
    the paths they have here, so the server's arguments are the process runtime's. The container
    runs as your uid:gid (``backends.docker.user``) with ``HOME=/tmp``; its output is copied into
    ``server.log`` when it stops or fails (``docker logs <name>`` meanwhile).
    """

    name = "docker"
    missing_module_hint = "add the server's requirements to image/requirements.txt (the image is rebuilt)"

    def __init__(self, target: "LocalServing") -> None:
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
        project = _slug(str(getattr(self.target.project, "name", "") or ""))[:20].strip("-") or "project"
        return f"mlflowctl-{project}-serve-{int(self.target._cfg('port'))}"

    def _get(self, ref: str) -> Any:
        """The container ``ref`` (id or name), or None when it is gone."""
        import docker.errors

        try:
            return self.client().containers.get(ref)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise UnavailableError(f"docker: cannot inspect container {ref}: {_api_reason(exc)}") from None

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
        if _read_json(self.target.info_file, {}).get("container") == ref:  # not a newer server's record
            self.target._forget()
        return False

    def describe(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"pid": None, "container": info.get("container_name") or info.get("container")}

    def log_hint(self, info: dict[str, Any]) -> str:
        return f"docker logs {info.get('container_name') or info.get('container')}"

    def spawn(self, args: list[str], base: Path) -> dict[str, Any]:
        import docker.errors
        from docker.types import Mount

        t = self.target
        host, port = str(t._cfg("host")), int(t._cfg("port"))
        image = self.backend.ensure_image()
        tag = self.backend.build_info.get("tag") or image.id
        name = self.container_name()
        self._remove_leftover(name)
        if _port_in_use(host, port):  # else another server on the port could answer our readiness probe
            raise UnavailableError(f"the model server cannot start: port {port} on {host} is already in use",
                                   hint=t._port_hint(port))
        serve_dir = t.dir.absolute()
        command = ["python", SERVER_SCRIPT, *args]
        with open(t.log_file, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting container {name} of {tag}: "
                      f"{' '.join(command)}\n".encode())
        try:
            container = self.client().containers.run(
                image.id, command, name=name, detach=True, init=True, stdin_open=False, tty=False,
                user=self.backend.user(), network_mode="host",
                environment={"HOME": "/tmp", "PYTHONUNBUFFERED": "1",
                             "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")},
                mounts=[Mount(target=str(base), source=os.path.realpath(base), type="bind", read_only=True),
                        Mount(target=str(serve_dir), source=os.path.realpath(serve_dir), type="bind",
                              read_only=False)],
                labels={LABEL_PROJECT: str(getattr(t.project, "name", "") or "project"), LABEL_ROLE: "serve",
                        LABEL_SERVE_DIR: str(serve_dir)},
            )
        except docker.errors.APIError as exc:
            leftover = self._get(name)  # created, but it would not start
            if leftover is not None:
                self._dispose(leftover)
            raise UnavailableError(f"cannot start the model server container {name} of {tag}: {_api_reason(exc)}",
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


def _api_reason(exc: Any) -> str:
    return str(getattr(exc, "explanation", None) or exc).strip().splitlines()[0][:300]


_RUNTIME_CLASSES: dict[str, type] = {"process": _ProcessRuntime, "docker": _DockerRuntime}


class LocalServing(ServingTarget):
    """Serve registry versions with ``image/serve.py`` (TF Serving REST + Open Inference V2 + drift)."""

    name = "local"
    description = ("mlflowctl's model server on this machine, as a process or (docker backend) a container "
                   "(TF Serving REST API, V2 API, drift metrics)")
    settings = {
        "host": Setting(str, "127.0.0.1", "address the model server listens on"),
        "port": Setting(int, 8501, "port of the model server (TF Serving's REST port by default)", min=1, max=65535),
        "grpc_port": Setting(int, 8500, "port of TF Serving's gRPC API (PredictionService, ModelService) on the same "
                                        "host; 0 turns gRPC off", min=0, max=65535),
        "batching": Setting(bool, False, "dynamic batching: concurrent requests of a version run as one model call"),
        "batch_window_us": Setting(int, 500, "microseconds the first request of a batch waits for others"),
        "max_batch": Setting(int, 64, "rows per batched model call"),
        "batch_queue": Setting(int, 1024, "requests waiting for a batch; more are answered 503 with Retry-After"),
        "max_body_bytes": Setting(int, 8 * 1024 * 1024, "largest request body the server accepts (413 above)"),
        "canary_weight": Setting(float, 0.0, "share (0..1) of unlabelled requests sent to the canary version",
                                 min=0, max=1),
        "start_timeout": Setting(float, 60.0, "seconds to wait for the server, or a version, to become ready"),
        "python": Setting(str, sys.executable, "Python interpreter that runs the server (needs tensorflow, uvicorn; "
                                               "process runtime)"),
        "runtime": Setting(str, "auto", "where the server runs: process, docker (a container of the docker "
                                        "backend's image, host network), k8s (a Deployment + Service in the "
                                        "cluster), or auto (the project's backend: docker, k8s, else process)",
                           choices=RUNTIMES),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self.dir = Path(project.state_dir) / "serve"
        self.pid_file = self.dir / "server.pid"
        self.info_file = self.dir / "server.json"
        self.log_file = self.dir / "server.log"
        self.routing_file = self.dir / "routing.json"
        self.lock_file = self.dir / "lock"
        self._runtimes: dict[str, Any] = {}

    # ------------------------------------------------------------------ settings and URLs
    def _cfg(self, key: str) -> Any:
        value = self.config.get(key) if isinstance(self.config, dict) else None
        return self.settings[key].default if value in (None, "") else value

    @property
    def model_name(self) -> str:
        return self.project.model_name

    @property
    def url(self) -> str:
        if self.runtime_name == "k8s":  # where Jobs in the cluster reach it
            return self._runtime("k8s").cluster_url()
        host = str(self._cfg("host"))
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{int(self._cfg('port'))}"

    def _predict_url(self, version: int | None = None, label: str | None = None) -> str:
        base = f"{self.url}/v1/models/{self.model_name}"
        if version is not None:
            return f"{base}/versions/{version}:predict"
        if label is not None:
            return f"{base}/labels/{label}:predict"
        return f"{base}:predict"

    def metrics_url(self) -> str | None:
        return f"{self.url}/metrics"

    def drift_url(self, version: int) -> str | None:
        """The server scores drift with each version's concept model (``GET /monitor/v1/models/<name>/drift``)."""
        return f"{self.url}/monitor/v1/models/{self.model_name}/drift"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the gRPC API (empty when gRPC is off), loopback for a wildcard host."""
        port = int(self._cfg("grpc_port"))
        if not port or self.runtime_name == "k8s":  # in a cluster the server runs without gRPC (not exposed yet)
            return ""
        return self.url[len("http://"):].rsplit(":", 1)[0] + f":{port}"

    # ------------------------------------------------------------------ runtimes
    @property
    def runtime_name(self) -> str:
        """The runtime a new server starts in (``auto`` resolved against the project's backend)."""
        name = str(self._cfg("runtime"))
        if name == "auto":
            config = getattr(self.project, "config", None)
            try:
                backend = config["backend"] if config is not None else None
            except (KeyError, TypeError):
                backend = None
            return backend if backend in ("docker", "k8s") else "process"
        if name not in RUNTIMES:
            raise ConfigError(f"serving.local.runtime: expected one of {', '.join(RUNTIMES)}, got {name!r}")
        return name

    def _runtime(self, name: str | None = None) -> Any:
        name = name or self.runtime_name
        if name not in self._runtimes:
            cls = _RUNTIME_CLASSES.get(name)
            if name == "k8s":
                from mlflowctl_plugins.k8s_serving import KubeServerRuntime as cls
            if cls is None:
                raise MlflowctlError(f"{self.info_file}: unknown runtime {name!r}",
                                     hint=f"stop that server by hand and remove {self.info_file}")
            self._runtimes[name] = cls(self)
        return self._runtimes[name]

    def _server(self) -> tuple[Any, dict[str, Any]] | None:
        """The running server: (the runtime it was started in, its server.json), or None.

        The runtime is the recorded one, not the configured one: ``mlflowctl serve stop`` stops a
        container started by ``doit backend=docker`` without repeating the override.
        """
        info = _read_json(self.info_file, {})
        if not isinstance(info, dict):
            info = {}
        runtime = self._runtime(info.get("runtime") or "process")
        return (runtime, info) if runtime.alive(info) else None

    # ------------------------------------------------------------------ routing file
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise routing changes between mlflowctl processes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+") as fh:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - not POSIX
                yield
                return
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _routing(self) -> dict[str, Any]:
        data = _read_json(self.routing_file, None)
        if not isinstance(data, dict):
            data = {}
        versions = sorted({int(v) for v in data.get("versions", []) if isinstance(v, int)})
        labels = {str(k): int(v) for k, v in (data.get("labels") or {}).items()
                  if isinstance(v, int) and v in versions}
        weight = data.get("canary_weight", self._cfg("canary_weight"))
        return {"versions": versions, "labels": labels, "canary_weight": float(weight or 0.0)}

    def _write_routing(self, routing: dict[str, Any]) -> None:
        _write_json_atomic(self.routing_file, routing)

    # ------------------------------------------------------------------ the server
    def _active_runtime(self) -> Any:
        info = _read_json(self.info_file, {})
        return self._runtime((info.get("runtime") if isinstance(info, dict) else None) or self.runtime_name)

    def _get(self, path: str, timeout: float = 2.0) -> Any:
        import requests

        runtime = self._active_runtime()
        if hasattr(runtime, "request"):  # a server in a cluster: through the API server
            return runtime.request("GET", path.lstrip("/"), timeout=timeout)
        return requests.get(f"{self._server_url()}{path}", timeout=timeout)

    def _server_url(self) -> str:
        """The URL of the running server (as started, which may differ from the current settings)."""
        info = _read_json(self.info_file, {})
        return info.get("url") or self.url

    def _ready(self, serves: Any = None) -> bool:
        """Does the server answer ready -- and, given ``serves(answer)``, is it ours (not another on the port)?"""
        import requests

        try:
            r = self._get("/v2/health/ready", timeout=1.0)
            if r.status_code != 200:
                return False
            return serves is None or bool(serves(r.json()))
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def _base_path(self) -> Path:
        try:
            return Path(self.project.store.fetch(f"models/{self.model_name}")).resolve()
        except (FileNotFoundError, KeyError) as exc:
            raise MlflowctlError(f"nothing to serve: model {self.model_name!r} has no registered version ({exc})",
                                 hint="run the pipeline (mlflowctl run) to train and register one") from None

    def _port_hint(self, port: int) -> str:
        return f"stop what listens on port {port} (mlflowctl serve stop) or set serving.local.port"

    def _model_base(self, runtime: Any) -> Any:
        """Where the server finds the registry: a local folder, or (a cluster runtime) a store path."""
        return runtime.base_path() if hasattr(runtime, "base_path") else self._base_path()

    def _server_args(self) -> list[str]:
        """The server's arguments from the settings (after model, base path and routing file)."""
        port, grpc_port = int(self._cfg("port")), int(self._cfg("grpc_port"))
        if not 0 <= grpc_port <= 65535 or grpc_port == port:
            raise ConfigError(f"serving.local.grpc_port must be 0 (gRPC off) or a port other than serving.local.port, "
                              f"got {grpc_port}")
        return ["--host", str(self._cfg("host")), "--port", str(port),
                "--max-body-bytes", str(int(self._cfg("max_body_bytes"))),
                "--grpc-port", str(grpc_port), "--batching", "on" if self._cfg("batching") else "off",
                "--batch-window-us", str(int(self._cfg("batch_window_us"))),
                "--max-batch", str(int(self._cfg("max_batch"))), "--batch-queue", str(int(self._cfg("batch_queue")))]

    def _spawn(self) -> None:
        runtime = self._runtime()
        host, port = str(self._cfg("host")), int(self._cfg("port"))
        base = self._model_base(runtime)
        args = ["--model-name", self.model_name, "--base-path", str(base), "--routing", str(self.routing_file),
                *self._server_args()]
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            offset = self.log_file.stat().st_size
        except OSError:
            offset = 0
        info = {"runtime": runtime.name, "host": host, "port": port, "url": self.url,
                "grpc": self.grpc_target, "server_args": args[6:],  # a change of these restarts the server
                "base_path": str(base), "started_at": time.time(), "model_name": self.model_name}
        info.update(runtime.spawn(args, base))
        _write_json_atomic(self.info_file, info)
        deadline = time.monotonic() + float(self._cfg("start_timeout"))
        while True:
            code = runtime.exit_code()
            if code is not None:
                runtime.discard(info)
                self._forget()
                gist = _log_gist(self.log_file, offset)
                hint = f"see {self.log_file}"
                if "gRPC port" in gist:
                    hint = f"stop what listens on port {self._cfg('grpc_port')} or set serving.local.grpc_port (0 turns gRPC off)"
                elif "already in use" in gist:
                    hint = self._port_hint(port)
                elif "No module named" in gist:
                    hint = runtime.missing_module_hint
                raise UnavailableError(f"the model server exited at start (code {code}): {gist}", hint=hint)
            if self._ready(runtime.serves):
                return
            if time.monotonic() > deadline:
                runtime.stop(info)
                self._forget()
                raise UnavailableError(
                    f"the model server did not become ready within {self._cfg('start_timeout'):g}s: "
                    f"{_log_gist(self.log_file, offset)}",
                    hint=f"see {self.log_file}; raise serving.local.start_timeout if loading is just slow")
            time.sleep(0.2)

    def _forget(self) -> None:
        for f in (self.pid_file, self.info_file):
            with contextlib.suppress(OSError):
                f.unlink()

    def _log_hint(self) -> str:
        server = self._server()
        return server[0].log_hint(server[1]) if server else f"see {self.log_file}"

    def _running_matches(self) -> bool:
        """Does the running server serve this project's model from the current base path and port, in the
        configured runtime?"""
        info = _read_json(self.info_file, {})
        if info.get("model_name") != self.model_name or info.get("url") != self.url:
            return False
        if (info.get("runtime") or "process") != self.runtime_name:
            return False
        if info.get("server_args") != self._server_args():  # gRPC port or batching changed
            return False
        try:
            return info.get("base_path") == str(self._model_base(self._runtime()))
        except MlflowctlError:
            return True

    def _reload(self) -> dict[str, Any]:
        """Make the running server re-read routing.json; returns its view of the versions."""
        import requests

        runtime = self._active_runtime()
        if hasattr(runtime, "push_routing"):  # a server in a cluster reads its routing from the store
            runtime.push_routing()
            return runtime.wait_routing(self._routing(), float(self._cfg("start_timeout")))

        try:
            r = requests.post(f"{self._server_url()}/admin/reload", timeout=float(self._cfg("start_timeout")))
        except requests.RequestException as exc:
            server = self._server()
            if server is None:
                raise UnavailableError(f"the model server is not running ({exc.__class__.__name__})",
                                       hint="mlflowctl serve start") from None
            server[0].hangup(server[1])  # fall back to the signal
            return {}
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200:
            raise MlflowctlError(f"the model server refused the new routing: {body.get('error', r.text[:200])}")
        return body

    def _ensure_running(self) -> None:
        """Start the server, or make the running one pick up routing.json (restarting it if it is stale)."""
        server = self._server()
        if server is not None and not self._running_matches():
            server[0].stop(server[1])
            self._forget()
            server = None
        if server is None:
            self._spawn()
        else:
            self._reload()

    def _wait_available(self, number: int) -> None:
        import requests

        deadline = time.monotonic() + float(self._cfg("start_timeout"))
        last = "no answer"
        while True:
            try:
                r = self._get(f"/v1/models/{self.model_name}/versions/{number}")
                if r.status_code == 200:
                    st = r.json()["model_version_status"][0]
                    if st["state"] == "AVAILABLE":
                        return
                    last = f"state {st['state']}"
                    if st["state"] == "END":
                        msg = st.get("status", {}).get("error_message") or "unloaded"
                        raise MlflowctlError(f"the model server could not load version {number} of "
                                             f"{self.model_name}: {msg}", hint=self._log_hint())
                else:
                    last = r.json().get("error", f"HTTP {r.status_code}")
            except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise UnavailableError(f"version {number} of {self.model_name} did not become available within "
                                       f"{self._cfg('start_timeout'):g}s ({last})", hint=self._log_hint())
            time.sleep(0.2)

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        if not (Path(self.project.stage_code_dir) / SERVER_SCRIPT).is_file():
            raise MlflowctlError(f"model server script {Path(self.project.stage_code_dir) / SERVER_SCRIPT} is missing")
        if self.runtime_name == "docker":
            self._runtime("docker").client()  # the daemon answers (else: one line and a hint)
        elif self.runtime_name == "k8s":
            self._runtime("k8s").backend.preflight()  # the cluster answers, the store is mountable

    def start(self) -> Endpoint | None:
        with self._locked():
            routing = self._routing()
            if not self.routing_file.exists():
                routing = self._seed_routing(routing)
                self._write_routing(routing)
            self._ensure_running()
        if not routing["versions"]:
            return None
        return self.endpoint()

    def _seed_routing(self, routing: dict[str, Any]) -> dict[str, Any]:
        """Without routing.json, serve what the registry labels say (if the project has a registry)."""
        try:
            labels = self.project.models.labels()
        except Exception:  # noqa: BLE001 - no registry (or no labels) is fine: the server serves the latest
            return routing
        labels = {str(k): int(v) for k, v in (labels or {}).items() if isinstance(v, int)}
        if labels:
            routing = {**routing, "versions": sorted(set(labels.values())), "labels": labels}
        return routing

    def stop(self) -> None:
        server = self._server()
        if server is not None:
            server[0].stop(server[1])
        elif self.runtime_name in ("docker", "k8s"):
            self._runtime(self.runtime_name).sweep()
        self._forget()

    def deploy(self, version: Any, label: str = "canary", weight: float = 0.0) -> Endpoint:
        number = int(version.number)
        name = getattr(version, "name", self.model_name)
        if name != self.model_name:
            raise MlflowctlError(f"this project serves model {self.model_name!r}, not {name!r}")
        if not 0.0 <= float(weight) <= 1.0:
            raise MlflowctlError(f"canary weight must be between 0 and 1, got {weight}")
        with self._locked():
            before = self._routing()
            routing = {"versions": sorted(set(before["versions"]) | {number}), "labels": dict(before["labels"]),
                       "canary_weight": before["canary_weight"]}
            if label:
                routing["labels"][label] = number
                if label == "canary":
                    routing["canary_weight"] = float(weight) if weight else float(self._cfg("canary_weight"))
            self._write_routing(routing)
            try:
                self._ensure_running()
                self._wait_available(number)
            except MlflowctlError:
                self._write_routing(before)  # roll back; the others keep answering
                with contextlib.suppress(MlflowctlError):
                    if self._server() is not None:
                        self._reload()
                raise
        return Endpoint(url=self.url, predict_url=self._predict_url(version=number), model_name=self.model_name,
                        version=number, protocol="tfserving", grpc=self.grpc_target)

    def set_label(self, label: str, version: int | None) -> None:
        with self._locked():
            routing = self._routing()
            if version is None:
                routing["labels"].pop(label, None)
            else:
                if int(version) not in routing["versions"]:
                    raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on the local server",
                                         hint=f"deploy it first (served: {routing['versions'] or 'none'})")
                routing["labels"][label] = int(version)
            self._write_routing(routing)
            if self._server() is not None:
                self._reload()

    def undeploy(self, version: int) -> None:
        with self._locked():
            routing = self._routing()
            number = int(version)
            routing["versions"] = [v for v in routing["versions"] if v != number]
            routing["labels"] = {k: v for k, v in routing["labels"].items() if v != number}
            self._write_routing(routing)
            if self._server() is not None:
                self._reload()

    def serves(self, version: int) -> bool:
        """One stdlib HTTP request (asked on every ``doit``): is ``version`` AVAILABLE, in the configured runtime?"""
        import urllib.request

        info = _read_json(self.info_file, {})
        if not info or (info.get("runtime") or "process") != self.runtime_name:
            return False
        runtime = self._runtime()
        if hasattr(runtime, "request"):  # in a cluster: one request through the API server
            try:
                r = runtime.request("GET", f"v1/models/{self.model_name}/versions/{int(version)}", timeout=5)
                states = r.json().get("model_version_status", []) if r.status_code == 200 else []
            except (MlflowctlError, ValueError):
                return False
            return any(str(s.get("state")) == "AVAILABLE" for s in states if isinstance(s, dict))
        url = f"{info.get('url') or self.url}/v1/models/{self.model_name}/versions/{int(version)}"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                states = json.loads(response.read()).get("model_version_status", [])
        except (OSError, ValueError, AttributeError):
            return False
        return any(str(s.get("state")) == "AVAILABLE" for s in states if isinstance(s, dict))

    def status(self) -> ServingStatus:
        import requests

        routing = self._routing()
        server = self._server()
        runtime, info = server if server is not None else (None, {})
        out = ServingStatus(
            target=self.name, running=False, model_name=self.model_name,
            versions=[VersionStatus(v, "STOPPED") for v in routing["versions"]],
            labels=dict(routing["labels"]), canary_weight=routing["canary_weight"],
            details={"pid": None, "container": None, "log": str(self.log_file),
                     "runtime": runtime.name if runtime is not None else self.runtime_name},
        )
        if runtime is None:
            return out
        out.details.update(runtime.describe(info))
        url = self._server_url()
        out.url, out.predict_url, out.metrics_url = url, f"{url}/v1/models/{self.model_name}:predict", f"{url}/metrics"
        out.grpc = info.get("grpc", "")
        try:
            r = self._get(f"/v1/models/{self.model_name}")
            out.running = True
            if r.status_code == 200:
                states = {int(s["version"]): s for s in r.json().get("model_version_status", [])}
                out.versions = [
                    VersionStatus(v, states[v]["state"] if v in states else "UNKNOWN",
                                  states[v].get("status", {}).get("error_message", "") if v in states else "")
                    for v in routing["versions"]
                ]
        except (requests.RequestException, ValueError, KeyError):
            out.error = f"the server {'container' if runtime.name == 'docker' else 'process'} runs but does not answer"
        return out

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:
        routing = self._routing()
        if version is not None:
            if int(version) not in routing["versions"]:
                raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on the local server",
                                     hint=f"served: {routing['versions'] or 'none'}")
            return Endpoint(self.url, self._predict_url(version=int(version)), self.model_name, int(version),
                            grpc=self.grpc_target)
        if label is not None:
            if label not in routing["labels"]:
                raise MlflowctlError(f"no version of {self.model_name} has the label {label!r}",
                                     hint=f"labels: {routing['labels'] or 'none'}")
            return Endpoint(self.url, self._predict_url(label=label), self.model_name, routing["labels"][label],
                            grpc=self.grpc_target)
        if not routing["versions"]:
            raise MlflowctlError(f"no version of {self.model_name} is deployed on the local server",
                                 hint="mlflowctl run (or deploy a version) first")
        number = routing["labels"].get("stable", max(routing["versions"]))
        return Endpoint(self.url, self._predict_url(), self.model_name, number, grpc=self.grpc_target)


@hookimpl
def mlflowctl_add_serving_targets(registry: Any) -> None:
    registry.add_serving_target(LocalServing)
