"""Tiny SavedModels with the registry's signatures, and a helper to run ``image/serve.py``.

Version ``v`` of the fake classifier answers ``softmax(logits)`` with
``logits[v] = 5`` (so a blank image is classified as ``v``, making routing
visible) plus ``0.05 * sum(image)`` on class 9 (so a bright image is class 9,
showing the input matters). The fake concept model's reconstruction error is
``mean(image ** 2)``: 0 for a blank image, 1 for a white one; its threshold is
``CONCEPT_THRESHOLD``.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "image" / "serve.py"
CONCEPT_THRESHOLD = 0.25
HIST_EDGES = [i * 0.05 for i in range(11)]  # 0.0 .. 0.5
HIST_COUNTS = [50, 20, 10, 5, 5, 4, 3, 1, 1, 1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_classifier(path: Path, favourite: int, with_pair: bool = False) -> None:
    import tensorflow as tf

    class Classifier(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            bias = [0.0] * 10
            bias[favourite] = 5.0
            self.bias = tf.Variable(bias, dtype=tf.float32)
            self.w9 = tf.Variable([0.0] * 9 + [0.05], dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name="images")])
        def serve(self, images):
            logits = self.bias[None, :] + tf.reduce_sum(images, axis=1, keepdims=True) * self.w9[None, :]
            return {"probabilities": tf.nn.softmax(logits)}

        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a"),
                                      tf.TensorSpec([None, 2], tf.float32, name="b")])
        def pair(self, a, b):
            return {"sum": a + b, "diff": a - b}

    m = Classifier()
    sigs = {"serving_default": m.serve.get_concrete_function()}
    if with_pair:
        sigs["pair"] = m.pair.get_concrete_function()
    tf.saved_model.save(m, str(path), signatures=sigs)


def save_concept(path: Path, threshold: float = CONCEPT_THRESHOLD) -> None:
    import tensorflow as tf

    class Concept(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = tf.Variable(1.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 784], tf.float32, name="images")])
        def serve(self, images):
            return {"reconstruction_error": self.scale * tf.reduce_mean(tf.square(images), axis=1)}

    m = Concept()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve.get_concrete_function()})
    (path / "threshold.json").write_text(json.dumps(
        {"threshold": threshold, "quantile": 0.99, "histogram": {"edges": HIST_EDGES, "counts": HIST_COUNTS}}))


def build_registry(base: Path) -> Path:
    """``base`` = models/<name>: version 1 (no concept), version 2 (concept + a 2-input signature)."""
    base.mkdir(parents=True, exist_ok=True)
    save_classifier(base / "1", favourite=1)
    (base / "1" / "metadata.json").write_text(json.dumps({"version": 1}))
    save_classifier(base / "2", favourite=2, with_pair=True)
    save_concept(base / "2" / "concept")
    (base / "2" / "metadata.json").write_text(json.dumps({"version": 2}))
    (base / ".tmp-123").mkdir(exist_ok=True)  # half-published junk the server must ignore
    return base


def write_routing(path: Path, versions: list[int], labels: dict[str, int] | None = None, canary_weight: float = 0.0) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"versions": versions, "labels": labels or {}, "canary_weight": canary_weight}))
    os.replace(tmp, path)


class ServerProcess:
    """``image/serve.py`` as a subprocess on a free loopback port."""

    def __init__(self, name: str, base: Path, routing: Path, log: Path, extra: list[str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.log = log
        cmd = [sys.executable, str(SERVE), "--model-name", name, "--base-path", str(base), "--routing", str(routing),
               "--host", "127.0.0.1", "--port", str(self.port), "--grpc-port", str(self.grpc_port), *(extra or [])]
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(SERVE.parent), stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 90.0) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._fh.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(name: str, base: Path, routing: Path, log: Path, extra: list[str] | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(name, base, routing, log, extra)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def post(srv, path: str, body, **kw):
    """POST ``body`` (JSON-encoded unless bytes/str) to a running server's ``srv.session``."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return srv.session.post(srv.url + path, data=data, timeout=10, **kw)


def get(srv, path: str, **kw):
    return srv.session.get(srv.url + path, timeout=10, **kw)


def assert_error(r, status: int, needle: str = ""):
    """``r`` is a ``{"error": message}`` answer with ``status``, its message containing ``needle``."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert needle.lower() in body["error"].lower(), body["error"]
