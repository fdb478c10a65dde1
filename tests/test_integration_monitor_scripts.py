"""The ``integration_test`` and ``monitor`` stage scripts (image/integration_test.py, image/monitor.py).

Each script runs for real as a subprocess against a REAL HTTP server on 127.0.0.1 started
here: a small stdlib ``ThreadingHTTPServer`` that speaks the TF Serving / V2 / Seldon
predict shapes and the drift-monitor JSON of image/serve.py. Its "model" is deterministic:
it recognises the test set's images (rounded back to uint8) and answers a chosen function
of the true label, so the expected accuracy is known; it flags images as outliers by a hash,
and logs every image it receives, so the expected out-of-distribution rates are known too.
This fake stands in for a serving target only to test these clients (the real server has
its own tests in test_model_server.py). No TensorFlow here.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

IMAGE_DIR = Path(__file__).resolve().parents[1] / "image"
NAME, VERSION = "mnist", 3
N_IMAGES = 200
STAGE_VARS = (
    "MNIST_DATA_DIR ENDPOINT_DIR OUTPUT_DIR MIN_ACCURACY SAMPLES BATCH_SIZE NOISE TIMEOUT SEED MAX_DRIFT_RATE"
).split()
PATHS = {
    "tfserving": f"/v1/models/{NAME}/versions/{VERSION}:predict",
    "v2": f"/v2/models/{NAME}/versions/{VERSION}/infer",
    "seldon": "/api/v1.0/predictions",
    "hydrosphere": f"/gateway/application/{NAME}",
}
LIVE_INPUTS = "/live-inputs"  # a target's sample of live inputs (mlflowctl.serving: live_inputs_url)


# =============================================================== the fake server
def key_of(row) -> bytes:
    """An image sent as 784 floats in [0, 1] -> its uint8 bytes (the test set's key)."""
    return np.rint(np.asarray(row, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8).tobytes()


def is_outlier(key: bytes) -> bool:
    return zlib.crc32(key) % 3 == 0


class Fake:
    """State of one fake serving target (what it answers, and what it saw)."""

    def __init__(self, labels: dict[bytes, int],
                 classify: Callable[[int | None], int] = lambda y: y if y is not None else 0,
                 drift: str | None = "test", failure: str | None = None, monitor: dict | None = None,
                 labels_served: tuple[str, ...] = ("stable",)):
        self.labels = labels
        self.classify = classify
        self.drift = drift                    # "test" (separate counters) | "legacy" | "html" | None (404)
        self.failure = failure                # None | "500" | "malformed" | "wrong_shape" | "slow" | "no_key"
        self.monitor = monitor                # a fixed drift JSON to answer (monitor tests)
        self.labels_served = labels_served
        self.lock = threading.Lock()
        self.received: list[tuple[bytes, bool]] = []   # (image key, test-tagged) in arrival order
        self.untagged_requests = 0
        self.predict_requests = 0
        self.bodies: list[Any] = []
        self.drift_queries: list[dict] = []
        self.test = {"scored": 1000, "outliers": 111}   # non-zero start: the script must use deltas
        self.live = {"scored": 5000, "outliers": 222}
        self.live_inputs: list | None = None  # GET /live-inputs answers {"inputs": these}

    # -- predict --
    def predict(self, protocol: str, body: Any, tagged: bool) -> tuple[int, bytes]:
        rows = self.decode(protocol, body)
        keys = [key_of(r) for r in rows]
        outliers = sum(is_outlier(k) for k in keys)
        with self.lock:
            self.predict_requests += 1
            self.untagged_requests += 0 if tagged else 1
            self.received.extend((k, tagged) for k in keys)
            counters = self.test if (tagged and self.drift == "test") else self.live
            counters["scored"] += len(keys)
            counters["outliers"] += outliers
        if self.failure == "500":
            return 500, b'model crashed\nwith a second line ' + b"x" * 500
        if self.failure == "malformed":
            return 200, b'{"predictions": [[0.1, 0.2'
        if self.failure == "slow":
            time.sleep(3)
        probs = np.zeros((len(keys), 10))
        for i, k in enumerate(keys):
            probs[i, self.classify(self.labels.get(k))] = 0.9
        probs += 0.01
        if self.failure == "wrong_shape":
            probs = probs[:, :9]
        if protocol == "tfserving":
            out = {"predictions": probs.tolist()} if self.failure != "no_key" else {"outputs": probs.tolist()}
        elif protocol == "v2":
            out = {"model_name": NAME, "model_version": str(VERSION), "id": "1",
                   "outputs": [{"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32",
                                "data": probs.ravel().tolist()}]}
        elif protocol == "hydrosphere":
            out = {"probabilities": probs.tolist()}
        else:
            out = {"data": {"names": [f"t:{i}" for i in range(10)], "ndarray": probs.tolist()}, "meta": {}}
        return 200, json.dumps(out).encode()

    @staticmethod
    def decode(protocol: str, body: Any) -> list:
        """Strictly the request shapes of REFERENCE.md §1-§3 (AssertionError -> 400)."""
        if protocol == "tfserving":
            assert set(body) == {"instances"}
            rows = body["instances"]
        elif protocol == "v2":
            (inp,) = body["inputs"]
            assert inp["name"] == "images" and inp["datatype"] == "FP32"
            n, width = inp["shape"]
            assert width == 784 and len(inp["data"]) == n * 784
            assert all(isinstance(v, (int, float)) for v in inp["data"][:50])
            rows = np.asarray(inp["data"], dtype=np.float64).reshape(n, 784)
        elif protocol == "hydrosphere":
            assert set(body) == {"images"}
            rows = body["images"]
        else:
            rows = body["data"]["ndarray"]
        assert len(rows) >= 1 and all(len(r) == 784 for r in rows)
        return list(rows)

    # -- drift JSON (the shape of serve.py's App.drift) --
    def drift_json(self, query: dict) -> tuple[int, Any]:
        with self.lock:
            self.drift_queries.append(query)
        if self.monitor is not None:
            if "label" in query and query["label"] not in self.labels_served:
                return 404, {"error": f"no version of '{NAME}' has the label '{query['label']}'"}
            return 200, self.monitor
        if self.drift is None:
            return 404, {"error": "not found"}
        if self.drift == "html":  # e.g. an ingress's default page
            return 200, b"<html><body>default backend</body></html>"
        assert query == {"version": str(VERSION)}, query
        with self.lock:
            live, test = dict(self.live), dict(self.test)
        out = {"model_name": NAME, "version": str(VERSION), "drift_scoring": True, **live,
               "outlier_rate": live["outliers"] / live["scored"], "threshold": 0.03,
               "versions": {str(VERSION): {**live, "threshold": 0.03, "predictions": 0}}}
        if self.drift == "test":
            out["test"] = test
            out["versions"][str(VERSION)]["test"] = test
        return 200, out


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-serving/0.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, data: bytes | Any) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        fake: Fake = self.server.fake
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        protocol = next((p for p, path in PATHS.items() if self.path == path), None)
        if protocol is None:
            return self._send(404, {"error": f"no route {self.path}"})
        tagged = self.headers.get("X-Mlflowctl-Traffic") == "test"
        try:
            parsed = json.loads(body)
            fake.bodies.append(parsed)
            status, out = fake.predict(protocol, parsed, tagged)
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            status, out = 400, {"error": f"bad request: {exc!r}"}
        self._send(status, out)

    def do_GET(self):
        fake: Fake = self.server.fake
        url = urlsplit(self.path)
        if url.path == LIVE_INPUTS and fake.live_inputs is not None:
            return self._send(200, {"inputs": fake.live_inputs})
        if url.path not in (f"/monitor/v1/models/{NAME}/drift", "/custom/drift"):
            return self._send(404, {"error": f"no route {url.path}"})
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        status, out = fake.drift_json(query)
        self._send(status, out)


class Server:
    def __init__(self, fake: Fake):
        self.fake = fake
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = fake
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(fake: Fake) -> Server:
        servers.append(Server(fake))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ============================================================== data and helpers
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, dict[bytes, int]]:
    data_dir = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(123)
    x = rng.integers(0, 256, size=(N_IMAGES, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=N_IMAGES, dtype=np.uint8)
    np.savez(data_dir / "t10k.npz", x=x, y=y)
    labels = {img.tobytes(): int(lab) for img, lab in zip(x, y)}
    assert len(labels) == N_IMAGES
    return data_dir, x, y, labels


def write_endpoint(dir_: Path, url: str, protocol: str = "tfserving", **contract: str) -> Path:
    """endpoint.json; ``contract`` adds drift_url / inputs_url / target (without them: an endpoint.json
    written before the contract named drift, which means the built-in server's drift path)."""
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "endpoint.json").write_text(json.dumps({
        "url": url, "predict_url": url + PATHS.get(protocol, PATHS["tfserving"]),
        "model_name": NAME, "version": VERSION, "protocol": protocol, **contract}))
    return dir_


