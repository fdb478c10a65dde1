"""The Open Inference Protocol V2: ``/v2``, ``/v2/health/{live,ready}``,
``/v2/models/{m}[/versions/{v}][/ready|/infer]``, with the binary tensor extension
(``Inference-Header-Content-Length``; v2_binary.py).

Handlers take the app (serve_app.App) and the request (serve_http.Request) and return
``(status, payload, served version label)``; a payload with binary outputs is a serve_http.Raw.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import orjson

import v2_binary
from serve_decode import conform, parse_json, to_array
from serve_engine import DTYPES, TensorSig
from serve_errors import bad, not_found
from serve_http import Raw
from serve_paths import MAX_VERSION_DIGITS, parse_version, shown

SERVER_NAME = "mlflowctl-model-server"
SERVER_VERSION = "0.1.0"
PID = os.getpid()


def _parse(path: str) -> tuple[str, str | None, list[str]]:
    parts = path[len("/v2/models/"):].split("/")
    name, rest = parts[0], parts[1:]
    version = None
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
        if parse_version(version) is None:
            raise not_found(f"version '{shown(version)}' of model '{shown(name)}' not found (versions are "
                            f"ASCII integers of at most {MAX_VERSION_DIGITS} digits)")
    return name, version, rest


async def get(app: Any, req: Any) -> tuple[int, Any, str]:
    """Every ``GET /v2...``."""
    code, payload = _get(app, req.path)
    return code, payload, ""


def _get(app: Any, path: str) -> tuple[int, Any]:
    if path in ("/v2", "/v2/"):
        return 200, {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": [v2_binary.EXTENSION]}
    if path == "/v2/health/live":
        return 200, {"live": True}
    if path == "/v2/health/ready":
        # versions load before the socket listens and reloads swap atomically, so once the
        # app runs it is ready (a reload in progress keeps the old versions serving)
        return (200 if app.ready else 503), {"ready": app.ready, "pid": PID}
    if not path.startswith("/v2/models/"):
        raise app.no_route(path, "GET")
    name, version, rest = _parse(path)
    model = app.model
    if rest == ["ready"]:
        model.check_name(name)
        if version is not None and int(version) not in model.states:
            raise not_found(f"version {version} of model '{name}' not found")
        v = model.versions.get(int(version)) if version is not None else model.default
        return (200 if v else 503), {"name": name, "ready": v is not None}
    if rest:
        raise app.no_route(path, "GET")
    v = model.select(name, version, None)
    sig = v.signatures.get("serving_default") or next(iter(v.signatures.values()))

    def tensors(sigs: dict[str, TensorSig]) -> list[dict[str, Any]]:
        return [{"name": t.alias, "datatype": DTYPES.get(t.dtype, ("", t.dtype.upper(), None))[1],
                 "shape": list(t.shape) if t.shape is not None else [-1]} for t in sigs.values()]

    return 200, {"name": name, "versions": [str(n) for n in sorted(model.versions)],
                 "platform": "tensorflow_savedmodel",
                 "inputs": tensors(sig.inputs), "outputs": tensors(sig.output_sigs)}


async def infer(app: Any, request: Any) -> tuple[int, Any, str]:
    """An infer request, JSON or with the binary tensor extension; returns (status, JSON or Raw, version)."""
    path, body, headers, test = request.path, request.body, request.headers, request.test
    name, version, rest = _parse(path)
    if rest != ["infer"]:
        raise app.no_route(path, "POST")
    v = app.model.select(name, version, None)
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
    outs = await app.predict(v, sig, inputs, test)
    tail: list[bytes] = []
    out = {"model_name": name, "model_version": v.label,
           "outputs": [v2_binary.output_entry(k, outs[k], DTYPES.get(sig.output_sigs[k].dtype, ("", "BYTES", None))[1],
                                              binary_per.get(k, binary_default), tail) for k in wanted]}
    rid = req.get("id")
    if rid is not None:
        out["id"] = rid if isinstance(rid, str) else str(rid)
    if tail:  # binary outputs: the JSON header, then their bytes
        head = orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
        return 200, Raw(b"".join([head, *tail]), [(b"content-type", b"application/octet-stream"),
                                                  (v2_binary.HEADER, str(len(head)).encode())]), v.label
    return 200, out, v.label

