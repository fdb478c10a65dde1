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
import json
import sys
import time
from pathlib import Path
from typing import Any

from mlflowctl import hookimpl
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus
from mlflowctl_plugins.local_serving_client import ServerClient, ServerUnreachable
from mlflowctl_plugins.local_serving_docker import LABEL_PROJECT, LABEL_ROLE, LABEL_SERVE_DIR, DockerRuntime
from mlflowctl_plugins.local_serving_process import ProcessRuntime
from mlflowctl_plugins.local_serving_routing import RoutingFile
from mlflowctl_plugins.local_serving_runtime import (
    SERVER_SCRIPT,
    STOP_TIMEOUT,
    is_our_server,
    log_gist,
    port_in_use,
    read_json,
    slug,
    write_json_atomic,
)

RUNTIMES = ("auto", "process", "docker", "k8s")
_RUNTIME_CLASSES: dict[str, type] = {"process": ProcessRuntime, "docker": DockerRuntime}

# the names these had before the split (kept for code that imported them from here)
_ProcessRuntime, _DockerRuntime = ProcessRuntime, DockerRuntime
_read_json, _write_json_atomic, _is_our_server, _log_gist, _slug, _port_in_use = (
    read_json, write_json_atomic, is_our_server, log_gist, slug, port_in_use)
