"""The ``pvc://claim/path`` store: results and the model registry on a Kubernetes PersistentVolumeClaim.

Stages running as Jobs mount the claim (``pod_volume``: the claim with a ``subPath`` per input and
one for the output's staging folder) and read and write it directly. The orchestrator runs outside
the cluster and must read cache markers and the registry without a Job per check: it talks to a
small long-running *store server* (``pvc_store_server.py``, standard library only, shipped in a
ConfigMap and run in ``stores.pvc.image``) that mounts the claim, reached through the API server's
service proxy with the kubeconfig's credentials. Publishing is a ``rename`` on the volume done by
that server, so a result appears all at once, the first publisher wins, and two registrations
never share a version number. Why a server and not ``kubectl exec``/``cp``: one HTTP request per
check (a no-op ``doit`` stays fast), no tar/shell needed in the image, and a plain RBAC story
(``services/proxy``).

The server (a Deployment + Service + ConfigMap named ``mlflowctl-store-<claim>``) is created by the
store's preflight when missing or out of date; the claim itself is not (``mlflowctl setup``
applies it with the other prerequisites, ``mlflowctl render backend=k8s`` writes it).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

from mlflowctl import hookimpl
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.manifest import sha256_file
from mlflowctl.stores import MANIFEST, Store, created_mode, file_manifest, folder_problem, loads_json
from mlflowctl_plugins.kube import Kube, check_dns_label, check_quantity, dns_name

SERVER_PORT = 8080
_RESULT = re.compile(r"^results/[^/]+/[^/]+(/_manifest\.json|#intact)?$")  # published results: immutable
SERVER_FILES = {  # file name in the ConfigMap -> where its source lives
    "store_server.py": Path(__file__).with_name("pvc_store_server.py"),
    "manifest.py": Path(__file__).resolve().parent.parent / "mlflowctl" / "manifest.py",
}
RBAC_RULES = [  # what the store does on the cluster (beside the backend's)
    ("", "persistentvolumeclaims", ("get",)),
    ("", "configmaps", ("get", "create", "update")),
    ("", "services", ("get", "create")),
    ("", "services/proxy", ("get", "create", "update", "delete")),
    ("apps", "deployments", ("get", "create", "update")),
]


def _manifest_source(name: str) -> str:
    if name == "manifest.py":
        import mlflowctl.manifest

        return Path(mlflowctl.manifest.__file__).read_text()
    return SERVER_FILES[name].read_text()


class PvcStore(Store):
    """Results and models on a PVC, read and written through a store server in the cluster."""

    scheme = "pvc"
    description = "a Kubernetes PersistentVolumeClaim: stages mount it, the orchestrator uses a store server"
    settings = {
        "kubeconfig": Setting(str, "", "kubeconfig file (empty: backends.k8s.kubeconfig, $KUBECONFIG, ~/.kube/config)"),
        "context": Setting(str, "", "kube context (empty: backends.k8s.context, else the current one)"),
        "namespace": Setting(str, "", "namespace of the claim and the store server (empty: backends.k8s.namespace)",
                             check=check_dns_label),
        "image": Setting(str, "python:3.11-slim", "image of the store server (any image with python3)"),
        "storage_class": Setting(str, "", "storageClassName of the claim `mlflowctl setup` creates "
                                          "(empty: the cluster's default)"),
        "size": Setting(str, "20Gi", "size of the claim `mlflowctl setup` creates", check=check_quantity),
        "access_mode": Setting(str, "ReadWriteOnce", "access mode of that claim (ReadWriteMany for several nodes)",
                               choices=("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")),
        "start_timeout": Setting(float, 120.0, "seconds to wait for the store server to become ready"),
        "remember_results": Setting(bool, True, "remember published results this machine has seen (they never "
                                                "change), so a no-op run asks the cluster almost nothing; a result "
                                                "deleted on the claim by hand is then not noticed here"),
    }

    def __init__(self, url: str, settings: dict[str, Any], project: Any) -> None:
        super().__init__(url, settings, project)
        rest = url[len("pvc://"):] if url.startswith("pvc://") else url
        claim, _, base = rest.partition("/")
        if check_dns_label(claim) or not claim:
            raise ConfigError(f"store: {url!r}: the claim name must be a DNS-1123 label", hint="e.g. pvc://mlflowctl/mnist")
        parts = [p for p in base.split("/") if p]
        if any(p in ("..", ".") for p in parts):
            raise ConfigError(f"store: {url!r}: the path may not contain '.' or '..'")
        self.claim, self.base = claim, "/".join(parts)
        k8s = {}
        try:
            k8s = dict(project.config["backends"].get("k8s") or {})
        except (KeyError, TypeError, AttributeError):
            pass
        pick = lambda key: (settings or {}).get(key) or k8s.get(key) or ""  # noqa: E731
        self.kube = Kube(pick("context"), pick("namespace"), pick("kubeconfig"), where="stores.pvc")
        self.server = dns_name("mlflowctl-store", claim)
        self._ready = False      # preflight done in this process (the server checked, created or updated)
        self._answered = False   # the server answered a request in this process
        self._cache_dir = Path(project.state_dir) / "cache" / "pvc"
        self._known_file = self._cache_dir / f"results-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        self._known_cache: dict[str, Any] | None = None

    def setting(self, key: str) -> Any:
        value = (self.config or {}).get(key)
        return self.settings[key].default if value in (None, "") else value

    # -- the store server ----------------------------------------------------------------------
    def server_files(self) -> dict[str, str]:
        return {name: _manifest_source(name) for name in sorted(SERVER_FILES)}

    def server_manifests(self) -> list[dict[str, Any]]:
        """ConfigMap (the server's code), Deployment and Service of the store server."""
        ns = self.kube.namespace if self.kube._api is not None else (self.kube._namespace or "default")
        files = self.server_files()
        digest = hashlib.sha256(json.dumps([files, self.setting("image")]).encode()).hexdigest()[:16]
        labels = {"app.kubernetes.io/managed-by": "mlflowctl", "app.kubernetes.io/name": "mlflowctl-store",
                  "mlflowctl.io/claim": self.claim}
        root = "/store"  # the whole claim: one server serves every path of it (the client adds the path)
        return [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": self.server, "namespace": ns, "labels": labels},
             "data": files},
            {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": self.server, "namespace": ns, "labels": labels,
                          "annotations": {"mlflowctl.io/spec": digest}},
             "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                      "selector": {"matchLabels": {"app.kubernetes.io/name": "mlflowctl-store", "mlflowctl.io/claim": self.claim}},
                      "template": {"metadata": {"labels": labels, "annotations": {"mlflowctl.io/spec": digest}},
                                   "spec": {
                                       "automountServiceAccountToken": False, "enableServiceLinks": False,
                                       "terminationGracePeriodSeconds": 2,
                                       "containers": [{
                                           "name": "store", "image": self.setting("image"),
                                           "imagePullPolicy": "IfNotPresent",
                                           "command": ["python3", "-u", "/opt/mlflowctl/store_server.py", "--root", root,
                                                       "--port", str(SERVER_PORT)],
                                           "ports": [{"name": "http", "containerPort": SERVER_PORT}],
                                           "readinessProbe": {"httpGet": {"path": "/healthz", "port": SERVER_PORT},
                                                              "periodSeconds": 1, "failureThreshold": 3},
                                           "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                                           "volumeMounts": [{"name": "store", "mountPath": "/store"},
                                                            {"name": "code", "mountPath": "/opt/mlflowctl", "readOnly": True}]}],
                                       "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": self.claim}},
                                                   {"name": "code", "configMap": {"name": self.server}}]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": self.server, "namespace": ns, "labels": labels},
             "spec": {"selector": {"app.kubernetes.io/name": "mlflowctl-store", "mlflowctl.io/claim": self.claim},
                      "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": SERVER_PORT}]}},
        ]

    def claim_manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"accessModes": [self.setting("access_mode")],
                                "resources": {"requests": {"storage": self.setting("size")}}}
        if self.setting("storage_class"):
            spec["storageClassName"] = self.setting("storage_class")
        ns = self.kube.namespace if self.kube._api is not None else (self.kube._namespace or "default")
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": self.claim, "namespace": ns, "labels": {"app.kubernetes.io/managed-by": "mlflowctl"}},
                "spec": spec}

    def preflight(self) -> None:
        """The claim exists and the store server answers (created or updated here when needed)."""
        if self._ready:
            return
        kube = self.kube
        kube.check_reachable()
        kube.check_namespace()
        core, apps, ns = kube.core(), kube.apps(), kube.namespace
        if kube.call(f"read claim {self.claim}", core.read_namespaced_persistent_volume_claim, self.claim, ns,
                     not_found=None) is None:
            raise UnavailableError(f"store {self.url}: claim {self.claim!r} does not exist in namespace {ns}",
                                   hint="create it: mlflowctl setup (or kubectl apply the claim from "
                                        "mlflowctl render backend=k8s)")
        configmap, deployment, service = self.server_manifests()
        digest = deployment["metadata"]["annotations"]["mlflowctl.io/spec"]
        current = kube.call("read the store server", apps.read_namespaced_deployment, self.server, ns, not_found=None)
        if current is None or (current.metadata.annotations or {}).get("mlflowctl.io/spec") != digest:
            if kube.call("read configmap", core.read_namespaced_config_map, self.server, ns, not_found=None) is None:
                kube.call("create the store server's configmap", core.create_namespaced_config_map, ns, configmap)
            else:
                kube.call("update the store server's configmap", core.replace_namespaced_config_map, self.server, ns,
                          configmap)
            if current is None:
                kube.call("create the store server", apps.create_namespaced_deployment, ns, deployment)
            else:
                kube.call("update the store server", apps.replace_namespaced_deployment, self.server, ns, deployment)
        if kube.call("read service", core.read_namespaced_service, self.server, ns, not_found=None) is None:
            kube.call("create the store server's service", core.create_namespaced_service, ns, service)
        self._wait_ready(digest)
        self._ready = True

    def _wait_ready(self, digest: str) -> None:
        deadline = time.monotonic() + float(self.setting("start_timeout"))
        last = "not answering"
        while time.monotonic() < deadline:
            try:
                r = self.kube.proxy("GET", self.server, SERVER_PORT, "healthz", timeout=5)
                if r.status_code == 200:
                    dep = self.kube.apps().read_namespaced_deployment(self.server, self.kube.namespace)
                    if (dep.status.updated_replicas or 0) >= 1 and (dep.status.replicas or 0) <= 1:
                        return
                    last = "rolling out"
                else:
                    last = f"HTTP {r.status_code}"
            except UnavailableError as exc:
                last = exc.message
            time.sleep(0.5)
        raise UnavailableError(f"store {self.url}: the store server {self.server} did not become ready within "
                               f"{self.setting('start_timeout'):g}s ({last})",
                               hint=f"kubectl -n {self.kube.namespace} describe deployment {self.server}; is "
                                    f"{self.setting('image')} available to the cluster? (stores.pvc.image)")

    # -- HTTP to the server ------------------------------------------------------------------------
    def _request(self, method: str, route: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        # Reads go straight to the server: a no-op run needs no set-up check (7 requests) when it answers.
        r = self.kube.proxy(method, self.server, SERVER_PORT, route, **kwargs) \
            if self._ready or self._answered or method == "GET" else None
        if r is None or _from_api_server(r):  # no server answered (not there yet, or not ready): set it up, retry
            self._ready = self._answered = False
            self.preflight()
            r = self.kube.proxy(method, self.server, SERVER_PORT, route, **kwargs)
        self._answered = True
        if r.status_code not in ok:
            try:
                message = r.json().get("error", r.text[:200])
            except ValueError:
                message = r.text[:200]
            if r.status_code >= 500 or r.status_code == 503:
                raise UnavailableError(f"store {self.url}: {route}: HTTP {r.status_code}: {message}")
            raise MlflowctlError(f"store {self.url}: {route}: HTTP {r.status_code}: {message}")
        return r

    def _check(self, path: str) -> str:
        """The claim-relative path of store path ``path`` (the URL's path first)."""
        parts = [p for p in str(path).split("/") if p and p != "."]
        if any(p == ".." for p in parts):
            raise ValueError(f"store path {path!r} leaves the store")
        return "/".join([*([self.base] if self.base else []), *parts])

    def _new_staging(self, label: str, key: str = "") -> str:
        """Create a staging folder on the volume; returns its store path (``.staging/<label>-<key|random>``)."""
        import uuid

        name = f"{dns_name(label, limit=40)}-{key or uuid.uuid4().hex[:12]}"
        self._request("POST", "v1/staging", params={"path": self._check(f".staging/{name}")})
        return f".staging/{name}"

    # -- objects -------------------------------------------------------------------------------------
    # -- published results are immutable: what this machine has seen of them, it need not ask again --------
    def _known(self) -> dict[str, Any]:
        if self._known_cache is None:
            try:
                self._known_cache = json.loads(self._known_file.read_text())
            except (OSError, ValueError):
                self._known_cache = {}
        return self._known_cache

    def _remember(self, path: str, value: Any) -> None:
        if not self.setting("remember_results") or not _RESULT.match(path.strip("/")):
            return
        known = self._known()
        known[path.strip("/")] = value
        self._known_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._known_file.with_name(f".{self._known_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, self._known_file)

    def _forget(self, path: str) -> None:
        prefix = path.strip("/")
        known = self._known()
        gone = [k for k in known if k == prefix or k.startswith((prefix + "/", prefix + "#")) or not prefix]
        if gone:
            for k in gone:
                known.pop(k, None)
            self._remember_all(known)

    def _remember_all(self, known: dict[str, Any]) -> None:
        self._known_file.parent.mkdir(parents=True, exist_ok=True)
        self._known_file.write_text(json.dumps(known))

    def exists(self, path: str) -> bool:
        if self.setting("remember_results") and path.strip("/") in self._known():
            return True
        found = bool(self._request("GET", "v1/stat", params={"path": self._check(path)}).json()["exists"])
        if found:
            self._remember(path, True)
        return found

    def list(self, prefix: str) -> list[str]:
        return list(self._request("GET", "v1/list", params={"path": self._check(prefix)}).json()["names"])

    def read_bytes(self, path: str) -> bytes | None:
        seen = self._known().get(path.strip("/")) if self.setting("remember_results") else None
        if isinstance(seen, str):
            return seen.encode()
        r = self._request("GET", "v1/file", ok=(200, 404), params={"path": self._check(path)})
        if r.status_code != 200:
            return None
        if path.strip("/").endswith(MANIFEST):
            self._remember(path, r.content.decode("utf-8", "replace"))
        return r.content

    def read_json(self, path: str, default: Any = None) -> Any:
        data = self.read_bytes(path)  # one request, not exists + open
        return default if data is None else loads_json(data, self, path)

    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        if "w" in mode:
            return _Upload(self, self._check(path), text="b" not in mode)  # type: ignore[return-value]
        data = self.read_bytes(path)
        if data is None:
            raise FileNotFoundError(f"{self.url}: {path}")
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode())

    def put(self, src: Path, path: str) -> None:
        with open(src, "rb") as fh:
            self._request("PUT", "v1/file", params={"path": self._check(path)}, data=fh,
                          headers={"X-Content-SHA256": sha256_file(src)})

    def get(self, path: str, dest: Path) -> Path:
        rel = self._check(path)
        st = self._request("GET", "v1/stat", params={"path": rel}).json()
        if not st["exists"]:
            raise FileNotFoundError(f"{self.url}: {path}")
        r = self._request("GET", "v1/tar", params={"path": rel}, stream=True, timeout=600)
        r.raw.decode_content = True
        if st["dir"]:
            Path(dest).mkdir(parents=True, exist_ok=True)
            _untar(r.raw, Path(dest))
        else:
            tmp = Path(tempfile.mkdtemp(dir=self._tmp_root()))
            try:
                _untar(r.raw, tmp)
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(tmp / Path(rel).name), dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return Path(dest)

    def delete(self, path: str) -> None:
        self._forget(path)
        self._request("DELETE", "v1/path", params={"path": self._check(path)})

    # -- directories -------------------------------------------------------------------------------------
    def _tmp_root(self) -> Path:
        root = Path(self.project.state_dir) / "staging"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def fetch(self, path: str) -> Path:
        """A local copy of a published folder, cached by its manifest digest (unchanged: not downloaded again)."""
        rel = self._check(path)
        manifest = self.read_json(f"{path}/{MANIFEST}")
        if manifest is None:
            raise FileNotFoundError(f"{self.url}: {path} is not a published folder")
        key = hashlib.sha256(f"{self.url}\0{rel}\0{manifest.get('digest')}".encode()).hexdigest()[:24]
        target = self._cache_dir / key
        if target.is_dir():
            return target
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self._cache_dir))
        tmp.chmod(created_mode(0o777))
        try:
            self.get(path, tmp)
            problem = folder_problem(tmp, deep=True)  # what arrived, against the manifest it was published with
            if problem is None and (json.loads((tmp / MANIFEST).read_text()).get("digest") != manifest.get("digest")):
                problem = f"{MANIFEST} changed while it was downloaded"
            if problem is not None:
                raise UnavailableError(f"store {self.url}: {path} does not match its manifest ({problem})",
                                       hint="the result was damaged on the claim; delete it and re-run its stage")
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @contextlib.contextmanager
    def staging(self, label: str = "out") -> Iterator[Path]:
        tmp = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self._tmp_root()))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, src: Path, path: str, manifest: dict[str, Any] | None = None) -> bool:
        """Upload ``src`` into a staging folder on the volume, then publish it there (a rename)."""
        if self.exists(path):
            return False
        expect = file_manifest(Path(src))["files"]  # the server publishes only if exactly these files landed
        staging = self._new_staging("upload")
        try:
            buf = tempfile.TemporaryFile(dir=self._tmp_root())
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for child in sorted(Path(src).rglob("*")):
                    if child.name != MANIFEST:
                        tf.add(child, arcname=child.relative_to(src).as_posix(), recursive=False)
            buf.seek(0)
            self._request("POST", "v1/untar", params={"path": self._check(staging)}, data=buf, timeout=600)
            buf.close()
            published = self.publish_staged(staging, path, {**(manifest or {}), "_expect": expect})
        finally:
            with contextlib.suppress(MlflowctlError):
                self.delete(staging)  # gone already when published
        if published:
            shutil.rmtree(src, ignore_errors=True)
        return published

    def damaged(self, path: str, deep: bool = False) -> str | None:
        """Checked by the store server on the volume: sizes (a result this machine saw intact is not asked
        again while ``remember_results``), with ``deep`` every sha256 too."""
        verified = f"{path.strip('/')}#intact"
        if not deep and self.setting("remember_results") and self._known().get(verified):
            return None
        r = self._request("GET", "v1/damaged", ok=(200, 404), params={"path": self._check(path),
                                                                      "deep": "1" if deep else "0"})
        problem = r.json().get("problem") if r.status_code == 200 else "it is missing"
        if problem is None:
            self._remember(verified, True)
        else:
            self._forget(path)
        return problem

    # -- stages that run in the cluster ----------------------------------------------------------------
    def pod_volume(self, path: str) -> tuple[dict[str, Any], str]:
        return {"persistentVolumeClaim": {"claimName": self.claim}}, self._check(path)

    @contextlib.contextmanager
    def remote_staging(self, label: str = "out", key: str = "") -> Iterator[str]:
        staging = self._new_staging(label, key)
        try:
            yield staging
        finally:
            with contextlib.suppress(MlflowctlError):
                self.delete(staging)  # published folders are gone from .staging already

    def publish_staged(self, staging: str, path: str, manifest: dict[str, Any] | None = None) -> bool:
        r = self._request("POST", "v1/publish", ok=(200, 409),
                          params={"src": self._check(staging), "dst": self._check(path)},
                          data=json.dumps(manifest or {}).encode(), headers={"Content-Type": "application/json"})
        return bool(r.json().get("published"))


