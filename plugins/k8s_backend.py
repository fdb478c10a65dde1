"""The ``k8s`` backend: every stage with a command runs as a ``batch/v1`` Job on a Kubernetes cluster.

The image is the one the ``docker`` backend builds (same build context, same content-digest tag
``mlflowctl/<project>:<digest>``). With ``backends.k8s.registry`` it is tagged and pushed there;
with ``backends.k8s.image_load`` a command hands it to the cluster (``kind load docker-image
{image}``, ``minikube image load {image}``, the test cluster's ``scripts/ensure-cluster.sh
load-image {image}``); with neither, the cluster must already have it.

A stage's inputs and output are store paths (``StageRun.locations``): the pod mounts the store's
volume (a PVC) with one ``subPath`` per input (read-only) and one for the output, a staging folder
inside the store that the pipeline publishes after the Job succeeded. The Job's name is derived
from project, stage and cache key, so a re-submitted run (after the orchestrator died) adopts the
Job that is still running instead of starting a second one.

The backend waits with a watch on the Job's pods (resumed after ``410 Gone``), streams each pod's
log live with the stage prefix, and maps every way a Job ends to one line: success; failure with
the exit code and the log tail; ``DeadlineExceeded``; an image the node cannot get; unschedulable
(with the scheduler's reason); OOMKilled; evicted. Ctrl-C (or the timeout) deletes the Job and its
pods. The ``kubernetes`` client is imported only when a stage runs or a check is made.
"""
from __future__ import annotations

import json
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from mlflowctl import hookimpl
from mlflowctl.backends import Backend, Cancelled, LogWriter, StageResult, StageRun
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, StageFailed, UnavailableError
from mlflowctl_plugins.kube import Kube, api_reason, check_dns_label, check_quantity, dns_name

INPUTS_ROOT = "/mnt/inputs"
OUTPUTS_ROOT = "/mnt/outputs"
MANAGED_BY = "mlflowctl"
LABEL_PROJECT = "mlflowctl.io/project"
LABEL_STAGE = "mlflowctl.io/stage"
LABEL_KEY = "mlflowctl.io/key"
TFJOB_GROUP, TFJOB_VERSION = "kubeflow.org", "v1"
TFJOB_LABEL = "training.kubeflow.org/job-name"
WATCH_SECONDS = 1           # each watch call returns at least this often, so cancel is prompt
IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName")
CONFIG_ERRORS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
# What the backend does on the cluster: checked with a SelfSubjectAccessReview at preflight, and
# written as the Role of `mlflowctl render backend=k8s`.
RBAC_RULES = [
    ("batch", "jobs", ("create", "get", "list", "watch", "delete")),
    ("", "pods", ("get", "list", "watch", "delete")),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),
]


def _check_mount(spec: str) -> str | None:
    parts = str(spec).split(":")
    if len(parts) in (2, 3) and parts[0].startswith("/") and parts[1].startswith("/") \
            and (len(parts) == 2 or parts[2] in ("ro", "rw")):
        return None
    return "expected host:container[:ro|rw] with absolute paths"


def _check_toleration(item: Any) -> str | None:
    if isinstance(item, dict) and set(item) <= {"key", "operator", "value", "effect", "tolerationSeconds"}:
        return None
    return "expected a toleration mapping (key, operator, value, effect, tolerationSeconds)"


