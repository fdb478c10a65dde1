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
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.parse
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import orjson  # noqa: E402

import v2_binary  # noqa: E402 - the modules next to this script (its folder is sys.path[0])
from batching import BatchConfig, Batcher, QueueFull  # noqa: E402

SERVER_NAME = "mlflowctl-model-server"
SERVER_VERSION = "0.1.0"
DEFAULT_MAX_BODY = 8 * 1024 * 1024
RING_SIZE = 10_000
RECENT_CAP = 5_000
PID = os.getpid()
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

log = logging.getLogger("serve")

# TF dtype name -> (TF Serving enum name, V2 datatype, numpy dtype)
DTYPES: dict[str, tuple[str, str, Any]] = {
    "float32": ("DT_FLOAT", "FP32", np.float32),
    "float64": ("DT_DOUBLE", "FP64", np.float64),
    "float16": ("DT_HALF", "FP16", np.float16),
    "int8": ("DT_INT8", "INT8", np.int8),
    "int16": ("DT_INT16", "INT16", np.int16),
    "int32": ("DT_INT32", "INT32", np.int32),
    "int64": ("DT_INT64", "INT64", np.int64),
    "uint8": ("DT_UINT8", "UINT8", np.uint8),
    "uint16": ("DT_UINT16", "UINT16", np.uint16),
    "uint32": ("DT_UINT32", "UINT32", np.uint32),
    "uint64": ("DT_UINT64", "UINT64", np.uint64),
    "bool": ("DT_BOOL", "BOOL", np.bool_),
    "string": ("DT_STRING", "BYTES", object),
}


