"""What the Kubernetes plugins share: one connection to a cluster, errors as one line, names, quantities.

Used by the ``k8s`` backend, the ``pvc://`` store and the model server's ``k8s`` runtime. The
official ``kubernetes`` client is imported inside :meth:`Kube.connect`, so importing this module
costs nothing (``mlflowctl --help`` and a no-op ``doit`` never load the client).

HTTP to something running in the cluster (the store server, the model server) goes through the
API server's service proxy (``/api/v1/namespaces/<ns>/services/<name>:<port>/proxy/<path>``), with
the credentials of the kubeconfig: it works from any machine that can run ``kubectl``, with no
port-forward and no route to pod addresses.
"""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError

_QUANTITY = re.compile(r"^([+]?[0-9]+(\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?[0-9]+)?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _in_cluster(path: str | None) -> bool:
    """No kubeconfig anywhere, and a pod's service account at hand: use it (in-cluster config)."""
    import os

    if path or os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists():
        return False
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path(SA_DIR, "token").is_file()


def check_quantity(value: str) -> str | None:
    """``None`` if ``value`` is a Kubernetes quantity (``500m``, ``2``, ``2Gi``, ``1e3``), else why not."""
    if value == "" or _QUANTITY.match(str(value)):
        return None
    return "expected a Kubernetes quantity such as 500m, 2, 512Mi or 2Gi"


def check_dns_label(value: str) -> str | None:
    if value == "" or (len(value) <= 63 and _DNS1123_LABEL.match(value)):
        return None
    return "expected a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters)"


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 name from ``parts`` (each slugged), cut to ``limit`` characters, ends alphanumeric."""
    slugs = [re.sub(r"[^a-z0-9]+", "-", str(p).lower()).strip("-") for p in parts]
    name = "-".join(s for s in slugs if s)[:limit].strip("-")
    return name or "x"


def api_reason(exc: Any) -> str:
    """The message of a Kubernetes ``ApiException`` (its Status body), on one line."""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message")
            if message:
                return str(message).splitlines()[0][:400]
        except (ValueError, AttributeError, TypeError):
            pass
    reason = getattr(exc, "reason", None) or str(exc)
    status = getattr(exc, "status", None)
    return f"{status} {reason}".strip()[:400] if status else str(reason).splitlines()[0][:400]


class Kube:
    """A connection to one cluster: kubeconfig + context + namespace, API clients made on demand.

    ``connect()`` loads the kubeconfig once (thread-safe); every failure to reach or authenticate
    becomes an :class:`UnavailableError` naming the context and what to do.
    """

    def __init__(self, context: str = "", namespace: str = "", kubeconfig: str = "", where: str = "backends.k8s") -> None:
        self.context = context
        self.kubeconfig = kubeconfig
        self._namespace = namespace
        self.where = where
        self._lock = threading.Lock()
        self._api: Any = None
        self._session: Any = None
        self.context_name = context or "(current context)"

    # -- connection ------------------------------------------------------------------------
    def connect(self) -> Any:
        """The ``ApiClient`` (created once)."""
        with self._lock:
            if self._api is not None:
                return self._api
            import os

            from kubernetes import client, config
            from kubernetes.config.config_exception import ConfigException

            path = os.path.expanduser(self.kubeconfig) if self.kubeconfig else None
            if _in_cluster(path):  # a pod (an exported Argo Workflow's step): its service account
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                self.context_name = "in-cluster"
                if not self._namespace:
                    self._namespace = Path(SA_DIR, "namespace").read_text().strip()
                configuration.retries = 1
                self._api = client.ApiClient(configuration)
                return self._api
            try:
                contexts, current = config.list_kube_config_contexts(config_file=path)
                names = [c["name"] for c in contexts or []]
                if self.context and self.context not in names:
                    raise ConfigError(f"{self.where}.context: no context {self.context!r} in the kubeconfig"
                                      f" ({path or os.environ.get('KUBECONFIG') or '~/.kube/config'}); known: "
                                      f"{', '.join(names) or 'none'}", hint="kubectl config get-contexts")
                self.context_name = self.context or (current or {}).get("name", "?")
                if not self._namespace:
                    self._namespace = ((current or {}).get("context", {}) or {}).get("namespace") or "default"
                    if self.context:
                        ctx = next(c for c in contexts if c["name"] == self.context)
                        self._namespace = (ctx.get("context") or {}).get("namespace") or "default"
                configuration = client.Configuration()
                config.load_kube_config(config_file=path, context=self.context or None,
                                        client_configuration=configuration)
            except (ConfigException, FileNotFoundError, OSError, ValueError, TypeError) as exc:
                raise UnavailableError(f"no usable kube context{' ' + repr(self.context) if self.context else ''}: "
                                       f"{str(exc).splitlines()[0][:300]}",
                                       hint=f"set KUBECONFIG or {self.where}.kubeconfig / {self.where}.context "
                                            "(kubectl config get-contexts)") from None
            configuration.retries = 1
            self._api = client.ApiClient(configuration)
            return self._api

    @property
    def namespace(self) -> str:
        self.connect()
        return self._namespace

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.connect())

    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.connect())

    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.connect())

    def call(self, what: str, fn: Any, *args: Any, not_found: Any = MlflowctlError, **kwargs: Any) -> Any:
        """Call an API method; connection failures and API errors become one-line errors.

        ``not_found``: the value to return on 404 (pass anything but the default to allow it).
        """
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and not_found is not MlflowctlError:
                return not_found
            if exc.status in (401, 403):
                raise UnavailableError(f"kube context {self.context_name}: not allowed to {what}: {api_reason(exc)}",
                                       hint="check the service account's or user's RBAC (mlflowctl render "
                                            "backend=k8s writes the Role it needs)") from None
            raise MlflowctlError(f"kube context {self.context_name}: cannot {what}: {api_reason(exc)}") from None
        except Exception as exc:  # urllib3 connection errors, TLS errors, timeouts
            if type(exc).__module__.startswith(("urllib3", "ssl", "socket")) or isinstance(exc, OSError):
                raise UnavailableError(f"kube context {self.context_name}: API server unreachable while trying to "
                                       f"{what}: {_short(exc)}",
                                       hint="is the cluster up? (kubectl cluster-info; for the test cluster: "
                                            "make cluster)") from None
            raise

    def check_reachable(self) -> None:
        """One cheap request: the API server answers and the credentials are accepted."""
        from kubernetes import client

        self.call("read the API server version", client.VersionApi(self.connect()).get_code, _request_timeout=10)

    def check_namespace(self) -> None:
        ns = self.namespace
        if self.context_name == "in-cluster" and ns == Path(SA_DIR, "namespace").read_text().strip():
            return  # a pod's own namespace exists (and its Role cannot grant reading namespaces)
        if self.call(f"read namespace {ns}", self.core().read_namespace, ns, not_found=None, _request_timeout=10) is None:
            raise UnavailableError(f"kube context {self.context_name}: namespace {ns!r} does not exist",
                                   hint=f"kubectl create namespace {ns}, or set {self.where}.namespace")

    def check_access(self, rules: list[tuple[str, str, str]]) -> None:
        """Ask the API server (SelfSubjectAccessReview) for each (group, resource, verb); one line for the first denied."""
        from kubernetes import client

        api = client.AuthorizationV1Api(self.connect())
        for group, resource, verb in rules:
            review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(group=group, resource=resource, verb=verb,
                                                                namespace=self.namespace)))
            answer = self.call("review access", api.create_self_subject_access_review, review, _request_timeout=10)
            if not answer.status.allowed:
                what = f"{resource}.{group}" if group else resource
                raise UnavailableError(f"kube context {self.context_name}: not allowed to {verb} {what} in namespace "
                                       f"{self.namespace}", hint="bind the Role that `mlflowctl render backend=k8s` "
                                                             "writes (mlflowctl setup applies it)")

    # -- HTTP through the API server's service proxy ------------------------------------------
    def session(self) -> Any:
        """A ``requests`` session carrying the kubeconfig's credentials (client cert, token, CA)."""
        with self._lock:
            if self._session is not None:
                return self._session
        api = self.connect()
        import requests

        c = api.configuration
        s = requests.Session()
        s.trust_env = False  # the kubeconfig decides: no REQUESTS_CA_BUNDLE / *_PROXY from the environment
        if getattr(c, "proxy", None):
            s.proxies = {"https": c.proxy, "http": c.proxy}
        s.verify = c.ssl_ca_cert if c.verify_ssl and c.ssl_ca_cert else bool(c.verify_ssl)
        if c.cert_file and c.key_file:
            s.cert = (c.cert_file, c.key_file)
        token = (c.api_key or {}).get("authorization") or (c.api_key or {}).get("BearerToken")
        if token:
            s.headers["Authorization"] = token if token.lower().startswith("bearer ") else f"Bearer {token}"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        s.mount("https://", adapter)
        s.mount("http://", adapter)
        with self._lock:
            self._session = s
        return s

    def service_url(self, service: str, port: str | int, path: str = "") -> str:
        host = self.connect().configuration.host.rstrip("/")
        return f"{host}/api/v1/namespaces/{self.namespace}/services/{service}:{port}/proxy/{path.lstrip('/')}"

    def proxy(self, method: str, service: str, port: str | int, path: str, **kwargs: Any) -> Any:
        """An HTTP request to ``service:port/path`` through the API server (``requests.Response``)."""
        import requests

        kwargs.setdefault("timeout", 30)
        try:
            return self.session().request(method, self.service_url(service, port, path), **kwargs)
        except requests.RequestException as exc:
            raise UnavailableError(f"kube context {self.context_name}: cannot reach service {service} through the "
                                   f"API server: {_short(exc)}", hint="kubectl cluster-info") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    match = re.search(r"(Connection refused|Name or service not known|timed out|certificate verify failed"
                      r"|No route to host|Max retries exceeded)", text)
    return (match.group(1) if match else text)[:300]
