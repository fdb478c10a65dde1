"""The inference engine: loading a registry version (SavedModel + optional concept model) into
callables that take and return numpy arrays.

* Signatures run as TF concrete functions built once at load, or -- engine ``auto`` -- on
  TFLite when the conversion reproduces TensorFlow's outputs on probe inputs (rtol 1e-3).
* With a concept (drift) model, the classifier and the concept model are fused into one call
  per batch (one graph call on TF, two interpreter calls on TFLite): ``Version.runner``.
* TensorFlow is imported lazily (``_tf()``), so ``serve.py --help`` and bind errors are instant.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from batching import Batcher
from serve_drift import Concept, DriftUnavailable, DriftWindow, read_threshold
from serve_errors import bad

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
    drift: DriftWindow = field(default_factory=DriftWindow)
    predictions: int = 0
    label: str = ""                 # str(number), precomputed for metrics

    def record(self, errors: np.ndarray, test: bool = False) -> int:
        """Add reconstruction errors to the drift window (live traffic only); returns how many are outliers."""
        return self.drift.record(errors, self.concept.threshold, test)


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
    """The version's concept (drift) model: None when the version has no ``concept/`` folder; a
    ``concept/`` that cannot score drift refuses the version (DriftUnavailable), so no version is
    ever served with drift scoring silently off."""
    cdir = version_dir / "concept"
    if not cdir.is_dir():
        return None
    where = f"{version_dir.name}/concept"
    if not (cdir / "saved_model.pb").is_file():
        raise DriftUnavailable(f"{where}/saved_model.pb is missing: drift scoring cannot run")
    th = read_threshold(cdir)
    loaded = _tf().saved_model.load(str(cdir))
    if "serving_default" not in loaded.signatures:
        raise DriftUnavailable(f"{where}: the concept model has no serving_default signature: drift scoring cannot run")
    sig = _signature("serving_default", loaded.signatures["serving_default"])
    if len(sig.outputs) != 1 or sig.single_input is None:
        raise DriftUnavailable(f"{where}: the concept model must have one input and one output: "
                               f"drift scoring cannot run")
    return loaded, Concept(sig, th.threshold, th.quantile, th.edges, th.train_counts)


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

