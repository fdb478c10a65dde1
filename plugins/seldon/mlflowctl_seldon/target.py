"""The ``seldon`` serving target: Seldon Core v1.

* ``runtime: local`` (``auto`` unless ``backend=k8s``): the REAL ``seldon-core-microservice`` (from
  PyPI, seldon-core 1.18, in its own environment: ``serving.seldon.executable``, ``make seldon``
  creates ``.venv-seldon``) serving the model class :mod:`mlflowctl_seldon.model.MlflowctlModel`, one
  process per deployed version (Seldon's Python wrapper serves one model), predictions at Seldon
  v1's ``/api/v1.0/predictions``. A label is which version's process the label's URL reaches: the
  wrapper has no router, so a canary traffic share (``weight``) is refused locally.
  Seldon's wrapper binds all interfaces (hard-coded in seldon-core); the ports are free ones.
* ``runtime: k8s``: a ``SeldonDeployment`` (``machinelearning.seldon.io/v1``) rendered by
  :func:`mlflowctl_seldon.manifest.seldon_deployment` -- one predictor per served version, the
  canary's ``traffic`` from ``weight`` -- see :mod:`mlflowctl_seldon.k8s`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus
from mlflowctl.state import pid_alive
from mlflowctl.target_state import TargetBasics

MODEL_CLASS = "MlflowctlModel"
MODEL_DIR = Path(__file__).resolve().parent / "model"
PREDICT_PATH = "/api/v1.0/predictions"
STOP_TIMEOUT = 10.0
LOAD_FAILED = "cannot load the model"  # MlflowctlModel.health_status() says so


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: bytes | None = None, timeout: float = 2.0) -> tuple[int, str]:
    """(status, text); (0, reason) when nothing answers. Standard library only."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(getattr(exc, "reason", exc))


def _is_wrapper(pid: int) -> bool:
    """Guard against pid reuse: the process must be a seldon-core-microservice."""
    try:
        return b"seldon-core-microservice" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists()


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "no log"
    keep = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ours = [ln for ln in keep if "Error" in ln or "error" in ln] or keep
    return " | ".join(ours[-lines:])[-400:] or "empty log"


