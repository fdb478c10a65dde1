"""The ``local`` serving target: mlflowctl's model server (``image/serve.py``) as a local process.

The server is started detached (its own session), so it outlives the command
that started it; ``mlflowctl serve stop`` ends it. Everything about it lives
in ``.mlflowctl/serve/``:

* ``server.pid`` -- pid of the running server (a stale one is detected and removed)
* ``server.json`` -- how it was started (host, port, base path), to reuse or restart it
* ``server.log`` -- its stdout and stderr
* ``routing.json`` -- the versions it loads, their labels and the canary weight;
  written atomically here, re-read by the server on ``POST /admin/reload`` (or ``SIGHUP``)

This module imports only the standard library at import time (``requests``
lazily): the orchestrator never loads TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from mlflowctl import hookimpl
from mlflowctl.config import Setting
from mlflowctl.errors import MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingTarget

SERVER_SCRIPT = "serve.py"
STOP_TIMEOUT = 10.0


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


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` runs (a zombie child of ours is reaped and counts as gone)."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


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


class LocalServing(ServingTarget):
    """Serve registry versions with ``image/serve.py`` (TF Serving REST + Open Inference V2 + drift)."""

    name = "local"
    description = "mlflowctl's model server as a local process (TF Serving REST API, V2 API, drift metrics)"
    settings = {
        "host": Setting(str, "127.0.0.1", "address the model server listens on"),
        "port": Setting(int, 8501, "port of the model server (TF Serving's REST port by default)"),
        "max_body_bytes": Setting(int, 8 * 1024 * 1024, "largest request body the server accepts (413 above)"),
        "canary_weight": Setting(float, 0.0, "share (0..1) of unlabelled requests sent to the canary version"),
        "start_timeout": Setting(float, 60.0, "seconds to wait for the server, or a version, to become ready"),
        "python": Setting(str, sys.executable, "Python interpreter that runs the server (needs tensorflow, uvicorn)"),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self.dir = Path(project.state_dir) / "serve"
        self.pid_file = self.dir / "server.pid"
        self.info_file = self.dir / "server.json"
        self.log_file = self.dir / "server.log"
        self.routing_file = self.dir / "routing.json"
        self.lock_file = self.dir / "lock"
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ settings and URLs
    def _cfg(self, key: str) -> Any:
        value = self.config.get(key) if isinstance(self.config, dict) else None
        return self.settings[key].default if value in (None, "") else value

    @property
    def model_name(self) -> str:
        return self.project.model_name

    @property
    def url(self) -> str:
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

    # ------------------------------------------------------------------ process
    def _pid(self) -> int | None:
        """The pid of the running server, or None (a stale pid file is removed)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and _is_our_server(pid):
            return pid
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        return None

    def _get(self, path: str, timeout: float = 2.0) -> Any:
        import requests

        return requests.get(f"{self._server_url()}{path}", timeout=timeout)

    def _server_url(self) -> str:
        """The URL of the running server (as started, which may differ from the current settings)."""
        info = _read_json(self.info_file, {})
        return info.get("url") or self.url

    def _ready(self, pid: int | None = None) -> bool:
        """Does the server answer ready -- and, given ``pid``, is it that process (not another on the port)?"""
        import requests

        try:
            r = self._get("/v2/health/ready", timeout=1.0)
            if r.status_code != 200:
                return False
            return pid is None or r.json().get("pid") == pid
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def _base_path(self) -> Path:
        try:
            return Path(self.project.store.fetch(f"models/{self.model_name}")).resolve()
        except (FileNotFoundError, KeyError) as exc:
            raise MlflowctlError(f"nothing to serve: model {self.model_name!r} has no registered version ({exc})",
                                 hint="run the pipeline (mlflowctl run) to train and register one") from None

    def _spawn(self) -> int:
        host, port = str(self._cfg("host")), int(self._cfg("port"))
        base = self._base_path()
        script = Path(self.project.stage_code_dir) / SERVER_SCRIPT
        if not script.is_file():
            raise MlflowctlError(f"model server script {script} is missing", hint="is this an mlflowctl project folder?")
        python = str(self._cfg("python"))
        cmd = [python, str(script), "--model-name", self.model_name, "--base-path", str(base),
               "--routing", str(self.routing_file), "--host", host, "--port", str(port),
               "--max-body-bytes", str(int(self._cfg("max_body_bytes")))]
        self.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        with open(self.log_file, "ab") as log:
            offset = log.tell()
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=str(script.parent), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise UnavailableError(f"cannot start the model server with {python}: {exc.strerror or exc}",
                                       hint="set serving.local.python to an interpreter with tensorflow and uvicorn") from None
        self._proc = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        _write_json_atomic(self.info_file, {"pid": proc.pid, "host": host, "port": port, "url": self.url,
                                            "base_path": str(base), "python": python, "started_at": time.time(),
                                            "model_name": self.model_name})
        deadline = time.monotonic() + float(self._cfg("start_timeout"))
        while True:
            code = proc.poll()
            if code is not None:
                self._forget()
                gist = _log_gist(self.log_file, offset)
                hint = f"see {self.log_file}"
                if "already in use" in gist:
                    hint = f"stop what listens on port {port} (mlflowctl serve stop) or set serving.local.port"
                elif "No module named" in gist:
                    hint = "install the server's requirements (image/requirements.txt) into serving.local.python"
                raise UnavailableError(f"the model server exited at start (code {code}): {gist}", hint=hint)
            if self._ready(proc.pid):
                return proc.pid
            if time.monotonic() > deadline:
                self._terminate(proc.pid)
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

    def _terminate(self, pid: int, timeout: float = STOP_TIMEOUT) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
            else:
                time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
        if self._proc is not None and self._proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1)
            self._proc = None

    def _running_matches(self) -> bool:
        """Does the running server serve this project's model from the current base path and port?"""
        info = _read_json(self.info_file, {})
        if info.get("model_name") != self.model_name or info.get("url") != self.url:
            return False
        try:
            return info.get("base_path") == str(self._base_path())
        except MlflowctlError:
            return True

    def _reload(self) -> dict[str, Any]:
        """Make the running server re-read routing.json; returns its view of the versions."""
        import requests

        try:
            r = requests.post(f"{self._server_url()}/admin/reload", timeout=float(self._cfg("start_timeout")))
        except requests.RequestException as exc:
            pid = self._pid()
            if pid is None:
                raise UnavailableError(f"the model server is not running ({exc.__class__.__name__})",
                                       hint="mlflowctl serve start") from None
            os.kill(pid, signal.SIGHUP)  # fall back to the signal
            return {}
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200:
            raise MlflowctlError(f"the model server refused the new routing: {body.get('error', r.text[:200])}")
        return body

    def _ensure_running(self) -> None:
        """Start the server, or make the running one pick up routing.json (restarting it if it is stale)."""
        pid = self._pid()
        if pid is not None and not self._running_matches():
            self._terminate(pid)
            self._forget()
            pid = None
        if pid is None:
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
                                             f"{self.model_name}: {msg}", hint=f"see {self.log_file}")
                else:
                    last = r.json().get("error", f"HTTP {r.status_code}")
            except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise UnavailableError(f"version {number} of {self.model_name} did not become available within "
                                       f"{self._cfg('start_timeout'):g}s ({last})", hint=f"see {self.log_file}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        if not (Path(self.project.stage_code_dir) / SERVER_SCRIPT).is_file():
            raise MlflowctlError(f"model server script {Path(self.project.stage_code_dir) / SERVER_SCRIPT} is missing")

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
        pid = self._pid()
        if pid is not None:
            self._terminate(pid)
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
                    if self._pid() is not None:
                        self._reload()
                raise
        return Endpoint(url=self.url, predict_url=self._predict_url(version=number), model_name=self.model_name,
                        version=number, protocol="tfserving")

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
            if self._pid() is not None:
                self._reload()

    def undeploy(self, version: int) -> None:
        with self._locked():
            routing = self._routing()
            number = int(version)
            routing["versions"] = [v for v in routing["versions"] if v != number]
            routing["labels"] = {k: v for k, v in routing["labels"].items() if v != number}
            self._write_routing(routing)
            if self._pid() is not None:
                self._reload()

    def status(self) -> dict[str, Any]:
        import requests

        routing = self._routing()
        pid = self._pid()
        out: dict[str, Any] = {
            "target": self.name, "running": False, "pid": pid, "url": "", "model_name": self.model_name,
            "versions": [{"version": v, "state": "STOPPED", "error": ""} for v in routing["versions"]],
            "labels": routing["labels"], "canary_weight": routing["canary_weight"],
            "predict_url": "", "metrics_url": "", "log": str(self.log_file),
        }
        if pid is None:
            return out
        url = self._server_url()
        out.update(url=url, predict_url=f"{url}/v1/models/{self.model_name}:predict", metrics_url=f"{url}/metrics")
        try:
            r = self._get(f"/v1/models/{self.model_name}")
            out["running"] = True
            if r.status_code == 200:
                states = {int(s["version"]): s for s in r.json().get("model_version_status", [])}
                out["versions"] = [
                    {"version": v, "state": states[v]["state"] if v in states else "UNKNOWN",
                     "error": states[v].get("status", {}).get("error_message", "") if v in states else ""}
                    for v in routing["versions"]
                ]
        except (requests.RequestException, ValueError, KeyError):
            out["error"] = "the server process runs but does not answer"
        return out

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:
        routing = self._routing()
        if version is not None:
            if int(version) not in routing["versions"]:
                raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on the local server",
                                     hint=f"served: {routing['versions'] or 'none'}")
            return Endpoint(self.url, self._predict_url(version=int(version)), self.model_name, int(version))
        if label is not None:
            if label not in routing["labels"]:
                raise MlflowctlError(f"no version of {self.model_name} has the label {label!r}",
                                     hint=f"labels: {routing['labels'] or 'none'}")
            return Endpoint(self.url, self._predict_url(label=label), self.model_name, routing["labels"][label])
        if not routing["versions"]:
            raise MlflowctlError(f"no version of {self.model_name} is deployed on the local server",
                                 hint="mlflowctl run (or deploy a version) first")
        number = routing["labels"].get("stable", max(routing["versions"]))
        return Endpoint(self.url, self._predict_url(), self.model_name, number)


@hookimpl
def mlflowctl_add_serving_targets(registry: Any) -> None:
    registry.add_serving_target(LocalServing)
