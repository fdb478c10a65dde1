"""HTTP to the running model server of the ``local`` target (TF Serving REST status, V2 readiness,
``/admin/reload``): directly, or for a server in a cluster through its runtime's ``request()``.

``requests`` is imported when a request is made, never at import time.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from mlflowctl.errors import MlflowctlError, UnavailableError


class ServerUnreachable(Exception):
    """The server did not answer at all (transport failure)."""


class ServerClient:
    """One running server: ``runtime`` (its ``request`` if it has one) and its base ``url``."""

    def __init__(self, runtime: Any, url: str, model_name: str) -> None:
        self.runtime = runtime
        self.url = url
        self.model_name = model_name

    def get(self, path: str, timeout: float = 2.0) -> Any:
        import requests

        if hasattr(self.runtime, "request"):  # a server in a cluster: through the API server
            return self.runtime.request("GET", path.lstrip("/"), timeout=timeout)
        return requests.get(f"{self.url}{path}", timeout=timeout)

    def ready(self, serves: Callable[[dict[str, Any]], bool] | None = None) -> bool:
        """Does the server answer ready -- and, given ``serves(answer)``, is it ours (not another on the port)?"""
        import requests

        try:
            r = self.get("/v2/health/ready", timeout=1.0)
            if r.status_code != 200:
                return False
            return serves is None or bool(serves(r.json()))
        except (requests.RequestException, ValueError, AttributeError):
            return False

    def reload(self, timeout: float) -> dict[str, Any]:
        """``POST /admin/reload``: the server re-reads routing.json; its view of the versions.
        Raises :class:`ServerUnreachable` when it does not answer."""
        import requests

        try:
            r = requests.post(f"{self.url}/admin/reload", timeout=timeout)
        except requests.RequestException as exc:
            raise ServerUnreachable(exc.__class__.__name__) from None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200:
            raise MlflowctlError(f"the model server refused the new routing: {body.get('error', r.text[:200])}")
        return body

    def version_states(self, number: int | None = None) -> list[dict[str, Any]] | None:
        """TF Serving's ``model_version_status`` of the model (or one version); None unless it answers 200."""
        path = f"/v1/models/{self.model_name}" + (f"/versions/{int(number)}" if number is not None else "")
        r = self.get(path)
        if r.status_code != 200:
            return None
        return [s for s in r.json().get("model_version_status", []) if isinstance(s, dict)]

    def wait_available(self, number: int, timeout: float, log_hint: str) -> None:
        """Until version ``number`` is AVAILABLE; END (it could not load) or the timeout is an error."""
        import requests

        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                r = self.get(f"/v1/models/{self.model_name}/versions/{number}")
                if r.status_code == 200:
                    st = r.json()["model_version_status"][0]
                    if st["state"] == "AVAILABLE":
                        return
                    last = f"state {st['state']}"
                    if st["state"] == "END":
                        msg = st.get("status", {}).get("error_message") or "unloaded"
                        raise MlflowctlError(f"the model server could not load version {number} of "
                                             f"{self.model_name}: {msg}", hint=log_hint)
                else:
                    last = r.json().get("error", f"HTTP {r.status_code}")
            except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise UnavailableError(f"version {number} of {self.model_name} did not become available within "
                                       f"{timeout:g}s ({last})", hint=log_hint)
            time.sleep(0.2)
