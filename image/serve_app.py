"""The ASGI application: lifespan (gRPC, SIGHUP and routing-file reloads), dispatch through
ONE route table, and the prediction path every protocol shares (batching, drift accounting).

The protocols' handlers live in serve_tfserving.py (TF Serving REST) and serve_v2.py (Open
Inference V2); the monitor's drift JSON in serve_drift.py; metrics in serve_metrics.py.
A handler is ``async (app, Request) -> (status, payload, served version label)``; the payload is
JSON-serialisable or a serve_http.Raw.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

import serve_drift
import serve_tfserving
import serve_v2
from batching import QueueFull
from serve_decode import conform
from serve_engine import Signature, Version
from serve_errors import INTERNAL_ERROR, ApiError, bad, not_found
from serve_http import Guard, Raw, Request, read_body, send_json, send_raw
from serve_metrics import Metrics
from serve_model import Model

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

log = logging.getLogger("serve")


async def admin_reload(app: "App", req: Request) -> tuple[int, Any, str]:
    """``POST /admin/reload``: re-read the routing file (loopback clients only)."""
    client = (req.scope.get("client") or ("", 0))[0]
    if client not in LOOPBACK:
        raise ApiError(403, "reload is only accepted from loopback clients")
    try:
        return 200, await app.reload(), ""
    except ValueError as exc:
        raise bad(f"routing not changed: {exc}") from None


async def metrics(app: "App", req: Request) -> tuple[int, Any, str]:
    """``GET /metrics`` (Prometheus text format)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return 200, Raw(generate_latest(app.metrics.registry), [(b"content-type", CONTENT_TYPE_LATEST.encode())]), ""


async def drift(app: "App", req: Request) -> tuple[int, Any, str]:
    """``GET /monitor/v1/models/{m}/drift``: what ``mlflowctl monitor`` reads."""
    code, payload = serve_drift.report(app.model, req.path, req.scope.get("query_string", b""))
    return code, payload, ""


@dataclass(frozen=True)
class Route:
    method: str
    path: str        # an exact path; ending in "/": a prefix; otherwise also the path's sub-paths
    endpoint: str    # the metrics label
    handler: Callable[["App", Request], Any]

    def matches(self, path: str) -> bool:
        p = self.path
        return path == p or (p.endswith("/") and path.startswith(p)) or path.startswith(p + "/")


# THE route table: dispatch (first match of method and path) and 405-vs-404 both read it.
ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/models/", "predict", serve_tfserving.predict),
    Route("GET", "/v1/models/", "status", serve_tfserving.status),
    Route("POST", "/v2/models/", "infer", serve_v2.infer),
    Route("GET", "/v2", "v2", serve_v2.get),
    Route("GET", "/metrics", "metrics", metrics),
    Route("GET", "/monitor/v1/models/", "monitor", drift),
    Route("POST", "/admin/reload", "admin", admin_reload),
)


