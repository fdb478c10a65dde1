"""The ``k8s`` runtime of the ``tfserving`` target: TF Serving as a Deployment + Service.

* the registry folder ``models/<name>`` of the store (a ``pvc://`` store: the claim with a ``subPath``)
  is mounted read only at ``/models/<name>``; ``MODEL_NAME``/``MODEL_BASE_PATH`` are set as for the
  container;
* the ``--model_config_file`` lives in the store at ``serving/<name>/tfserving/models.config``,
  mounted at ``/config``: a deploy, a label or an undeploy is one file write, TF Serving re-reads it
  every ``poll_seconds`` (a ConfigMap would take the kubelet's sync period to arrive);
* ports 8500 (gRPC) and 8501 (REST), readiness probe ``GET /v1/models/<name>`` on 8501;
* ``image: project`` runs the k8s backend's stage image with ``image/tf_serving_entrypoint.py`` as the
  command (the stand-in for ``tensorflow/serving``).

Jobs (integration test, monitor) reach it at the Service's cluster address; mlflowctl itself through
the API server's service proxy.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from mlflowctl.errors import ConfigError, UnavailableError
from mlflowctl_tfserving.target import ENTRY_SCRIPT, PROJECT_IMAGE, render_model_config

REST, GRPC = 8501, 8500


class K8sRuntime:
    def __init__(self, target: Any) -> None:
        self.target = target
        self.backend = target.project.backend_named("k8s")
        self.kube = self.backend.kube
        self.store = target.project.store
        self._cluster_url: str | None = None

    # ------------------------------------------------------------------ names
    @property
    def model(self) -> str:
        return self.target.model_name

    @property
    def name(self) -> str:
        from mlflowctl_plugins.kube import dns_name

        return dns_name("mlflowctl", str(self.target.project.name)[:16], "tfserving", self.model[:20])

    def config_path(self) -> str:
        return f"serving/{self.model}/tfserving"

    def url(self) -> str:
        """``http://<ClusterIP>:8501`` of the Service (where Jobs reach it)."""
        if self._cluster_url is None:
            svc = self.kube.call("read the TF Serving service", self.kube.core().read_namespaced_service,
                                 self.name, self.kube.namespace, not_found=None)
            if svc is None or not svc.spec.cluster_ip:
                return f"http://{self.name}.{self.kube.namespace}.svc:{REST}"
            self._cluster_url = f"http://{svc.spec.cluster_ip}:{REST}"
        return self._cluster_url

    def log_hint(self) -> str:
        return f"kubectl -n {self.kube.namespace} logs deployment/{self.name}"

    # ------------------------------------------------------------------ manifests
    def manifests(self, image: str) -> list[dict[str, Any]]:
        models_volume, models_sub = self.store.pod_volume(f"models/{self.model}")
        config_volume, config_sub = self.store.pod_volume(self.config_path())
        if models_volume != config_volume:
            raise ConfigError("TF Serving needs the registry and its model config on one volume")
        labels = {"app.kubernetes.io/managed-by": "mlflowctl", "app.kubernetes.io/name": "mlflowctl-tfserving",
                  "mlflowctl.io/deployment": self.name}
        container: dict[str, Any] = {
            "name": "tfserving", "image": image, "imagePullPolicy": self.backend.setting("image_pull_policy"),
            "args": [f"--port={GRPC}", f"--rest_api_port={REST}", "--model_config_file=/config/models.config",
                     f"--model_config_file_poll_wait_seconds={int(self.target.setting('poll_seconds'))}"],
            "env": [{"name": "MODEL_NAME", "value": self.model}, {"name": "MODEL_BASE_PATH", "value": "/models"},
                    {"name": "HOME", "value": "/tmp"}],
            "ports": [{"name": "grpc", "containerPort": GRPC}, {"name": "http", "containerPort": REST}],
            "readinessProbe": {"httpGet": {"path": f"/v1/models/{self.model}", "port": REST},
                               "periodSeconds": 1, "failureThreshold": 3, "timeoutSeconds": 2},
            "volumeMounts": [
                {"name": "store", "mountPath": f"/models/{self.model}", "subPath": models_sub, "readOnly": True},
                {"name": "store", "mountPath": "/config", "subPath": config_sub, "readOnly": True}],
        }
        if str(self.target.setting("image")) == PROJECT_IMAGE:
            container["command"] = ["python", f"/app/{ENTRY_SCRIPT}"]
        if self.backend.resources():
            container["resources"] = self.backend.resources()
        pod = {"containers": [container], "volumes": [{**models_volume, "name": "store"}],
               "automountServiceAccountToken": False, "enableServiceLinks": False, "terminationGracePeriodSeconds": 5}
        ns = self.kube.namespace
        return [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": self.name, "namespace": ns, "labels": labels},
             "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                      "template": {"metadata": {"labels": labels}, "spec": pod}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": self.name, "namespace": ns, "labels": labels},
             "spec": {"selector": labels, "ports": [{"name": "http", "port": REST, "targetPort": REST},
                                                    {"name": "grpc", "port": GRPC, "targetPort": GRPC}]}},
        ]

    def image(self) -> str:
        if str(self.target.setting("image")) == PROJECT_IMAGE:
            return self.backend.image(lambda line: print(f"[tfserving] {line}", flush=True))
        return str(self.target.setting("image"))

    # ------------------------------------------------------------------ the runtime
    def preflight(self) -> None:
        self.backend.preflight()
        self.store.pod_volume(f"models/{self.model}")  # a store pods can mount (else one line)

    def apply(self, rec: dict[str, Any]) -> None:
        """Write the model config into the store, and start the Deployment if it is not there."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "models.config"
            path.write_text(render_model_config(self.model, f"/models/{self.model}", rec["versions"], rec["labels"]))
            self.store.put(path, f"{self.config_path()}/models.config")
        self.target.state.write(rec)
        if not self.exists():
            deployment, service = self.manifests(self.image())
            apps, core, ns = self.kube.apps(), self.kube.core(), self.kube.namespace
            self.kube.call("create the TF Serving deployment", apps.create_namespaced_deployment, ns, deployment)
            if self.kube.call("read service", core.read_namespaced_service, self.name, ns, not_found=None) is None:
                self.kube.call("create the TF Serving service", core.create_namespaced_service, ns, service)
            self._cluster_url = None

    def exists(self) -> bool:
        dep = self.kube.call("read the TF Serving deployment", self.kube.apps().read_namespaced_deployment,
                             self.name, self.kube.namespace, not_found=None)
        return dep is not None and dep.metadata.deletion_timestamp is None

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            r = self.kube.proxy("GET", self.name, REST, path, timeout=timeout)
        except UnavailableError as exc:
            return 0, str(exc)
        if r.status_code == 503 and "no endpoints available" in r.text:  # the API server: not ready yet
            return 0, "no ready pod"
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, None

    def delete(self) -> None:
        from kubernetes import client

        apps, core, ns = self.kube.apps(), self.kube.core(), self.kube.namespace
        body = client.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=2)
        self.kube.call("delete the TF Serving deployment", apps.delete_namespaced_deployment, self.name, ns,
                       body=body, not_found=None)
        self.kube.call("delete the TF Serving service", core.delete_namespaced_service, self.name, ns, not_found=None)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.kube.call(
                "read deployment", apps.read_namespaced_deployment, self.name, ns, not_found=None) is not None:
            time.sleep(0.3)
        self._cluster_url = None
