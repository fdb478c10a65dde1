"""A stand-in for a Hydrosphere Serving 3.x cluster, written from its documented API (../shared/REFERENCE.md §4).

Hydrosphere is unmaintained (last release 3.0.3, 2021) and cannot run here, so the ``hydrosphere``
target's tests run against this server on 127.0.0.1. It keeps the documented behaviour:

* ``POST /api/v2/model/upload`` (multipart ``payload`` tar.gz + ``metadata`` JSON) makes the next version
  ``name:M`` of the model, ``Assembling``, then ``Released`` once the payload loads as a SavedModel
  (with TensorFlow, in this process) or ``Failed``; ``GET /api/v2/model/version[/<name>/<M>]``;
* ``POST /api/v2/monitoring/metricspec`` attaches a model version as a metric of another, with a
  threshold and a comparison; ``GET`` lists them;
* ``GET|POST /api/v2/application``, ``GET|DELETE /api/v2/application/<name>``: an execution graph of
  stages of weighted model variants (weights of a stage sum to 100), ``Assembling`` -> ``Ready``
  (``Failed`` if a variant is not Released); names are unique (409);
* ``POST /gateway/application/<name>``: the contract's named inputs -> named outputs, a variant
  picked by weight; a request that breaks the contract is 400 ``ContractViolationError``. Every
  request is also scored by the metrics attached to the variant (``metric_values``).
"""
from __future__ import annotations

import email.parser
import email.policy
import io
import json
import random
import re
import tarfile
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

CMP = {"Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b, "Greater": lambda a, b: a > b,
       "GreaterEq": lambda a, b: a >= b, "Less": lambda a, b: a < b, "LessEq": lambda a, b: a <= b}