class App:
    # for the gRPC service (grpc_service.py)
    bad = staticmethod(bad)
    not_found = staticmethod(not_found)
    conform = staticmethod(conform)

    def __init__(self, model: Model, metrics: Metrics, max_body: int, grpc: Any = None, guard: Guard | None = None):
        self.model = model
        self.metrics = metrics
        self.max_body = max_body
        self.guard = guard or Guard()  # Host / Origin checks
        self.grpc = grpc  # grpc_service.GrpcServer, started and stopped with the lifespan
        self.ready = False
        self.watch_routing = 0.0  # seconds between checks of the routing file (--watch-routing), 0: off
        self._watcher: Any = None
        self.startup_error = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reloading: asyncio.Lock | None = None

    # -- ASGI entry point --
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        # websockets: not accepted (uvicorn closes them)

    async def lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()
                self.reloading = asyncio.Lock()
                try:
                    self.loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
                if self.grpc is not None:
                    try:
                        await self.grpc.start()
                    except Exception as exc:  # noqa: BLE001 - one line, and the server exits non-zero
                        self.startup_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                        await send({"type": "lifespan.startup.failed", "message": self.startup_error})
                        return
                if self.watch_routing > 0 and self.model.routing_path is not None:
                    self._watcher = asyncio.ensure_future(self._watch_routing())
                self.ready = True
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                self.ready = False
                if self.grpc is not None:
                    await self.grpc.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _watch_routing(self) -> None:
        """Re-read the routing file when it changes (``--watch-routing``: where no signal or loopback
        request can reach the server, e.g. a pod whose routing file lives on a volume)."""
        path = self.model.routing_path

        def stamp() -> tuple[int, int, int] | None:
            try:
                st = path.stat()
                return (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                return None

        last = stamp()
        while True:
            await asyncio.sleep(self.watch_routing)
            now = stamp()
            if now != last and now is not None:
                log.info("routing file changed: re-reading %s", path)
                await self._reload_quietly()
            last = now

    def _on_sighup(self) -> None:
        log.info("SIGHUP: re-reading %s", self.model.routing_path)
        asyncio.ensure_future(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # noqa: BLE001
            log.error("reload failed, routing unchanged: %s", exc)

    async def reload(self) -> dict[str, Any]:
        assert self.reloading is not None and self.loop is not None
        async with self.reloading:
            return await self.loop.run_in_executor(None, self.model.reload)

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        t0 = time.perf_counter()
        method = scope["method"]
        path = scope["path"]
        endpoint, version = "other", ""
        try:
            self.guard.check(scope["headers"], method)
            if method == "POST":
                test = (b"x-mlflowctl-traffic", b"test") in scope["headers"]
                req = Request(scope, await read_body(scope, receive, self.max_body), test)
            else:
                req = Request(scope)
            for route in ROUTES:
                if route.method == method and route.matches(path):
                    endpoint = route.endpoint
                    status, payload, version = await route.handler(self, req)
                    break
            else:
                raise self.no_route(path, method)
            if isinstance(payload, Raw):
                await send_raw(send, status, payload.data, payload.headers)
            else:
                await send_json(send, status, payload)
        except ApiError as exc:
            status = exc.status
            await send_json(send, status, {"error": exc.message}, exc.headers)
        except Exception:  # noqa: BLE001 - the server keeps serving whatever happens
            status = 500
            log.exception("internal error on %s %s", method, path[:200])
            await send_json(send, 500, {"error": INTERNAL_ERROR})  # never the exception's text
        self.metrics.request(endpoint, version, status, time.perf_counter() - t0)

    def no_route(self, path: str, method: str) -> ApiError:
        """405 (with ``Allow``) when the path exists for another method, else 404."""
        if path.startswith("/v1/models/") or path.startswith("/v2/models/"):
            is_post = path.endswith(":predict") or path.endswith(":classify") or path.endswith(":regress") \
                or path.endswith("/infer")
            allowed = "POST" if is_post else "GET"
            if method != allowed:
                return ApiError(405, f"method {method} is not allowed on {path}; use {allowed}",
                                [(b"allow", allowed.encode())])
        methods = sorted({r.method for r in ROUTES if r.matches(path)})
        if methods and method not in methods:
            return ApiError(405, f"method {method} is not allowed on {path}; use {' or '.join(methods)}",
                            [(b"allow", ", ".join(methods).encode())])
        return not_found(f"no such endpoint: {method} {path}")

    async def predict(self, v: Version, sig: Signature, inputs: dict[str, np.ndarray],
                      test: bool = False) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs``: through the version's batcher when it has one, else inline."""
        batcher = v.batcher
        if batcher is None or sig.name != "serving_default" or sig.single_input is None or batcher.run_at_once():
            return self._run(v, sig, inputs, test)
        x = self._rows(inputs, sig)
        try:
            outs, errors = await batcher.submit(x)
        except QueueFull as exc:
            raise ApiError(503, str(exc), [(b"retry-after", str(exc.retry_after).encode())]) from None
        except Exception as exc:  # noqa: BLE001 - TF rejected this request's input
            raise bad(self._tf_message(exc)) from None
        self._account(v, x.shape[0] if x.ndim else 1, errors, test)
        return outs

    @staticmethod
    def _rows(inputs: dict[str, np.ndarray], sig: Signature) -> np.ndarray | None:
        for alias, arr in inputs.items():
            if arr.size == 0:
                raise bad(f"input '{alias}' is empty (shape {list(arr.shape)}); send at least one instance")
        return inputs.get(sig.single_input.alias) if sig.single_input is not None else None

    def _run(self, v: Version, sig: Signature, inputs: dict[str, np.ndarray], test: bool = False) -> dict[str, np.ndarray]:
        """Call the model (and the concept model on the same batch); returns numpy outputs."""
        x = self._rows(inputs, sig)
        n = x.shape[0] if x is not None and x.ndim else 1
        errors = None
        try:
            if sig.name == "serving_default" and v.runner is not None and x is not None:
                outs, errors = v.runner(x)
            else:
                outs = sig.run(inputs)
        except Exception as exc:  # noqa: BLE001 - TF rejected the input
            raise bad(self._tf_message(exc)) from None
        self._account(v, n, errors, test)
        return outs

    def _account(self, v: Version, n: int, errors: np.ndarray | None, test: bool) -> None:
        """Drift scores into the version's window (test traffic apart) and the metrics."""
        scored = outliers = 0
        if errors is not None:
            errors = errors.reshape(-1)
            outliers = v.record(errors, test)
            scored = 0 if test else errors.size
            if test:
                outliers = 0
        v.predictions += n
        self.metrics.predicted(v, n, scored, outliers)

    @staticmethod
    def _tf_message(exc: Exception) -> str:
        text = str(getattr(exc, "message", None) or exc).strip().splitlines()
        return "the model rejected the input: " + (text[0][:300] if text else type(exc).__name__)