def _from_api_server(r: Any) -> bool:
    """Did the API server answer for the proxy (no such service, no ready endpoint) rather than the store server?"""
    if r.status_code not in (404, 502, 503) or "json" not in r.headers.get("content-type", ""):
        return False
    try:
        return r.json().get("kind") == "Status"
    except ValueError:
        return False


class _Upload(io.BytesIO):
    """``open(path, "w")``: buffered here, sent on a clean close; nothing is written on an error."""

    def __init__(self, store: PvcStore, path: str, text: bool) -> None:
        super().__init__()
        self._store, self._path, self._text = store, path, text

    def write(self, data: Any) -> int:  # type: ignore[override]
        return super().write(data.encode() if isinstance(data, str) else data)

    def __enter__(self) -> "_Upload":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            body = self.getvalue()
            self._store._request("PUT", "v1/file", params={"path": self._path}, data=body,
                                 headers={"X-Content-SHA256": hashlib.sha256(body).hexdigest()})
        super().close()


def _untar(stream: Any, dest: Path) -> None:
    """Extract the store server's tar stream into ``dest``: files and folders only, all inside ``dest``.

    tarfile's ``data`` filter does it where this Python has it (3.11.4 and later); the runner image's Debian
    Python (3.11.2, ``mlflowctl export argo``) has not, so there the same checks are made member by member.
    """
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
            return
        root = Path(dest).resolve()
        for member in tf:
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or (target != root and root not in target.parents):
                raise MlflowctlError(f"the store server sent {member.name!r}, which is not a file or folder "
                                     f"inside the result: nothing more is extracted")
            tf.extract(member, root, set_attrs=False)


@hookimpl
def mlflowctl_add_stores(registry: Any) -> None:
    registry.add_store(PvcStore)
