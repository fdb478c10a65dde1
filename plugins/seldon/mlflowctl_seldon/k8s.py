"""The ``k8s`` runtime of the ``seldon`` target: a ``SeldonDeployment`` applied with the official client.

``deploy``/``set_label``/``undeploy`` re-render the object (:mod:`mlflowctl_seldon.manifest`), apply it
(create, or replace with the current ``resourceVersion``) and wait until the Seldon operator reports
``status.state: Available`` for the new ``metadata.generation`` (``Failed`` is an error, with the
operator's ``status.description``). Predictions: ``<ingress_url>/seldon/<ns>/<name>/api/v1.0/predictions``
(the default, routed by ``traffic``); a version alone at its predictor's Service
``http://<name>-v<N>.<ns>.svc:8000/api/v1.0/predictions`` (inside the cluster).
"""
from __future__ import annotations

import time
from typing import Any

from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.serving import Endpoint, ServingStatus, VersionStatus
from mlflowctl_seldon.manifest import GROUP, PLURAL, VERSION, dns, seldon_deployment


class K8sRuntime:
    def __init__(self, target: Any) -> None:
        self.target = target
        self.backend = target.project.backend_named("k8s")
        self.kube = self.backend.kube

    # ------------------------------------------------------------------ names
    @property
    def namespace(self) -> str:
        return str(self.target.setting("namespace") or self.kube.namespace)

    @property
    def name(self) -> str:
        return dns("mlflowctl", str(self.target.project.name)[:20], self.target.model_name[:20])

    def model_uri(self) -> str:
        uri = str(self.target.setting("model_uri") or "")
        if uri:
            return uri
        store_url = str(self.target.project.store.url)
        if not store_url.startswith("pvc://"):
            raise ConfigError("serving.seldon.model_uri is not set and the store is not a pvc:// store",
                              hint="set serving.seldon.model_uri (s3://..., gs://... or pvc://claim/path/models/<name>)")
        return f"{store_url.rstrip('/')}/models/{self.target.model_name}"

    def _api(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.kube.connect())

    def manifest(self, rec: dict[str, Any]) -> dict[str, Any]:
        return seldon_deployment(self.name, self.namespace, self.target.model_name, self.model_uri(),
                                 [int(v) for v in rec["versions"]], rec["labels"], float(rec.get("canary_weight", 0.0)),
                                 image=str(self.target.setting("image") or ""), project=str(self.target.project.name))

    # ------------------------------------------------------------------ the object
    def read(self) -> dict[str, Any] | None:
        api = self._api()
        return self.kube.call(f"read SeldonDeployment {self.name}", api.get_namespaced_custom_object,
                              GROUP, VERSION, self.namespace, PLURAL, self.name, not_found=None)

    def apply(self, rec: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        api, body = self._api(), self.manifest(rec)
        extra = {"dry_run": "All"} if dry_run else {}
        current = self.read()
        if current is None:
            return self.kube.call(f"create SeldonDeployment {self.name}", api.create_namespaced_custom_object,
                                  GROUP, VERSION, self.namespace, PLURAL, body, **extra)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return self.kube.call(f"replace SeldonDeployment {self.name}", api.replace_namespaced_custom_object,
                              GROUP, VERSION, self.namespace, PLURAL, self.name, body, **extra)

    def wait_available(self, generation: int) -> None:
        deadline = time.monotonic() + float(self.target.setting("start_timeout"))
        state = "no status"
        while True:
            obj = self.read()
            if obj is None:
                raise MlflowctlError(f"SeldonDeployment {self.name} vanished while waiting for it")
            status = obj.get("status") or {}
            state = str(status.get("state") or "no status")
            fresh = int(status.get("observedGeneration", generation) or generation) >= generation
            if fresh and state == "Available":
                return
            if fresh and state == "Failed":
                raise MlflowctlError(f"SeldonDeployment {self.name} failed: {status.get('description') or 'Failed'}",
                                     hint=f"kubectl -n {self.namespace} describe sdep {self.name}")
            if time.monotonic() > deadline:
                raise UnavailableError(f"SeldonDeployment {self.name} not Available within "
                                       f"{self.target.setting('start_timeout'):g}s (state: {state})",
                                       hint="is the Seldon Core operator installed? "
                                            f"kubectl -n {self.namespace} describe sdep {self.name}")
            time.sleep(0.5)

    def _change(self, change: Any) -> None:
        with self.target.state.locked():
            rec = self.target._record()
            change(rec)
            if not rec["versions"]:
                self.delete()
            else:
                obj = self.apply(rec)
                self.wait_available(int(obj["metadata"].get("generation", 1)))
            self.target.state.write(rec)

    # ------------------------------------------------------------------ the contract
    def preflight(self) -> None:
        self.kube.check_reachable()
        self.model_uri()

    def deploy(self, number: int, label: str | None, weight: float) -> Endpoint:
        def change(rec: dict[str, Any]) -> None:
            rec["versions"][str(number)] = {"predictor": f"v{number}"}
            if label:
                rec["labels"][label] = number
                if label == "canary":
                    rec["canary_weight"] = weight

        self._change(change)
        return self.endpoint(number, None)

    def set_label(self, label: str, version: int | None) -> None:
        def change(rec: dict[str, Any]) -> None:
            if version is None:
                rec["labels"].pop(label, None)
            elif str(int(version)) not in rec["versions"]:
                raise MlflowctlError(f"version {version} of {self.target.model_name} is not deployed on Seldon")
            else:
                rec["labels"][label] = int(version)

        self._change(change)

    def undeploy(self, number: int) -> None:
        def change(rec: dict[str, Any]) -> None:
            rec["versions"].pop(str(number), None)
            rec["labels"] = {k: v for k, v in rec["labels"].items() if v != number}

        self._change(change)

    def delete(self) -> None:
        api = self._api()
        self.kube.call(f"delete SeldonDeployment {self.name}", api.delete_namespaced_custom_object,
                       GROUP, VERSION, self.namespace, PLURAL, self.name, not_found=None)

    def serves(self, number: int) -> bool:
        try:
            obj = self.read()
        except MlflowctlError:
            return False
        if not obj or (obj.get("status") or {}).get("state") != "Available":
            return False
        return any(p.get("name") == f"v{number}" for p in obj["spec"].get("predictors", []))

    def endpoint(self, version: int | None, label: str | None) -> Endpoint:
        rec = self.target._record()
        if version is None and label not in (None, "stable"):
            if label not in rec["labels"]:
                raise MlflowctlError(f"no version of {self.target.model_name} has the label {label!r} on Seldon")
            version = rec["labels"][label]
        if version is not None:
            if str(int(version)) not in rec["versions"]:
                raise MlflowctlError(f"version {version} of {self.target.model_name} is not deployed on Seldon")
            url = f"http://{self.name}-v{int(version)}.{self.namespace}.svc:8000"
            return Endpoint(url=url, predict_url=f"{url}/api/v1.0/predictions", model_name=self.target.model_name,
                            version=int(version), protocol="seldon")
        if "stable" not in rec["labels"]:
            raise MlflowctlError(f"no version of {self.target.model_name} is stable on Seldon")
        ingress = str(self.target.setting("ingress_url") or "").rstrip("/")
        if not ingress:
            raise ConfigError("serving.seldon.ingress_url is not set (the Istio/Ambassador address)")
        url = f"{ingress}/seldon/{self.namespace}/{self.name}"
        return Endpoint(url=url, predict_url=f"{url}/api/v1.0/predictions", model_name=self.target.model_name,
                        version=rec["labels"]["stable"], protocol="seldon")

    def status(self) -> ServingStatus:
        rec = self.target._record()
        obj = None
        try:
            obj = self.read()
        except MlflowctlError as exc:
            error = str(exc)
        else:
            error = ""
        state = str(((obj or {}).get("status") or {}).get("state") or "")
        mapped = {"Available": "AVAILABLE", "Creating": "LOADING", "Failed": "END"}.get(state, "UNKNOWN")
        versions = [VersionStatus(int(v), mapped if obj else "STOPPED") for v in sorted(rec["versions"], key=int)]
        return ServingStatus(target=self.target.name, running=obj is not None, model_name=self.target.model_name,
                             versions=versions, labels=dict(rec["labels"]),
                             canary_weight=float(rec.get("canary_weight", 0.0)), error=error,
                             details={"runtime": "k8s", "seldondeployment": f"{self.namespace}/{self.name}",
                                      "state": state})