def run_script(script: str, timeout: float = 60, **env: Any) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in STAGE_VARS}
    full.update(PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg", **{k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, script], cwd=IMAGE_DIR, env=full, capture_output=True, text=True,
                          timeout=timeout)


def integration(dataset, tmp_path: Path, url: str, protocol: str = "tfserving", contract: dict | None = None,
                **env: Any):
    settings = {"MIN_ACCURACY": 0.8, "SAMPLES": 50, "BATCH_SIZE": 16, "NOISE": 0.5, "TIMEOUT": 10, **env}
    out = tmp_path / "out"
    proc = run_script("integration_test.py", MNIST_DATA_DIR=dataset[0], OUTPUT_DIR=out,
                      ENDPOINT_DIR=write_endpoint(tmp_path / "endpoint", url, protocol, **(contract or {})),
                      **settings)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return proc, report, out


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def assert_one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_parts(fake: Fake, samples: int) -> dict[str, list[bytes]]:
    keys = [k for k, _ in fake.received]
    n_random = max(10, samples // 10)
    assert len(keys) == 2 * samples + n_random  # bounded: exactly the images of the three parts
    return {"clean": keys[:samples], "noisy": keys[samples:2 * samples], "random": keys[2 * samples:]}


def rate(keys: list[bytes]) -> float:
    return sum(is_outlier(k) for k in keys) / len(keys)


# ======================================================== integration_test.py
def test_accuracy_passes_and_ood_rates_from_test_counter_deltas(dataset, tmp_path, serve):
    _, x, y, labels = dataset
    fake = Fake(labels)  # an oracle: answers the true label
    srv = serve(fake)
    proc, report, out = integration(dataset, tmp_path, srv.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""

    parts = expected_parts(fake, 50)
    assert all(k in labels for k in parts["clean"]) and len(set(parts["clean"])) == 50  # a sample, no repeats
    assert not any(k in labels for k in parts["random"])
    assert fake.untagged_requests == 0 and all(tagged for _, tagged in fake.received)
    assert report["passed"] is True and report["accuracy"] == 1.0
    assert report["min_accuracy"] == 0.8 and report["samples"] == 50 and report["version"] == VERSION
    assert report["requests"] == fake.predict_requests == 4 + 4 + 1  # ceil(50/16) ×2 + ceil(10/16)
    assert report["endpoint"]["predict_url"] == srv.url + PATHS["tfserving"]
    assert report["ood_source"] == "test"
    for part, keys in parts.items():
        assert report["ood_rate"][part] == pytest.approx(rate(keys)), part
        assert report["ood_counts"][part]["scored"] == len(keys)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    md = (out / "report.md").read_text()
    assert "PASSED" in md and "1.0000" in md and "| noisy" in md
    assert "accuracy 1.0000" in proc.stdout and "vs floor 0.8000" in proc.stdout and "p99" in proc.stdout

    # the same seed draws the same sample; another seed another one
    fake.received.clear()
    integration(dataset, tmp_path, srv.url)
    assert [k for k, _ in fake.received[:50]] == parts["clean"]
    fake.received.clear()
    integration(dataset, tmp_path, srv.url, SEED=7)
    assert [k for k, _ in fake.received[:50]] != parts["clean"]


def test_accuracy_against_the_floor(dataset, tmp_path, serve):
    _, x, y, labels = dataset
    # right only for even labels: the accuracy is the share of even labels in the sample
    fake = Fake(labels, classify=lambda lab: lab if lab is not None and lab % 2 == 0 else ((lab or 0) + 1) % 10)
    srv = serve(fake)
    proc, report, _ = integration(dataset, tmp_path, srv.url, SAMPLES=60, NOISE=0)
    assert proc.returncode == 0, proc.stderr
    clean = expected_parts(fake, 60)["clean"]
    expected = sum(labels[k] % 2 == 0 for k in clean) / 60
    assert 0 < expected < 1
    assert report["accuracy"] == pytest.approx(expected)
    assert report["accuracy_noisy"] == pytest.approx(expected)  # NOISE=0: the noisy part is the clean one
    assert report["passed"] is (expected >= 0.8)

    for floor, passed in ((expected, True), (expected - 0.01, True), (min(1.0, expected + 0.01), False)):
        fake.received.clear()
        proc, report, out = integration(dataset, tmp_path, srv.url, SAMPLES=60, MIN_ACCURACY=floor)
        assert proc.returncode == 0, proc.stderr  # a failed floor is not a stage failure: promote decides
        assert report["passed"] is passed and report["min_accuracy"] == pytest.approx(floor)
        assert ("PASSED" if passed else "FAILED") in (out / "report.md").read_text()


def test_garbage_model_fails(dataset, tmp_path, serve):
    _, x, y, labels = dataset
    srv = serve(Fake(labels, classify=lambda lab: ((lab or 0) + 3) % 10))
    proc, report, _ = integration(dataset, tmp_path, srv.url, MIN_ACCURACY=0.1)
    assert proc.returncode == 0, proc.stderr
    assert report["accuracy"] == 0.0 and report["passed"] is False
    assert "FAILED" in proc.stdout


def test_samples_above_the_test_set_size_uses_all_images(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    fake = Fake(labels)
    srv = serve(fake)
    proc, report, _ = integration(dataset, tmp_path, srv.url, SAMPLES=10_000, BATCH_SIZE=100)
    assert proc.returncode == 0, proc.stderr
    assert report["samples"] == N_IMAGES and report["images"] == {"clean": 200, "noisy": 200, "random": 20}
    assert len(fake.received) == 420 and report["requests"] == 2 + 2 + 1
    assert set(k for k, _ in fake.received[:200]) == set(labels)


def test_legacy_server_counters_fall_back_to_top_level(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    fake = Fake(labels, drift="legacy")
    srv = serve(fake)
    proc, report, _ = integration(dataset, tmp_path, srv.url, SAMPLES=30)
    assert proc.returncode == 0, proc.stderr
    assert report["ood_source"] == "live"
    for part, keys in expected_parts(fake, 30).items():
        assert report["ood_rate"][part] == pytest.approx(rate(keys)), part


@pytest.mark.parametrize("protocol", ["v2", "seldon", "hydrosphere"])
def test_v2_and_seldon_request_shapes(dataset, tmp_path, serve, protocol):
    _, _, _, labels = dataset
    fake = Fake(labels, drift=None)  # other serving targets have no drift monitor
    srv = serve(fake)
    proc, report, _ = integration(dataset, tmp_path, srv.url, protocol, SAMPLES=40, BATCH_SIZE=25)
    assert proc.returncode == 0, proc.stderr
    assert report["accuracy"] == 1.0 and report["passed"] is True
    assert report["ood_rate"] == {"clean": None, "noisy": None, "random": None} and report["ood_source"] is None
    assert report["requests"] == 2 + 2 + 1 and fake.untagged_requests == 0
    first = fake.bodies[0]
    if protocol == "v2":
        assert first["inputs"][0]["shape"] == [25, 784] and len(first["inputs"][0]["data"]) == 25 * 784
    elif protocol == "hydrosphere":
        assert len(first["images"]) == 25 and len(first["images"][0]) == 784
    else:
        assert len(first["data"]["ndarray"]) == 25 and len(first["data"]["ndarray"][0]) == 784
    assert "n/a" in proc.stdout


def test_drift_path_answering_non_json_means_no_ood_rates(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    srv = serve(Fake(labels, drift="html"))
    proc, report, _ = integration(dataset, tmp_path, srv.url, SAMPLES=20)
    assert proc.returncode == 0, proc.stderr
    assert report["ood_source"] is None and set(report["ood_rate"].values()) == {None}
    assert report["accuracy"] == 1.0


def test_values_are_rounded_and_in_range(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    fake = Fake(labels)
    srv = serve(fake)
    integration(dataset, tmp_path, srv.url, SAMPLES=20)
    values = np.asarray([v for body in fake.bodies for row in body["instances"] for v in row])
    assert values.min() >= 0.0 and values.max() <= 1.0
    np.testing.assert_allclose(values, np.round(values, 4), atol=1e-12)


@pytest.mark.parametrize(
    "failure, needles",
    [
        ("500", ["answered 500:", "model crashed with a second line"]),
        ("malformed", ["not JSON", '{"predictions": [[0.1, 0.2']),
        ("wrong_shape", ["malformed tfserving response", "expected 16×10 class scores, got shape 16×9"]),
        ("no_key", ["no 'predictions'"]),
    ],
)
def test_misbehaving_endpoint_is_one_line_and_nonzero(dataset, tmp_path, serve, failure, needles):
    _, _, _, labels = dataset
    srv = serve(Fake(labels, failure=failure))
    proc, report, _ = integration(dataset, tmp_path, srv.url)
    line = assert_one_line_failure(proc, "integration_test:", f"POST {srv.url}{PATHS['tfserving']}", *needles)
    assert len(line) < 400  # the body is cut to 200 characters
    assert proc.returncode == 5 and report is None


def test_timeout_is_one_line(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    srv = serve(Fake(labels, failure="slow"))
    t0 = time.monotonic()
    proc, _, _ = integration(dataset, tmp_path, srv.url, TIMEOUT=0.5)
    assert time.monotonic() - t0 < 20
    assert_one_line_failure(proc, "timed out after 0.5s")


def test_unreachable_endpoint_is_one_line(dataset, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc, report, _ = integration(dataset, tmp_path, url, TIMEOUT=5)
    assert_one_line_failure(proc, "integration_test:", url, "cannot connect")
    assert proc.returncode == 5 and report is None


def test_bad_settings_and_inputs(dataset, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc, _, _ = integration(dataset, tmp_path, url, MIN_ACCURACY="high")
    assert_one_line_failure(proc, "MIN_ACCURACY")
    assert proc.returncode == 2
    proc, _, _ = integration(dataset, tmp_path, url, protocol="grpc-web")
    assert_one_line_failure(proc, "unknown protocol 'grpc-web'")
    (tmp_path / "empty").mkdir()
    proc = run_script("integration_test.py", MNIST_DATA_DIR=dataset[0], OUTPUT_DIR=tmp_path / "o",
                      ENDPOINT_DIR=tmp_path / "empty", MIN_ACCURACY=0.8, SAMPLES=5, BATCH_SIZE=5, NOISE=0.1, TIMEOUT=1)
    assert_one_line_failure(proc, "endpoint.json not found")
    assert proc.returncode == 3


# ================================================================= monitor.py
def drift_doc(recent: list[float], threshold: float = 0.03, scoring: bool = True) -> dict:
    """A drift JSON as serve.py answers it, for a window of ``recent`` live errors."""
    edges = np.linspace(0.0, 0.05, 51)
    rng = np.random.default_rng(0)
    train = rng.gamma(4.0, 0.004, 20_000)
    counts, _ = np.histogram(train, bins=edges)
    arr = np.asarray(recent, dtype=np.float64)
    window_out = int(np.count_nonzero(~(arr <= threshold)))
    out = {"model_name": NAME, "version": str(VERSION), "drift_scoring": scoring,
           "scored": len(recent) + 40, "outliers": window_out + 3, "outlier_rate": 0.0,
           "test": {"scored": 999, "outliers": 998}, "versions": {}}
    if not scoring:
        return out
    live, _ = np.histogram(arr[np.isfinite(arr)], bins=edges)
    out.update({
        "threshold": threshold, "quantile": 0.99,
        "window": {"size": len(recent), "outliers": window_out,
                   "outlier_rate": window_out / len(recent) if recent else 0.0, "capacity": 10_000},
        "training_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "recent_errors": arr.tolist(),
        "live_histogram": {"edges": edges.tolist(), "counts": live.tolist(),
                           "underflow": 0, "overflow": int(np.count_nonzero(arr > edges[-1]))},
    })
    return out


def live_errors(n: int, above: int, seed: int = 1) -> list[float]:
    rng = np.random.default_rng(seed)
    low = rng.uniform(0.002, 0.029, n - above)
    high = rng.uniform(0.031, 0.08, above)  # some beyond the training histogram's last edge (0.05)
    return [float(v) for v in rng.permutation(np.concatenate([low, high]))]


def monitor(tmp_path: Path, url: str, contract: dict | None = None, **env: Any):
    out = tmp_path / "mon"
    proc = run_script("monitor.py", timeout=120, ENDPOINT_DIR=write_endpoint(tmp_path / "endpoint", url,
                                                                            **(contract or {})),
                      OUTPUT_DIR=out, **{"MAX_DRIFT_RATE": 0.5, "TIMEOUT": 10, **env})
    drift = json.loads((out / "drift.json").read_text()) if (out / "drift.json").is_file() else None
    return proc, drift, out


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_monitor_under_the_max(tmp_path, serve):
    fake = Fake({}, monitor=drift_doc(live_errors(200, 20)))
    srv = serve(fake)
    proc, drift, out = monitor(tmp_path, srv.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    assert fake.drift_queries == [{"label": "stable"}]
    assert drift["rate"] == pytest.approx(0.10) and drift["passed"] is True and drift["note"] is None
    assert drift["version"] == VERSION and drift["threshold"] == 0.03 and drift["max_rate"] == 0.5
    assert drift["scored"] == 240 and drift["outliers"] == 23  # the live counters, not the test ones
    assert drift["window"] == {"size": 200, "outliers": 20, "capacity": 10_000}
    assert "drift rate 0.10 (max 0.50) on mnist version 3" in proc.stdout
    md = (out / "report.md").read_text()
    assert "0.10" in md and "![drift](drift.png)" in md and "| version | 3 |" in md and "0.03" in md
    assert_png(out / "drift.png")


def test_monitor_over_the_max_exits_6(tmp_path, serve):
    srv = serve(Fake({}, monitor=drift_doc(live_errors(100, 62))))
    proc, drift, out = monitor(tmp_path, srv.url)
    assert proc.returncode == 6
    assert stderr_lines(proc) == ["monitor: drift rate 0.62 > max 0.50 on mnist version 3"]
    assert drift["rate"] == pytest.approx(0.62) and drift["passed"] is False
    assert "0.62" in (out / "report.md").read_text()
    assert_png(out / "drift.png")


def test_monitor_rate_just_above_the_max_shows_the_difference(tmp_path, serve):
    srv = serve(Fake({}, monitor=drift_doc(live_errors(2000, 1001))))
    proc, _, _ = monitor(tmp_path, srv.url)
    assert proc.returncode == 6
    assert stderr_lines(proc) == ["monitor: drift rate 0.5005 > max 0.5000 on mnist version 3"]


def test_monitor_no_live_traffic(tmp_path, serve):
    srv = serve(Fake({}, monitor=drift_doc([])))
    proc, drift, out = monitor(tmp_path, srv.url, MAX_DRIFT_RATE=0)
    assert proc.returncode == 0, proc.stderr
    assert drift["rate"] == 0.0 and drift["note"] == "no live traffic yet" and drift["passed"] is True
    assert "no live traffic yet" in proc.stdout and "no live traffic yet" in (out / "report.md").read_text()
    assert_png(out / "drift.png")


def test_monitor_without_concept_model(tmp_path, serve):
    srv = serve(Fake({}, monitor=drift_doc([], scoring=False)))
    proc, drift, out = monitor(tmp_path, srv.url)
    assert proc.returncode == 0, proc.stderr
    assert drift["rate"] == 0.0 and drift["drift_scoring"] is False and "drift scoring is off" in drift["note"]
    assert_png(out / "drift.png")


def test_monitor_falls_back_to_the_version(tmp_path, serve):
    fake = Fake({}, monitor=drift_doc(live_errors(50, 5)), labels_served=())
    srv = serve(fake)
    proc, drift, _ = monitor(tmp_path, srv.url)
    assert proc.returncode == 0, proc.stderr
    assert fake.drift_queries == [{"label": "stable"}, {"version": str(VERSION)}]
    assert drift["rate"] == pytest.approx(0.10) and drift["source"].endswith(f"?version={VERSION}")


def test_monitor_without_drift_endpoint_is_one_line(tmp_path, serve):
    srv = serve(Fake({}, drift=None))
    proc, drift, _ = monitor(tmp_path, srv.url)
    assert_one_line_failure(proc, "monitor:", f"drift?version={VERSION} answered 404")
    assert proc.returncode == 5 and drift is None


def test_monitor_non_json_answer_is_one_line(tmp_path, serve):
    srv = serve(Fake({}, drift="html"))
    proc, drift, _ = monitor(tmp_path, srv.url)
    assert_one_line_failure(proc, "monitor:", "drift?label=stable answered 200 with a body that is not JSON",
                            "default backend")
    assert proc.returncode == 5 and drift is None


def test_monitor_unreachable_exits_5(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc, drift, _ = monitor(tmp_path, url, TIMEOUT=5)
    assert_one_line_failure(proc, "monitor:", url, "cannot connect")
    assert proc.returncode == 5 and drift is None


def test_monitor_bad_setting(tmp_path):
    proc, _, _ = monitor(tmp_path, "http://127.0.0.1:9", MAX_DRIFT_RATE=1.5)
    assert_one_line_failure(proc, "MAX_DRIFT_RATE")
    assert proc.returncode == 2


def test_requirements_list_matplotlib():
    lines = [line.split("#")[0].strip() for line in (IMAGE_DIR / "requirements.txt").read_text().splitlines()]
    assert any(line.lower().startswith("matplotlib") for line in lines)


# ======================================================= drift through the serving contract
def test_integration_test_asks_no_drift_of_a_target_without_it(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    fake = Fake(labels, drift="test")
    srv = serve(fake)
    proc, report, _ = integration(dataset, tmp_path, srv.url, contract={"drift_url": "", "target": "tfs"}, SAMPLES=20)
    assert proc.returncode == 0, proc.stderr
    assert fake.drift_queries == [] and report["ood_source"] is None and report["accuracy"] == 1.0


def test_integration_test_reads_drift_where_the_target_says(dataset, tmp_path, serve):
    _, _, _, labels = dataset
    fake = Fake(labels, drift="test")
    srv = serve(fake)
    proc, report, _ = integration(dataset, tmp_path, srv.url, contract={"drift_url": srv.url + "/custom/drift"},
                                  SAMPLES=20)
    assert proc.returncode == 0, proc.stderr
    assert fake.drift_queries and report["ood_source"] == "test"


def test_monitor_reports_drift_not_available_without_failing(tmp_path, serve):
    fake = Fake({}, monitor=drift_doc(live_errors(200, 190)))  # would fail the gate if it were asked
    srv = serve(fake)
    proc, drift, out = monitor(tmp_path, srv.url, {"drift_url": "", "inputs_url": "", "target": "tfserving"})
    assert proc.returncode == 0, proc.stderr
    assert fake.drift_queries == []
    assert drift["available"] is False and drift["passed"] is True and drift["rate"] == 0.0
    assert drift["note"] == "drift not available for target tfserving"
    assert "drift not available for target tfserving" in proc.stdout and proc.stderr.strip() == ""
    assert "drift not available for target tfserving" in (out / "report.md").read_text()
    assert_png(out / "drift.png")


def test_monitor_reads_the_targets_drift_url(tmp_path, serve):
    fake = Fake({}, monitor=drift_doc(live_errors(200, 20)))
    srv = serve(fake)
    proc, drift, _ = monitor(tmp_path, srv.url, {"drift_url": srv.url + "/custom/drift", "target": "x"})
    assert proc.returncode == 0, proc.stderr
    assert drift["available"] is True and drift["rate"] == pytest.approx(0.10)
    assert drift["source"] == f"{srv.url}/custom/drift?label=stable"


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    """A concept model as train_concept writes it: saved_model/ (error = mean(x**2)) + threshold.json (0.25)."""
    import serving_fixtures as fx

    root = tmp_path_factory.mktemp("concept")
    fx.save_concept(root / "saved_model")
    (root / "threshold.json").write_text((root / "saved_model" / "threshold.json").read_text())
    return root


def test_monitor_scores_a_targets_live_inputs_with_the_concept_model(tmp_path, serve, concept_dir):
    fake = Fake({})
    fake.live_inputs = [[0.0] * 784] * 4 + [[1.0] * 784] * 2  # errors 0, 0, 0, 0, 1, 1: 2 of 6 above 0.25
    srv = serve(fake)
    contract = {"drift_url": "", "inputs_url": srv.url + LIVE_INPUTS, "target": "sampler"}
    proc, drift, out = monitor(tmp_path, srv.url, contract, CONCEPT_DIR=concept_dir)
    assert proc.returncode == 0, proc.stderr
    assert drift["available"] is True and drift["rate"] == pytest.approx(2 / 6)
    assert drift["scored"] == 6 and drift["outliers"] == 2 and drift["threshold"] == 0.25
    assert drift["source"] == srv.url + LIVE_INPUTS
    assert_png(out / "drift.png")
    proc, drift, _ = monitor(tmp_path, srv.url, contract, CONCEPT_DIR=concept_dir, MAX_DRIFT_RATE=0.2)
    assert proc.returncode == 6 and stderr_lines(proc) == ["monitor: drift rate 0.33 > max 0.20 on mnist version 3"]


def test_monitor_scores_live_inputs_with_the_stable_versions_own_concept_model(tmp_path, serve, concept_dir):
    """promote's result carries the stable version's concept/ (the registry's layout: the SavedModel at its top,
    threshold.json beside it); monitor scores with that one, not with whatever CONCEPT_DIR names."""
    import serving_fixtures as fx

    fake = Fake({})
    fake.live_inputs = [[0.0] * 784] * 4 + [[0.4] * 784] * 2  # errors 0 and 0.16
    srv = serve(fake)
    contract = {"drift_url": "", "inputs_url": srv.url + LIVE_INPUTS, "target": "sampler"}
    endpoint = write_endpoint(tmp_path / "endpoint", srv.url, **contract)
    fx.save_concept(endpoint / "concept", threshold=0.1)  # the stable version's: 0.16 is above 0.1
    out = tmp_path / "mon"
    proc = run_script("monitor.py", timeout=120, ENDPOINT_DIR=endpoint, OUTPUT_DIR=out, MAX_DRIFT_RATE=0.5,
                      TIMEOUT=10, CONCEPT_DIR=concept_dir)  # CONCEPT_DIR's threshold (0.25) would find none
    drift = json.loads((out / "drift.json").read_text())
    assert proc.returncode == 0, proc.stderr
    assert drift["threshold"] == 0.1 and drift["outliers"] == 2 and drift["rate"] == pytest.approx(2 / 6)


def test_monitor_with_live_inputs_but_no_concept_model_says_why(tmp_path, serve):
    fake = Fake({})
    fake.live_inputs = [[1.0] * 784]
    srv = serve(fake)
    proc, drift, _ = monitor(tmp_path, srv.url, {"drift_url": "", "inputs_url": srv.url + LIVE_INPUTS,
                                                 "target": "sampler"})
    assert proc.returncode == 0, proc.stderr
    assert drift["available"] is False and "CONCEPT_DIR names none" in drift["note"]


def test_monitor_rejects_malformed_live_inputs_in_one_line(tmp_path, serve, concept_dir):
    fake = Fake({})
    fake.live_inputs = [[0.0] * 784, [0.0] * 3]
    srv = serve(fake)
    proc, drift, _ = monitor(tmp_path, srv.url, {"drift_url": "", "inputs_url": srv.url + LIVE_INPUTS},
                             CONCEPT_DIR=concept_dir)
    assert_one_line_failure(proc, "'inputs' is not a list of equally long number rows")
    assert proc.returncode == 5 and drift is None
