"""TensorFlow Serving's gRPC API for the model server: ``PredictionService`` and ``ModelService``.

The services are the generated ones of the ``tensorflow-serving-api`` package (``Predict``,
``GetModelMetadata``, ``GetModelStatus``; the others answer UNIMPLEMENTED). They run on a
``grpc.aio`` server on the REST server's own event loop, so a gRPC request goes through exactly
the code a REST one does -- version / label routing, the (batched) model call, drift scoring,
test-traffic marking (metadata ``x-mlflowctl-traffic: test``) and metrics -- with no locks.

A REST error becomes the gRPC status TF Serving uses for it: 400 INVALID_ARGUMENT, 404
NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE (a full batch queue), else INTERNAL.
Messages over ``max_message_bytes`` are refused by gRPC itself with RESOURCE_EXHAUSTED.
Importing this module imports TensorFlow (the API's protos are TensorFlow's): the server
imports it after its models are loaded.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
from tensorflow import as_dtype, make_ndarray
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc  # imports TensorFlow

from serve_errors import INTERNAL_ERROR

log = logging.getLogger("serve")

STATE_ENUM = {"UNKNOWN": 0, "START": 10, "LOADING": 20, "AVAILABLE": 30, "UNLOADING": 40, "END": 50}


def _grpc_code(status: int) -> Any:
    import grpc

    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
            405: grpc.StatusCode.UNIMPLEMENTED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
            503: grpc.StatusCode.UNAVAILABLE}.get(status, grpc.StatusCode.INTERNAL)


class GrpcServer:
    """The gRPC side of ``app`` (serve.App): started and stopped with the ASGI lifespan."""

    def __init__(self, app: Any, host: str, port: int, max_message_bytes: int):
        self.app = app
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.server: Any = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        from grpc import aio

        server = aio.server(options=[
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on the port must fail, not share it
        ])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(self.app), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelStatus(self.app), server)
        try:
            bound = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        else:
            reason = "the address is in use or not available"
        if not bound:
            raise OSError(f"cannot listen for gRPC on {self.address}: {reason} "
                          f"(stop what listens there, or pick another --grpc-port; 0 turns gRPC off)")
        await server.start()
        self.server = server

    async def stop(self, grace: float = 2.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None


# ------------------------------------------------------------------------------ helpers
def _spec_choice(spec: Any) -> tuple[str | None, str | None]:
    """(version, label) of a ModelSpec: TF Serving's version_choice oneof."""
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return str(spec.version.value), None
    if which == "version_label":
        return None, spec.version_label
    return None, None


def _test_traffic(context: Any) -> bool:
    return any(k == "x-mlflowctl-traffic" and v == "test" for k, v in (context.invocation_metadata() or ()))


# numeric DataType enum <-> little-endian numpy dtype: the fast path for tensor_content both ways
_NUMERIC = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
            "uint64", "bool")
_ENUM_TO_NP = {as_dtype(n).as_datatype_enum: np.dtype(n).newbyteorder("<") for n in _NUMERIC}
_NP_TO_ENUM = {np.dtype(n): as_dtype(n).as_datatype_enum for n in _NUMERIC}


def _dtype_enum(name: str) -> int:
    return as_dtype(name).as_datatype_enum


def _dtype_name(enum: int) -> str:
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"dtype {enum}"


def to_ndarray(proto: Any, where: str) -> np.ndarray:
    """A TensorProto as an array (tensor_content or the typed *_val fields); ValueError when malformed."""
    shape = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in shape):
        raise ValueError(f"{where}: the tensor shape {shape} has an unknown dimension; send concrete sizes")
    dtype = _ENUM_TO_NP.get(proto.dtype)
    if dtype is not None and proto.tensor_content:  # what make_tensor_proto sends: the raw bytes
        count = math.prod(shape)
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise ValueError(f"{where}: tensor_content has {len(proto.tensor_content)} bytes, shape {shape} of "
                             f"{_dtype_name(proto.dtype)} needs {count * dtype.itemsize}")
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    try:
        return make_ndarray(proto)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: malformed TensorProto: {str(exc).splitlines()[0][:200]}") from None


def to_proto(arr: np.ndarray) -> Any:
    arr = np.ascontiguousarray(arr)
    enum = _NP_TO_ENUM.get(arr.dtype)
    return tensor_pb2.TensorProto(
        dtype=enum if enum is not None else as_dtype(arr.dtype).as_datatype_enum,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                             for d in arr.shape]),
        tensor_content=arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


class _Handler:
    def __init__(self, app: Any):
        self.app = app

    async def _fail(self, context: Any, endpoint: str, version: str, t0: float, exc: Exception) -> None:
        status = getattr(exc, "status", None)
        if status is None:
            log.exception("internal error in gRPC %s", endpoint)
            message = INTERNAL_ERROR  # never the exception's text: it is in the server log
        else:
            message = exc.message  # type: ignore[attr-defined]
        code = _grpc_code(status or 500)
        self.app.metrics.request(endpoint, version, code.name, time.perf_counter() - t0)
        await context.abort(code, message)


