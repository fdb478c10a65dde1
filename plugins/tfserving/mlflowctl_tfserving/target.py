"""The ``tfserving`` serving target: TensorFlow Serving serving the registry folder, the way
``tensorflow/serving`` is run by hand.

* ``runtime: docker`` (``auto`` with any backend but k8s): one container of ``serving.tfserving.image``
  named ``mlflowctl-<project>-tfserving-<port>``, with ``MODEL_NAME``/``MODEL_BASE_PATH`` set, the
  registry folder ``models/<name>`` bind-mounted read only at ``/models/<name>``, and a
  ``--model_config_file`` (``.mlflowctl/serve/tfserving/config/models.config``, mounted at ``/config``)
  that lists the served versions (``model_version_policy { specific { ... } }``) and their
  ``version_labels``; TF Serving re-reads it every ``poll_seconds``. REST 8501 and gRPC 8500 are
  published on ``host:port`` / ``host:grpc_port``.
* ``runtime: k8s`` (``auto`` with ``backend=k8s``): see :mod:`mlflowctl_tfserving.k8s`.

TF Serving routes by version and label only: there is no traffic share, so ``deploy(..., weight>0)``
is refused. A label can only point at a loaded version, so ``deploy`` loads the version first, then
labels it, and waits until ``/v1/models/<name>/labels/<label>`` answers with it.

``image: project`` runs the project's own model server instead of ``tensorflow/serving`` (which
cannot be pulled everywhere): an image ``FROM`` the docker backend's stage image whose ENTRYPOINT is
``image/tf_serving_entrypoint.py``, a stand-in that reads exactly what TF Serving reads.
"""
from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus
from mlflowctl.target_state import TargetBasics

CONFIG_IN_CONTAINER = "/config/models.config"
ENTRY_SCRIPT = "tf_serving_entrypoint.py"
PROJECT_IMAGE = "project"
LABEL_ROLE = "mlflowctl.role"
LABEL_DIR = "mlflowctl.serve-dir"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_model_config(name: str, base_path: str, versions: list[int], labels: dict[str, int]) -> str:
    """TF Serving's ``--model_config_file`` (text protobuf ``ModelServerConfig``) for one model."""
    lines = ["model_config_list {", "  config {", f"    name: {json.dumps(name)}",
             f"    base_path: {json.dumps(base_path)}", '    model_platform: "tensorflow"',
             "    model_version_policy {", "      specific {"]
    lines += [f"        versions: {int(v)}" for v in sorted(set(versions))]
    lines += ["      }", "    }"]
    for label, version in sorted(labels.items()):
        lines += ["    version_labels {", f"      key: {json.dumps(label)}", f"      value: {int(version)}", "    }"]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, parsed JSON or None); (0, reason) when nothing answers. Standard library only: cheap."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError) as exc:
        return 0, str(getattr(exc, "reason", exc))