class ApiError(Exception):
    """A request that cannot be served: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


# =============================================================================== models
@dataclass
class TensorSig:
    alias: str
    dtype: str          # TF dtype name, e.g. "float32"
    shape: tuple | None  # None = unknown rank; -1 / None entries = any size
    np_dtype: Any = None

    def check(self, arr: np.ndarray, where: str) -> None:
        if self.shape is None:
            return
        if arr.ndim != len(self.shape) or any(
            want not in (-1, None) and got != want for got, want in zip(arr.shape, self.shape)
        ):
            want = "[" + ",".join("-1" if d in (-1, None) else str(d) for d in self.shape) + "]"
            got = "[" + ",".join(str(d) for d in arr.shape) + "]"
            raise bad(f"{where}: input '{self.alias}' has shape {got}, the model expects {want}")


@dataclass
class Signature:
    name: str
    fn: Any                       # the concrete function
    inputs: dict[str, TensorSig]
    outputs: list[str]            # output aliases, in the order returned
    output_sigs: dict[str, TensorSig]
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None  # numpy in, numpy out
    engine: str = "tf"

    @property
    def single_input(self) -> TensorSig | None:
        return next(iter(self.inputs.values())) if len(self.inputs) == 1 else None


@dataclass
class Concept:
    sig: Signature
    threshold: float
    quantile: float | None
    edges: np.ndarray | None
    train_counts: list[int] | None


@dataclass
class Version:
    number: int
    path: Path
    loaded: Any                      # keeps the SavedModel objects alive
    signatures: dict[str, Signature]
    signature_defs: dict[str, Any]   # TF Serving metadata JSON, per signature
    concept: Concept | None
    metadata: dict[str, Any]
    fused: Callable[[np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]] | None = None
    # serving_default on one input: rows -> (outputs, drift scores or None); what batches run
    runner: Callable[[np.ndarray], tuple[dict[str, np.ndarray], np.ndarray | None]] | None = None
    batcher: Batcher | None = None
    signature_protos: dict[str, Any] = field(default_factory=dict)  # SignatureDef protos (gRPC metadata)
    ring: np.ndarray = field(default_factory=lambda: np.zeros(RING_SIZE, np.float32))
    ring_pos: int = 0
    ring_len: int = 0
    scored: int = 0
    outliers: int = 0
    test_scored: int = 0            # traffic marked "X-Mlflowctl-Traffic: test" (the integration test):
    test_outliers: int = 0          # counted apart, never in the live statistics the monitor reads
    predictions: int = 0
    label: str = ""                 # str(number), precomputed for metrics

    def record(self, errors: np.ndarray, test: bool = False) -> int:
        """Add reconstruction errors to the ring buffer (live traffic only); returns how many are outliers."""
        n = errors.shape[0]
        if test:
            bad_count = n - int(np.count_nonzero(errors <= self.concept.threshold))
            self.test_scored += n
            self.test_outliers += bad_count
            return bad_count
        if n == 1:
            self.ring[self.ring_pos] = errors[0]
            self.ring_pos = (self.ring_pos + 1) % RING_SIZE
            if self.ring_len < RING_SIZE:
                self.ring_len += 1
        elif n >= RING_SIZE:
            self.ring[:] = errors[-RING_SIZE:]
            self.ring_pos, self.ring_len = 0, RING_SIZE
        else:
            end = self.ring_pos + n
            if end <= RING_SIZE:
                self.ring[self.ring_pos:end] = errors
            else:
                k = RING_SIZE - self.ring_pos
                self.ring[self.ring_pos:] = errors[:k]
                self.ring[: n - k] = errors[k:]
            self.ring_pos = end % RING_SIZE
            self.ring_len = min(RING_SIZE, self.ring_len + n)
        bad_count = n - int(np.count_nonzero(errors <= self.concept.threshold))  # NaN counts as an outlier
        self.scored += n
        self.outliers += bad_count
        return bad_count

    def recent(self) -> np.ndarray:
        if self.ring_len < RING_SIZE:
            return self.ring[: self.ring_len].copy()
        return np.concatenate([self.ring[self.ring_pos:], self.ring[: self.ring_pos]])


def _tf():
    import tensorflow as tf  # imported lazily so --help and bind errors are instant

    return tf


def _tensor_sig(alias: str, spec: Any) -> TensorSig:
    dtype = spec.dtype.name
    shape = None if spec.shape.rank is None else tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSig(alias, dtype, shape, DTYPES.get(dtype, (None, None, None))[2])


def _signature(name: str, fn: Any) -> Signature:
    _, kwargs = fn.structured_input_signature
    inputs = {alias: _tensor_sig(alias, spec) for alias, spec in sorted(kwargs.items())}
    outs = fn.structured_outputs
    if not isinstance(outs, dict):
        raise ValueError(f"signature {name!r} does not return a dict of named outputs")
    output_sigs = {alias: _tensor_sig(alias, t) for alias, t in sorted(outs.items())}
    sig = Signature(name, fn, inputs, list(output_sigs), output_sigs)
    sig.run = _tf_runner(sig)
    return sig


def _tf_runner(sig: Signature) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    constant, fn, outs = _tf().constant, sig.fn, sig.outputs

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = fn(**{k: constant(v) for k, v in inputs.items()})
        return {k: res[k].numpy() for k in outs}

    return run


# ------------------------------------------------------------------------------- TFLite engine
ENGINE = "auto"          # auto: TFLite when it converts and matches TF on probe inputs; tf: TensorFlow only
LITE_MAX_SHAPES = 16     # interpreters kept per signature, one per distinct batch shape (batching pads to 7 sizes)


def _interpreter_class() -> Any:
    try:  # the LiteRT package, TF's designated successor of tf.lite.Interpreter
        from ai_edge_litert.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated.*")
    return getattr(getattr(_tf(), "lite", None), "Interpreter", None)


class LiteRunner:
    """A signature converted to TFLite: ~30 us per batch-1 call where a TF eager call costs ~300+ us.

    TFLite interpreters have static shapes, so one interpreter is kept per input-shape tuple
    (bounded, least recently used first out). Only ever called from one thread at a time
    (built and verified in the loader thread, then used by the event-loop thread).
    """

    def __init__(self, content: bytes, sig: Signature, interpreter_cls: Any):
        self.content = content
        self.cls = interpreter_cls
        self.aliases = list(sig.inputs)
        self.outputs = list(sig.outputs)
        self.cache: OrderedDict[tuple, tuple[Any, list[int], list[tuple[str, int]]]] = OrderedDict()
        self._make(None)  # fails early if the signature does not map

    def _make(self, shapes: tuple | None) -> tuple[Any, list[int], list[tuple[str, int]]]:
        it = self.cls(model_content=self.content, num_threads=1)
        if len(it.get_signature_list()) != 1:
            raise ValueError("expected exactly one signature in the converted model")
        runner = it.get_signature_runner()
        ind, outd = runner.get_input_details(), runner.get_output_details()
        in_idx = [ind[a]["index"] for a in self.aliases]
        out_idx = [(a, outd[a]["index"]) for a in self.outputs]
        del runner, ind, outd  # the runner pins tensor buffers; allocate_tensors refuses while it lives
        if shapes is not None:
            for i, shape in zip(in_idx, shapes):
                it.resize_tensor_input(i, list(shape), strict=False)
        it.allocate_tensors()
        return it, in_idx, out_idx

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [inputs[a] for a in self.aliases]
        key = tuple(a.shape for a in arrays)
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache[key] = self._make(key)
            if len(self.cache) > LITE_MAX_SHAPES:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        it, in_idx, out_idx = entry
        for i, a in zip(in_idx, arrays):
            it.set_tensor(i, a)
        it.invoke()
        return {a: it.get_tensor(i) for a, i in out_idx}


def _probe_inputs(sig: Signature, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    out = {}
    for alias, t in sig.inputs.items():
        if t.shape is None or not t.shape or t.np_dtype not in (np.float32, np.float64, np.float16):
            return None
        if any(d == -1 for d in t.shape[1:]):
            return None
        shape = (batch, *t.shape[1:])
        rows = [np.zeros(shape[1:]), np.ones(shape[1:])] + [rng.random(shape[1:]) for _ in range(max(0, batch - 2))]
        out[alias] = np.stack(rows[:batch]).astype(t.np_dtype) if batch > 1 else rng.random(shape).astype(t.np_dtype)
    return out


def _lite(model_dir: Path, sig: Signature, what: str) -> None:
    """Switch ``sig.run`` to TFLite if it converts and agrees with TF; otherwise keep TF (and say why)."""
    if ENGINE == "tf":
        return
    cls = _interpreter_class()
    if cls is None:
        log.info("%s: TFLite interpreter not available; using TensorFlow", what)
        return
    rng = np.random.default_rng(0)
    probes = [_probe_inputs(sig, b, rng) for b in (1, 5)]
    if probes[0] is None:
        log.info("%s: inputs are not fixed-size float tensors; using TensorFlow", what)
        return
    tf = _tf()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converter = tf.lite.TFLiteConverter.from_saved_model(str(model_dir), signature_keys=[sig.name])
            runner = LiteRunner(converter.convert(), sig, cls)
        for probe in probes:
            got, want = runner(probe), sig.run(probe)
            for k in sig.outputs:
                if got[k].shape != want[k].shape or not np.allclose(got[k], want[k], rtol=1e-3, atol=1e-5):
                    diff = float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) if got[k].shape == want[k].shape \
                        else f"shape {got[k].shape} vs {want[k].shape}"
                    raise ValueError(f"TFLite output '{k}' differs from TensorFlow's (max abs diff {diff})")
    except Exception as exc:  # noqa: BLE001 - any failure: stay on the TF path
        log.info("%s: TFLite not used (%s); using TensorFlow", what, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        return
    sig.run, sig.engine = runner, "tflite"


def _signature_defs(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SavedModel's signature defs: as TF Serving's metadata JSON renders them, and as protos."""
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.core.framework import types_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((model_dir / "saved_model.pb").read_bytes())
    if not proto.meta_graphs:
        return {}, {}

    def tensor_info(info: Any) -> dict[str, Any]:
        shape = info.tensor_shape
        return {
            "dtype": types_pb2.DataType.Name(info.dtype),
            "tensor_shape": {
                "dim": [{"size": str(d.size), "name": d.name} for d in shape.dim],
                "unknown_rank": bool(shape.unknown_rank),
            },
            "name": info.name,
        }

    defs, protos = {}, {}
    for key, sd in sorted(proto.meta_graphs[0].signature_def.items()):
        defs[key] = {
            "inputs": {k: tensor_info(v) for k, v in sorted(sd.inputs.items())},
            "outputs": {k: tensor_info(v) for k, v in sorted(sd.outputs.items())},
            "method_name": sd.method_name,
        }
        protos[key] = sd
    return defs, protos


def _load_concept(version_dir: Path) -> tuple[Any, Concept] | None:
    cdir = version_dir / "concept"
    if not (cdir / "saved_model.pb").is_file():
        return None
    tf = _tf()
    try:
        info = json.loads((cdir / "threshold.json").read_text())
        threshold = float(info["threshold"])
        if not math.isfinite(threshold):
            raise ValueError("threshold is not finite")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("version %s: concept model ignored, bad threshold.json: %s", version_dir.name, exc)
        return None
    edges = counts = None
    hist = info.get("histogram") or {}
    try:
        e = np.asarray(hist.get("edges", []), dtype=np.float64)
        c = [int(x) for x in hist.get("counts", [])]
        if e.ndim == 1 and e.size >= 2 and len(c) == e.size - 1 and np.all(np.diff(e) > 0):
            edges, counts = e, c
    except (TypeError, ValueError):
        pass
    loaded = tf.saved_model.load(str(cdir))
    if "serving_default" not in loaded.signatures:
        log.warning("version %s: concept model has no serving_default signature; drift scoring off", version_dir.name)
        return None
    sig = _signature("serving_default", loaded.signatures["serving_default"])
    if len(sig.outputs) != 1 or sig.single_input is None:
        log.warning("version %s: concept model must have one input and one output; drift scoring off", version_dir.name)
        return None
    q = info.get("quantile")
    return loaded, Concept(sig, threshold, float(q) if isinstance(q, (int, float)) else None, edges, counts)


