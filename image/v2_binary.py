"""The Open Inference V2 binary tensor data extension (Triton's ``binary_tensor_data``), both ways.

A request with the header ``Inference-Header-Content-Length: N`` has a JSON header in its first
``N`` bytes and the raw tensors after it: an input whose ``parameters`` hold
``"binary_data_size": K`` has no ``data``; its ``K`` bytes (little-endian, row-major) follow the
previous binary input's. An output is answered in binary when its request entry has
``"parameters": {"binary_data": true}``, or, for outputs the request does not list, when the
request's ``parameters`` say ``"binary_data_output": true``. A binary answer carries the same
header, each binary output has ``"parameters": {"binary_data_size": K}`` and its bytes follow the
JSON in the order of the outputs.

Everything here is pure numpy: :func:`split_body` and :func:`take_input` raise ``ValueError``
with a one-line message the server answers as a 400. ``BYTES`` tensors (4-byte length prefixed
elements) are not accepted: the server's models take numbers only.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

EXTENSION = "binary_tensor_data"
HEADER = b"inference-header-content-length"  # ASGI header names are lower-case bytes

# V2 datatype -> little-endian numpy dtype (the extension's byte order)
NUMPY = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}


def header_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``Inference-Header-Content-Length`` of an ASGI header list, or None when absent."""
    for name, value in headers:
        if name == HEADER:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"Inference-Header-Content-Length must be an integer, got {value[:40]!r}") from None
            if n < 0:
                raise ValueError(f"Inference-Header-Content-Length must not be negative, got {n}")
            return n
    return None


def split_body(body: bytes, n: int | None) -> tuple[bytes, memoryview | None]:
    """(JSON header, binary part) of a request body whose header length is ``n`` (None: all JSON)."""
    if n is None:
        return body, None
    if n > len(body):
        raise ValueError(f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes; "
                         f"send the JSON header's length in bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def binary_size(item: dict[str, Any], where: str) -> int | None:
    """The ``binary_data_size`` parameter of an input (None when its data is JSON)."""
    params = item.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ValueError(f"{where}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}: 'binary_data_size' must be a non-negative integer, got {size!r}")
    return size


def take_input(binary: memoryview | None, offset: int, size: int, datatype: str, shape: list[int],
               where: str) -> tuple[np.ndarray, int]:
    """The array of ``size`` bytes at ``offset`` of the binary part, and the next offset."""
    if binary is None:
        raise ValueError(f"{where}: 'binary_data_size' is set but the request has no Inference-Header-Content-Length "
                         f"header (send the JSON header's length so the binary part can be found)")
    dtype = NUMPY.get(datatype)
    if dtype is None:
        raise ValueError(f"{where}: datatype {datatype} is not accepted as binary data")
    want = math.prod(shape) * dtype.itemsize
    if size != want:
        raise ValueError(f"{where}: binary_data_size is {size} bytes, shape {shape} of {datatype} needs {want}")
    end = offset + size
    if end > len(binary):
        raise ValueError(f"{where}: the binary data is truncated: {size} bytes expected at offset {offset} "
                         f"of the binary part, only {max(0, len(binary) - offset)} there")
    arr = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    return arr, end


def wants_binary(req: dict[str, Any], requested: list[Any] | None) -> tuple[bool, dict[str, bool]]:
    """(binary by default, per-output choice) from a request's ``parameters`` and ``outputs``."""
    params = req.get("parameters")
    default = bool(params.get("binary_data_output")) if isinstance(params, dict) else False
    per: dict[str, bool] = {}
    for o in requested or []:
        p = o.get("parameters")
        if isinstance(p, dict) and "binary_data" in p:
            if not isinstance(p["binary_data"], bool):
                raise ValueError(f"output '{o['name']}': 'binary_data' must be true or false")
            per[o["name"]] = p["binary_data"]
    return default, per


def output_entry(name: str, arr: np.ndarray, datatype: str, binary: bool, chunks: list[bytes]) -> dict[str, Any]:
    """One output of the answer; a binary one appends its bytes to ``chunks``."""
    entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
    if binary and datatype in NUMPY:
        data = np.ascontiguousarray(arr, dtype=NUMPY[datatype]).tobytes()
        entry["parameters"] = {"binary_data_size": len(data)}
        chunks.append(data)
    else:
        entry["data"] = arr.reshape(-1)
    return entry
