"""Request bodies to arrays: JSON parsing and the dtype/finiteness/shape checks every protocol
(TF Serving REST, V2 JSON and binary, gRPC) applies to an input tensor."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from serve_engine import DTYPES, TensorSig
from serve_errors import bad

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
