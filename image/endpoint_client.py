"""HTTP client bits shared by the stage scripts that talk to a served model
(integration_test.py, monitor.py).

* :func:`load_endpoint` reads ``<ENDPOINT_DIR>/endpoint.json`` as written by the deploy and promote
  stages (``mlflowctl.serving.Endpoint``): ``{"url", "predict_url", "model_name", "version", "protocol",
  "grpc", "drift_url", "inputs_url", "target"}``. The scripts know the serving target only through it.
* :class:`HttpClient` wraps one ``requests.Session``: every request has a timeout,
  and any transport failure, non-2xx answer or non-JSON body becomes a
  :class:`common.StageError` with ONE line (exit :data:`EXIT_ENDPOINT`), e.g.
  ``POST http://127.0.0.1:8501/v1/models/mnist/versions/3:predict answered 500: {"error": ...}``.
* :class:`GrpcClient` is the same for TF Serving's gRPC ``PredictionService`` at ``endpoint.json``'s
  ``grpc`` address (``tensorflow-serving-api``'s stub; imported only when used).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any
from urllib.parse import quote

from common import EXIT_DATA, StageError

EXIT_ENDPOINT = 5          # the endpoint is unreachable or misbehaves
SNIPPET = 200              # characters of a response body quoted in an error line
PROTOCOLS = ("tfserving", "v2", "seldon", "hydrosphere")


# ------------------------------------------------------------------ endpoint.json
def load_endpoint(endpoint_dir: str) -> dict[str, Any]:
    """The validated content of ``<endpoint_dir>/endpoint.json`` (``version`` as an int)."""
    path = os.path.join(endpoint_dir, "endpoint.json")
    if not os.path.isfile(path):
        raise StageError(f"{path} not found (run the deploy stage first)", EXIT_DATA)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is not valid JSON: {exc}", EXIT_DATA) from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object", EXIT_DATA)
    for key in ("url", "predict_url", "model_name"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise StageError(f"{path}: {key!r} must be a non-empty string", EXIT_DATA)
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, (int, str)) or not str(version).isdigit():
        raise StageError(f"{path}: 'version' must be a positive integer, got {version!r}", EXIT_DATA)
    if not isinstance(data.get("grpc", ""), str):
        raise StageError(f"{path}: 'grpc' must be a host:port string", EXIT_DATA)
    for key in ("drift_url", "inputs_url", "target"):
        if not isinstance(data.get(key, ""), str):
            raise StageError(f"{path}: {key!r} must be a string", EXIT_DATA)
    protocol = data.get("protocol", "tfserving")
    if protocol not in PROTOCOLS:
        raise StageError(f"{path}: unknown protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})", EXIT_DATA)
    return {**data, "url": data["url"].rstrip("/"), "version": int(version), "protocol": protocol}


def drift_url(endpoint: dict[str, Any]) -> str:
    """Where the target answers its drift JSON ("" when it does not score drift).

    An ``endpoint.json`` without the ``drift_url`` key was written before the serving contract
    named it (by the built-in server only): its drift path is used.
    """
    if "drift_url" in endpoint:
        return endpoint["drift_url"] or ""
    return f"{endpoint['url']}/monitor/v1/models/{quote(endpoint['model_name'], safe='')}/drift"


def target_name(endpoint: dict[str, Any]) -> str:
    return endpoint.get("target") or "?"


# ---------------------------------------------------------------------- client
def snippet(text: str, limit: int = SNIPPET) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    one = " ".join(text.split())
    if not one:
        return "(empty body)"
    return one if len(one) <= limit else one[:limit] + "…"


def _reason(exc: Exception) -> str:
    """The useful part of a requests ConnectionError ('[Errno 111] Connection refused')."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip().rstrip(".")
    for hint in ("Name or service not known", "Connection refused", "Connection reset", "Remote end closed"):
        if hint.lower() in text.lower():
            return hint
    return type(exc).__name__


class Answer:
    """A response: status, parsed JSON (``None`` unless asked for) and round-trip milliseconds."""

    __slots__ = ("status", "json", "text", "ms")

    def __init__(self, status: int, data: Any, text: str, ms: float):
        self.status, self.json, self.text, self.ms = status, data, text, ms