class TFServingTarget(TargetBasics, ServingTarget):
    name = "tfserving"
    description = ("TensorFlow Serving (the tensorflow/serving container, or a Deployment + Service on k8s) "
                   "serving the registry folder; versions and labels through a model_config_file")
    settings = {
        "image": Setting(str, "tensorflow/serving:2.18.0",
                         "the TF Serving image; 'project' runs the project's own server through "
                         "image/tf_serving_entrypoint.py (what the tests do: tensorflow/serving cannot be pulled here)"),
        "runtime": Setting(str, "auto", "docker, k8s, or auto (k8s with backend=k8s, else docker)",
                           choices=("auto", "docker", "k8s")),
        "host": Setting(str, "127.0.0.1", "host address the container's REST and gRPC ports are published on"),
        "port": Setting(int, 8501, "host port of the REST API (the container's 8501)", min=1, max=65535),
        "grpc_port": Setting(int, 8500, "host port of the gRPC API (the container's 8500); 0: not published",
                             min=0, max=65535),
        "poll_seconds": Setting(int, 1, "--model_config_file_poll_wait_seconds: how often TF Serving re-reads "
                                "the model config", min=1, max=600),
        "start_timeout": Setting(float, 120.0, "seconds to wait for the server, a version or a label", min=1),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self._backend: Any = None
        self._k8s: Any = None

    # ------------------------------------------------------------------ settings, names, URLs
    @property
    def runtime_name(self) -> str:
        return self.runtime_choice("docker")

    @property
    def url(self) -> str:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().url()
        return f"http://{self.setting('host')}:{int(self.setting('port'))}"

    @property
    def grpc(self) -> str:
        port = int(self.setting("grpc_port"))
        return f"{self.setting('host')}:{port}" if port and self.runtime_name == "docker" else ""

    @property
    def config_dir(self) -> Path:
        return self.state.dir / "config"

    def container_name(self) -> str:
        project = _slug(str(self.project.name))[:20].strip("-") or "project"
        return f"mlflowctl-{project}-tfserving-{int(self.setting('port'))}"

    def _predict_url(self, version: int | None = None, label: str | None = None) -> str:
        sel = f"/versions/{int(version)}" if version is not None else f"/labels/{label}" if label else ""
        return f"{self.url}/v1/models/{self.model_name}{sel}:predict"

    def _endpoint(self, number: int, version: int | None = None, label: str | None = None) -> Endpoint:
        return Endpoint(url=self.url, predict_url=self._predict_url(version, label), model_name=self.model_name,
                        version=int(number), protocol="tfserving", grpc=self.grpc)

    # ------------------------------------------------------------------ the record
    def _record(self) -> dict[str, Any]:
        rec = self.state.read({"versions": [], "labels": {}})
        rec["versions"] = sorted({int(v) for v in rec.get("versions", [])})
        rec["labels"] = {str(k): int(v) for k, v in (rec.get("labels") or {}).items()}
        return rec

    def _write_config(self, rec: dict[str, Any], base_in_server: str) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        text = render_model_config(self.model_name, base_in_server, rec["versions"], rec["labels"])
        path = self.config_dir / "models.config"
        tmp = path.with_name(".models.config.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        self.state.write(rec)

    def _apply(self, rec: dict[str, Any]) -> None:
        """Make the server serve ``rec`` (start it if needed), without waiting."""
        if self.runtime_name == "k8s":
            self._k8s_runtime().apply(rec)
            return
        self._write_config(rec, f"/models/{self.model_name}")
        self._ensure_container()

    # ------------------------------------------------------------------ docker runtime
    def _docker_backend(self) -> Any:
        if self._backend is None:
            project = self.project
            if project.config["backend"] == "docker":
                self._backend = project.backend
            else:
                try:
                    cls = project.pm.registry.backend("docker")
                except MlflowctlError as exc:
                    raise ConfigError(f"serving.tfserving with runtime docker needs the docker backend plugin ({exc})")
                self._backend = cls(project.config["backends"]["docker"], project)
        return self._backend

    def _client(self) -> Any:
        return self._docker_backend().client()

    def _image(self) -> Any:
        """The server image: ``image`` as given (pulled if missing), or the project's stand-in image."""
        import docker.errors

        client = self._client()
        ref = str(self.setting("image"))
        if ref != PROJECT_IMAGE:
            try:
                return client.images.get(ref)
            except docker.errors.ImageNotFound:
                pass
            try:
                return client.images.pull(ref)
            except docker.errors.APIError as exc:
                raise UnavailableError(f"serving.tfserving.image: cannot pull {ref}: {str(exc)[:200]}",
                                       hint="docker pull it (or load it) first, or set serving.tfserving.image") from None
        base = self._docker_backend().ensure_image()
        tag = f"mlflowctl/{_slug(str(self.project.name)) or 'project'}-tfserving:{base.id.split(':')[-1][:12]}"
        try:
            return client.images.get(tag)
        except docker.errors.ImageNotFound:
            pass
        dockerfile = (f"FROM {base.id}\nENTRYPOINT [\"python\", \"/app/{ENTRY_SCRIPT}\"]\n"
                      "CMD [\"--port=8500\", \"--rest_api_port=8501\"]\n")
        try:
            image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True,
                                           labels={LABEL_ROLE: "tfserving"})
        except (docker.errors.BuildError, docker.errors.APIError) as exc:
            raise UnavailableError(f"cannot build the TF Serving stand-in image {tag}: {str(exc)[:200]}") from None
        return image

    def _container(self) -> Any:
        import docker.errors

        try:
            return self._client().containers.get(self.container_name())
        except docker.errors.NotFound:
            return None

    def _base_path(self) -> Path:
        try:
            return Path(self.project.store.fetch(f"models/{self.model_name}")).resolve()
        except (FileNotFoundError, KeyError) as exc:
            raise MlflowctlError(f"nothing to serve: model {self.model_name!r} has no registered version ({exc})",
                                 hint="run doit to train and register one") from None

    def _ensure_container(self) -> None:
        """Start the container unless one with the same image, ports and folders runs already."""
        import docker.errors
        from docker.types import Mount

        image = self._image()
        base = self._base_path()
        host, port, grpc_port = str(self.setting("host")), int(self.setting("port")), int(self.setting("grpc_port"))
        wanted = {"image": image.id, "base": str(base), "host": host, "port": port, "grpc_port": grpc_port,
                  "poll": int(self.setting("poll_seconds"))}
        container = self._container()
        if container is not None:
            if container.status == "running" and container.labels.get("mlflowctl.tfserving") == json.dumps(
                    wanted, sort_keys=True):
                return
            container.remove(force=True)
        ports: dict[str, Any] = {"8501/tcp": (host, port)}
        if grpc_port:
            ports["8500/tcp"] = (host, grpc_port)
        args = [f"--model_config_file={CONFIG_IN_CONTAINER}",
                f"--model_config_file_poll_wait_seconds={int(self.setting('poll_seconds'))}"]
        try:
            self._client().containers.run(
                image.id, args, name=self.container_name(), detach=True, init=True,
                user=self._docker_backend().user(), ports=ports,
                environment={"MODEL_NAME": self.model_name, "MODEL_BASE_PATH": "/models", "HOME": "/tmp"},
                mounts=[Mount(target=f"/models/{self.model_name}", source=str(base), type="bind", read_only=True),
                        Mount(target="/config", source=str(self.config_dir.resolve()), type="bind", read_only=True)],
                labels={"mlflowctl.project": str(self.project.name), LABEL_ROLE: "tfserving",
                        LABEL_DIR: str(self.state.dir.resolve()), "mlflowctl.tfserving": json.dumps(wanted, sort_keys=True)},
            )
        except docker.errors.APIError as exc:
            leftover = self._container()
            if leftover is not None:
                leftover.remove(force=True)
            reason = str(getattr(exc, "explanation", "") or exc)
            hint = f"free port {port} or set serving.tfserving.port" if "allocated" in reason or "in use" in reason \
                else f"docker logs {self.container_name()}"
            raise UnavailableError(f"cannot start TF Serving container {self.container_name()}: {reason[:200]}",
                                   hint=hint) from None

    def _container_log(self) -> str:
        container = self._container()
        if container is None:
            return "the container is gone"
        try:
            text = container.logs(tail=5).decode(errors="replace")
        except Exception:  # noqa: BLE001 - a log is a courtesy
            return "no log"
        return " | ".join(ln.strip() for ln in text.splitlines() if ln.strip())[-400:] or "empty log"

    # ------------------------------------------------------------------ waiting
    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().get(path, timeout)
        return _get_json(f"{self.url}/{path}", timeout)

    def _wait(self, what: str, check: Any) -> None:
        deadline = time.monotonic() + float(self.setting("start_timeout"))
        last = "no answer"
        while True:
            ok, last = check()
            if ok:
                return
            if self.runtime_name == "docker":
                container = self._container()
                if container is None or container.status in ("exited", "dead"):
                    raise UnavailableError(f"TF Serving stopped while waiting for {what}: {self._container_log()}",
                                           hint=f"docker logs {self.container_name()}")
            if time.monotonic() > deadline:
                raise UnavailableError(f"TF Serving: {what} not ready within {self.setting('start_timeout'):g}s ({last})",
                                       hint=self._log_hint())
            time.sleep(0.25)

    def _log_hint(self) -> str:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().log_hint()
        return f"docker logs {self.container_name()}"

    def _version_state(self, sel: str) -> tuple[str, str, int | None]:
        """(state, error message, version) of ``/v1/models/<name><sel>``; state '' when nothing answers."""
        code, body = self._get(f"v1/models/{self.model_name}{sel}")
        if code == 200 and isinstance(body, dict) and body.get("model_version_status"):
            st = body["model_version_status"][0]
            return str(st.get("state", "")), str((st.get("status") or {}).get("error_message", "")), \
                int(st.get("version", 0) or 0)
        if code == 0:
            return "", str(body), None
        return "", (body or {}).get("error", f"HTTP {code}") if isinstance(body, dict) else f"HTTP {code}", None

    def _wait_version(self, number: int) -> None:
        def check() -> tuple[bool, str]:
            state, error, _ = self._version_state(f"/versions/{number}")
            if state == "END" and error:
                raise MlflowctlError(f"TF Serving could not load version {number} of {self.model_name}: {error}",
                                     hint=self._log_hint())
            return state == "AVAILABLE", state or error

        self._wait(f"version {number} of {self.model_name}", check)

    def _wait_label(self, label: str, number: int | None) -> None:
        def check() -> tuple[bool, str]:
            state, error, version = self._version_state(f"/labels/{label}")
            if number is None:
                return state == "", f"label still points at {version}"
            return state == "AVAILABLE" and version == number, f"label points at {version} ({state or error})"

        self._wait(f"label {label!r} -> {number}", check)

    def _wait_gone(self, number: int) -> None:
        def check() -> tuple[bool, str]:
            state, _, _ = self._version_state(f"/versions/{number}")
            return state in ("", "END"), state

        self._wait(f"version {number} unloaded", check)

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        if self.runtime_name == "k8s":
            self._k8s_runtime().preflight()
            return
        self._client()  # the daemon answers (else one line, exit 5)
        if str(self.setting("image")) == PROJECT_IMAGE and not (Path(self.project.stage_code_dir) / ENTRY_SCRIPT).is_file():
            raise ConfigError(f"serving.tfserving.image=project needs {Path(self.project.stage_code_dir) / ENTRY_SCRIPT}",
                              hint="copy it from mlflowctl's image/ folder, or set serving.tfserving.image")

    def deploy(self, version: Any, label: str = "canary", weight: float = 0.0) -> Endpoint:
        number = int(version.number)
        if getattr(version, "name", self.model_name) != self.model_name:
            raise MlflowctlError(f"this project serves model {self.model_name!r}, not {version.name!r}")
        if weight and float(weight) > 0:
            raise MlflowctlError("TF Serving routes by version and label only: a canary traffic share "
                                 f"({weight}) needs a router in front of it", hint="deploy with weight 0")
        with self.state.locked():
            before = self._record()
            rec = {"versions": sorted(set(before["versions"]) | {number}), "labels": dict(before["labels"])}
            try:
                self._apply(rec)  # load the version first: TF Serving labels only loaded versions
                self._wait_version(number)
                if label:
                    rec["labels"][label] = number
                    self._apply(rec)
                    self._wait_label(label, number)
            except MlflowctlError:
                if before["versions"] or self._running():
                    self._apply(before)  # roll back; the others keep answering
                else:
                    self.state.write(before)
                raise
        return self._endpoint(number, version=number)

    def set_label(self, label: str, version: int | None) -> None:
        with self.state.locked():
            rec = self._record()
            if version is None:
                if rec["labels"].pop(label, None) is None:
                    return
            else:
                if int(version) not in rec["versions"]:
                    raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on TF Serving",
                                         hint=f"deploy it first (served: {rec['versions'] or 'none'})")
                rec["labels"][label] = int(version)
            self._apply(rec)
            self._wait_label(label, None if version is None else int(version))

    def undeploy(self, version: int) -> None:
        number = int(version)
        with self.state.locked():
            rec = self._record()
            if number not in rec["versions"]:
                return
            rec["versions"] = [v for v in rec["versions"] if v != number]
            rec["labels"] = {k: v for k, v in rec["labels"].items() if v != number}
            if not rec["versions"]:
                self._stop_server()
                self.state.write(rec)
                return
            self._apply(rec)
            self._wait_gone(number)

    def _running(self) -> bool:
        if self.runtime_name == "k8s":
            return self._k8s_runtime().exists()
        container = self._container()
        return container is not None and container.status == "running"

    def serves(self, version: int) -> bool:
        state, _, _ = self._version_state(f"/versions/{int(version)}")
        return state == "AVAILABLE"

    def status(self) -> ServingStatus:
        rec = self._record()
        out = ServingStatus(target=self.name, model_name=self.model_name, labels=dict(rec["labels"]),
                            versions=[VersionStatus(v, "STOPPED") for v in rec["versions"]],
                            details={"runtime": self.runtime_name, "container": self.container_name()
                                     if self.runtime_name == "docker" else "", "config": str(self.config_dir)})
        code, body = self._get(f"v1/models/{self.model_name}")
        if code == 0:
            return out
        out.running, out.url, out.grpc = True, self.url, self.grpc
        if "stable" in rec["labels"]:
            out.predict_url = self._predict_url(label="stable")
        states = {}
        if code == 200 and isinstance(body, dict):
            states = {int(s["version"]): s for s in body.get("model_version_status", [])}
        elif code != 404:
            out.error = f"TF Serving answers HTTP {code} for /v1/models/{self.model_name}"
        out.versions = [VersionStatus(v, states[v]["state"] if v in states else "UNKNOWN",
                                      (states[v].get("status") or {}).get("error_message", "") if v in states else "")
                        for v in rec["versions"]]
        return out

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:
        rec = self._record()
        if version is not None:
            if int(version) not in rec["versions"]:
                raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on TF Serving",
                                     hint=f"served: {rec['versions'] or 'none'}")
            return self._endpoint(int(version), version=int(version))
        label = label or ("stable" if "stable" in rec["labels"] else None)
        if label is not None:
            if label not in rec["labels"]:
                raise MlflowctlError(f"no version of {self.model_name} has the label {label!r}",
                                     hint=f"labels: {rec['labels'] or 'none'}")
            return self._endpoint(rec["labels"][label], label=label)
        if not rec["versions"]:
            raise MlflowctlError(f"no version of {self.model_name} is deployed on TF Serving",
                                 hint="run doit (deploy) first")
        # no stable label yet: TF Serving's own default, the highest served version
        return self._endpoint(max(rec["versions"]))

    def start(self) -> Endpoint | None:
        with self.state.locked():
            rec = self._record()
            if not rec["versions"]:
                return None
            self._apply(rec)
            for number in rec["versions"]:
                self._wait_version(number)
        return self.endpoint()

    def _stop_server(self) -> None:
        if self.runtime_name == "k8s":
            self._k8s_runtime().delete()
            return
        container = self._container()
        if container is not None:
            container.remove(force=True)

    def stop(self) -> None:
        with self.state.locked():
            self._stop_server()

    # ------------------------------------------------------------------ k8s
    def _k8s_runtime(self) -> Any:
        if self._k8s is None:
            from mlflowctl_tfserving.k8s import K8sRuntime

            self._k8s = K8sRuntime(self)
        return self._k8s