def _fuse(clf: Signature, concept: Concept) -> Callable | None:
    """One call computing the classifier outputs and the reconstruction errors of a batch.

    On the TF engine both SavedModels run in one graph call (halving the eager-call
    overhead); on TFLite the two interpreters run back to back.
    """
    tf = _tf()
    cin, kin = clf.single_input, concept.sig.single_input
    if cin is None or kin is None or cin.dtype != kin.dtype:
        return None
    if cin.shape != kin.shape:
        return None
    if clf.engine != "tf" or concept.sig.engine != "tf":
        crun, krun, c_alias, k_alias, k_out = clf.run, concept.sig.run, cin.alias, kin.alias, concept.sig.outputs[0]

        def both(x: np.ndarray):
            return crun({c_alias: x}), krun({k_alias: x})[k_out]

        return both
    cfn, kfn = clf.fn, concept.sig.fn
    c_alias, k_alias, k_out, outs = cin.alias, kin.alias, concept.sig.outputs[0], list(clf.outputs)
    spec = tf.TensorSpec(None if cin.shape is None else [None if d == -1 else d for d in cin.shape],
                         getattr(tf, cin.dtype))

    @tf.function(input_signature=[spec], autograph=False)
    def fused(x):
        o = cfn(**{c_alias: x})
        e = kfn(**{k_alias: x})[k_out]
        return [o[k] for k in outs] + [e]

    concrete = fused.get_concrete_function()
    constant = tf.constant

    def call(x: np.ndarray):
        res = concrete(constant(x))
        return {k: res[i].numpy() for i, k in enumerate(outs)}, res[-1].numpy()

    return call


def _runner(v: Version) -> Callable | None:
    """serving_default on its one input, with the drift scores of the same rows (None: not single-input)."""
    sd = v.signatures.get("serving_default")
    if sd is None or sd.single_input is None:
        return None
    if v.fused is not None:
        return v.fused
    run, alias, concept = sd.run, sd.single_input.alias, v.concept

    def both(x: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        outs = run({alias: x})
        if concept is None:
            return outs, None
        try:
            kin = concept.sig.single_input
            kin.check(x, "drift")
            return outs, concept.sig.run({kin.alias: x})[concept.sig.outputs[0]]
        except Exception as exc:  # noqa: BLE001 - drift scoring never fails a prediction
            log.debug("drift scoring skipped: %s", exc)
            return outs, None

    return both


def load_version(base: Path, number: int) -> Version:
    tf = _tf()
    vdir = base / str(number)
    if not (vdir / "saved_model.pb").is_file():
        raise FileNotFoundError(f"no SavedModel at {vdir} (saved_model.pb missing)")
    loaded = tf.saved_model.load(str(vdir))
    sigs = {name: _signature(name, fn) for name, fn in loaded.signatures.items()}
    if not sigs:
        raise ValueError(f"the SavedModel at {vdir} has no signatures")
    keep: list[Any] = [loaded]
    concept = None
    got = _load_concept(vdir)
    if got is not None:
        keep.append(got[0])
        concept = got[1]
    metadata: dict[str, Any] = {}
    try:
        metadata = json.loads((vdir / "metadata.json").read_text())
    except (OSError, ValueError):
        pass
    defs, protos = _signature_defs(vdir)
    v = Version(number, vdir, keep, sigs, defs, concept, metadata if isinstance(metadata, dict) else {},
                signature_protos=protos)
    v.label = str(number)
    if "serving_default" in sigs:
        _lite(vdir, sigs["serving_default"], f"version {number} classifier")
    if concept is not None:
        _lite(vdir / "concept", concept.sig, f"version {number} concept model")
    if concept is not None and "serving_default" in sigs:
        try:
            v.fused = _fuse(sigs["serving_default"], concept)
        except Exception as exc:  # noqa: BLE001 - fall back to two calls
            log.warning("version %d: could not fuse classifier and concept model (%s); using two calls", number, exc)
    v.runner = _runner(v)
    # warm up: the first call of a concrete function traces/optimises; do it now, not on a client's time
    sd = sigs.get("serving_default")
    if sd is not None and sd.single_input is not None and sd.single_input.shape is not None \
            and sd.single_input.np_dtype not in (None, object):
        shape = tuple(1 if d == -1 else d for d in sd.single_input.shape)
        x = np.zeros(shape, sd.single_input.np_dtype)
        try:
            if v.fused is not None:
                v.fused(x)
            else:
                sd.run({sd.single_input.alias: x})
                if concept is not None:
                    concept.sig.run({concept.sig.single_input.alias: x})
        except Exception as exc:  # noqa: BLE001
            log.warning("version %d: warm-up call failed: %s", number, exc)
    return v


def _warm_up(v: Version, sizes: list[int]) -> None:
    sd = v.signatures["serving_default"].single_input
    if sd.shape is None or any(d == -1 for d in sd.shape[1:]) or sd.np_dtype in (None, object):
        return
    for size in sizes:
        try:
            v.runner(np.zeros((size, *sd.shape[1:]), sd.np_dtype))
        except Exception as exc:  # noqa: BLE001 - a failing size fails again, per request, with its message
            log.warning("version %d: warm-up of batch size %d failed: %s", v.number, size, exc)
            return


def scan_versions(base: Path) -> list[int]:
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and (base / n / "saved_model.pb").is_file())


# =============================================================================== routing
@dataclass
class Routing:
    versions: list[int]
    labels: dict[str, int]
    canary_weight: float
    explicit: bool  # False = no routing file: serve the highest version
    batching: dict[int, bool] = field(default_factory=dict)  # per-version override of the server's default