__all__ = ["LABEL_PROJECT", "LABEL_ROLE", "LABEL_SERVE_DIR", "RUNTIMES", "SERVER_SCRIPT", "STOP_TIMEOUT", "LocalServing",
           "mlflowctl_add_serving_targets"]


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
        self.routes = RoutingFile(self.routing_file, self.lock_file, lambda: float(self.setting("canary_weight") or 0.0))
        self._runtimes: dict[str, Any] = {}

    # ------------------------------------------------------------------ settings and URLs
    def setting(self, key: str) -> Any:
        """``serving.local.<key>``, its default when unset."""
        value = self.config.get(key) if isinstance(self.config, dict) else None
        return self.settings[key].default if value in (None, "") else value

    @property
    def model_name(self) -> str:
        return self.project.model_name

    @property
    def url(self) -> str:
        if self.runtime_name == "k8s":  # where Jobs in the cluster reach it
            return self._runtime("k8s").cluster_url()
        host = str(self.setting("host"))
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{int(self.setting('port'))}"

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
        port = int(self.setting("grpc_port"))
        if not port or self.runtime_name == "k8s":  # in a cluster the server runs without gRPC (not exposed yet)
            return ""
        return self.url[len("http://"):].rsplit(":", 1)[0] + f":{port}"

    # ------------------------------------------------------------------ runtimes
    @property
    def runtime_name(self) -> str:
        """The runtime a new server starts in (``auto`` resolved against the project's backend)."""
        name = str(self.setting("runtime"))
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
        info = read_json(self.info_file, {})
        if not isinstance(info, dict):
            info = {}
        runtime = self._runtime(info.get("runtime") or "process")
        return (runtime, info) if runtime.alive(info) else None

    # ------------------------------------------------------------------ routing file
    def _routing(self) -> dict[str, Any]:
        return self.routes.read()

    def _write_routing(self, routing: dict[str, Any]) -> None:
        self.routes.write(routing)

    # ------------------------------------------------------------------ the server
    def _active_runtime(self) -> Any:
        info = read_json(self.info_file, {})
        return self._runtime((info.get("runtime") if isinstance(info, dict) else None) or self.runtime_name)

    def _client(self) -> ServerClient:
        """HTTP to the running server (or, in a cluster, through its runtime)."""
        return ServerClient(self._active_runtime(), self._server_url(), self.model_name)

    def _server_url(self) -> str:
        """The URL of the running server (as started, which may differ from the current settings)."""
        info = read_json(self.info_file, {})
        return info.get("url") or self.url

    def _base_path(self) -> Path:
        try:
            return Path(self.project.store.fetch(f"models/{self.model_name}")).resolve()
        except (FileNotFoundError, KeyError) as exc:
            raise MlflowctlError(f"nothing to serve: model {self.model_name!r} has no registered version ({exc})",
                                 hint="run the pipeline (mlflowctl run) to train and register one") from None

    def port_hint(self, port: int) -> str:
        return f"stop what listens on port {port} (mlflowctl serve stop) or set serving.local.port"

    def _model_base(self, runtime: Any) -> Any:
        """Where the server finds the registry: a local folder, or (a cluster runtime) a store path."""
        return runtime.base_path() if hasattr(runtime, "base_path") else self._base_path()

    def _server_args(self) -> list[str]:
        """The server's arguments from the settings (after model, base path and routing file)."""
        port, grpc_port = int(self.setting("port")), int(self.setting("grpc_port"))
        if not 0 <= grpc_port <= 65535 or grpc_port == port:
            raise ConfigError(f"serving.local.grpc_port must be 0 (gRPC off) or a port other than serving.local.port, "
                              f"got {grpc_port}")
        return ["--host", str(self.setting("host")), "--port", str(port),
                "--max-body-bytes", str(int(self.setting("max_body_bytes"))),
                "--grpc-port", str(grpc_port), "--batching", "on" if self.setting("batching") else "off",
                "--batch-window-us", str(int(self.setting("batch_window_us"))),
                "--max-batch", str(int(self.setting("max_batch"))), "--batch-queue", str(int(self.setting("batch_queue")))]

    def _spawn(self) -> None:
        runtime = self._runtime()
        host, port = str(self.setting("host")), int(self.setting("port"))
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
        write_json_atomic(self.info_file, info)
        deadline = time.monotonic() + float(self.setting("start_timeout"))
        while True:
            code = runtime.exit_code()
            if code is not None:
                runtime.discard(info)
                self.forget()
                gist = log_gist(self.log_file, offset)
                hint = f"see {self.log_file}"
                if "gRPC port" in gist:
                    hint = f"stop what listens on port {self.setting('grpc_port')} or set serving.local.grpc_port (0 turns gRPC off)"
                elif "already in use" in gist:
                    hint = self.port_hint(port)
                elif "No module named" in gist:
                    hint = runtime.missing_module_hint
                raise UnavailableError(f"the model server exited at start (code {code}): {gist}", hint=hint)
            if self._client().ready(runtime.serves):
                return
            if time.monotonic() > deadline:
                runtime.stop(info)
                self.forget()
                raise UnavailableError(
                    f"the model server did not become ready within {self.setting('start_timeout'):g}s: "
                    f"{log_gist(self.log_file, offset)}",
                    hint=f"see {self.log_file}; raise serving.local.start_timeout if loading is just slow")
            time.sleep(0.2)

    def forget(self) -> None:
        """Drop the record of the running server (server.pid, server.json)."""
        for f in (self.pid_file, self.info_file):
            with contextlib.suppress(OSError):
                f.unlink()

    def _log_hint(self) -> str:
        server = self._server()
        return server[0].log_hint(server[1]) if server else f"see {self.log_file}"

    def _running_matches(self) -> bool:
        """Does the running server serve this project's model from the current base path and port, in the
        configured runtime?"""
        info = read_json(self.info_file, {})
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
        runtime = self._active_runtime()
        if hasattr(runtime, "push_routing"):  # a server in a cluster reads its routing from the store
            runtime.push_routing()
            return runtime.wait_routing(self._routing(), float(self.setting("start_timeout")))
        try:
            return self._client().reload(float(self.setting("start_timeout")))
        except ServerUnreachable as exc:
            server = self._server()
            if server is None:
                raise UnavailableError(f"the model server is not running ({exc})", hint="mlflowctl serve start") from None
            server[0].hangup(server[1])  # fall back to the signal
            return {}

    def _ensure_running(self) -> None:
        """Start the server, or make the running one pick up routing.json (restarting it if it is stale).

        A restart checks the new settings first (valid arguments, a free port): a server that could
        not start never replaces the one that answers.
        """
        server = self._server()
        if server is not None and not self._running_matches():
            self._check_can_start(server[1])
            server[0].stop(server[1])
            self.forget()
            server = None
        if server is None:
            self._spawn()
        else:
            self._reload()

    def _check_can_start(self, running: dict[str, Any]) -> None:
        """Would a server with the current settings start? (else an error, and the running one stays)."""
        self._server_args()  # gRPC port vs port: a ConfigError
        if self.runtime_name == "k8s":
            return
        host, port, grpc_port = str(self.setting("host")), int(self.setting("port")), int(self.setting("grpc_port"))
        held = {int(running.get("port") or 0)}
        args = running.get("server_args") or []
        if "--grpc-port" in args:
            held.add(int(args[args.index("--grpc-port") + 1]))
        if port not in held and port_in_use(host, port):
            raise UnavailableError(f"the model server cannot move to port {port} on {host}: it is already in use; "
                                   f"the running server on port {running.get('port')} keeps serving",
                                   hint=self.port_hint(port))
        if grpc_port and grpc_port not in held and port_in_use(host, grpc_port):
            raise UnavailableError(f"the model server cannot move its gRPC API to port {grpc_port} on {host}: it is "
                                   f"already in use; the running server keeps serving",
                                   hint=f"stop what listens on port {grpc_port} or set serving.local.grpc_port "
                                        f"(0 turns gRPC off)")

    def _wait_available(self, number: int) -> None:
        self._client().wait_available(number, float(self.setting("start_timeout")), self._log_hint())

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        if not (Path(self.project.stage_code_dir) / SERVER_SCRIPT).is_file():
            raise MlflowctlError(f"model server script {Path(self.project.stage_code_dir) / SERVER_SCRIPT} is missing")
        if self.runtime_name == "docker":
            self._runtime("docker").client()  # the daemon answers (else: one line and a hint)
        elif self.runtime_name == "k8s":
            self._runtime("k8s").backend.preflight()  # the cluster answers, the store is mountable

    def start(self) -> Endpoint | None:
        with self.routes.locked():
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
        self.forget()

    def deploy(self, version: Any, label: str = "canary", weight: float = 0.0) -> Endpoint:
        number = int(version.number)
        name = getattr(version, "name", self.model_name)
        if name != self.model_name:
            raise MlflowctlError(f"this project serves model {self.model_name!r}, not {name!r}")
        if not 0.0 <= float(weight) <= 1.0:
            raise MlflowctlError(f"canary weight must be between 0 and 1, got {weight}")
        with self.routes.locked():
            before = self._routing()
            routing = {"versions": sorted(set(before["versions"]) | {number}), "labels": dict(before["labels"]),
                       "canary_weight": before["canary_weight"]}
            if label:
                routing["labels"][label] = number
                if label == "canary":
                    routing["canary_weight"] = float(weight) if weight else float(self.setting("canary_weight"))
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
        with self.routes.locked():
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
        with self.routes.locked():
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

        info = read_json(self.info_file, {})
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
            r = self._client().get(f"/v1/models/{self.model_name}")
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
