"""The model server in the cluster: the ``k8s`` runtime of the ``local`` serving target.

Under ``backend=k8s`` (``serving.local.runtime: auto`` or ``k8s``) the built-in server
(``image/serve.py``) runs as a Deployment + Service of the stage image, the way it runs in a
container under ``backend=docker``:

* the registry folder ``models/<name>`` of the store is mounted read-only at ``/models/<name>``
  (the claim with a ``subPath``), the routing file lives in the store at
  ``serving/<name>/routing.json``, mounted at ``/serving``; the server re-reads it when it changes
  (``serve.py --watch-routing``), so a deploy, a label or an undeploy is one file write;
* the readiness probe is the model's TF Serving status URL ``/v1/models/<name>``;
* Jobs (integration test, monitor) reach it at the Service's cluster address
  (``http://<ClusterIP>:<port>``: no DNS is needed); ``mlflowctl serve status|stop``, ``report``
  and the pipeline's checks reach it from your machine through the API server's service proxy.
"""
from __future__ import annotations

import time
from typing import Any

from mlflowctl.errors import ConfigError, UnavailableError
from mlflowctl_plugins.kube import dns_name

SERVER_SCRIPT = "serve.py"
RBAC_RULES = [  # what the model server's runtime does on the cluster
    ("apps", "deployments", ("get", "create", "delete")),
    ("", "services", ("get", "create", "delete")),
    ("", "services/proxy", ("get", "create")),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
]