class SeldonTarget(TargetBasics, ServingTarget):
    name = "seldon"
    description = ("Seldon Core v1: the real seldon-core-microservice locally (its own venv), "
                   "a SeldonDeployment with canary predictors on Kubernetes")
    settings = {
        "runtime": Setting(str, "auto", "local, k8s, or auto (k8s with backend=k8s, else local)",
                           choices=("auto", "local", "k8s")),
        "executable": Setting(str, "seldon-core-microservice",
                              "the wrapper of seldon-core 1.18, in an environment of its own with a TensorFlow "
                              "that fits its pins (make seldon: .venv-seldon/bin/seldon-core-microservice)"),
        "host": Setting(str, "127.0.0.1", "address the local wrappers are reached at"),
        "workers": Setting(int, 1, "gunicorn workers per wrapper (--workers)", min=1, max=64),
        "start_timeout": Setting(float, 120.0, "seconds to wait for a version to load and answer", min=1),
        # k8s
        "namespace": Setting(str, "", "k8s: namespace of the SeldonDeployment (default: backends.k8s.namespace)"),
        "image": Setting(str, "", "k8s: image of the model container (default: the prepackaged TENSORFLOW_SERVER)"),
        "ingress_url": Setting(str, "", "k8s: base URL of the Istio/Ambassador ingress "
                                        "(predictions at <ingress_url>/seldon/<ns>/<name>/api/v1.0/predictions)"),
        "model_uri": Setting(str, "", "k8s: where the registry folder is, e.g. pvc://claim/path/models/<name> "
                                      "(default: from a pvc:// store)"),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self._k8s: Any = None

    @property
    def runtime_name(self) -> str:
        return self.runtime_choice("local")

    def _k8s_runtime(self) -> Any:
        if self._k8s is None:
            from mlflowctl_seldon.k8s import K8sRuntime

            self._k8s = K8sRuntime(self)
        return self._k8s

    # ------------------------------------------------------------------ the record
    def _record(self) -> dict[str, Any]:
        rec = self.state.read({"versions": {}, "labels": {}, "canary_weight": 0.0})
        rec["versions"] = {str(k): v for k, v in (rec.get("versions") or {}).items()}
        rec["labels"] = {str(k): int(v) for k, v in (rec.get("labels") or {}).items()}
        return rec

    def _url(self, proc: dict[str, Any]) -> str:
        return f"http://{self.setting('host')}:{int(proc['http'])}"

    def _endpoint(self, rec: dict[str, Any], number: int) -> Endpoint:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().endpoint(number)
        url = self._url(rec["versions"][str(number)])
        return Endpoint(url=url, predict_url=url + PREDICT_PATH, model_name=self.model_name, version=number,
                        protocol="seldon")

    # ------------------------------------------------------------------ local processes
    def _alive(self, proc: dict[str, Any] | None) -> bool:
        return bool(proc) and pid_alive(int(proc.get("pid", 0) or 0)) and _is_wrapper(int(proc["pid"]))

    def _spawn(self, number: int) -> dict[str, Any]:
        """Start the wrapper for ``number`` and wait until it answers ``/health/status``."""
        folder = Path(self.project.store.fetch(f"models/{self.model_name}/{number}")).resolve()
        host = str(self.setting("host"))
        proc = {"http": free_port(host), "grpc": free_port(host), "metrics": free_port(host), "model_dir": str(folder)}
        log = self.state.dir / f"{number}.log"
        params = json.dumps([{"name": "model_dir", "value": str(folder), "type": "STRING"}])
        cmd = [str(self.setting("executable")), MODEL_CLASS, "--service-type", "MODEL",
               "--http-port", str(proc["http"]), "--grpc-port", str(proc["grpc"]),
               "--metrics-port", str(proc["metrics"]), "--workers", str(int(self.setting("workers"))),
               "--parameters", params]
        env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python", PYTHONUNBUFFERED="1",
                   TF_CPP_MIN_LOG_LEVEL="2")
        self.state.dir.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            fh.flush()
            try:
                popen = subprocess.Popen(cmd, cwd=str(MODEL_DIR), stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as exc:
                raise ConfigError(f"serving.seldon.executable: cannot run {cmd[0]}: {exc.strerror or exc}",
                                  hint="make seldon, then serving.seldon.executable=.venv-seldon/bin/"
                                       "seldon-core-microservice (an absolute path)") from None
        proc["pid"] = popen.pid
        proc["log"] = str(log)
        deadline = time.monotonic() + float(self.setting("start_timeout"))
        last = "no answer"
        while True:
            code = popen.poll()
            if code is not None:
                raise UnavailableError(f"seldon-core-microservice for version {number} exited with {code}: "
                                       f"{_log_tail(log)}", hint=f"see {log}")
            status, text = _http("GET", f"{self._url(proc)}/health/status")
            if status == 200:
                return proc
            if LOAD_FAILED in text:  # the model class could not load the version: no use waiting
                self._terminate(proc)
                reason = text[text.index(LOAD_FAILED):].split('"')[0][:300]
                raise MlflowctlError(f"Seldon cannot serve version {number} of {self.model_name}: {reason}",
                                     hint=f"see {log}")
            last = f"HTTP {status}" if status else text
            if time.monotonic() > deadline:
                self._terminate(proc)
                raise UnavailableError(f"seldon-core-microservice for version {number} did not answer within "
                                       f"{self.setting('start_timeout'):g}s ({last})", hint=f"see {log}")
            time.sleep(0.3)

    def _terminate(self, proc: dict[str, Any]) -> None:
        """SIGINT to the wrapper's process group (gunicorn's quick shutdown), SIGKILL after STOP_TIMEOUT."""
        if not self._alive(proc):
            return
        pid = int(proc["pid"])
        for sig in (signal.SIGINT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not pid_alive(pid):
                return

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        if self.runtime_name == "k8s":
            self._k8s_runtime().preflight()
            return
        exe = str(self.setting("executable"))
        import shutil

        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)) and not shutil.which(exe):
            raise ConfigError(f"serving.seldon.executable: {exe} not found",
                              hint="make seldon creates .venv-seldon; set serving.seldon.executable to "
                                   "<repo>/.venv-seldon/bin/seldon-core-microservice")

    def deploy(self, version: Any, label: str | None = "canary", weight: float = 0.0) -> Endpoint:
        number = self.checked_number(version, weight)
        if self.runtime_name == "k8s":
            return self._k8s_runtime().deploy(number, label, float(weight or 0.0))
        if weight and float(weight) > 0:
            raise MlflowctlError("the local Seldon wrapper serves one version per process, without a router: "
                                 f"a canary traffic share ({weight}) needs serving.seldon.runtime=k8s",
                                 hint="deploy with weight 0 (the canary answers at its own URL)")
        with self.state.locked():
            rec = self._record()
            if not self._alive(rec["versions"].get(str(number))):
                rec["versions"][str(number)] = self._spawn(number)
            if label:
                rec["labels"][label] = number
            self.state.write(rec)
            return self._endpoint(rec, number)

    def set_label(self, label: str, version: int | None) -> None:
        if self.runtime_name == "k8s":
            self._k8s_runtime().set_label(label, version)
            return
        with self.state.locked():
            rec = self._record()
            if version is None:
                rec["labels"].pop(label, None)
            else:
                if str(int(version)) not in rec["versions"]:
                    raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on Seldon",
                                         hint=f"deploy it first (served: {sorted(map(int, rec['versions'])) or 'none'})")
                rec["labels"][label] = int(version)
            self.state.write(rec)

    def undeploy(self, version: int) -> None:
        if self.runtime_name == "k8s":
            self._k8s_runtime().undeploy(int(version))
            return
        with self.state.locked():
            rec = self._record()
            proc = rec["versions"].pop(str(int(version)), None)
            rec["labels"] = {k: v for k, v in rec["labels"].items() if v != int(version)}
            if proc:
                self._terminate(proc)
            self.state.write(rec)

    def serves(self, version: int) -> bool:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().serves(int(version))
        proc = self._record()["versions"].get(str(int(version)))
        return self._alive(proc) and _http("GET", f"{self._url(proc)}/health/ping")[0] == 200

    def status(self) -> ServingStatus:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().status()
        rec = self._record()
        versions, running = [], False
        for key, proc in sorted(rec["versions"].items(), key=lambda kv: int(kv[0])):
            if not self._alive(proc):
                versions.append({"version": int(key), "state": "STOPPED", "error": ""})
                continue
            running = True
            code, text = _http("GET", f"{self._url(proc)}/health/status")
            versions.append({"version": int(key), "state": "AVAILABLE" if code == 200 else "UNKNOWN",
                             "error": "" if code == 200 else (text[:200] if code else text)})
        stable = rec["labels"].get("stable")
        url = self._url(rec["versions"][str(stable)]) if stable is not None and str(stable) in rec["versions"] else ""
        return self._status(running=running, url=url if running else "",
                            predict_url=url + PREDICT_PATH if url and running else "",
                            versions=versions, labels=rec["labels"],
                            details={"runtime": "local", "processes": {k: v.get("pid") for k, v in rec["versions"].items()},
                                     "log_dir": str(self.state.dir)})

    def _status(self, **fields: Any) -> ServingStatus:
        fields["versions"] = [VersionStatus(**v) for v in fields["versions"]]
        return ServingStatus(target=self.name, model_name=self.model_name, **fields)

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().endpoint(version, label)
        rec = self._record()
        if version is None:
            label = label or "stable"
            if label not in rec["labels"]:
                raise MlflowctlError(f"no version of {self.model_name} has the label {label!r} on Seldon",
                                     hint=f"labels: {rec['labels'] or 'none'}")
            version = rec["labels"][label]
        if str(int(version)) not in rec["versions"]:
            raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on Seldon",
                                 hint=f"served: {sorted(map(int, rec['versions'])) or 'none'}")
        return self._endpoint(rec, int(version))

    def start(self) -> Endpoint | None:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().endpoint(None, None)
        with self.state.locked():
            rec = self._record()
            for key, proc in list(rec["versions"].items()):
                if not self._alive(proc):
                    rec["versions"][key] = self._spawn(int(key))
            self.state.write(rec)
        if not rec["versions"]:
            return None
        return self.endpoint(label="stable") if "stable" in rec["labels"] else self.endpoint(
            version=max(map(int, rec["versions"])))

    def stop(self) -> None:
        if self.runtime_name == "k8s":
            self._k8s_runtime().delete()
            return
        with self.state.locked():
            for proc in self._record()["versions"].values():
                self._terminate(proc)