def read_routing(path: Path | None, base: Path) -> Routing:
    if path is None or not path.exists():
        found = scan_versions(base)
        return Routing(found[-1:], {}, 0.0, False)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"routing file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"routing file {path}: expected a JSON object")
    versions = data.get("versions", [])
    labels = data.get("labels") or {}
    weight = data.get("canary_weight", 0.0)
    if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in versions):
        raise ValueError(f"routing file {path}: 'versions' must be a list of non-negative integers")
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) for k, v in labels.items()
    ):
        raise ValueError(f"routing file {path}: 'labels' must map label names to version numbers")
    missing = sorted({v for v in labels.values() if v not in versions})
    if missing:
        raise ValueError(f"routing file {path}: labels point at versions {missing} that are not in 'versions'")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"routing file {path}: 'canary_weight' must be a number between 0 and 1")
    batching = data.get("batching") or {}
    if not isinstance(batching, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, bool) for k, v in batching.items()
    ):
        raise ValueError(f"routing file {path}: 'batching' must map version numbers (as strings) to true or false")
    return Routing(sorted(set(versions)), dict(labels), float(weight), True, {int(k): v for k, v in batching.items()})


@dataclass
class VersionState:
    state: str = "START"
    error_code: str = "OK"
    error_message: str = ""


class Model:
    """The served versions of one model and how requests are routed among them."""

    def __init__(self, name: str, base: Path, routing_path: Path | None, batching: BatchConfig | None = None):
        self.name = name
        self.batching = batching or BatchConfig()
        self.base = base
        self.routing_path = routing_path
        self.versions: dict[int, Version] = {}
        self.states: dict[int, VersionState] = {}
        self.routing = Routing([], {}, 0.0, False)
        self.default: Version | None = None
        self.canary: Version | None = None
        self.canary_weight = 0.0
        self.label_map: dict[str, Version] = {}
        self.reload_lock = threading.Lock()

    def _set_state(self, n: int, st: VersionState) -> None:
        # copy-on-write: the event-loop thread may be iterating the current dict
        self.states = {**self.states, n: st}

    # -- reload (runs in a worker thread; the swap is a few attribute assignments) --
    def reload(self) -> dict[str, Any]:
        with self.reload_lock:
            routing = read_routing(self.routing_path, self.base)
            wanted = set(routing.versions)
            versions = dict(self.versions)
            for n in sorted(wanted - set(versions)):
                self._set_state(n, VersionState("LOADING"))
                t0 = time.monotonic()
                try:
                    versions[n] = load_version(self.base, n)
                except Exception as exc:  # noqa: BLE001 - a broken version must not take the server down
                    code = "NOT_FOUND" if isinstance(exc, FileNotFoundError) else "UNKNOWN"
                    self._set_state(n, VersionState("END", code, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]))
                    log.error("version %d of %s could not be loaded: %s", n, self.name, self.states[n].error_message)
                    continue
                v = versions[n]
                sd = v.signatures.get("serving_default")
                log.info("loaded version %d of %s in %.2fs (engine %s%s)", n, self.name, time.monotonic() - t0,
                         sd.engine if sd else "tf",
                         f", concept model on {v.concept.sig.engine}" if v.concept else ", no concept model")
            removed = sorted(set(versions) - wanted)
            for n in removed:
                self._set_state(n, VersionState("UNLOADING"))
                versions.pop(n)
            cfg = self.batching
            for n, v in versions.items():
                if not routing.batching.get(n, cfg.enabled) or v.runner is None:
                    v.batcher = None  # requests already queued still get their answers (the loop holds them)
                elif v.batcher is None:
                    sd = v.signatures["serving_default"]
                    batcher = Batcher(v.runner, cfg.window, cfg.max_batch, cfg.max_queue,
                                      pad=sd.engine == "tflite" or (v.concept is not None and v.concept.sig.engine == "tflite"),
                                      idle_rounds=cfg.idle_rounds, clients=cfg.open_connections)
                    if n not in self.versions:  # not serving yet: build each batch size's interpreters now,
                        _warm_up(v, batcher.buckets())  # not on a client's time (TFLite shapes are static)
                    v.batcher = batcher
            # swap
            label_map = {lab: versions[n] for lab, n in routing.labels.items() if n in versions}
            default = label_map.get("stable") or (versions[max(versions)] if versions else None)
            canary = label_map.get("canary")
            self.versions = versions
            self.routing = routing
            self.label_map = label_map
            self.default = default
            self.canary = canary if canary is not None and canary is not default else None
            self.canary_weight = routing.canary_weight if self.canary is not None else 0.0
            # states last: AVAILABLE only once routable, END only once no longer routed
            self.states = {**self.states, **{n: VersionState("AVAILABLE") for n in versions
                                             if self.states.get(n, VersionState()).state != "AVAILABLE"},
                           **{n: VersionState("END") for n in removed}}
            for n in removed:
                log.info("unloaded version %d of %s", n, self.name)
            for n, st in list(self.states.items()):
                if n not in wanted and st.state != "END":
                    self._set_state(n, VersionState("END"))
            log.info("routing: serving versions %s, labels %s, default %s%s", sorted(versions),
                     {k: v.number for k, v in label_map.items()} or "none",
                     default.number if default else "none",
                     f", canary {self.canary.number} at weight {self.canary_weight:g}" if self.canary else "")
            return self.describe()

    def describe(self) -> dict[str, Any]:
        return {
            "model_name": self.name,
            "versions": [{"version": n, "state": s.state, "error": s.error_message}
                         for n, s in sorted(self.states.items())],
            "labels": {lab: v.number for lab, v in self.label_map.items()},
            "default_version": self.default.number if self.default else None,
            "canary_weight": self.canary_weight,
            "batching": {str(n): v.batcher is not None for n, v in sorted(self.versions.items())},
        }

    # -- request routing --
    def check_name(self, name: str) -> None:
        if name != self.name:
            raise not_found(f"Servable not found for request: model '{name}' is not served here (serving '{self.name}')")

    def select(self, name: str, version: str | None, label: str | None) -> Version:
        if name != self.name:
            self.check_name(name)
        if version is not None:
            try:
                v = self.versions[int(version)]
            except (KeyError, ValueError):
                st = self.states.get(int(version)) if version.isdigit() else None
                why = f" (state {st.state}{': ' + st.error_message if st.error_message else ''})" if st else ""
                raise not_found(f"Servable not found for request: Specific({name}, {version}){why}") from None
            return v
        if label is not None:
            v = self.label_map.get(label)
            if v is None:
                raise not_found(f"Servable not found for request: no version of '{name}' has the label '{label}'")
            return v
        if self.canary is not None and random.random() < self.canary_weight:
            return self.canary
        if self.default is None:
            raise not_found(f"Servable not found for request: Latest({name}) (no version is loaded)")
        return self.default


# =============================================================================== metrics
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, float("inf"))