class KubeServerRuntime:
    """Start, find, reach and stop the model server's Deployment (the runtime interface of ``LocalServing``)."""

    name = "k8s"
    missing_module_hint = "add the server's requirements to image/requirements.txt (the image is rebuilt)"

    def __init__(self, target: Any) -> None:
        self.target = target
        project = target.project
        self.backend = project.backend_named("k8s")
        self.kube = self.backend.kube
        self.store = project.store
        self._cluster_url: str | None = None
        self._exit: int | None = None

    # -- names and places ------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.target.model_name

    @property
    def deployment(self) -> str:
        return dns_name("mlflowctl", str(self.target.project.name)[:16], "serve", self.model[:20])

    @property
    def port(self) -> int:
        return int(self.target.setting("port"))

    def routing_path(self) -> str:
        return f"serving/{self.model}/routing.json"

    def base_path(self) -> str:
        return f"{self.store.url}/models/{self.model}"

    def cluster_url(self) -> str:
        """``http://<ClusterIP>:<port>`` of the server's Service (where Jobs reach it)."""
        if self._cluster_url is None:
            svc = self.kube.call("read the server's service", self.kube.core().read_namespaced_service,
                                 self.deployment, self.kube.namespace, not_found=None)
            if svc is None or not svc.spec.cluster_ip:
                return f"http://{self.deployment}.{self.kube.namespace}.svc:{self.port}"
            self._cluster_url = f"http://{svc.spec.cluster_ip}:{self.port}"
        return self._cluster_url

    # -- HTTP through the API server ----------------------------------------------------------------
    def request(self, method: str, path: str, timeout: float = 5.0, **kwargs: Any) -> Any:
        return self.kube.proxy(method, self.deployment, self.port, path, timeout=timeout, **kwargs)

    def push_routing(self) -> None:
        """Put the routing file where the server reads it (the server notices within a second)."""
        self.store.put(self.target.routing_file, self.routing_path())

    def wait_routing(self, routing: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Until the server serves exactly ``routing``'s versions with its labels (a reload done)."""
        deadline = time.monotonic() + timeout
        want = set(routing["versions"])
        seen: Any = None
        while time.monotonic() < deadline:
            try:
                r = self.request("GET", f"v1/models/{self.model}")
                states = r.json().get("model_version_status", []) if r.status_code == 200 else []
                seen = {int(s["version"]) for s in states}
                if seen == want and all(self._label_is(label, number) for label, number in routing["labels"].items()):
                    return {"versions": sorted(seen), "labels": routing["labels"]}
            except (ValueError, KeyError, UnavailableError):
                pass
            time.sleep(0.3)
        raise UnavailableError(f"the model server in the cluster did not pick up the new routing within {timeout:g}s "
                               f"(serving {sorted(seen) if seen is not None else 'nothing'}, want {sorted(want)})",
                               hint=self.log_hint({}))

    def _label_is(self, label: str, number: int) -> bool:
        r = self.request("GET", f"v1/models/{self.model}/labels/{label}")
        if r.status_code != 200:
            return False
        return any(int(s["version"]) == int(number) for s in r.json().get("model_version_status", []))

    # -- the runtime interface --------------------------------------------------------------------------
    def manifests(self, image: str) -> list[dict[str, Any]]:
        """The server's Deployment and Service."""
        ns = self.kube.namespace
        models_volume, models_sub = self.store.pod_volume(f"models/{self.model}")
        serving_volume, serving_sub = self.store.pod_volume(f"serving/{self.model}")
        if models_volume != serving_volume:
            raise ConfigError("the model server needs the registry and its routing on one volume")
        labels = {"app.kubernetes.io/managed-by": "mlflowctl", "app.kubernetes.io/name": "mlflowctl-serve",
                  "mlflowctl.io/project": dns_name(str(self.target.project.name)), "mlflowctl.io/model": dns_name(self.model)}
        selector = {"app.kubernetes.io/name": "mlflowctl-serve", "mlflowctl.io/model": dns_name(self.model),
                    "mlflowctl.io/project": labels["mlflowctl.io/project"]}
        b = self.backend
        command = ["python", SERVER_SCRIPT, "--model-name", self.model, "--base-path", f"/models/{self.model}",
                   "--routing", "/serving/routing.json", "--watch-routing", "0.5", "--host", "0.0.0.0",
                   "--port", str(self.port), "--max-body-bytes", str(int(self.target.setting("max_body_bytes"))),
                   "--grpc-port", "0"]  # REST and V2 only in the cluster: gRPC is not exposed by the Service yet
        container: dict[str, Any] = {
            "name": "serve", "image": image, "imagePullPolicy": b.setting("image_pull_policy"), "command": command,
            "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"}],
            "ports": [{"name": "http", "containerPort": self.port}],
            "readinessProbe": {"httpGet": {"path": f"/v1/models/{self.model}", "port": self.port},
                               "periodSeconds": 1, "failureThreshold": 3, "timeoutSeconds": 2},
            "volumeMounts": [
                {"name": "store", "mountPath": f"/models/{self.model}", "subPath": models_sub, "readOnly": True},
                {"name": "store", "mountPath": "/serving", "subPath": serving_sub, "readOnly": True}],
        }
        if b.resources():
            container["resources"] = b.resources()
        pod: dict[str, Any] = {"containers": [container], "volumes": [{**models_volume, "name": "store"}],
                               "automountServiceAccountToken": False, "enableServiceLinks": False,
                               "terminationGracePeriodSeconds": 5}
        if b.setting("node_selector"):
            pod["nodeSelector"] = dict(b.setting("node_selector"))
        if b.setting("tolerations"):
            pod["tolerations"] = list(b.setting("tolerations"))
        if b.setting("image_pull_secrets"):
            pod["imagePullSecrets"] = [{"name": n} for n in b.setting("image_pull_secrets")]
        return [
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": self.deployment, "namespace": ns, "labels": labels},
             "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                      "template": {"metadata": {"labels": labels}, "spec": pod}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": self.deployment, "namespace": ns, "labels": labels},
             "spec": {"selector": selector, "ports": [{"name": "http", "port": self.port, "targetPort": self.port}]}},
        ]

    def spawn(self, args: list[str], base: Any) -> dict[str, Any]:
        self.backend.preflight()
        image = self.backend.image(lambda line: print(f"[serve] {line}", flush=True))
        self.push_routing()
        deployment, service = self.manifests(image)
        apps, core, ns = self.kube.apps(), self.kube.core(), self.kube.namespace
        self._remove()
        self.kube.call("create the server's deployment", apps.create_namespaced_deployment, ns, deployment)
        if self.kube.call("read service", core.read_namespaced_service, self.deployment, ns, not_found=None) is None:
            self.kube.call("create the server's service", core.create_namespaced_service, ns, service)
        self._cluster_url = None
        self._exit = None
        return {"deployment": self.deployment, "namespace": ns, "image": image, "url": self.cluster_url(),
                "routing": self.routing_path()}

    def _pods(self) -> list[Any]:
        core = self.kube.core()
        selector = f"app.kubernetes.io/name=mlflowctl-serve,mlflowctl.io/model={dns_name(self.model)}"
        return self.kube.call("list the server's pods", core.list_namespaced_pod, self.kube.namespace,
                              label_selector=selector).items

    def alive(self, info: dict[str, Any]) -> bool:
        if info.get("runtime") != "k8s" and info:
            return False
        dep = self.kube.call("read the server's deployment", self.kube.apps().read_namespaced_deployment,
                             self.deployment, self.kube.namespace, not_found=None)
        return dep is not None and dep.metadata.deletion_timestamp is None

    def exit_code(self) -> int | None:
        """A server container that keeps failing (crash loop, image error) ends the wait for readiness."""
        for pod in self._pods():
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                waiting = cs.state.waiting if cs.state else None
                term = cs.last_state.terminated if cs.last_state else None
                if waiting and waiting.reason in ("CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff",
                                                  "ErrImageNeverPull", "CreateContainerConfigError"):
                    self._save_log(pod.metadata.name)
                    return int(term.exit_code) if term else 1
        return None

    def _save_log(self, pod: str) -> None:
        try:
            text = self.kube.core().read_namespaced_pod_log(pod, self.kube.namespace, container="serve",
                                                            previous=True, tail_lines=200)
        except Exception:  # noqa: BLE001 - no previous log: nothing to keep
            return
        with open(self.target.log_file, "a") as log:
            log.write(text if text.endswith("\n") else text + "\n")

    def serves(self, ready: dict[str, Any]) -> bool:
        return True

    def describe(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"pid": None, "container": f"deployment/{self.deployment} (namespace {self.kube.namespace})"}

    def log_hint(self, info: dict[str, Any]) -> str:
        return f"kubectl -n {self.kube.namespace} logs deployment/{self.deployment}"

    def discard(self, info: dict[str, Any]) -> None:
        self._remove()

    def stop(self, info: dict[str, Any], timeout: float = 10.0) -> None:
        self._remove(wait=timeout)

    def hangup(self, info: dict[str, Any]) -> None:
        self.push_routing()

    def sweep(self) -> None:
        self._remove()

    def _remove(self, wait: float = 0.0) -> None:
        from kubernetes import client

        apps, core, ns = self.kube.apps(), self.kube.core(), self.kube.namespace
        body = client.V1DeleteOptions(propagation_policy="Foreground", grace_period_seconds=2)
        self.kube.call("delete the server's deployment", apps.delete_namespaced_deployment, self.deployment, ns,
                       body=body, not_found=None)
        self.kube.call("delete the server's service", core.delete_namespaced_service, self.deployment, ns,
                       not_found=None)
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline and self._pods():
            time.sleep(0.3)
        while time.monotonic() < deadline + 30 and self.kube.call(
                "read deployment", apps.read_namespaced_deployment, self.deployment, ns, not_found=None) is not None:
            time.sleep(0.3)
        self._cluster_url = None
