"""Stage ``integration_test``: test a deployed model version over HTTP, as a client would.

Env: MNIST_DATA_DIR (input, t10k.npz), ENDPOINT_DIR (input, endpoint.json), OUTPUT_DIR (output),
MIN_ACCURACY (0.8, in [0, 1]), SAMPLES (1000), BATCH_SIZE (100, images per request),
NOISE (0.5, std-dev of the Gaussian noise on [0, 1] pixels), TIMEOUT (30, seconds per request), SEED (0),
TRANSPORT (rest | grpc, default rest).

Talks to ``endpoint.json``'s ``predict_url`` (protocol tfserving | v2 | seldon | hydrosphere) or, with
``TRANSPORT=grpc``, to its ``grpc`` address (TF Serving's PredictionService, by version), every
request tagged ``X-Mlflowctl-Traffic: test`` (gRPC metadata ``x-mlflowctl-traffic: test``) so the
server keeps it out of its live statistics:

1. clean:  a seeded random sample of SAMPLES held-out images -> accuracy (argmax == label);
2. noisy:  the same images + N(0, NOISE), clipped to [0, 1];
3. random: max(10, SAMPLES // 10) images of uniform-random pixels.

If the target scores drift (``endpoint.json``'s ``drift_url``, see ``mlflowctl.serving``) and
``GET {drift_url}?version={version}`` answers 200, the share of each part the concept model flags as out-of-distribution comes
from the version's test counters (``test.scored``/``test.outliers``; the top-level
``scored``/``outliers`` on older servers) read before and after the part; otherwise it is null.

Outputs in OUTPUT_DIR: report.json, report.md. Exit 0 whether or not the accuracy reaches
MIN_ACCURACY (``passed`` says it; promote decides). Exit 5 with one stderr line when the endpoint
is unreachable, answers non-2xx, or answers something that is not the protocol's response.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from common import (
    EXIT_DATA,
    StageError,
    env_dir,
    env_float,
    env_int,
    load_split,
    log,
    main,
    make_dir,
    write_json_atomic,
    write_text_atomic,
)
from endpoint_client import EXIT_ENDPOINT, GrpcClient, HttpClient, drift_url, load_endpoint, snippet

STAGE = "integration_test"
TEST_HEADER = {"X-Mlflowctl-Traffic": "test"}
CLASSES = 10
PIXELS = 784
DECIMALS = 4
PROTOCOLS = ("tfserving", "v2", "seldon", "hydrosphere")  # all of endpoint_client.PROTOCOLS
PARTS = ("clean", "noisy", "random")
TRANSPORTS = ("rest", "grpc")


def settings() -> dict:
    return {
        "data_dir": env_dir("MNIST_DATA_DIR"),
        "endpoint_dir": env_dir("ENDPOINT_DIR"),
        "output_dir": env_dir("OUTPUT_DIR", must_exist=False),
        "min_accuracy": env_float("MIN_ACCURACY", 0.8, low=0.0, high=1.0, inclusive=True),
        "samples": env_int("SAMPLES", 1000, minimum=1),
        "batch_size": env_int("BATCH_SIZE", 100, minimum=1),
        "noise": env_float("NOISE", 0.5, low=0.0, inclusive=True),
        "timeout": env_float("TIMEOUT", 30.0, low=0.0),
        "seed": env_int("SEED", 0),
        "transport": os.environ.get("TRANSPORT", "rest").strip().lower() or "rest",
    }


# ------------------------------------------------------------------ protocols
def request_body(protocol: str, batch) -> dict[str, Any]:
    """The predict request for ``batch`` (float32 n×784 in [0, 1]), values rounded to 4 decimals."""
    import numpy as np

    values = np.round(batch.astype(np.float64), DECIMALS)
    if protocol == "tfserving":
        return {"instances": values.tolist()}
    if protocol == "v2":
        return {"inputs": [{"name": "images", "shape": [int(values.shape[0]), PIXELS], "datatype": "FP32",
                            "data": values.ravel().tolist()}]}
    if protocol == "hydrosphere":  # the gateway takes the contract's named fields
        return {"images": values.tolist()}
    return {"data": {"ndarray": values.tolist()}}  # seldon


def _pick(row: dict, where: str) -> Any:
    """A row given as ``{output_name: value}``: the probabilities (or the only output)."""
    if "probabilities" in row:
        return row["probabilities"]
    if len(row) == 1:
        return next(iter(row.values()))
    raise ValueError(f"{where} has several outputs ({', '.join(sorted(map(str, row)))}) and none is 'probabilities'")


def parse_scores(protocol: str, data: Any, n: int):
    """Class scores float64 n×10 from a predict response; ValueError says what is wrong."""
    import numpy as np

    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if protocol == "tfserving":
        if "predictions" not in data:
            raise ValueError(f"no 'predictions' in the response (keys: {', '.join(sorted(data)) or 'none'})")
        rows = data["predictions"]
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            rows = [_pick(r, "a prediction") if isinstance(r, dict) else r for r in rows]
    elif protocol == "v2":
        outputs = data.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
            raise ValueError("expected 'outputs': a non-empty list of tensors")
        out = next((o for o in outputs if o.get("name") == "probabilities"), outputs[0])
        if "data" not in out:
            raise ValueError(f"output {out.get('name')!r} has no 'data'")
        rows = out["data"]
        flat = np.asarray(rows, dtype=np.float64).ravel()
        if flat.size != n * CLASSES:
            raise ValueError(f"output {out.get('name')!r} has {flat.size} values, expected {n}×{CLASSES}")
        rows = flat.reshape(n, CLASSES)
    elif protocol == "hydrosphere":  # the contract's named outputs
        rows = _pick(data, "the response")
    else:  # seldon
        body = data.get("data")
        if not isinstance(body, dict):
            raise ValueError(f"no 'data' object in the response (keys: {', '.join(sorted(data)) or 'none'})")
        if "ndarray" in body:
            rows = body["ndarray"]
        elif isinstance(body.get("tensor"), dict):
            tensor = body["tensor"]
            rows = np.asarray(tensor.get("values"), dtype=np.float64).reshape(tensor.get("shape"))
        else:
            raise ValueError("expected 'data.ndarray' (or 'data.tensor') in the response")
    arr = np.asarray(rows, dtype=np.float64)  # ragged or non-numeric -> ValueError
    if arr.shape != (n, CLASSES):
        shape = "×".join(map(str, arr.shape)) or "scalar"
        raise ValueError(f"expected {n}×{CLASSES} class scores, got shape {shape}")
    return arr


# ---------------------------------------------------------------- drift counters
class Counters:
    """The version's test-traffic drift counters on the embedded model server (if any)."""

    def __init__(self, client: HttpClient, endpoint: dict[str, Any]):
        self.client = client
        self.url = drift_url(endpoint)
        self.params = {"version": str(endpoint["version"])}
        self.version = str(endpoint["version"])
        self.source: str | None = None   # "test" | "live" | None (not available)

    def _extract(self, data: Any) -> tuple[int, int, str] | None:
        if not isinstance(data, dict) or data.get("drift_scoring") is False or data.get("version") is None:
            return None
        test = data.get("test")
        if not isinstance(test, dict):
            per = data.get("versions")
            per = per.get(self.version) if isinstance(per, dict) else None
            test = per.get("test") if isinstance(per, dict) else None
        for source, node in (("test", test), ("live", data)):
            if isinstance(node, dict):
                scored, outliers = node.get("scored"), node.get("outliers")
                if all(isinstance(v, int) and not isinstance(v, bool) for v in (scored, outliers)):
                    return scored, outliers, source
        return None

    def probe(self) -> tuple[int, int] | None:
        """First read: decides whether OOD rates are available (connection errors still fail)."""
        if not self.url:  # the target does not score drift
            return None
        answer = self.client.get(self.url, self.params, ok_only=False)
        got = self._extract(answer.json) if answer.status == 200 else None
        if got is None:
            return None
        self.source = got[2]
        return got[0], got[1]

    def read(self) -> tuple[int, int] | None:
        if self.source is None:
            return None
        answer = self.client.get(self.url, self.params)
        got = self._extract(answer.json)
        if got is None or got[2] != self.source:
            raise StageError(f"GET {self.url}?version={self.version} no longer answers the drift counters "
                             f"(body: {snippet(answer.text)})", EXIT_ENDPOINT)
        return got[0], got[1]