class KubeBackend(Backend):
    """Runs each stage as a Job of the project's image, with its inputs and output on the store's volume."""

    name = "k8s"
    runs_in_store = True
    supports_replicas = True  # StageRun.replicas > 1: a kubeflow.org/v1 TFJob (Chief + replicas-1 Workers)
    description = "stages run as Kubernetes Jobs of the project's image; inputs and outputs on the store's volume"
    settings = {
        "kubeconfig": Setting(str, "", "kubeconfig file (empty: $KUBECONFIG or ~/.kube/config)"),
        "context": Setting(str, "", "kube context (empty: the kubeconfig's current context)"),
        "namespace": Setting(str, "", "namespace of the Jobs (empty: the context's, else default)",
                             check=check_dns_label),
        "image": Setting(str, "", "run this image as is (empty: the docker backend's image of image/, "
                                  "mlflowctl/<project>:<content digest>)"),
        "registry": Setting(str, "", "push the built image to this registry prefix, e.g. registry.example.com/team "
                                     "(empty: the cluster gets it through image_load, or already has it)"),
        "image_load": Setting(str, "", "command that hands a locally built image to the cluster, {image} replaced: "
                                       "'kind load docker-image {image}', 'minikube image load {image}'"),
        "image_pull_policy": Setting(str, "IfNotPresent", "imagePullPolicy of the stage pods",
                                     choices=("IfNotPresent", "Always", "Never")),
        "service_account": Setting(str, "", "service account of the stage pods (empty: the namespace's default)",
                                   check=check_dns_label),
        "cpu": Setting(str, "", "CPU request and limit per stage pod, e.g. 500m or 2 (empty: none)",
                       check=check_quantity),
        "memory": Setting(str, "", "memory request and limit per stage pod, e.g. 2Gi (empty: none)",
                          check=check_quantity),
        "gpus": Setting(int, 0, "nvidia.com/gpu limit per stage pod"),
        "node_selector": Setting(dict, {}, "nodeSelector of the stage pods"),
        "tolerations": Setting(list, [], "tolerations of the stage pods", check=_check_toleration),
        "image_pull_secrets": Setting(list, [], "names of image pull secrets", check=check_dns_label),
        "host_mounts": Setting(list, [], "hostPath mounts host:container[:ro|rw] (single-node clusters, e.g. "
                                         "/usr/share/datasets:/usr/share/datasets:ro)", check=_check_mount),
        "backoff_limit": Setting(int, 0, "retries of a failed stage pod (Job backoffLimit)"),
        "active_deadline_seconds": Setting(int, 6 * 3600, "a Job running longer fails with DeadlineExceeded"),
        "ttl_seconds_after_finished": Setting(int, 3600, "finished Jobs are garbage-collected after this"),
        "keep_jobs": Setting(bool, False, "keep finished Jobs and their pods (for kubectl describe/logs) until "
                                          "ttl_seconds_after_finished; by default they are deleted once the "
                                          "stage's log is saved"),
        "start_timeout": Setting(float, 300.0, "seconds a pod may stay unschedulable or not started before the "
                                               "stage fails"),
    }

    def __init__(self, settings: dict[str, Any], project: Any) -> None:
        super().__init__(settings, project)
        self.kube = Kube(self.setting("context"), self.setting("namespace"), self.setting("kubeconfig"))
        self._lock = threading.RLock()
        self._images: Any = None
        self._image_ref: str | None = None
        self._checked = False
        for key in ("backoff_limit", "active_deadline_seconds", "ttl_seconds_after_finished", "gpus"):
            if int(self.setting(key)) < 0:
                raise ConfigError(f"backends.k8s.{key}: expected a number >= 0, got {self.setting(key)}")

    def setting(self, key: str) -> Any:
        value = self.config.get(key) if isinstance(self.config, dict) else None
        return self.settings[key].default if value is None else value

    # -- the image: built by the docker backend's code ---------------------------------------------
    @property
    def images(self) -> Any:
        """The docker backend of this project (its settings), which builds and tags the image."""
        with self._lock:
            if self._images is None:
                from mlflowctl_plugins.docker_backend import DockerBackend

                config = getattr(self.project, "config", None)
                try:
                    docker_settings = config["backends"].get("docker", {}) if config is not None else {}
                except (KeyError, TypeError, AttributeError):
                    docker_settings = {}
                self._images = DockerBackend(docker_settings or {}, self.project)
            return self._images

    def profile(self) -> dict[str, Any]:
        """The image's environment, exactly as the docker backend keys it: results are shared both ways."""
        if self.setting("image"):
            return {"image": self.setting("image")}
        return self.images.profile()

    def image(self, echo: Any = None) -> str:
        """The image reference pods run, built, pushed or loaded as configured (once per run)."""
        with self._lock:
            if self._image_ref is not None:
                return self._image_ref
            if self.setting("image"):
                self._image_ref = str(self.setting("image"))
                return self._image_ref
            self.images.ensure_image(echo)
            ref = self.images.image_ref()
            registry = str(self.setting("registry")).rstrip("/")
            if registry:
                ref = self._push(ref, f"{registry}/{ref.split('/', 1)[-1]}", echo)
            elif self.setting("image_load"):
                self._load(ref, echo)
            self._image_ref = ref
            return ref

    def _push(self, local: str, remote: str, echo: Any) -> str:
        client = self.images.client()
        repo, tag = remote.rsplit(":", 1)
        (echo or print)(f"pushing {remote}")
        client.images.get(local).tag(repo, tag)
        for line in client.images.push(repo, tag=tag, stream=True, decode=True):
            if "error" in line:
                raise UnavailableError(f"cannot push {remote}: {line['error']}",
                                       hint="docker login to the registry, or check backends.k8s.registry")
        return remote

    def _loaded_record(self) -> Path:
        return Path(self.project.state_dir) / "k8s-images.json"

    def _load(self, ref: str, echo: Any, force: bool = False) -> None:
        """Run ``image_load`` for ``ref`` unless done before for this context (or ``force``)."""
        import subprocess

        record = self._loaded_record()
        try:
            done = json.loads(record.read_text())
        except (OSError, ValueError):
            done = {}
        context = self.kube.context_name if self.kube._api is not None else (self.setting("context") or "current")
        if not force and ref in done.get(context, []):
            return
        command = [part.replace("{image}", ref) for part in shlex.split(str(self.setting("image_load")))]
        (echo or print)(f"loading {ref} into the cluster: {shlex.join(command)}")
        try:
            proc = subprocess.run(command, cwd=self.project.root, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UnavailableError(f"backends.k8s.image_load failed for {ref}: {exc}") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise UnavailableError(f"backends.k8s.image_load failed for {ref} (exit {proc.returncode}): {tail}",
                                   hint="check the command in backends.k8s.image_load")
        done.setdefault(context, [])
        done[context] = sorted(set(done[context]) | {ref})
        record.write_text(json.dumps(done, indent=2, sort_keys=True))

    # -- checks ---------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """The context answers, the namespace exists, the verbs are allowed, the store is mountable."""
        if self._checked:
            return
        self.kube.check_reachable()
        self.kube.check_namespace()
        self.kube.check_access([(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs])
        store = getattr(self.project, "store", None)
        if store is not None:
            store.pod_volume("")  # raises ConfigError for a store pods cannot reach
        self._checked = True

    # -- the Job ----------------------------------------------------------------------------------------
    def job_name(self, run: StageRun) -> str:
        """``mlflowctl-<project>-<stage>-<key>``: DNS-1123, at most 63 characters, the same for the same key."""
        key = run.key if run.key and run.key != "uncached" else f"x{int(time.time() * 1000) % 10**9:09d}"
        project = dns_name(str(getattr(self.project, "name", "") or "p"), limit=14)
        stage = dns_name(run.stage, limit=22)
        return dns_name("mlflowctl", project, stage, key[:12])

    def labels(self, run: StageRun) -> dict[str, str]:
        return {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_PROJECT: dns_name(str(self.project.name)),
                LABEL_STAGE: dns_name(run.stage), LABEL_KEY: dns_name(run.key or "none")}

    def volumes(self, run: StageRun) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
        """(volumes, volumeMounts, env) for the run's store locations and host mounts."""
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        env: dict[str, str] = {}
        names: dict[str, str] = {}
        for var, loc in sorted(run.locations.items()):
            volume, sub_path = loc.store.pod_volume(loc.path)
            ident = json.dumps(volume, sort_keys=True)
            if ident not in names:
                names[ident] = f"store-{len(names)}"
                volumes.append({**volume, "name": names[ident]})
            target = f"{INPUTS_ROOT if loc.read_only else OUTPUTS_ROOT}/{var}"
            mounts.append({"name": names[ident], "mountPath": target, "subPath": sub_path, "readOnly": loc.read_only})
            env[var] = target
        for i, spec in enumerate(self.setting("host_mounts") or []):
            parts = str(spec).split(":")
            host, target, mode = parts[0], parts[1], (parts[2] if len(parts) > 2 else "ro")
            volumes.append({"name": f"host-{i}", "hostPath": {"path": host, "type": "Directory"}})
            mounts.append({"name": f"host-{i}", "mountPath": target, "readOnly": mode == "ro"})
        return volumes, mounts, env

    def resources(self) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if self.setting("cpu"):
            limits["cpu"] = str(self.setting("cpu"))
        if self.setting("memory"):
            limits["memory"] = str(self.setting("memory"))
        requests = dict(limits)
        if int(self.setting("gpus")):
            limits["nvidia.com/gpu"] = int(self.setting("gpus"))
        return {"requests": requests, "limits": limits} if limits else {}

    def job_manifest(self, run: StageRun, name: str, image: str) -> dict[str, Any]:
        """The ``batch/v1`` Job that runs ``run`` (what :meth:`run` creates and :meth:`render` writes)."""
        volumes, mounts, location_env = self.volumes(run)
        env = {"HOME": "/tmp", "TF_CPP_MIN_LOG_LEVEL": "2", **run.env, **location_env}
        container: dict[str, Any] = {
            "name": "stage", "image": image, "imagePullPolicy": self.setting("image_pull_policy"),
            "command": list(run.command), "env": [{"name": k, "value": str(v)} for k, v in sorted(env.items())],
            "volumeMounts": mounts,
        }
        if self.resources():
            container["resources"] = self.resources()
        pod: dict[str, Any] = {
            "restartPolicy": "Never", "containers": [container], "volumes": volumes,
            "automountServiceAccountToken": False, "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
        }
        if self.setting("service_account"):
            pod["serviceAccountName"] = self.setting("service_account")
        if self.setting("node_selector"):
            pod["nodeSelector"] = {str(k): str(v) for k, v in self.setting("node_selector").items()}
        if self.setting("tolerations"):
            pod["tolerations"] = list(self.setting("tolerations"))
        if self.setting("image_pull_secrets"):
            pod["imagePullSecrets"] = [{"name": n} for n in self.setting("image_pull_secrets")]
        labels = self.labels(run)
        spec: dict[str, Any] = {"backoffLimit": int(self.setting("backoff_limit")),
                                "template": {"metadata": {"labels": labels}, "spec": pod}}
        if int(self.setting("active_deadline_seconds")):
            spec["activeDeadlineSeconds"] = int(self.setting("active_deadline_seconds"))
        if int(self.setting("ttl_seconds_after_finished")):
            spec["ttlSecondsAfterFinished"] = int(self.setting("ttl_seconds_after_finished"))
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": self.namespace_for_manifests(), "labels": labels}, "spec": spec}

    def tfjob_manifest(self, run: StageRun, name: str, image: str) -> dict[str, Any]:
        """The ``kubeflow.org/v1`` TFJob for ``run.replicas`` > 1: a Chief and replicas-1 Workers, each pod the
        Job's pod (container ``tensorflow``, port 2222, same volumes and env); the training operator sets
        ``TF_CONFIG``. Workers get an emptyDir where the chief has the output folder (they write nothing kept)."""
        job = self.job_manifest(run, name, image)
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        container["name"] = "tensorflow"
        container["ports"] = [{"name": "tfjob-port", "containerPort": 2222}]
        worker = json.loads(json.dumps(template))
        outputs = {f"{OUTPUTS_ROOT}/{var}" for var, loc in run.locations.items() if not loc.read_only}
        for i, mount in enumerate(worker["spec"]["containers"][0]["volumeMounts"]):
            if mount["mountPath"] in outputs:
                worker["spec"]["volumes"].append({"name": f"replica-output-{i}", "emptyDir": {}})
                worker["spec"]["containers"][0]["volumeMounts"][i] = {"name": f"replica-output-{i}",
                                                                      "mountPath": mount["mountPath"]}
        run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": int(self.setting("backoff_limit"))}
        for key in ("active_deadline_seconds", "ttl_seconds_after_finished"):
            if int(self.setting(key)):
                run_policy["activeDeadlineSeconds" if key.startswith("active") else "ttlSecondsAfterFinished"] = \
                    int(self.setting(key))
        replica = {"restartPolicy": "Never"}
        return {"apiVersion": f"{TFJOB_GROUP}/{TFJOB_VERSION}", "kind": "TFJob", "metadata": job["metadata"],
                "spec": {"runPolicy": run_policy, "tfReplicaSpecs": {
                    "Chief": {**replica, "replicas": 1, "template": template},
                    "Worker": {**replica, "replicas": run.replicas - 1, "template": worker}}}}

    # -- running -------------------------------------------------------------------------------------------
    def run(self, run: StageRun) -> StageResult:
        if not run.locations:
            raise ConfigError(f"stage {run.stage}: the k8s backend needs store locations for its inputs and output",
                              hint="run it through the pipeline (doit), with a store pods can mount (pvc://)")
        self.preflight()
        image = self.image(run.emit)
        if run.replicas > 1:
            return self._run_tfjob(run, image)
        batch = self.kube.batch()
        ns = self.kube.namespace
        name = self.job_name(run)
        started = time.monotonic()
        with LogWriter(run) as log:
            job = self.kube.call(f"read job {name}", batch.read_namespaced_job, name, ns, not_found=None)
            if job is not None and _job_condition(job, "Failed"):
                log.line(f"deleting the failed job {name} of an earlier run")
                self._delete(name, wait=True)
                job = None
            if job is None:
                for loc in run.locations.values():
                    if not loc.read_only:  # a fresh output folder (a failed earlier attempt may have written)
                        loc.store.delete(loc.path)
                self._create(run, name, image)
                log.line(f"job {name} submitted (namespace {ns}, image {image})")
            else:
                log.line(f"adopting job {name}, submitted by an earlier run")
            outcome = self._watch(_JobWatcher(self, run, name, log, started), "job",
                                  lambda wait: self._delete(name, wait=wait))
        detail = {"job": name, "namespace": ns, "image": image, "pod": outcome.get("pod", "")}
        if outcome.get("error"):
            raise StageFailed(f"stage {run.stage}: {outcome['error']}", hint=outcome.get("hint") or
                              f"full log: {run.log_path}; kubectl -n {ns} describe job {name}")
        return StageResult(int(outcome["exit_code"]), time.monotonic() - started, run.log_path, detail)

    def _run_tfjob(self, run: StageRun, image: str) -> StageResult:
        from kubernetes import client

        custom = client.CustomObjectsApi(self.kube.connect())
        ns, name, started = self.kube.namespace, self.job_name(run), time.monotonic()
        with LogWriter(run) as log:
            self._delete_tfjob(name, wait=True)  # an earlier attempt's (TFJobs are not adopted)
            for loc in run.locations.values():
                if not loc.read_only:
                    loc.store.delete(loc.path)
            created = self.kube.call(f"create tfjob {name}", custom.create_namespaced_custom_object, TFJOB_GROUP,
                                     TFJOB_VERSION, ns, "tfjobs", self.tfjob_manifest(run, name, image),
                                     not_found=None)
            if created is None:
                raise ConfigError(f"stage {run.stage}: {run.replicas} replicas need a TFJob, and the cluster has no "
                                  f"TFJob CRD ({TFJOB_GROUP}/{TFJOB_VERSION} tfjobs)",
                                  hint="install the Kubeflow training operator (on the test cluster: "
                                       "make tfjob-operator), or set the stage's replica count to 1")
            log.line(f"tfjob {name} submitted (namespace {ns}, image {image}, chief + {run.replicas - 1} "
                     f"worker{'s' if run.replicas > 2 else ''})")
            outcome = self._watch(_TFJobWatcher(self, run, name, log, started), "tfjob",
                                  lambda wait: self._delete_tfjob(name, wait=wait))
        detail = {"tfjob": name, "namespace": ns, "image": image, "pod": outcome.get("pod", ""),
                  "replicas": run.replicas}
        if outcome.get("error"):
            raise StageFailed(f"stage {run.stage}: {outcome['error']}", hint=outcome.get("hint") or
                              f"full log: {run.log_path}; kubectl -n {ns} describe tfjob {name}")
        return StageResult(int(outcome["exit_code"]), time.monotonic() - started, run.log_path, detail)

    def _watch(self, watcher: Any, kind: str, delete: Any) -> dict[str, Any]:
        """Wait for the watcher's outcome; on Ctrl-C or any error delete the job and its pods (waiting for
        them), once done delete it in the background unless ``keep_jobs``."""
        try:
            outcome = watcher.wait()
        except KeyboardInterrupt:
            watcher.stop_logs()
            delete(True)
            raise Cancelled(f"stage {watcher.run.stage} interrupted; {kind} {watcher.name} deleted") from None
        except BaseException:
            watcher.stop_logs()
            delete(True)
            raise
        finally:
            watcher.stop_logs(join=True)
        if not self.setting("keep_jobs"):
            delete(False)  # finished pods go with it (background deletion)
        return outcome

    def _delete_tfjob(self, name: str, wait: bool = False, timeout: float = 30.0) -> None:
        """Delete the TFJob and its pods (grace 0); the operator's Services go with it (owner references)."""
        from kubernetes import client

        custom = client.CustomObjectsApi(self.kube.connect())
        self._delete(name, wait, timeout, kind="tfjob", pod_label=TFJOB_LABEL,
                     delete=lambda ns, body: custom.delete_namespaced_custom_object(
                         TFJOB_GROUP, TFJOB_VERSION, ns, "tfjobs", name, body=body))

    def _create(self, run: StageRun, name: str, image: str) -> None:
        manifest = self.job_manifest(run, name, image)
        self.kube.call(f"create job {name}", self.kube.batch().create_namespaced_job, self.kube.namespace, manifest)

    def _delete(self, name: str, wait: bool = False, timeout: float = 30.0, kind: str = "job",
                pod_label: str = "job-name", delete: Any = None) -> None:
        """Delete the Job (or with ``delete(namespace, body)``, another kind) and its pods (grace 0);
        with ``wait``, until no pod of it is left."""
        from kubernetes import client

        ns = self.kube.namespace
        body = client.V1DeleteOptions(propagation_policy="Background", grace_period_seconds=0)
        delete = delete or (lambda ns, body: self.kube.batch().delete_namespaced_job(name, ns, body=body))
        for attempt in range(3):  # a second Ctrl-C must not leave the Job behind
            try:
                self.kube.call(f"delete {kind} {name}", delete, ns, body, not_found=None)
                core = self.kube.core()
                self.kube.call("delete pods", core.delete_collection_namespaced_pod, ns,
                               label_selector=f"{pod_label}={name}", grace_period_seconds=0, not_found=None)
                deadline = time.monotonic() + timeout
                while wait and time.monotonic() < deadline:
                    pods = self.kube.call("list pods", core.list_namespaced_pod, ns, label_selector=f"{pod_label}={name}")
                    if not pods.items:
                        break
                    time.sleep(0.2)
                return
            except KeyboardInterrupt:
                continue
            except MlflowctlError:
                return

    # -- rendering --------------------------------------------------------------------------------------------
    def render(self, run: StageRun, folder: Path) -> list[Path]:
        """The stage's Job manifest (YAML), with the image it would run."""
        import yaml

        folder.mkdir(parents=True, exist_ok=True)
        image = self.manifest_image()
        kind = "tfjob" if run.replicas > 1 else "job"
        manifest = (self.tfjob_manifest if run.replicas > 1 else self.job_manifest)(run, self.job_name(run), image)
        path = folder / f"{kind}-{dns_name(run.stage)}.yaml"
        path.write_text(f"# stage {run.stage}: kubectl apply -f {path.name}\n" + yaml.safe_dump(manifest, sort_keys=False))
        return [path]

    def manifest_image(self) -> str:
        """The image written manifests name, nothing built: ``image`` as is, else the docker backend's tag (under
        ``registry`` when one is set, where a run pushes it)."""
        if self.setting("image"):
            return str(self.setting("image"))
        image = self.images.image_ref()
        registry = str(self.setting("registry")).rstrip("/")
        return f"{registry}/{image.split('/', 1)[-1]}" if registry else image

    def namespace_for_manifests(self) -> str:
        try:
            return self.kube.namespace
        except MlflowctlError:  # no cluster at hand: render for the configured namespace
            return self.setting("namespace") or "default"

    def rbac_manifests(self) -> list[dict[str, Any]]:
        """ServiceAccount, Role and RoleBinding with exactly the verbs mlflowctl uses in the namespace.

        The rules are the backend's (Jobs, their pods and logs), the store's (``pvc://``: the claim,
        its server) and the model server's (its Deployment, Service and proxy): the identity that runs
        ``doit backend=k8s`` (you, or a CI job running as this ServiceAccount) needs these and no more.
        """
        ns = self.namespace_for_manifests()
        sa = "mlflowctl"
        labels = {"app.kubernetes.io/managed-by": MANAGED_BY}
        from mlflowctl_plugins.k8s_serving import RBAC_RULES as SERVING_RULES
        from mlflowctl_plugins.pvc_store import RBAC_RULES as STORE_RULES

        merged: dict[tuple[str, str], set[str]] = {}
        tfjobs = [(TFJOB_GROUP, "tfjobs", ("create", "get", "list", "watch", "delete"))]  # stages with workers > 1
        for group, resource, verbs in [*RBAC_RULES, *STORE_RULES, *SERVING_RULES, *tfjobs]:
            merged.setdefault((group, resource), set()).update(verbs)
        rules = [{"apiGroups": [g], "resources": [r], "verbs": sorted(v)} for (g, r), v in sorted(merged.items())]
        return [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns, "labels": labels}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "mlflowctl-runner", "namespace": ns, "labels": labels}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "mlflowctl-runner", "namespace": ns, "labels": labels},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mlflowctl-runner"},
             "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]},
        ]

    # -- set-up: what must exist before a stage runs --------------------------------------------------
    def setup_manifests(self, with_servers: bool = True) -> list[dict[str, Any]]:
        """RBAC, the store's claim and server, image pull Secret templates (no values), the model server."""
        docs = self.rbac_manifests()
        ns = self.namespace_for_manifests()
        for name in self.setting("image_pull_secrets") or []:
            docs.append({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                         "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                                      "annotations": {"mlflowctl.io/template": "fill in: kubectl create secret "
                                                      f"docker-registry {name} --docker-server=..."}},
                         "stringData": {".dockerconfigjson": '{"auths": {}}'}})
        store = getattr(self.project, "store", None)
        if store is not None and hasattr(store, "claim_manifest"):
            docs.append(store.claim_manifest())
            if with_servers:
                docs += store.server_manifests()
        serving = getattr(self.project, "serving", None)
        if with_servers and serving is not None and getattr(serving, "runtime_name", "") == "k8s":
            image = self.setting("image") or self.images.image_ref()
            docs += serving._runtime("k8s").manifests(image)
        return docs

    def render_setup(self, folder: Path) -> list[Path]:
        """One YAML file per prerequisite (``kubectl apply -f folder``)."""
        import yaml

        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for i, doc in enumerate(self.setup_manifests()):
            path = folder / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            written.append(path)
        return written

    def apply_setup(self, dry_run: bool = False) -> list[str]:
        """Server-side apply of the prerequisites a run needs up front (RBAC, the claim); Secrets only if absent."""
        from kubernetes import dynamic

        client = dynamic.DynamicClient(self.kube.connect())
        done = []
        for doc in self.setup_manifests(with_servers=False):
            kind, name, ns = doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace")
            resource = self.kube.call(f"find the {kind} API", client.resources.get, api_version=doc["apiVersion"], kind=kind)
            if kind == "Secret" and self.kube.call(f"read secret {name}", resource.get, name=name, namespace=ns,
                                                   not_found=None) is not None:
                continue  # never overwrite credentials with a template
            extra = {"dry_run": "All"} if dry_run else {}
            self.kube.call(f"apply {kind} {name}", resource.server_side_apply, body=doc, name=name, namespace=ns,
                           field_manager="mlflowctl", force_conflicts=True, **extra)
            done.append(f"{kind.lower()}/{name}")
        return done


