"""mlflowctl's embedded model server: TensorFlow Serving REST + Open Inference V2 + drift scoring.

Run as its own process (never inside the orchestrator)::

    python serve.py --model-name mnist --base-path models/mnist --routing routing.json \
        --host 127.0.0.1 --port 8501

Registry layout under ``--base-path`` is TensorFlow Serving's: ``<base>/<N>/saved_model.pb``
(+ ``variables/``) per integer version ``N``; optionally ``<base>/<N>/concept/`` holds the
drift autoencoder (signature ``serving_default``: ``images`` -> ``reconstruction_error``) and
``<base>/<N>/concept/threshold.json`` its threshold and training histogram.

The routing file ``{"versions": [1, 2], "labels": {"stable": 1, "canary": 2},
"canary_weight": 0.1}`` says which versions are loaded and how unlabelled requests are
split; it is re-read on ``SIGHUP`` and on ``POST /admin/reload`` (loopback clients only).
Without a routing file the highest version is served, as TensorFlow Serving does.

HTTP surface (all JSON errors are ``{"error": "<message>"}``):

* TF Serving REST: ``GET /v1/models/{m}[/versions/{v}|/labels/{l}][/metadata]``,
  ``POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict`` (row and columnar forms).
* Open Inference Protocol V2: ``/v2``, ``/v2/health/{live,ready}``,
  ``/v2/models/{m}[/versions/{v}][/ready|/infer]``.
  With the binary tensor extension (``Inference-Header-Content-Length``; v2_binary.py).
* ``GET /metrics`` (Prometheus), ``GET /monitor/v1/models/{m}/drift`` (JSON for the monitor).

Limits and checks (serve_limits.py, serve_http.Guard): request heads over ``--max-header-bytes``
get 431; a connection with no request in progress for ``--idle-timeout`` seconds is closed, and a
body stalled that long gets 408; beyond ``--limit-concurrency`` connections the longest-idle one is
closed, and with that many busy a request gets 503. ``Host`` must be an IP literal, a loopback,
single-label or in-cluster name, or listed in ``--allowed-hosts``; a POST with an ``Origin`` (a web
page's) is refused unless listed in ``--allowed-origins``. 5xx bodies never carry exception text.
A version whose ``concept/`` cannot score drift (threshold.json missing or absurd) is refused.

gRPC (``--grpc-port``, 8500 by default, 0 = off): TF Serving's ``PredictionService`` (Predict,
GetModelMetadata) and ``ModelService`` (GetModelStatus) on the same event loop (grpc_service.py).
Dynamic batching (``--batching on``, or per version in the routing file's ``"batching"``):
concurrent serving_default requests of a version share model calls (batching.py).

Performance choices (measured on the pipeline's MLPs, batch-1 predict with drift scoring):

* The HTTP layer is a plain ASGI callable under uvicorn (httptools/uvloop when installed);
  Starlette's routing and Request/Response objects cost ~15% more CPU per request for
  nothing needed here. JSON is orjson both ways (numpy arrays serialised directly).
* Models run inline on the event-loop thread: a batch-1 call is far below a millisecond
  and a thread-pool hop costs more than it saves on a small CPU box.
* Engine ``auto`` (default): at load time each version's ``serving_default`` (classifier
  and concept model) is converted in memory to TFLite and used only if it reproduces the
  SavedModel's outputs on probe inputs (rtol 1e-3); a TFLite call costs ~30-50 us where a
  TF eager concrete-function call costs ~300-500 us. Anything that does not convert or
  match (and every other signature) runs on TF concrete functions built once at load;
  on TF the classifier and concept model are fused into one graph call. ``--engine tf``
  forces TensorFlow throughout.
* Metrics are plain counters on the hot path, rendered by a prometheus-client collector
  at scrape time.

This script is the entry point (arguments, sockets, uvicorn); the server is split by concern
into the modules next to it (its folder is sys.path[0], and the image copies every ``*.py``):

* serve_engine.py    loading a version: signatures, TFLite/TF engines, the fused drift call
* serve_drift.py     threshold.json, each version's window of live errors, the monitor's JSON
* serve_model.py     the routing file, loading/unloading versions, picking a request's version
* serve_metrics.py   Prometheus metrics
* serve_decode.py    JSON bodies to checked arrays (shared by every protocol)
* serve_tfserving.py TF Serving REST handlers; serve_v2.py Open Inference V2 handlers
* serve_http.py      the per-request object, body limits, sending
* serve_errors.py    ApiError -> {"error": ...}
* serve_app.py       the ASGI app: lifespan, THE route table, the shared prediction path
* grpc_service.py, batching.py, v2_binary.py: gRPC, dynamic batching, the V2 binary extension
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# the modules next to this script (its folder is sys.path[0])
import serve_engine  # noqa: E402
from batching import BatchConfig  # noqa: E402
from serve_app import App  # noqa: E402
from serve_http import Guard  # noqa: E402
from serve_limits import (DEFAULT_IDLE_TIMEOUT, DEFAULT_LIMIT_CONCURRENCY, DEFAULT_MAX_HEADER_BYTES,  # noqa: E402
                          connection_budget, limited, protocol_class)
from serve_metrics import Metrics  # noqa: E402
from serve_model import Model  # noqa: E402

DEFAULT_MAX_BODY = 8 * 1024 * 1024

log = logging.getLogger("serve")


# =============================================================================== main
def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it Nagle + delayed ACKs add ~40 ms to every response (uvloop sets it regardless).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets on Linux
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE (Linux, macOS, Windows)
            raise SystemExit(f"serve: port {port} on {host} is already in use "
                             f"(stop what listens there, or pick another port)") from None
        raise SystemExit(f"serve: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mlflowctl model server (TF Serving REST and gRPC + Open Inference V2 "
                                            "+ drift)")
    p.add_argument("--model-name", default=os.environ.get("MODEL_NAME", "model"))
    p.add_argument("--base-path", default=None, help="registry folder of the model (default $MODEL_BASE_PATH/<name>)")
    p.add_argument("--routing", default=os.environ.get("ROUTING_FILE") or None,
                   help="routing JSON; without it the highest version is served")
    p.add_argument("--watch-routing", type=float, default=0.0, metavar="SECONDS",
                   help="also re-read the routing file when it changes, checking every SECONDS (0: off)")
    p.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8501")))
    p.add_argument("--max-body-bytes", type=int, default=int(os.environ.get("MAX_BODY_BYTES", DEFAULT_MAX_BODY)))
    p.add_argument("--intra-op-threads", type=int, default=int(os.environ.get("TF_INTRA_OP_THREADS", "1")),
                   help="TensorFlow intra-op threads (1 is fastest for small batches; 0 = TF's default)")
    p.add_argument("--engine", default=os.environ.get("SERVE_ENGINE", "auto"), choices=["auto", "tf"],
                   help="auto: run serving_default on TFLite when it converts and matches TensorFlow (much "
                        "lower per-call overhead), else TensorFlow; tf: TensorFlow concrete functions only")
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", "8500")),
                   help="port of TF Serving's gRPC API (PredictionService, ModelService); 0 turns gRPC off")
    p.add_argument("--grpc-host", default=os.environ.get("GRPC_HOST") or None,
                   help="address the gRPC API listens on (default: --host)")
    p.add_argument("--allowed-hosts", default=os.environ.get("ALLOWED_HOSTS", ""), metavar="LIST",
                   help="comma list of extra Host names to accept (NAME, .SUFFIX, or * for any); IP literals, "
                        "localhost, single-label and *.svc / *.cluster.local names are always accepted")
    p.add_argument("--allowed-origins", default=os.environ.get("ALLOWED_ORIGINS", ""), metavar="LIST",
                   help="comma list of browser Origins whose POSTs are accepted (default none: this server "
                        "serves no web page; * for any)")
    p.add_argument("--max-header-bytes", type=int, default=int(os.environ.get("MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES)),
                   help="largest request head (request line + headers) accepted; larger: 431 and the connection "
                        "is closed")
    p.add_argument("--idle-timeout", type=float, default=float(os.environ.get("IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT)),
                   metavar="SECONDS", help="close a connection with no request in progress after SECONDS (also a "
                                           "request head that arrives too slowly)")
    p.add_argument("--limit-concurrency", type=int,
                   default=int(os.environ.get("LIMIT_CONCURRENCY", DEFAULT_LIMIT_CONCURRENCY)), metavar="N",
                   help="at most N open connections: a new one closes the one idle longest; a request while N are "
                        "busy gets 503 (lowered to what the fd limit allows)")
    BatchConfig.add_arguments(p)
    p.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                   help="uvicorn HTTP parser (auto: httptools when installed)")
    p.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                   help="event loop (auto: uvloop when installed)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    serve_engine.ENGINE = args.engine
    logging.basicConfig(level=args.log_level.upper(), format="serve: %(message)s", stream=sys.stdout)
    base = Path(args.base_path or os.path.join(os.environ.get("MODEL_BASE_PATH", "/models"), args.model_name)).resolve()
    routing_path = Path(args.routing).resolve() if args.routing else None
    if args.max_body_bytes < 1024:
        raise SystemExit("serve: --max-body-bytes must be at least 1024")
    if args.max_header_bytes < 1024:
        raise SystemExit("serve: --max-header-bytes must be at least 1024")
    if not args.idle_timeout > 0:
        raise SystemExit("serve: --idle-timeout must be a number of seconds above 0")
    if args.limit_concurrency < 2:
        raise SystemExit("serve: --limit-concurrency must be at least 2")
    if not 0 <= args.grpc_port <= 65535:
        raise SystemExit("serve: --grpc-port must be between 0 (gRPC off) and 65535")
    try:
        batching = BatchConfig.from_args(args)
    except ValueError as exc:
        raise SystemExit(f"serve: {exc}") from None
    grpc_host = args.grpc_host or args.host

    sock = bind_socket(args.host, args.port)  # fail fast (port in use) before the slow TF import
    if args.grpc_port:
        if (grpc_host, args.grpc_port) == (args.host, args.port):
            raise SystemExit("serve: --grpc-port must differ from --port")
        try:
            bind_socket(grpc_host, args.grpc_port).close()
        except SystemExit as exc:
            sock.close()
            raise SystemExit(str(exc).replace("serve: port", "serve: gRPC port")
                             .replace("pick another port", "pick another --grpc-port, or 0 to turn gRPC off")) from None
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("serve: uvicorn is not installed (pip install uvicorn orjson prometheus-client)") from None

    tf = serve_engine._tf()
    if args.intra_op_threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if not base.is_dir():
        log.warning("model base path %s does not exist (yet); nothing is served until versions appear there", base)
    model = Model(args.model_name, base, routing_path, batching)
    metrics = Metrics(args.model_name, model)
    try:
        model.reload()
    except ValueError as exc:
        raise SystemExit(f"serve: {exc}") from None
    grpc_server = None
    if args.grpc_port:
        from grpc_service import GrpcServer

        grpc_server = GrpcServer(None, grpc_host, args.grpc_port, args.max_body_bytes)
    guard = Guard(args.allowed_hosts.split(","), args.allowed_origins.split(","))
    app = App(model, metrics, args.max_body_bytes, grpc_server, guard)
    # TensorFlow leaves ~10^6 long-lived objects: a full collection walking them stalls the event loop for
    # tens of ms. Freezing what exists now keeps them out of every later collection.
    gc.collect()
    gc.freeze()
    if grpc_server is not None:
        grpc_server.app = app
    app.watch_routing = args.watch_routing

    max_connections = connection_budget(args.limit_concurrency)
    protocol = limited(protocol_class(args.http), args.max_header_bytes, args.idle_timeout, max_connections)
    config = uvicorn.Config(app, loop=args.loop, http=protocol, lifespan="on", access_log=False,
                            log_level="warning", server_header=False, date_header=False,
                            timeout_graceful_shutdown=5, backlog=1024, limit_concurrency=max_connections + 1,
                            h11_max_incomplete_event_size=args.max_header_bytes)
    host_url = f"[{args.host}]" if ":" in args.host else args.host

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown (exit -15); a handled
            # SIGTERM is a clean stop here, so the process logs "stopped" and exits 0.
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

        async def startup(self, sockets=None):  # noqa: D401 - uvicorn hook
            await super().startup(sockets=sockets)
            if self.started:
                d = model.describe()
                labels = ", ".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "none"
                print(f"serve: model '{model.name}' versions {sorted(model.versions)} (labels: {labels}"
                      f"{', canary weight %g' % model.canary_weight if model.canary else ''}) "
                      f"at http://{host_url}:{args.port}/v1/models/{model.name} (V2 at /v2, metrics at /metrics)"
                      f"{'; gRPC at ' + grpc_server.address if grpc_server else ''}"
                      f"{'; batching on' if batching.enabled else ''}", flush=True)

    server = Server(config)
    connections = server.server_state.connections  # the batcher flushes once every connection has a request queued
    batching.clients = connections.__len__
    server.run(sockets=[sock])
    if app.startup_error:
        raise SystemExit(f"serve: {app.startup_error}")
    print("serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