# ------------------------------------------------------------------------ run
def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(float(np.percentile(values, q)), 3) if values else None


def run_part(client: HttpClient, endpoint: dict, images, batch_size: int, latencies: list[float],
             grpc: GrpcClient | None = None):
    """Send ``images`` in batches (over gRPC when ``grpc`` is given); return the predicted classes (int array)."""
    import numpy as np

    protocol, url = endpoint["protocol"], endpoint["predict_url"]
    predicted = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if grpc is not None:  # the same 4-decimal values the JSON protocols send
            scores, ms = grpc.predict(endpoint["model_name"], endpoint["version"], np.round(batch, DECIMALS))
            latencies.append(ms)
            if scores.shape != (len(batch), CLASSES):
                raise StageError(f"gRPC Predict {grpc.target} answered scores of shape {list(scores.shape)}, "
                                 f"expected [{len(batch)}, {CLASSES}]", EXIT_ENDPOINT)
            predicted.append(np.argmax(scores, axis=1))
            continue
        answer = client.post_json(url, request_body(protocol, batch))
        latencies.append(answer.ms)
        try:
            scores = parse_scores(protocol, answer.json, len(batch))
        except (ValueError, TypeError) as exc:
            raise StageError(f"POST {url} answered a malformed {protocol} response: {exc}", EXIT_ENDPOINT) from None
        predicted.append(np.argmax(scores, axis=1))
    return np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)