class _Prediction(_Handler, prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService: Predict and GetModelMetadata."""

    async def Predict(self, request: Any, context: Any) -> Any:  # noqa: N802 - the generated service's name
        from tensorflow_serving.apis import predict_pb2

        t0, version = time.perf_counter(), ""
        app = self.app
        try:
            spec = request.model_spec
            v = app.model.select(spec.name, *_spec_choice(spec))
            version = v.label
            sig_name = spec.signature_name or "serving_default"
            sig = v.signatures.get(sig_name)
            if sig is None:
                raise app.bad(f"Serving signature name: \"{sig_name}\" not found in signature def "
                              f"(available: {', '.join(sorted(v.signatures))})")
            if set(request.inputs) != set(sig.inputs):
                missing = sorted(set(sig.inputs) - set(request.inputs))
                extra = sorted(set(request.inputs) - set(sig.inputs))
                raise app.bad(f"inputs do not match the signature (missing {missing}, unknown {extra}); "
                              f"expected {sorted(sig.inputs)}")
            inputs = {}
            for alias, proto in request.inputs.items():
                tsig = sig.inputs[alias]
                want = _dtype_enum(tsig.dtype)
                if proto.dtype != want:
                    raise app.bad(f"input '{alias}' is {_dtype_name(proto.dtype)}, the model expects {_dtype_name(want)}")
                try:
                    arr = to_ndarray(proto, f"input '{alias}'")
                except ValueError as exc:
                    raise app.bad(str(exc)) from None
                inputs[alias] = app.conform(arr, tsig, "Predict")
            wanted = list(request.output_filter) or sig.outputs
            unknown = sorted(set(wanted) - set(sig.outputs))
            if unknown:
                raise app.bad(f"output_filter names unknown outputs {unknown}; the outputs are {sig.outputs}")
            outs = await app.predict(v, sig, inputs, _test_traffic(context))
            resp = predict_pb2.PredictResponse()
            resp.model_spec.name = spec.name
            resp.model_spec.version.value = v.number
            resp.model_spec.signature_name = sig.name
            for k in wanted:
                resp.outputs[k].CopyFrom(to_proto(outs[k]))
        except Exception as exc:  # noqa: BLE001 - every failure is a gRPC status, the server keeps serving
            await self._fail(context, "grpc_predict", version, t0, exc)
            raise  # not reached: abort raises
        app.metrics.request("grpc_predict", version, "OK", time.perf_counter() - t0)
        return resp

    async def GetModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_metadata_pb2

        t0, version = time.perf_counter(), ""
        app = self.app
        try:
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise app.bad(f"metadata_field must be ['signature_def'] (the only metadata served), got {fields}")
            spec = request.model_spec
            v = app.model.select(spec.name, *_spec_choice(spec))
            version = v.label
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            resp.model_spec.name = spec.name
            resp.model_spec.version.value = v.number
            resp.metadata["signature_def"].Pack(get_model_metadata_pb2.SignatureDefMap(signature_def=v.signature_protos))
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "grpc_metadata", version, t0, exc)
            raise
        app.metrics.request("grpc_metadata", version, "OK", time.perf_counter() - t0)
        return resp


class _ModelStatus(_Handler, model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus (HandleReloadConfigRequest is UNIMPLEMENTED)."""

    async def GetModelStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_status_pb2

        t0 = time.perf_counter()
        app = self.app
        try:
            spec = request.model_spec
            model = app.model
            model.check_name(spec.name)
            version, label = _spec_choice(spec)
            states = model.states
            if version is not None:
                if int(version) not in states:
                    raise app.not_found(f"Could not find version {version} of model {spec.name}")
                chosen = [(int(version), states[int(version)])]
            elif label is not None:
                v = model.select(spec.name, None, label)
                chosen = [(v.number, states[v.number])]
            else:
                if not states:
                    raise app.not_found(f"Could not find any versions of model {spec.name}")
                chosen = sorted(states.items(), reverse=True)
            resp = get_model_status_pb2.GetModelStatusResponse()
            for n, st in chosen:
                entry = resp.model_version_status.add()
                entry.version = n
                entry.state = STATE_ENUM.get(st.state, 0)
                entry.status.error_code = 0 if st.error_code == "OK" else (5 if st.error_code == "NOT_FOUND" else 2)
                entry.status.error_message = st.error_message
        except Exception as exc:  # noqa: BLE001
            await self._fail(context, "grpc_status", "", t0, exc)
            raise
        app.metrics.request("grpc_status", "", "OK", time.perf_counter() - t0)
        return resp