class HttpClient:
    """One ``requests.Session``; ``headers`` go on every request."""

    def __init__(self, timeout: float, headers: dict[str, str] | None = None):
        import requests

        self._requests = requests
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"Accept": "application/json", "User-Agent": "mlflowctl-stage"})
        self.session.headers.update(headers or {})

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, url: str, *, body: bytes | None = None, params: dict | None = None,
                ok_only: bool = True) -> Answer:
        """Send; raise a one-line StageError on transport failure. With ``ok_only`` a
        non-2xx answer or a body that is not JSON is an error too; without it the caller
        judges the answer (``Answer.json`` is ``None`` unless a 2xx answer is JSON)."""
        requests = self._requests
        shown = url if not params else f"{url}?{'&'.join(f'{k}={v}' for k, v in params.items())}"
        headers = {"Content-Type": "application/json"} if body is not None else None
        t0 = time.perf_counter()
        try:
            resp = self.session.request(method, url, data=body, params=params, headers=headers, timeout=self.timeout)
            content = resp.content
        except requests.Timeout:
            raise StageError(f"{method} {shown} timed out after {self.timeout:g}s", EXIT_ENDPOINT) from None
        except requests.ConnectionError as exc:
            raise StageError(f"{method} {shown} failed: cannot connect ({_reason(exc)})", EXIT_ENDPOINT) from None
        except requests.RequestException as exc:
            raise StageError(f"{method} {shown} failed: {type(exc).__name__}: {snippet(str(exc))}",
                             EXIT_ENDPOINT) from None
        ms = (time.perf_counter() - t0) * 1000.0
        text = content.decode("utf-8", errors="replace")
        if not 200 <= resp.status_code < 300:
            if ok_only:
                raise StageError(f"{method} {shown} answered {resp.status_code}: {snippet(text)}", EXIT_ENDPOINT)
            return Answer(resp.status_code, None, text, ms)
        try:
            data = json.loads(content)
        except ValueError:
            if not ok_only:
                return Answer(resp.status_code, None, text, ms)
            raise StageError(f"{method} {shown} answered {resp.status_code} with a body that is not JSON: "
                             f"{snippet(text)}", EXIT_ENDPOINT) from None
        return Answer(resp.status_code, data, text, ms)

    def get(self, url: str, params: dict | None = None, ok_only: bool = True) -> Answer:
        return self.request("GET", url, params=params, ok_only=ok_only)

    def post_json(self, url: str, payload: Any) -> Answer:
        return self.request("POST", url, body=json.dumps(payload, separators=(",", ":")).encode())


class GrpcClient:
    """TF Serving's ``PredictionService`` stub on one channel; ``metadata`` goes on every call.

    :meth:`predict` returns the float64 scores of the ``probabilities`` output (or the only one)
    and the round trip in milliseconds; any gRPC failure is one :class:`common.StageError` line.
    """

    def __init__(self, target: str, timeout: float, metadata: dict[str, str] | None = None):
        # the stub's protos are TensorFlow's: importing them imports TensorFlow, whose start-up chatter
        # (oneDNN, CPU features) would break the stage's one-line stderr; the client computes nothing with it
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self._grpc = grpc
        self.target = target
        self.timeout = timeout
        self.metadata = [(k.lower(), v) for k, v in (metadata or {}).items()]
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1),
                                                              ("grpc.max_receive_message_length", -1)])
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def predict(self, model_name: str, version: int, batch: Any, input_name: str = "images") -> tuple[Any, float]:
        import numpy as np
        from tensorflow import make_ndarray, make_tensor_proto
        from tensorflow_serving.apis import predict_pb2

        req = predict_pb2.PredictRequest()
        req.model_spec.name = model_name
        req.model_spec.version.value = int(version)
        req.inputs[input_name].CopyFrom(make_tensor_proto(np.asarray(batch, dtype=np.float32)))
        shown = f"gRPC Predict {self.target} ({model_name} version {version})"
        t0 = time.perf_counter()
        try:
            resp = self.stub.Predict(req, timeout=self.timeout, metadata=self.metadata)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == self._grpc.StatusCode.UNAVAILABLE:
                raise StageError(f"{shown} failed: cannot connect ({snippet(exc.details() or '')})", EXIT_ENDPOINT) from None
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                raise StageError(f"{shown} timed out after {self.timeout:g}s", EXIT_ENDPOINT) from None
            raise StageError(f"{shown} answered {code.name if code else 'an error'}: {snippet(exc.details() or '')}",
                             EXIT_ENDPOINT) from None
        ms = (time.perf_counter() - t0) * 1000.0
        outputs = resp.outputs
        name = "probabilities" if "probabilities" in outputs else (next(iter(outputs)) if len(outputs) == 1 else None)
        if name is None:
            raise StageError(f"{shown} answered outputs {sorted(outputs)} and none is 'probabilities'", EXIT_ENDPOINT)
        try:
            scores = make_ndarray(outputs[name]).astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise StageError(f"{shown} answered a malformed tensor: {snippet(str(exc))}", EXIT_ENDPOINT) from None
        return scores, ms