class Cluster:
    def __init__(self, root: Path, assemble_seconds: float = 0.2) -> None:
        self.root = root
        self.assemble_seconds = assemble_seconds
        self.lock = threading.Lock()
        self.versions: dict[int, dict[str, Any]] = {}   # id -> model version
        self.fns: dict[int, Any] = {}                   # id -> loaded signature
        self.metricspecs: dict[int, dict[str, Any]] = {}
        self.apps: dict[str, dict[str, Any]] = {}
        self.metric_values: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -------------------------------------------------------------------- models
    def upload(self, payload: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
        name = metadata.get("name")
        sig = metadata.get("modelSignature")
        runtime = metadata.get("runtime")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
            raise ValueError(f"invalid model name {name!r}")
        if not isinstance(runtime, dict) or not runtime.get("name") or not runtime.get("tag"):
            raise ValueError("metadata.runtime must be {name, tag}")
        if not isinstance(sig, dict) or not sig.get("signatureName") or not sig.get("inputs") or not sig.get("outputs"):
            raise ValueError("metadata.modelSignature must have signatureName, inputs and outputs")
        with self.lock:
            number = 1 + max([v["modelVersion"] for v in self.versions.values() if v["model"]["name"] == name],
                             default=0)
            vid = self.next_id()
            folder = self.root / name / str(number)
            folder.mkdir(parents=True)
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
                tar.extractall(folder, filter="data")
            version = {"id": vid, "model": {"id": hash(name) % 10000, "name": name}, "modelVersion": number,
                       "status": "Assembling", "runtime": runtime, "modelSignature": sig,
                       "metadata": metadata.get("metadata") or {}, "message": ""}
            self.versions[vid] = version
        threading.Thread(target=self._assemble, args=(vid, folder), daemon=True).start()
        return version

    def _assemble(self, vid: int, folder: Path) -> None:
        time.sleep(self.assemble_seconds)
        try:
            import tensorflow as tf

            fn = tf.saved_model.load(str(folder)).signatures["serving_default"]
            status, message = "Released", ""
        except Exception as exc:  # noqa: BLE001 - a build failure is a version state
            fn, status, message = None, "Failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        with self.lock:
            self.fns[vid] = fn
            self.versions[vid].update(status=status, message=message)

    def version(self, name: str, number: int) -> dict[str, Any] | None:
        return next((v for v in self.versions.values() if v["model"]["name"] == name and v["modelVersion"] == number),
                    None)

    # -------------------------------------------------------------------- applications
    def create_app(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        stages = (body.get("executionGraph") or {}).get("stages")
        if not isinstance(name, str) or not name:
            raise ValueError("application name missing")
        if not isinstance(stages, list) or not stages:
            raise ValueError("executionGraph.stages must be a non-empty list")
        for stage in stages:
            variants = stage.get("modelVariants") or []
            if not variants or sum(int(v.get("weight", 0)) for v in variants) != 100:
                raise ValueError("the weights of a stage's modelVariants must sum to 100")
            for v in variants:
                if int(v.get("modelVersionId", -1)) not in self.versions:
                    raise LookupError(f"model version {v.get('modelVersionId')} not found")
        with self.lock:
            if name in self.apps:
                raise FileExistsError(f"application {name} already exists")
            app = {"id": self.next_id(), "name": name, "executionGraph": body["executionGraph"],
                   "kafkaStreaming": body.get("kafkaStreaming") or [], "metadata": body.get("metadata") or {},
                   "status": "Assembling", "created": time.monotonic(), "message": ""}
            self.apps[name] = app
        return self._public(app)

    def app_status(self, app: dict[str, Any]) -> None:
        """Assembling until every variant is Released (then Ready) or one Failed (then Failed)."""
        if app["status"] != "Assembling" or time.monotonic() - app["created"] < self.assemble_seconds:
            return
        states = [self.versions[int(v["modelVersionId"])]["status"]
                  for s in app["executionGraph"]["stages"] for v in s["modelVariants"]]
        if "Failed" in states:
            app.update(status="Failed", message="a model variant failed to build")
        elif all(s == "Released" for s in states):
            app["status"] = "Ready"

    @staticmethod
    def _public(app: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in app.items() if k != "created"}

    # -------------------------------------------------------------------- gateway
    def predict(self, name: str, body: Any) -> dict[str, Any]:
        import numpy as np
        import tensorflow as tf

        app = self.apps.get(name)
        if app is None:
            raise LookupError(f"application {name} not found")
        self.app_status(app)
        if app["status"] != "Ready":
            raise RuntimeError(f"application {name} is {app['status']}")
        data = body
        for stage in app["executionGraph"]["stages"]:
            variants = stage["modelVariants"]
            chosen = random.choices(variants, weights=[int(v["weight"]) for v in variants])[0]
            vid = int(chosen["modelVersionId"])
            sig = self.versions[vid]["modelSignature"]
            if not isinstance(data, dict):
                raise ValueError("the request must be a JSON object of the contract's inputs")
            inputs = {}
            for field in sig["inputs"]:
                if field["name"] not in data:
                    raise ValueError(f"field {field['name']!r} of the contract is missing")
                arr = np.asarray(data[field["name"]], dtype=np.float32)
                dims = field["shape"]["dims"]
                if arr.ndim != len(dims) or any(d not in (-1, s) for d, s in zip(dims, arr.shape)):
                    raise ValueError(f"field {field['name']!r} has shape {list(arr.shape)}, the contract says {dims}")
                inputs[field["name"]] = arr
            fn = self.fns[vid]
            out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
            data = {k: np.asarray(v).tolist() for k, v in out.items()}
            self._score_metrics(vid, inputs)
        return data

    def _score_metrics(self, vid: int, inputs: dict[str, Any]) -> None:
        import numpy as np
        import tensorflow as tf

        for spec in list(self.metricspecs.values()):
            if int(spec["modelVersionId"]) != vid:
                continue
            cfg = spec["config"]
            fn = self.fns.get(int(cfg["modelVersionId"]))
            if fn is None:
                continue
            out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
            for value in np.asarray(next(iter(out.values()))).ravel().tolist():
                healthy = CMP[cfg["thresholdCmpOperator"]["kind"]](value, cfg["threshold"])
                self.metric_values.append({"metricSpecId": spec["id"], "value": value, "health": healthy})


class Handler(BaseHTTPRequestHandler):
    cluster: Cluster

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self) -> Any:
        try:
            return json.loads(self._body() or b"null")
        except ValueError:
            return None

    def do_GET(self) -> None:  # noqa: N802
        c = self.cluster
        c.requests.append(("GET", self.path))
        with c.lock:
            if self.path == "/api/v2/model/version":
                return self._send(200, list(c.versions.values()))
            m = re.fullmatch(r"/api/v2/model/version/([^/]+)/(\d+)", self.path)
            if m:
                v = c.version(m.group(1), int(m.group(2)))
                return self._send(200, v) if v else self._send(404, {"error": "NotFound", "information": self.path})
            if self.path == "/api/v2/monitoring/metricspec":
                return self._send(200, list(c.metricspecs.values()))
            if self.path == "/api/v2/application":
                for app in c.apps.values():
                    c.app_status(app)
                return self._send(200, [c._public(a) for a in c.apps.values()])
            m = re.fullmatch(r"/api/v2/application/([^/]+)", self.path)
            if m:
                app = c.apps.get(m.group(1))
                if app is None:
                    return self._send(404, {"error": "NotFound", "information": f"application {m.group(1)}"})
                c.app_status(app)
                return self._send(200, c._public(app))
        self._send(404, {"error": "NotFound", "information": self.path})

    def do_DELETE(self) -> None:  # noqa: N802
        c = self.cluster
        c.requests.append(("DELETE", self.path))
        m = re.fullmatch(r"/api/v2/application/([^/]+)", self.path)
        with c.lock:
            if m and m.group(1) in c.apps:
                return self._send(200, c._public(c.apps.pop(m.group(1))))
        self._send(404, {"error": "NotFound", "information": self.path})

    def do_POST(self) -> None:  # noqa: N802
        c = self.cluster
        c.requests.append(("POST", self.path))
        try:
            if self.path == "/api/v2/model/upload":
                parts = self._multipart()
                if "payload" not in parts or "metadata" not in parts:
                    return self._send(400, {"error": "InvalidRequest", "information": "payload and metadata needed"})
                return self._send(200, c.upload(parts["payload"], json.loads(parts["metadata"])))
            if self.path == "/api/v2/monitoring/metricspec":
                spec = self._json()
                cfg = (spec or {}).get("config") or {}
                if int((spec or {}).get("modelVersionId", -1)) not in c.versions \
                        or int(cfg.get("modelVersionId", -1)) not in c.versions:
                    return self._send(404, {"error": "NotFound", "information": "model version of the metric"})
                if not isinstance(cfg.get("threshold"), (int, float)) or \
                        (cfg.get("thresholdCmpOperator") or {}).get("kind") not in CMP:
                    return self._send(400, {"error": "InvalidRequest", "information": "threshold and comparison"})
                with c.lock:
                    spec = {**spec, "id": c.next_id()}
                    c.metricspecs[spec["id"]] = spec
                return self._send(200, spec)
            if self.path == "/api/v2/application":
                return self._send(200, c.create_app(self._json() or {}))
            m = re.fullmatch(r"/gateway/application/([^/]+)", self.path)
            if m:
                body = self._json()
                try:
                    return self._send(200, c.predict(m.group(1), body))
                except ValueError as exc:
                    return self._send(400, {"error": "ContractViolationError", "information": str(exc)})
        except LookupError as exc:
            return self._send(404, {"error": "NotFound", "information": str(exc)})
        except FileExistsError as exc:
            return self._send(409, {"error": "AlreadyExists", "information": str(exc)})
        except ValueError as exc:
            return self._send(400, {"error": "InvalidRequest", "information": str(exc)})
        except Exception as exc:  # noqa: BLE001 - as the platform answers it
            return self._send(500, {"error": "InternalUncaught", "information": f"{type(exc).__name__}: {exc}"})
        self._send(404, {"error": "NotFound", "information": self.path})

    def _multipart(self) -> dict[str, bytes]:
        ctype = self.headers.get("Content-Type", "")
        raw = b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + self._body()
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
        parts = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                parts[name] = part.get_payload(decode=True) or b""
        return parts


class HydrosphereServer:
    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="hydrosphere-")
        self.cluster = Cluster(Path(self.tmp.name))
        handler = type("H", (Handler,), {"cluster": self.cluster})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.tmp.cleanup()


@pytest.fixture(scope="module")
def hydrosphere():
    """A stand-in Hydrosphere cluster on 127.0.0.1 for the module (import this fixture into a test module)."""
    server = HydrosphereServer()
    yield server
    server.stop()