def _pod_ended_or_stuck(pod: Any) -> bool:
    status = pod.status
    if status is None:
        return False
    if status.phase in ("Succeeded", "Failed"):
        return True
    return any(cs.state and cs.state.waiting and cs.state.waiting.reason in IMAGE_ERRORS + CONFIG_ERRORS
               for cs in status.container_statuses or [])


def _job_condition(job: Any, kind: str) -> Any:
    for cond in (job.status.conditions or []) if job.status else []:
        if cond.type == kind and cond.status == "True":
            return cond
    return None


class _JobWatcher:
    """Watch a Job's pods until the Job ends; follow each pod's log; say how it ended."""

    pod_label = "job-name"      # the label naming the job on its pods
    container = "stage"
    done = "Complete"           # the job condition of success
    several_pods = False        # True: every pod is a replica (its lines prefixed), not a retry

    def __init__(self, backend: KubeBackend, run: StageRun, name: str, log: LogWriter, started: float) -> None:
        self.backend, self.run, self.name, self.log, self.started = backend, run, name, log, started
        self.kube = backend.kube
        self.pods: dict[str, Any] = {}          # pod name -> latest V1Pod
        self.followers: dict[str, threading.Thread] = {}
        self.stopping = threading.Event()
        self.pending_since: float | None = None
        self.image_retried = False

    # -- logs --------------------------------------------------------------------------------------
    def _follow(self, pod: str) -> None:
        core = self.kube.core()
        try:
            resp = core.read_namespaced_pod_log(pod, self.kube.namespace, container=self.container, follow=True,
                                                _preload_content=False, _request_timeout=(10, 7 * 86400))
        except Exception:  # noqa: BLE001 - no log (the pod is gone): nothing to stream
            return
        pending, prefix = b"", self.prefix(pod)
        try:
            for chunk in resp.stream(4096):
                if self.stopping.is_set():
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.log.line(prefix + line.decode("utf-8", "replace").rstrip("\r"))
            if pending and not self.stopping.is_set():
                self.log.line(prefix + pending.decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - the stream broke (pod deleted): what we have is the log
            pass
        finally:
            resp.release_conn()

    def prefix(self, pod: str) -> str:
        """What starts each log line of ``pod`` (a replica's name; nothing for the one pod of a Job)."""
        return ""

    def _start_follow(self, pod: Any) -> None:
        name = pod.metadata.name
        if name in self.followers:
            return
        statuses = (pod.status.container_statuses or []) if pod.status else []
        started = any(s.state and (s.state.running or s.state.terminated) for s in statuses)
        if not started:
            return
        if len(self.followers) > 0 and not self.several_pods:
            self.log.line(f"--- retry: pod {name}")
        t = threading.Thread(target=self._follow, args=(name,), daemon=True, name=f"log-{name}")
        self.followers[name] = t
        t.start()

    def stop_logs(self, join: bool = False) -> None:
        if join:
            for t in self.followers.values():
                if t is not threading.current_thread():
                    t.join(timeout=15)
        self.stopping.set()

    # -- waiting ------------------------------------------------------------------------------------
    def wait(self) -> dict[str, Any]:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        core, batch, ns = self.kube.core(), self.kube.batch(), self.kube.namespace
        selector = f"{self.pod_label}={self.name}"
        version = None
        while True:
            self.run.raise_if_stopped(self.started)
            if version is None:  # list, then watch from there
                listing = self.kube.call("list pods", core.list_namespaced_pod, ns, label_selector=selector)
                version = listing.metadata.resource_version
                for pod in listing.items:
                    self.pods[pod.metadata.name] = pod
            else:
                w = watch.Watch()
                try:
                    for event in w.stream(core.list_namespaced_pod, ns, label_selector=selector,
                                          resource_version=version, timeout_seconds=WATCH_SECONDS,
                                          _request_timeout=WATCH_SECONDS + 10):
                        pod = event["object"]
                        version = pod.metadata.resource_version
                        if event["type"] == "DELETED":
                            self.pods.pop(pod.metadata.name, None)
                        else:
                            self.pods[pod.metadata.name] = pod
                        if self.run.cancelled.is_set() or _pod_ended_or_stuck(pod):
                            break  # look at the Job now, not at the end of the watch window
                except ApiException as exc:
                    if exc.status == 410:  # too old a resourceVersion: list again and resume
                        version = None
                        continue
                    raise MlflowctlError(f"watching the pods of job {self.name}: {api_reason(exc)}") from None
                except Exception as exc:  # noqa: BLE001 - a broken watch connection: list again
                    if "urllib3" in type(exc).__module__ or isinstance(exc, OSError):
                        version = None
                        continue
                    raise
                finally:
                    w.stop()
            for pod in list(self.pods.values()):
                self._start_follow(pod)
                problem = self._pod_problem(pod)
                if problem:
                    return problem
            job = self._read_job(batch, ns)
            if job is None:
                return {"error": f"job {self.name} disappeared (deleted by someone else?)"}
            if _job_condition(job, self.done):
                self._catch_up()
                return {"exit_code": 0, "pod": self._last_pod_name()}
            failed = _job_condition(job, "Failed")
            if failed:
                self._catch_up()
                return self._failure(failed)

    def _read_job(self, batch: Any, ns: str) -> Any:
        """The Job; when a pod just ended, wait (briefly) for the Job controller to say how the Job ended."""
        ended = any(p.status is not None and p.status.phase in ("Succeeded", "Failed") for p in self.pods.values())
        deadline = time.monotonic() + (3.0 if ended else 0.0)
        while True:
            job = self.kube.call(f"read job {self.name}", batch.read_namespaced_job, self.name, ns, not_found=None)
            if job is None or _job_condition(job, "Complete") or _job_condition(job, "Failed") \
                    or time.monotonic() >= deadline:
                return job
            time.sleep(0.05)

    def _catch_up(self) -> None:
        """The log of every pod that ended before the watch saw it run (short stages), read whole."""
        core, ns = self.kube.core(), self.kube.namespace
        listing = self.kube.call("list pods", core.list_namespaced_pod, ns,
                                 label_selector=f"{self.pod_label}={self.name}")
        for pod in sorted(listing.items, key=lambda p: p.metadata.creation_timestamp or 0):
            self.pods[pod.metadata.name] = pod
            if pod.metadata.name not in self.followers:
                self.followers[pod.metadata.name] = threading.current_thread()
                self._follow(pod.metadata.name)

    def _last_pod_name(self) -> str:
        pods = sorted(self.pods.values(), key=lambda p: p.metadata.creation_timestamp or 0)
        return pods[-1].metadata.name if pods else ""

    def _failure(self, condition: Any) -> dict[str, Any]:
        reason = condition.reason or "Failed"
        ns = self.kube.namespace
        pods = sorted(self.pods.values(), key=lambda p: p.metadata.creation_timestamp or 0)
        if reason == "DeadlineExceeded":
            return {"error": f"job {self.name} ran past backends.k8s.active_deadline_seconds="
                             f"{self.backend.setting('active_deadline_seconds')} (DeadlineExceeded)",
                    "hint": "raise backends.k8s.active_deadline_seconds, or make the stage faster"}
        def failed_at(pod: Any) -> Any:  # when its first container failed (None: none failed)
            ends = [s.state.terminated.finished_at for s in (pod.status.container_statuses or [] if pod.status else [])
                    if s.state and s.state.terminated and s.state.terminated.exit_code]
            return min((e for e in ends if e is not None), default=None) if ends else None

        # the replica that failed first is the cause (a TFJob's operator then kills the others, exit 137)
        failed = sorted((p for p in pods if failed_at(p) is not None), key=failed_at)
        for pod in failed + [p for p in reversed(pods) if p not in failed]:
            if pod.status and pod.status.reason == "Evicted":
                return {"error": f"pod {pod.metadata.name} was evicted: {pod.status.message}",
                        "hint": "free resources on the node, or set backends.k8s.memory/cpu requests"}
            for status in pod.status.container_statuses or [] if pod.status else []:
                term = status.state.terminated if status.state else None
                if term is None:
                    continue
                if term.reason == "OOMKilled":
                    return {"error": f"pod {pod.metadata.name} was killed: out of memory (limit "
                                     f"{self.backend.setting('memory') or 'none set'})",
                            "hint": "raise backends.k8s.memory"}
                return {"exit_code": int(term.exit_code), "pod": pod.metadata.name}
        return {"error": f"job {self.name} failed: {reason}: {condition.message or ''}".rstrip(": "),
                "hint": f"kubectl -n {ns} describe job {self.name}"}

    def _pod_problem(self, pod: Any) -> dict[str, Any] | None:
        """A pod that can never run (image, config, unschedulable past start_timeout): the Job is given up."""
        status = pod.status
        if status is None:
            return None
        for cs in status.container_statuses or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting is None:
                continue
            if waiting.reason in IMAGE_ERRORS:
                if self.backend.setting("image_load") and not self.image_retried and not self.backend.setting("image"):
                    # the cluster lost the image (re-created?): load it again once and retry
                    self.image_retried = True
                    self.log.line(f"the node has no {cs.image}: loading it again")
                    self.backend._load(cs.image, self.log.line, force=True)
                    self.kube.call("delete pod", self.kube.core().delete_namespaced_pod, pod.metadata.name,
                                   self.kube.namespace, grace_period_seconds=0, not_found=None)
                    return None
                return {"error": f"the cluster cannot get image {cs.image}: {waiting.reason}: "
                                 f"{(waiting.message or '').splitlines()[0][:300] if waiting.message else ''}".rstrip(": "),
                        "hint": "push it (backends.k8s.registry) or load it (backends.k8s.image_load), "
                                "or set backends.k8s.image"}
            if waiting.reason in CONFIG_ERRORS:
                return {"error": f"pod {pod.metadata.name} cannot start: {waiting.reason}: {waiting.message or ''}",
                        "hint": f"kubectl -n {self.kube.namespace} describe pod {pod.metadata.name}"}
        if status.phase == "Pending":
            now = time.monotonic()
            self.pending_since = self.pending_since or now
            if now - self.pending_since > float(self.backend.setting("start_timeout")):
                return self._not_started(pod)
        else:
            self.pending_since = None
        return None

    def _not_started(self, pod: Any) -> dict[str, Any]:
        timeout = self.backend.setting("start_timeout")
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.status != "True":
                return {"error": f"pod {pod.metadata.name} unschedulable for {timeout:g}s: {cond.message or cond.reason}",
                        "hint": "lower backends.k8s.cpu/memory/gpus or fix node_selector/tolerations"}
        events = self.kube.call("list events", self.kube.core().list_namespaced_event, self.kube.namespace,
                                field_selector=f"involvedObject.name={pod.metadata.name}")
        last = [e.message for e in events.items if e.type == "Warning"][-1:] or ["no warning event"]
        return {"error": f"pod {pod.metadata.name} did not start within {timeout:g}s: {last[0][:300]}",
                "hint": f"kubectl -n {self.kube.namespace} describe pod {pod.metadata.name}"}


class _TFJobWatcher(_JobWatcher):
    """The same for a TFJob: its replica pods, its ``Succeeded``/``Failed`` conditions (set by the operator)."""

    pod_label = TFJOB_LABEL
    container = "tensorflow"
    done = "Succeeded"
    several_pods = True

    def prefix(self, pod: str) -> str:
        replica = pod[len(self.name) + 1:] if pod.startswith(self.name + "-") else pod
        return "" if replica == "chief-0" else f"{replica}: "

    def _failure(self, condition: Any) -> dict[str, Any]:
        """The failed replica's exit code: the operator may say Failed before the kubelet's pod status
        (the exit code) reaches us, so look again for a few seconds before falling back to its message."""
        core, ns = self.kube.core(), self.kube.namespace
        for _ in range(50):
            listing = self.kube.call("list pods", core.list_namespaced_pod, ns,
                                     label_selector=f"{self.pod_label}={self.name}")
            for pod in listing.items:
                self.pods[pod.metadata.name] = pod
            if any(s.state and s.state.terminated and s.state.terminated.exit_code
                   for p in listing.items for s in (p.status.container_statuses or [] if p.status else [])):
                break
            time.sleep(0.2)
        outcome = super()._failure(condition)
        if "error" in outcome:
            outcome["error"] = outcome["error"].replace(f"job {self.name}", f"tfjob {self.name}", 1)
            outcome["hint"] = f"kubectl -n {ns} describe tfjob {self.name}; full log: {self.run.log_path}"
        return outcome

    def _read_job(self, batch: Any, ns: str) -> Any:
        """The TFJob as an object like a Job (``.status.conditions``); a TFJob no operator has picked up
        (no condition at all) within ``start_timeout`` fails the stage."""
        from kubernetes import client

        custom = client.CustomObjectsApi(self.kube.connect())
        ended = any(p.status is not None and p.status.phase in ("Succeeded", "Failed") for p in self.pods.values())
        deadline = time.monotonic() + (3.0 if ended else 0.0)
        while True:
            raw = self.kube.call(f"read tfjob {self.name}", custom.get_namespaced_custom_object, TFJOB_GROUP,
                                 TFJOB_VERSION, ns, "tfjobs", self.name, not_found=None)
            if raw is None:
                return None
            conditions = [_Condition(c) for c in (raw.get("status") or {}).get("conditions") or []]
            job = _Obj(status=_Obj(conditions=conditions))
            if _job_condition(job, self.done) or _job_condition(job, "Failed") or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        timeout = float(self.backend.setting("start_timeout"))
        if not conditions and time.monotonic() - self.started > timeout:
            raise StageFailed(f"stage {self.run.stage}: no training operator picked up tfjob {self.name} within "
                              f"{timeout:g}s (it has no status)",
                              hint="is the Kubeflow training operator running with the tfjob scheme? "
                                   "(test cluster: make tfjob-operator)")
        return job


class _Obj:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class _Condition(_Obj):
    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__(type=raw.get("type"), status=raw.get("status"), reason=raw.get("reason"),
                         message=raw.get("message"))


@hookimpl
def mlflowctl_add_backends(registry: Any) -> None:
    registry.add_backend(KubeBackend)
