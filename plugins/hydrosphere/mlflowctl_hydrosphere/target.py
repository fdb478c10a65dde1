"""The ``hydrosphere`` serving target: Hydrosphere Serving 3.x through its manager API (``requests``).

What ``deploy(version N)`` does, as hydrosdk 3.x does it:

1. uploads the version's SavedModel (``POST /api/v2/model/upload``: ``payload`` a tar.gz, ``metadata``
   the model's name, runtime image and contract) -- Hydrosphere numbers its own versions, so the
   record maps mlflowctl's N to Hydrosphere's ``name:M`` and model version id;
2. waits until the version is ``Released`` (``GET /api/v2/model/version/<name>/<M>``; ``Failed`` is an error);
3. if the version has a concept model (``concept/``), uploads it as ``<name>-concept`` and attaches it
   to the classifier as a monitoring metric with the training threshold (``POST
   /api/v2/monitoring/metricspec``, ``thresholdCmpOperator: Less``);
4. (re)creates the applications (``POST /api/v2/application``, ``DELETE`` first: an application is
   replaced, not patched) and waits until they are ``Ready``:

   * ``<app>-v<N>``: version N alone (what ``endpoint(version=N)`` calls);
   * ``<app>-<label>``: each label's version (``endpoint(label=...)``);
   * ``<app>``: the default -- the stable version, with the canary as a second variant of the same
     stage weighted ``round(100 * weight)`` (weights in a stage sum to 100).

Predictions go through the gateway: ``POST <url>/gateway/application/<app>`` with the contract's named
fields (``{"images": [[...]]}`` -> ``{"probabilities": [[...]]}``), protocol ``hydrosphere``.

For ``hs apply`` (the seeds' way), every deploy also writes ``.mlflowctl/serve/hydrosphere/hs/``:
``serving.yaml`` (``kind: Model``) and ``application.yaml`` (``kind: Application``, the seeds' shape
with the ``Autoencoder`` monitoring check and its threshold); see :mod:`mlflowctl_hydrosphere.render`.

Drift: Hydrosphere scores it in its own monitoring service, which has no documented API in 3.x for
reading the scores back; this target gives neither a drift URL nor live inputs, so ``monitor``
reports "drift not available for target hydrosphere".
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingStatus, ServingTarget, VersionStatus
from mlflowctl.target_state import TargetBasics
from mlflowctl_hydrosphere import render

CONCEPT_SUFFIX = "-concept"


def _one_line(text: str, limit: int = 200) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[:limit] + "…"


def _tar_gz(folder: Path, skip: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            if path.name not in skip:
                tar.add(str(path), arcname=path.name)
    return buf.getvalue()


class HydrosphereTarget(TargetBasics, ServingTarget):
    name = "hydrosphere"
    description = ("Hydrosphere Serving 3.x: models and applications through the manager API, predictions "
                   "through the gateway, the concept model as a monitoring metric; hs apply YAML rendered too")
    settings = {
        "url": Setting(str, "", "the Hydrosphere cluster's HTTP address (what `hs cluster add --server` takes), "
                                "e.g. http://hydrosphere.example:80"),
        "application": Setting(str, "", "application name (default: the model name)"),
        "runtime": Setting(str, "hydrosphere/serving-runtime-tensorflow-1.13.1:3.0.3",
                           "runtime image name:tag the models run in"),
        "signature": Setting(str, "predict", "the contract's signature name"),
        "timeout": Setting(float, 10.0, "seconds per HTTP request", min=0.1),
        "start_timeout": Setting(float, 300.0, "seconds to wait for a version to be Released and an application "
                                               "to be Ready", min=1),
        "token": Setting(str, "", "bearer token for the cluster, if it asks for one", secret=True),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self._session: Any = None

    # ------------------------------------------------------------------ settings
    @property
    def base_url(self) -> str:
        url = str(self.setting("url") or "").rstrip("/")
        if not url:
            raise ConfigError("serving.hydrosphere.url is not set",
                              hint="set it to your cluster's address (the one `hs cluster add --server` takes)")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"serving.hydrosphere.url: expected an http(s) URL, got {url!r}")
        return url

    @property
    def app(self) -> str:
        return str(self.setting("application") or self.model_name)

    def app_name(self, version: int | None = None, label: str | None = None) -> str:
        if version is not None:
            return f"{self.app}-v{int(version)}"
        if label and label != "stable":
            return f"{self.app}-{label}"
        return self.app

    # ------------------------------------------------------------------ HTTP
    def _http(self) -> Any:
        if self._session is None:
            import requests

            self._session = requests.Session()
            self._session.headers["Accept"] = "application/json"
            if self.setting("token"):
                self._session.headers["Authorization"] = f"Bearer {self.setting('token')}"
        return self._session

    def _call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """One manager API call; its JSON (or None). Transport failures: UnavailableError (exit 5)."""
        import requests

        url = f"{self.base_url}{path}"
        try:
            r = self._http().request(method, url, timeout=float(self.setting("timeout")), **kwargs)
        except requests.RequestException as exc:
            raise UnavailableError(f"Hydrosphere at {self.base_url} is unreachable: {type(exc).__name__}",
                                   hint="check serving.hydrosphere.url and that the cluster runs") from None
        if r.status_code not in ok:
            raise MlflowctlError(f"Hydrosphere: {method} {path} answered {r.status_code}: {_one_line(r.text)}")
        try:
            return r.json() if r.content else None
        except ValueError:
            raise MlflowctlError(f"Hydrosphere: {method} {path} answered something that is not JSON: "
                                 f"{_one_line(r.text)}") from None

    def _wait(self, what: str, probe: Any) -> Any:
        deadline = time.monotonic() + float(self.setting("start_timeout"))
        while True:
            done, value = probe()
            if done:
                return value
            if time.monotonic() > deadline:
                raise UnavailableError(f"Hydrosphere: {what} not ready within {self.setting('start_timeout'):g}s "
                                       f"(last: {value})", hint="see the cluster's UI or `hs` for its events")
            time.sleep(0.2)

    # ------------------------------------------------------------------ models
    def _contract(self, folder: Path) -> dict[str, Any]:
        """The model's signature for the manager: the registry's input ``images`` and output ``probabilities``,
        read from the version's metadata when it names them."""
        return render.model_signature(self.setting("signature"), folder)

    def _upload(self, name: str, folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        image, _, tag = str(self.setting("runtime")).partition(":")
        metadata = {"name": name, "runtime": {"name": image, "tag": tag or "latest"},
                    "modelSignature": self._contract(folder), "installCommand": "",
                    "metadata": {"mlflowctl.project": str(self.project.name), "mlflowctl.source": str(folder)}}
        files = {"payload": ("payload.tar.gz", _tar_gz(folder, skip), "application/gzip"),
                 "metadata": (None, json.dumps(metadata), "application/json")}
        body = self._call("POST", "/api/v2/model/upload", files=files)
        if not isinstance(body, dict) or "id" not in body or "modelVersion" not in body:
            raise MlflowctlError(f"Hydrosphere: the upload of {name} answered no model version: {_one_line(body)}")
        return body

    def _wait_released(self, name: str, hs_version: int) -> dict[str, Any]:
        def probe() -> tuple[bool, Any]:
            body = self._call("GET", f"/api/v2/model/version/{name}/{hs_version}", ok=(200, 404)) or {}
            status = str(body.get("status", "")) if isinstance(body, dict) else ""
            if status == "Failed":
                raise MlflowctlError(f"Hydrosphere could not build {name}:{hs_version}: "
                                     f"{_one_line(body.get('message') or body.get('error') or 'Failed')}")
            return status == "Released", status or "not found"

        return self._wait(f"model {name}:{hs_version}", probe)

    def _released(self, name: str, hs_version: int) -> bool:
        body = self._call("GET", f"/api/v2/model/version/{name}/{hs_version}", ok=(200, 404))
        return isinstance(body, dict) and body.get("status") == "Released"

    def _ensure_model(self, rec: dict[str, Any], number: int) -> dict[str, Any]:
        """The Hydrosphere model (and concept metric) of mlflowctl version ``number``, uploaded once."""
        known = rec["versions"].get(str(number))
        if known and self._released(self.model_name, int(known["hs_version"])):
            return known
        try:
            folder = Path(self.project.store.fetch(f"models/{self.model_name}/{number}")).resolve()
        except (FileNotFoundError, KeyError) as exc:
            raise MlflowctlError(f"version {number} of {self.model_name} is not in the registry ({exc})") from None
        up = self._upload(self.model_name, folder, skip=("concept",))
        entry = {"hs_version": int(up["modelVersion"]), "id": int(up["id"])}
        self._wait_released(self.model_name, entry["hs_version"])
        concept = folder / "concept"
        threshold_file = concept / "threshold.json"
        if threshold_file.is_file():
            threshold = float(json.loads(threshold_file.read_text())["threshold"])
            cup = self._upload(self.model_name + CONCEPT_SUFFIX, concept)
            self._wait_released(self.model_name + CONCEPT_SUFFIX, int(cup["modelVersion"]))
            spec = {"name": f"{self.model_name}{CONCEPT_SUFFIX}", "modelVersionId": entry["id"],
                    "config": {"modelVersionId": int(cup["id"]), "threshold": threshold,
                               "thresholdCmpOperator": {"kind": "Less"}}}
            metric = self._call("POST", "/api/v2/monitoring/metricspec", json=spec) or {}
            entry.update(concept_id=int(cup["id"]), concept_version=int(cup["modelVersion"]),
                         threshold=threshold, metric=metric.get("id"))
        self._write_hs_yaml(entry, threshold_file)
        return entry

    def _write_hs_yaml(self, entry: dict[str, Any], threshold_file: Path) -> None:
        threshold = entry.get("threshold")
        out = self.state.dir / "hs"
        out.mkdir(parents=True, exist_ok=True)
        (out / "serving.yaml").write_text(render.model_yaml(self.model_name, str(self.setting("runtime"))))
        (out / "application.yaml").write_text(render.application_yaml(
            self.app, f"{self.model_name}:{entry['hs_version']}", str(self.setting("runtime")),
            concept=f"{self.model_name}{CONCEPT_SUFFIX}:{entry['concept_version']}" if threshold is not None else None,
            threshold=threshold))

    # ------------------------------------------------------------------ applications
    def _graph(self, variants: list[tuple[int, int]]) -> dict[str, Any]:
        return {"stages": [{"modelVariants": [{"modelVersionId": mid, "weight": w} for mid, w in variants]}]}

    def _wanted_apps(self, rec: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
        """Application name -> [(model version id, weight)] for the record."""
        ids = {int(k): int(v["id"]) for k, v in rec["versions"].items()}
        apps = {self.app_name(version=n): [(mid, 100)] for n, mid in ids.items()}
        for label, n in rec["labels"].items():
            if label != "stable" and n in ids:
                apps[self.app_name(label=label)] = [(ids[n], 100)]
        stable, canary = rec["labels"].get("stable"), rec["labels"].get("canary")
        if stable in ids:
            share = int(round(100 * float(rec.get("canary_weight", 0.0)))) if canary in ids and canary != stable else 0
            variants = [(ids[stable], 100 - share)] + ([(ids[canary], share)] if share else [])
            apps[self.app] = [(mid, w) for mid, w in variants if w > 0]
        return apps

    def _sync_apps(self, rec: dict[str, Any]) -> None:
        """Make the cluster's applications of this project what the record says; wait until Ready."""
        wanted = self._wanted_apps(rec)
        applied = rec.setdefault("apps", {})
        for name in sorted(set(applied) - set(wanted)):
            self._call("DELETE", f"/api/v2/application/{name}", ok=(200, 204, 404))
            applied.pop(name, None)
        for name, variants in sorted(wanted.items()):
            graph = self._graph(variants)
            if applied.get(name) == graph and self._app_status(name) == "Ready":
                continue
            self._call("DELETE", f"/api/v2/application/{name}", ok=(200, 204, 404))
            self._call("POST", "/api/v2/application", json={"name": name, "kafkaStreaming": [],
                                                            "executionGraph": graph,
                                                            "metadata": {"mlflowctl.project": str(self.project.name)}})
            applied[name] = graph
        for name in sorted(wanted):
            self._wait_ready(name)

    def _app_status(self, name: str) -> str:
        body = self._call("GET", f"/api/v2/application/{name}", ok=(200, 404))
        return str(body.get("status", "")) if isinstance(body, dict) else ""

    def _wait_ready(self, name: str) -> None:
        def probe() -> tuple[bool, Any]:
            body = self._call("GET", f"/api/v2/application/{name}", ok=(200, 404)) or {}
            status = str(body.get("status", "")) if isinstance(body, dict) else ""
            if status == "Failed":
                raise MlflowctlError(f"Hydrosphere application {name} failed: "
                                     f"{_one_line(body.get('message') or 'Failed')}")
            return status == "Ready", status or "not found"

        self._wait(f"application {name}", probe)

    # ------------------------------------------------------------------ the record
    def _record(self) -> dict[str, Any]:
        rec = self.state.read({"versions": {}, "labels": {}, "canary_weight": 0.0, "apps": {}})
        rec["labels"] = {str(k): int(v) for k, v in (rec.get("labels") or {}).items()}
        return rec

    def _endpoint(self, number: int, app: str) -> Endpoint:
        url = self.base_url
        return Endpoint(url=url, predict_url=f"{url}/gateway/application/{app}", model_name=self.model_name,
                        version=int(number), protocol="hydrosphere")

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        self._call("GET", "/api/v2/application")  # reachable, and the manager API answers

    def deploy(self, version: Any, label: str | None = "canary", weight: float = 0.0) -> Endpoint:
        number = self.checked_number(version, weight)
        with self.state.locked():
            before = self._record()
            rec = json.loads(json.dumps(before))
            rec["versions"][str(number)] = self._ensure_model(rec, number)
            if label:
                rec["labels"][label] = number
                if label == "canary":
                    rec["canary_weight"] = float(weight or 0.0)
            try:
                self._sync_apps(rec)
            except MlflowctlError:
                self.state.write({**before, "apps": rec.get("apps", {})})
                self._sync_apps({**before, "apps": rec.get("apps", {})})
                raise
            self.state.write(rec)
        return self._endpoint(number, self.app_name(version=number))

    def set_label(self, label: str, version: int | None) -> None:
        with self.state.locked():
            rec = self._record()
            if version is None:
                if rec["labels"].pop(label, None) is None:
                    return
                if label == "canary":
                    rec["canary_weight"] = 0.0
            else:
                if str(int(version)) not in rec["versions"]:
                    raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on Hydrosphere",
                                         hint=f"deploy it first (served: {sorted(map(int, rec['versions'])) or 'none'})")
                rec["labels"][label] = int(version)
            self._sync_apps(rec)
            self.state.write(rec)

    def undeploy(self, version: int) -> None:
        with self.state.locked():
            rec = self._record()
            if rec["versions"].pop(str(int(version)), None) is None:
                return
            rec["labels"] = {k: v for k, v in rec["labels"].items() if v != int(version)}
            self._sync_apps(rec)
            self.state.write(rec)

    def serves(self, version: int) -> bool:
        rec = self._record()
        if str(int(version)) not in rec["versions"]:
            return False
        try:
            return self._app_status(self.app_name(version=int(version))) == "Ready"
        except MlflowctlError:
            return False

    def status(self) -> ServingStatus:
        rec = self._record()
        out = ServingStatus(target=self.name, model_name=self.model_name, labels=dict(rec["labels"]),
                            canary_weight=float(rec.get("canary_weight", 0.0)),
                            versions=[VersionStatus(int(k), "STOPPED") for k in sorted(rec["versions"], key=int)],
                            details={"hs_versions": {k: f"{self.model_name}:{v['hs_version']}"
                                                     for k, v in rec["versions"].items()},
                                     "hs_apply": str(self.state.dir / "hs")})
        try:
            apps = self._call("GET", "/api/v2/application")
        except MlflowctlError as exc:
            out.error = str(exc)
            return out
        states = {a.get("name"): str(a.get("status", "")) for a in apps or [] if isinstance(a, dict)}
        out.running = bool(rec.get("apps"))  # stopped: its applications are deleted
        out.url = self.base_url if out.running else ""
        if "stable" in rec["labels"] and out.running:
            out.predict_url = f"{self.base_url}/gateway/application/{self.app}"
        for v in out.versions:
            state = states.get(self.app_name(version=v.version), "")
            v.state = {"Ready": "AVAILABLE", "Assembling": "LOADING", "Failed": "END"}.get(state, "UNKNOWN")
            v.error = "" if state == "Ready" else (f"application {state}" if state else "no application")
        return out

    def endpoint(self, version: int | None = None, label: str | None = None) -> Endpoint:
        rec = self._record()
        if version is not None:
            if str(int(version)) not in rec["versions"]:
                raise MlflowctlError(f"version {version} of {self.model_name} is not deployed on Hydrosphere",
                                     hint=f"served: {sorted(map(int, rec['versions'])) or 'none'}")
            return self._endpoint(int(version), self.app_name(version=int(version)))
        label = label or "stable"
        if label not in rec["labels"]:
            raise MlflowctlError(f"no version of {self.model_name} has the label {label!r} on Hydrosphere",
                                 hint=f"labels: {rec['labels'] or 'none'}")
        return self._endpoint(rec["labels"][label], self.app_name(label=label))

    def start(self) -> Endpoint | None:
        with self.state.locked():
            rec = self._record()
            for key in list(rec["versions"]):
                rec["versions"][key] = self._ensure_model(rec, int(key))
            rec["apps"] = {}
            self._sync_apps(rec)
            self.state.write(rec)
        return self.endpoint() if "stable" in rec["labels"] else None

    def stop(self) -> None:
        """Delete this project's applications (the uploaded model versions stay, as Hydrosphere keeps them)."""
        if not str(self.setting("url") or ""):
            return
        with self.state.locked():
            rec = self._record()
            for name in sorted(rec.get("apps", {})):
                self._call("DELETE", f"/api/v2/application/{name}", ok=(200, 204, 404))
            rec["apps"] = {}
            self.state.write(rec)