class Metrics:
    """Prometheus metrics, kept as plain numbers on the hot path and rendered at scrape time.

    Every update happens on the event-loop thread (as does every scrape), so no locks are
    needed; a custom prometheus-client collector turns the numbers into metric families.
    That keeps a request's bookkeeping to a few dict increments instead of half a dozen
    lock-taking ``Counter.labels(...).inc()`` calls.
    """

    PREFIX = "mlflowctl_serving"

    def __init__(self, model_name: str, model: "Model | None" = None):
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        self.model_name = model_name
        self.model = model
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(self)
        # per-version totals survive unloading (counters must not go backwards while the process lives)
        self.totals: dict[str, list[int]] = {}  # version -> [predictions, scored, outliers]

    # -- hot path --
    def request(self, endpoint: str, version: str, code: int, seconds: float) -> None:
        key = (endpoint, version, code)
        reqs = self.requests
        if key in reqs:
            reqs[key] += 1
        elif len(reqs) < 10_000:  # bounded label cardinality
            reqs[key] = 1
        else:
            key = (endpoint, "", code)
            reqs[key] = reqs.get(key, 0) + 1
        h = self.latency.get(endpoint)
        if h is None:
            h = self.latency[endpoint] = [0] * len(LATENCY_BUCKETS) + [0.0]
        h[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def predicted(self, v: "Version", n: int, scored: int, outliers: int) -> None:
        t = self.totals.get(v.label)
        if t is None:
            t = self.totals[v.label] = [0, 0, 0]
        t[0] += n
        t[1] += scored
        t[2] += outliers

    # -- scrape --
    def describe(self) -> list:
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        p = self.PREFIX
        req = CounterMetricFamily(f"{p}_requests", "HTTP requests by endpoint, served version and status code",
                                  labels=["endpoint", "version", "code"])
        for (endpoint, version, code), n in sorted(self.requests.items()):
            req.add_metric([endpoint, version, str(code)], n)
        yield req
        lat = HistogramMetricFamily(f"{p}_request_duration_seconds", "Request handling time by endpoint",
                                    labels=["endpoint"])
        for endpoint, h in sorted(self.latency.items()):
            acc, buckets = 0, []
            for bound, count in zip(LATENCY_BUCKETS, h):
                acc += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            lat.add_metric([endpoint], buckets, h[-1])
        yield lat
        labels = ["model", "version"]
        pred = CounterMetricFamily(f"{p}_predictions", "Instances predicted, by version", labels=labels)
        scored = CounterMetricFamily(f"{p}_drift_scored", "Instances scored by the concept (drift) model", labels=labels)
        outl = CounterMetricFamily(f"{p}_drift_outliers",
                                   "Instances whose reconstruction error exceeded the threshold (out of distribution)",
                                   labels=labels)
        for version, (n, s, o) in sorted(self.totals.items()):
            pred.add_metric([self.model_name, version], n)
            scored.add_metric([self.model_name, version], s)
            outl.add_metric([self.model_name, version], o)
        yield pred
        yield scored
        yield outl
        thr = GaugeMetricFamily(f"{p}_drift_threshold", "Reconstruction-error threshold of the concept model", labels=labels)
        loaded = GaugeMetricFamily(f"{p}_version_loaded", "1 when the version is loaded and serving", labels=labels)
        versions = dict(self.model.versions) if self.model is not None else {}
        for number, v in sorted(versions.items()):
            loaded.add_metric([self.model_name, v.label], 1)
            if v.concept is not None:
                thr.add_metric([self.model_name, v.label], v.concept.threshold)
        yield thr
        yield loaded


# =============================================================================== request decoding
def parse_json(body: bytes) -> Any:
    if not body:
        raise bad("the request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        first_error = str(exc)
    # TF Serving (RapidJSON) also accepts NaN / Infinity literals; the stdlib parser does too
    if b"NaN" in body or b"Infinity" in body:
        try:
            return json.loads(body)
        except (ValueError, RecursionError, UnicodeDecodeError):
            pass
    raise bad(f"malformed JSON in the request body: {first_error}")


def to_array(value: Any, sig: TensorSig, where: str) -> np.ndarray:
    """Convert a JSON value to an array of the signature's dtype, or raise a 400."""
    if sig.np_dtype in (None, object):
        raise bad(f"{where}: input '{sig.alias}' has dtype {sig.dtype}, which this server does not accept over JSON")
    if isinstance(value, dict):
        if "b64" in value:
            raise bad(f"{where}: input '{sig.alias}' is {DTYPES[sig.dtype][0]}; base64 ('b64') values are only for DT_STRING")
        raise bad(f"{where}: input '{sig.alias}' must be a number or a (nested) list of numbers, got an object")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        msg = str(exc).split("\n")[0]
        if "inhomogeneous" in msg or "sequence" in msg:
            msg = "the nested lists are ragged (rows of different lengths)"
        raise bad(f"{where}: input '{sig.alias}' is not a rectangular tensor: {msg}") from None
    return conform(arr, sig, where)


def conform(arr: np.ndarray, sig: TensorSig, where: str) -> np.ndarray:
    """``arr`` as the signature's dtype, finite and of its shape, or a 400 (JSON, binary and gRPC inputs)."""
    if sig.np_dtype in (None, object):
        raise bad(f"{where}: input '{sig.alias}' has dtype {sig.dtype}, which this server does not accept")
    kind = arr.dtype.kind
    if kind not in "fiu" and not (kind == "b" and sig.dtype == "bool"):
        what = {"U": "strings", "S": "strings", "b": "booleans", "O": "null, objects or out-of-range numbers"}.get(kind, kind)
        raise bad(f"{where}: input '{sig.alias}' expects {DTYPES[sig.dtype][0]} numbers, got {what}")
    if arr.dtype != sig.np_dtype:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(sig.np_dtype)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise bad(f"{where}: input '{sig.alias}' contains NaN or Infinity (or a number too large for {sig.dtype})")
    sig.check(arr, where)
    return arr


def decode_tfserving(body: Any, sig: Signature) -> tuple[dict[str, np.ndarray], bool]:
    """Inputs of a TF Serving predict body; returns (inputs, row_format)."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise bad("Missing 'inputs' or 'instances' key" if not has_rows else
                  "Not both 'inputs' and 'instances' keys may be given; use exactly one")
    single = sig.single_input
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise bad("'instances' must be a list (one element per instance)")
        if not rows:
            raise bad("'instances' is an empty list; send at least one instance")
        if isinstance(rows[0], dict) and "b64" in rows[0] and single is not None:
            to_array(rows[0], single, "instances")  # raises the b64 message
        if isinstance(rows[0], dict):
            named: dict[str, list] = {a: [] for a in sig.inputs}
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise bad(f"instance {i} is not an object; mix of named and unnamed instances")
                if row.keys() != named.keys():
                    missing = sorted(set(named) - set(row))
                    extra = sorted(set(row) - set(named))
                    raise bad(f"instance {i}: inputs do not match the signature (missing {missing}, unknown {extra}); "
                              f"expected {sorted(named)}")
                for a, val in row.items():
                    named[a].append(val)
            return {a: to_array(vals, sig.inputs[a], "instances") for a, vals in named.items()}, True
        if single is None:
            raise bad(f"the signature has inputs {sorted(sig.inputs)}; each instance must be an object naming them")
        return {single.alias: to_array(rows, single, "instances")}, True
    cols = body["inputs"]
    if isinstance(cols, dict) and "b64" in cols and single is not None:
        to_array(cols, single, "inputs")  # raises the b64 message
    if isinstance(cols, dict):
        if cols.keys() != sig.inputs.keys():
            missing = sorted(set(sig.inputs) - set(cols))
            extra = sorted(set(cols) - set(sig.inputs))
            raise bad(f"'inputs' do not match the signature (missing {missing}, unknown {extra}); expected {sorted(sig.inputs)}")
        arrays = {a: to_array(val, sig.inputs[a], "inputs") for a, val in cols.items()}
        batch = {a.shape[0] if a.ndim else None for a in arrays.values()}
        if len(batch) > 1:
            raise bad(f"'inputs' disagree on the batch size: {sorted(map(str, batch))}")
        return arrays, False
    if single is None:
        raise bad(f"the signature has inputs {sorted(sig.inputs)}; 'inputs' must be an object naming them")
    return {single.alias: to_array(cols, single, "inputs")}, False


# =============================================================================== the ASGI app
JSON_HEADERS = [(b"content-type", b"application/json")]


class App:
    # for the gRPC service (grpc_service.py), which cannot import this script
    bad = staticmethod(bad)
    not_found = staticmethod(not_found)
    conform = staticmethod(conform)

    def __init__(self, model: Model, metrics: Metrics, max_body: int, grpc: Any = None):
        self.model = model
        self.metrics = metrics
        self.max_body = max_body
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
            if method == "POST":
                headers = scope["headers"]
                test = (b"x-mlflowctl-traffic", b"test") in headers
                body = await self._body(scope, receive)
                if path.startswith("/v1/models/"):
                    endpoint = "predict"
                    status, payload, version = await self.v1_post(path, body, test)
                elif path.startswith("/v2/models/"):
                    endpoint = "infer"
                    status, payload, version, tail = await self.v2_post(path, body, headers, test)
                    if tail:  # binary outputs: the JSON header, then their bytes
                        head = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
                        await self._send_raw(send, status, b"".join([head, *tail]), [
                            (b"content-type", b"application/octet-stream"),
                            (v2_binary.HEADER, str(len(head)).encode())])
                        payload = None
                elif path == "/admin/reload":
                    endpoint = "admin"
                    status, payload = await self.admin_reload(scope)
                else:
                    raise self._no_route(path, method)
                if payload is not None:
                    await self._send(send, status, payload)
            elif method == "GET":
                if path.startswith("/v1/models/"):
                    endpoint = "status"
                    status, payload = self.v1_get(path)
                elif path.startswith("/v2"):
                    endpoint = "v2"
                    status, payload = self.v2_get(path)
                elif path == "/metrics":
                    endpoint = "metrics"
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    data = generate_latest(self.metrics.registry)
                    await self._send_raw(send, 200, data, [(b"content-type", CONTENT_TYPE_LATEST.encode())])
                    status = 200
                elif path.startswith("/monitor/v1/models/"):
                    endpoint = "monitor"
                    status, payload = self.drift(path, scope.get("query_string", b""))
                else:
                    raise self._no_route(path, method)
                if endpoint != "metrics":
                    await self._send(send, status, payload)
            else:
                raise self._no_route(path, method)
        except ApiError as exc:
            status = exc.status
            await self._send(send, status, {"error": exc.message}, exc.headers)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving whatever happens
            status = 500
            log.exception("internal error on %s %s", method, path)
            await self._send(send, 500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        self.metrics.request(endpoint, version, status, time.perf_counter() - t0)

    # -- plumbing --
    async def _body(self, scope: dict, receive: Callable) -> bytes:
        limit = self.max_body
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    raise bad("invalid Content-Length header") from None
                if n > limit:
                    raise ApiError(413, f"request body of {n} bytes is larger than the limit of {limit} bytes")
                break
        msg = await receive()
        body = msg.get("body", b"")
        if not msg.get("more_body"):
            if len(body) > limit:
                raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
            return body
        chunks = [body]
        size = len(body)
        while msg.get("more_body"):
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ApiError(400, "client disconnected")
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                raise ApiError(413, f"request body is larger than the limit of {limit} bytes")
            chunks.append(body)
        return b"".join(chunks)

    @staticmethod
    async def _send_raw(send: Callable, status: int, data: bytes, headers: list) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _send(self, send: Callable, status: int, payload: Any, extra: list | None = None) -> None:
        data = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        await send({"type": "http.response.start", "status": status,
                    "headers": JSON_HEADERS + extra if extra else JSON_HEADERS})
        await send({"type": "http.response.body", "body": data})

    ROUTES = {  # path prefix -> allowed methods (for 405 vs 404)
        "/v1/models/": ("GET", "POST"), "/v2/models/": ("GET", "POST"), "/v2": ("GET",),
        "/metrics": ("GET",), "/monitor/v1/models/": ("GET",), "/admin/reload": ("POST",),
    }

    def _no_route(self, path: str, method: str) -> ApiError:
        if path.startswith("/v1/models/") or path.startswith("/v2/models/"):
            is_post = path.endswith(":predict") or path.endswith(":classify") or path.endswith(":regress") \
                or path.endswith("/infer")
            allowed = "POST" if is_post else "GET"
            if method != allowed:
                return ApiError(405, f"method {method} is not allowed on {path}; use {allowed}",
                                [(b"allow", allowed.encode())])
        for prefix, methods in self.ROUTES.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)) or path.startswith(prefix + "/"):
                if method not in methods:
                    return ApiError(405, f"method {method} is not allowed on {path}; use {' or '.join(methods)}",
                                    [(b"allow", ", ".join(methods).encode())])
        return not_found(f"no such endpoint: {method} {path}")

    # -- TF Serving REST --
    @staticmethod
    def _v1_parse(path: str) -> tuple[str, str | None, str | None, list[str]]:
        """'/v1/models/m/versions/3/metadata' -> ('m', '3', None, ['metadata'])."""
        parts = path[len("/v1/models/"):].split("/")
        name, rest = parts[0], parts[1:]
        version = label = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
            if not version.isdigit():
                raise not_found(f"malformed request: version '{version}' is not an integer")
        elif len(rest) >= 2 and rest[0] == "labels":
            label, rest = rest[1], rest[2:]
        if not name:
            raise not_found("malformed request: missing model name")
        return name, version, label, rest

    async def v1_post(self, path: str, body: bytes, test: bool = False) -> tuple[int, Any, str]:
        head, sep, verb = path.rpartition(":")
        if not sep or "/" in verb:
            raise self._no_route(path, "POST")
        name, version, label, rest = self._v1_parse(head)
        if rest:
            raise self._no_route(path, "POST")
        model = self.model
        v = model.select(name, version, label)
        if verb != "predict":
            if verb in ("classify", "regress"):
                raise bad(f"{verb} is not supported: the signatures of '{name}' are predict signatures "
                          f"(method_name tensorflow/serving/predict); use :predict")
            raise not_found(f"malformed request: unknown method ':{verb}'")
        req = parse_json(body)
        if not isinstance(req, dict):
            raise bad("the request body must be a JSON object with 'instances' or 'inputs'")
        sig_name = req.get("signature_name") or "serving_default"
        if not isinstance(sig_name, str):
            raise bad("'signature_name' must be a string")
        sig = v.signatures.get(sig_name)
        if sig is None:
            raise bad(f"Serving signature name: \"{sig_name}\" not found in signature def "
                      f"(available: {', '.join(sorted(v.signatures))})")
        inputs, rows = decode_tfserving(req, sig)
        outputs = await self.predict(v, sig, inputs, test)
        if rows:
            if len(outputs) == 1:
                return 200, {"predictions": next(iter(outputs.values()))}, v.label
            n = next(iter(inputs.values())).shape[0]
            return 200, {"predictions": [{k: o[i] for k, o in outputs.items()} for i in range(n)]}, v.label
        if len(outputs) == 1:
            return 200, {"outputs": next(iter(outputs.values()))}, v.label
        return 200, {"outputs": outputs}, v.label

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

    def v1_get(self, path: str) -> tuple[int, Any]:
        if ":" in path.rsplit("/", 1)[-1]:
            raise self._no_route(path, "GET")
        name, version, label, rest = self._v1_parse(path)
        model = self.model
        model.check_name(name)
        if rest == ["metadata"]:
            v = model.select(name, version, label)
            return 200, {
                "model_spec": {"name": name, "signature_name": "", "version": v.label},
                "metadata": {"signature_def": {"signature_def": v.signature_defs}},
            }
        if rest:
            raise self._no_route(path, "GET")

        def entry(n: int, st: VersionState) -> dict[str, Any]:
            return {"version": str(n), "state": st.state,
                    "status": {"error_code": st.error_code, "error_message": st.error_message}}

        if version is not None:
            st = model.states.get(int(version))
            if st is None:
                raise not_found(f"Could not find version {version} of model {name}")
            return 200, {"model_version_status": [entry(int(version), st)]}
        if label is not None:
            v = model.select(name, None, label)
            return 200, {"model_version_status": [entry(v.number, model.states[v.number])]}
        if not model.states:
            raise not_found(f"Could not find any versions of model {name}")
        return 200, {"model_version_status": [entry(n, st) for n, st in sorted(model.states.items(), reverse=True)]}

    # -- Open Inference Protocol V2 --
    def _v2_parse(self, path: str) -> tuple[str, str | None, list[str]]:
        parts = path[len("/v2/models/"):].split("/")
        name, rest = parts[0], parts[1:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
            if not version.isdigit():
                raise not_found(f"version '{version}' of model '{name}' not found (versions are integers)")
        return name, version, rest

    def v2_get(self, path: str) -> tuple[int, Any]:
        if path in ("/v2", "/v2/"):
            return 200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": [v2_binary.EXTENSION]}
        if path == "/v2/health/live":
            return 200, {"live": True}
        if path == "/v2/health/ready":
            # versions load before the socket listens and reloads swap atomically, so once the
            # app runs it is ready (a reload in progress keeps the old versions serving)
            return (200 if self.ready else 503), {"ready": self.ready, "pid": PID}
        if not path.startswith("/v2/models/"):
            raise self._no_route(path, "GET")
        name, version, rest = self._v2_parse(path)
        model = self.model
        if rest == ["ready"]:
            model.check_name(name)
            if version is not None and int(version) not in model.states:
                raise not_found(f"version {version} of model '{name}' not found")
            v = model.versions.get(int(version)) if version is not None else model.default
            return (200 if v else 503), {"name": name, "ready": v is not None}
        if rest:
            raise self._no_route(path, "GET")
        v = model.select(name, version, None)
        sig = v.signatures.get("serving_default") or next(iter(v.signatures.values()))

        def tensors(sigs: dict[str, TensorSig]) -> list[dict[str, Any]]:
            return [{"name": t.alias, "datatype": DTYPES.get(t.dtype, ("", t.dtype.upper(), None))[1],
                     "shape": list(t.shape) if t.shape is not None else [-1]} for t in sigs.values()]

        return 200, {"name": name, "versions": [str(n) for n in sorted(model.versions)],
                     "platform": "tensorflow_savedmodel",
                     "inputs": tensors(sig.inputs), "outputs": tensors(sig.output_sigs)}

    async def v2_post(self, path: str, body: bytes, headers: list | None = None,
                      test: bool = False) -> tuple[int, Any, str, list[bytes]]:
        """An infer request, JSON or with the binary tensor extension; returns (status, JSON, version, binary tail)."""
        name, version, rest = self._v2_parse(path)
        if rest != ["infer"]:
            raise self._no_route(path, "POST")
        v = self.model.select(name, version, None)
        try:
            head, binary = v2_binary.split_body(body, v2_binary.header_length(headers or []))
        except ValueError as exc:
            raise bad(str(exc)) from None
        req = parse_json(head)
        if not isinstance(req, dict):
            raise bad("the request body must be a JSON object with 'inputs'")
        sig = v.signatures.get("serving_default") or next(iter(v.signatures.values()))
        items = req.get("inputs")
        if not isinstance(items, list) or not items:
            raise bad("'inputs' must be a non-empty list of {name, shape, datatype, data}")
        inputs: dict[str, np.ndarray] = {}
        offset = 0
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise bad(f"inputs[{i}] must be an object with name, shape, datatype and data")
            iname, shape, dtype = item.get("name"), item.get("shape"), item.get("datatype")
            if not isinstance(iname, str) or iname not in sig.inputs:
                raise bad(f"inputs[{i}]: unknown input {iname!r}; the model's inputs are {sorted(sig.inputs)}")
            if iname in inputs:
                raise bad(f"inputs[{i}]: input '{iname}' given twice")
            tsig = sig.inputs[iname]
            want = DTYPES.get(tsig.dtype, ("", "", None))[1]
            if dtype != want:
                raise bad(f"input '{iname}': datatype {dtype!r} does not match the model's {want}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise bad(f"input '{iname}': 'shape' must be a list of non-negative integers")
            try:
                size = v2_binary.binary_size(item, f"input '{iname}'")
                if size is not None:
                    if "data" in item:
                        raise ValueError(f"input '{iname}': give either 'data' or 'binary_data_size', not both")
                    arr, offset = v2_binary.take_input(binary, offset, size, dtype, shape, f"input '{iname}'")
            except ValueError as exc:
                raise bad(str(exc)) from None
            if size is None:
                if "data" not in item:
                    raise bad(f"input '{iname}': 'data' is missing (or set parameters.binary_data_size)")
                arr = to_array(item["data"], TensorSig(iname, tsig.dtype, None, tsig.np_dtype), f"input '{iname}'")
                if arr.size != math.prod(shape):
                    raise bad(f"input '{iname}': 'data' has {arr.size} elements, 'shape' {shape} needs {math.prod(shape)}")
                arr = arr.reshape(shape)
            inputs[iname] = conform(arr, tsig, f"input '{iname}'")
        if binary is not None and offset != len(binary):
            raise bad(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no input "
                      f"(check binary_data_size and Inference-Header-Content-Length)")
        missing = sorted(set(sig.inputs) - set(inputs))
        if missing:
            raise bad(f"missing inputs {missing}")
        wanted = sig.outputs
        req_out = req.get("outputs")
        if req_out is not None:
            if not isinstance(req_out, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in req_out):
                raise bad("'outputs' must be a list of {\"name\": ...}")
            wanted = [o["name"] for o in req_out]
            unknown = sorted(set(wanted) - set(sig.outputs))
            if unknown:
                raise bad(f"unknown outputs {unknown}; the model's outputs are {sig.outputs}")
        try:
            binary_default, binary_per = v2_binary.wants_binary(req, req_out)
        except ValueError as exc:
            raise bad(str(exc)) from None
        outs = await self.predict(v, sig, inputs, test)
        tail: list[bytes] = []
        out = {"model_name": name, "model_version": v.label,
               "outputs": [v2_binary.output_entry(k, outs[k], DTYPES.get(sig.output_sigs[k].dtype, ("", "BYTES", None))[1],
                                                  binary_per.get(k, binary_default), tail) for k in wanted]}
        rid = req.get("id")
        if rid is not None:
            out["id"] = rid if isinstance(rid, str) else str(rid)
        return 200, out, v.label, tail

    # -- admin / monitor --
    async def admin_reload(self, scope: dict) -> tuple[int, Any]:
        client = (scope.get("client") or ("", 0))[0]
        if client not in LOOPBACK:
            raise ApiError(403, "reload is only accepted from loopback clients")
        try:
            return 200, await self.reload()
        except ValueError as exc:
            raise bad(f"routing not changed: {exc}") from None

    def drift(self, path: str, query: bytes) -> tuple[int, Any]:
        parts = path[len("/monitor/v1/models/"):].split("/")
        if len(parts) != 2 or parts[1] != "drift":
            raise not_found(f"no such endpoint: GET {path} (use /monitor/v1/models/<name>/drift)")
        name = parts[0]
        params = dict(urllib.parse.parse_qsl(query.decode("latin-1")))
        version = params.get("version")
        label = params.get("label")
        if version is not None and not version.isdigit():
            raise bad("'version' must be an integer")
        model = self.model
        v = model.select(name, version, label) if (version or label) else (model.check_name(name) or model.default)
        per_version = {
            x.label: {"scored": x.scored, "outliers": x.outliers,
                      "outlier_rate": (x.outliers / x.scored) if x.scored else 0.0,
                      "test": {"scored": x.test_scored, "outliers": x.test_outliers},
                      "threshold": x.concept.threshold if x.concept else None,
                      "predictions": x.predictions,
                      "batching": x.batcher.stats() if x.batcher is not None else None}
            for x in model.versions.values()
        }
        if v is None:
            return 200, {"model_name": name, "version": None, "drift_scoring": False, "versions": per_version}
        out: dict[str, Any] = {"model_name": name, "version": v.label, "drift_scoring": v.concept is not None,
                               "scored": v.scored, "outliers": v.outliers,
                               "outlier_rate": (v.outliers / v.scored) if v.scored else 0.0,
                               "test": {"scored": v.test_scored, "outliers": v.test_outliers},
                               "versions": per_version}
        if v.concept is None:
            return 200, out
        c = v.concept
        recent = v.recent()
        window_out = int(np.count_nonzero(~(recent <= c.threshold)))
        out.update({
            "threshold": c.threshold, "quantile": c.quantile,
            "window": {"size": int(recent.size), "outliers": window_out,
                       "outlier_rate": window_out / recent.size if recent.size else 0.0,
                       "capacity": RING_SIZE},
            "training_histogram": {"edges": c.edges, "counts": c.train_counts} if c.edges is not None else None,
            "recent_errors": recent[-RECENT_CAP:],
        })
        if c.edges is not None:
            finite = recent[np.isfinite(recent)]
            counts, _ = np.histogram(finite, bins=c.edges)
            out["live_histogram"] = {"edges": c.edges, "counts": counts,
                                     "underflow": int(np.count_nonzero(finite < c.edges[0])),
                                     "overflow": int(np.count_nonzero(finite > c.edges[-1])) + int(recent.size - finite.size)}
        else:
            out["live_histogram"] = None
        return 200, out


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
    BatchConfig.add_arguments(p)
    p.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                   help="uvicorn HTTP parser (auto: httptools when installed)")
    p.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                   help="event loop (auto: uvloop when installed)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    global ENGINE
    ENGINE = args.engine
    logging.basicConfig(level=args.log_level.upper(), format="serve: %(message)s", stream=sys.stdout)
    base = Path(args.base_path or os.path.join(os.environ.get("MODEL_BASE_PATH", "/models"), args.model_name)).resolve()
    routing_path = Path(args.routing).resolve() if args.routing else None
    if args.max_body_bytes < 1024:
        raise SystemExit("serve: --max-body-bytes must be at least 1024")
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

    tf = _tf()
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
    app = App(model, metrics, args.max_body_bytes, grpc_server)
    # TensorFlow leaves ~10^6 long-lived objects: a full collection walking them stalls the event loop for
    # tens of ms. Freezing what exists now keeps them out of every later collection.
    gc.collect()
    gc.freeze()
    if grpc_server is not None:
        grpc_server.app = app
    app.watch_routing = args.watch_routing

    config = uvicorn.Config(app, loop=args.loop, http=args.http, lifespan="on", access_log=False,
                            log_level="warning", server_header=False, date_header=False,
                            timeout_graceful_shutdown=5, backlog=1024)
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