def fmt_rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.4f}"


def write_markdown(path: str, report: dict) -> None:
    ep = report["endpoint"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lat = report["latency_ms"]
    ood = report["ood_rate"]
    n = report["images"]
    lines = [
        f"# Integration test: {ep['model_name']} version {report['version']} — {verdict}",
        "",
        (f"Endpoint `{ep['predict_url']}` ({ep['protocol']})" if report["transport"] == "rest" else
         f"Endpoint gRPC `{ep['grpc']}` (TF Serving PredictionService)") + f", {report['requests']} requests "
        f"of up to {report['batch_size']} images, seed {report['seed']}.",
        "",
        "| part | images | accuracy | out-of-distribution rate |",
        "|---|---:|---:|---:|",
        f"| clean | {n['clean']} | {report['accuracy']:.4f} (floor {report['min_accuracy']:.4f}) "
        f"| {fmt_rate(ood['clean'])} |",
        f"| noisy (σ={report['noise']:g}) | {n['noisy']} | {report['accuracy_noisy']:.4f} "
        f"| {fmt_rate(ood['noisy'])} |",
        f"| random | {n['random']} | — | {fmt_rate(ood['random'])} |",
        "",
        f"Latency per request: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms.",
        "",
    ]
    if report["ood_source"] is None:
        lines += ["Out-of-distribution rates: n/a (the endpoint has no drift monitor).", ""]
    elif report["ood_source"] == "live":
        lines += ["Out-of-distribution rates from the server's overall counters (it does not separate test "
                  "traffic): concurrent live traffic would skew them.", ""]
    write_text_atomic(path, "\n".join(lines))


def run() -> None:
    cfg = settings()
    endpoint = load_endpoint(cfg["endpoint_dir"])
    if endpoint["protocol"] not in PROTOCOLS:
        raise StageError(f"endpoint protocol {endpoint['protocol']!r} is not supported by integration_test "
                         f"(supported: {', '.join(PROTOCOLS)})", EXIT_DATA)
    if cfg["transport"] not in TRANSPORTS:
        raise StageError(f"TRANSPORT must be one of {', '.join(TRANSPORTS)}, got {cfg['transport']!r}", EXIT_DATA)
    if cfg["transport"] == "grpc" and (not endpoint.get("grpc") or endpoint["protocol"] != "tfserving"):
        raise StageError("TRANSPORT=grpc but endpoint.json names no gRPC address (the serving target serves no "
                         "TF Serving gRPC API); set serving.local.grpc_port, or integration_test.transport: rest",
                         EXIT_DATA)
    x, y = load_split(cfg["data_dir"], "t10k")
    make_dir("OUTPUT_DIR", cfg["output_dir"])

    import numpy as np

    samples = min(cfg["samples"], len(x))
    if samples < cfg["samples"]:
        log(STAGE, f"SAMPLES={cfg['samples']} but t10k has {len(x)} images: using all of them")
    rng = np.random.default_rng(cfg["seed"])
    idx = rng.choice(len(x), size=samples, replace=False)
    clean = x[idx].reshape(samples, PIXELS).astype(np.float32) / np.float32(255.0)
    labels = y[idx].astype(np.int64)
    noisy = np.clip(clean + rng.normal(0.0, cfg["noise"], clean.shape).astype(np.float32), 0.0, 1.0)
    random_images = rng.random((max(10, samples // 10), PIXELS), dtype=np.float32)
    parts = {"clean": clean, "noisy": noisy, "random": random_images}

    where = (f"gRPC {endpoint['grpc']}" if cfg["transport"] == "grpc"
             else f"{endpoint['predict_url']} ({endpoint['protocol']})")
    log(STAGE, f"testing {endpoint['model_name']} version {endpoint['version']} at {where}: {samples} clean + {samples} noisy (σ={cfg['noise']:g}) + "
               f"{len(random_images)} random images, {cfg['batch_size']} per request")

    latencies: list[float] = []
    predictions: dict[str, Any] = {}
    ood: dict[str, float | None] = {p: None for p in PARTS}
    ood_counts: dict[str, dict[str, int] | None] = {p: None for p in PARTS}
    started = time.perf_counter()
    grpc = GrpcClient(endpoint["grpc"], cfg["timeout"], TEST_HEADER) if cfg["transport"] == "grpc" else None
    with HttpClient(cfg["timeout"], TEST_HEADER) as client, (grpc or contextlib.nullcontext()):
        counters = Counters(client, endpoint)
        before = counters.probe()
        if counters.source is None:
            log(STAGE, "no drift monitor on this endpoint: out-of-distribution rates are not measured")
        elif counters.source == "live":
            log(STAGE, "the server has no separate test counters: using its overall drift counters")
        for part in PARTS:
            predictions[part] = run_part(client, endpoint, parts[part], cfg["batch_size"], latencies, grpc)
            after = counters.read()
            if before is not None and after is not None:
                d_scored, d_out = after[0] - before[0], after[1] - before[1]
                ood_counts[part] = {"scored": d_scored, "outliers": d_out}
                ood[part] = (d_out / d_scored) if d_scored > 0 else None
            before = after
    elapsed = time.perf_counter() - started

    accuracy = float(np.mean(predictions["clean"] == labels))
    accuracy_noisy = float(np.mean(predictions["noisy"] == labels))
    passed = accuracy >= cfg["min_accuracy"]
    report = {
        "passed": passed,
        "accuracy": accuracy,
        "accuracy_noisy": accuracy_noisy,
        "min_accuracy": cfg["min_accuracy"],
        "samples": samples,
        "images": {p: int(len(parts[p])) for p in PARTS},
        "noise": cfg["noise"],
        "batch_size": cfg["batch_size"],
        "seed": cfg["seed"],
        "transport": cfg["transport"],
        "ood_rate": ood,
        "ood_counts": ood_counts,
        "ood_source": counters.source,
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "max": round(max(latencies), 3) if latencies else None},
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "endpoint": endpoint,
        "version": endpoint["version"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(os.path.join(cfg["output_dir"], "report.json"), report)
    write_markdown(os.path.join(cfg["output_dir"], "report.md"), report)

    log(STAGE, f"accuracy {accuracy:.4f} on {samples} clean images vs floor {cfg['min_accuracy']:.4f}: "
               f"{'PASSED' if passed else 'FAILED (promote will not make it stable)'}")
    log(STAGE, f"accuracy on noisy images {accuracy_noisy:.4f}")
    log(STAGE, "out-of-distribution rate: " + ", ".join(f"{p} {fmt_rate(ood[p])}" for p in PARTS))
    lat = report["latency_ms"]
    log(STAGE, f"latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms over {len(latencies)} requests "
               f"({elapsed:.1f}s)")
    log(STAGE, f"wrote report.json, report.md to {cfg['output_dir']}")


if __name__ == "__main__":
    main(STAGE, run)
