"""TensorFlow Serving's REST API: ``GET /v1/models/{m}[/versions/{v}|/labels/{l}][/metadata]`` and
``POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict`` (row and columnar forms).

Handlers take the app (serve_app.App: ``model``, ``predict``, ``no_route``) and the request
(serve_http.Request) and return ``(status, payload, served version label)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from serve_decode import parse_json, to_array
from serve_engine import Signature
from serve_model import VersionState
from serve_paths import MAX_VERSION_DIGITS, parse_version, shown
from serve_errors import bad, not_found

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



def _parse(path: str) -> tuple[str, str | None, str | None, list[str]]:
    """'/v1/models/m/versions/3/metadata' -> ('m', '3', None, ['metadata'])."""
    parts = path[len("/v1/models/"):].split("/")
    name, rest = parts[0], parts[1:]
    version = label = None
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
        if parse_version(version) is None:
            raise not_found(f"malformed request: version '{shown(version)}' is not a version number "
                            f"(ASCII digits, at most {MAX_VERSION_DIGITS})")
    elif len(rest) >= 2 and rest[0] == "labels":
        label, rest = rest[1], rest[2:]
    if not name:
        raise not_found("malformed request: missing model name")
    return name, version, label, rest


async def predict(app: Any, req: Any) -> tuple[int, Any, str]:
    """``POST /v1/models/...:predict``."""
    path, body, test = req.path, req.body, req.test
    head, sep, verb = path.rpartition(":")
    if not sep or "/" in verb:
        raise app.no_route(path, "POST")
    name, version, label, rest = _parse(head)
    if rest:
        raise app.no_route(path, "POST")
    model = app.model
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
    outputs = await app.predict(v, sig, inputs, test)
    if rows:
        if len(outputs) == 1:
            return 200, {"predictions": next(iter(outputs.values()))}, v.label
        n = next(iter(inputs.values())).shape[0]
        return 200, {"predictions": [{k: o[i] for k, o in outputs.items()} for i in range(n)]}, v.label
    if len(outputs) == 1:
        return 200, {"outputs": next(iter(outputs.values()))}, v.label
    return 200, {"outputs": outputs}, v.label


async def status(app: Any, req: Any) -> tuple[int, Any, str]:
    """``GET /v1/models/...``: version status, or a version's metadata."""
    code, payload = _status(app, req.path)
    return code, payload, ""


def _status(app: Any, path: str) -> tuple[int, Any]:
    if ":" in path.rsplit("/", 1)[-1]:
        raise app.no_route(path, "GET")
    name, version, label, rest = _parse(path)
    model = app.model
    model.check_name(name)
    if rest == ["metadata"]:
        v = model.select(name, version, label)
        return 200, {
            "model_spec": {"name": name, "signature_name": "", "version": v.label},
            "metadata": {"signature_def": {"signature_def": v.signature_defs}},
        }
    if rest:
        raise app.no_route(path, "GET")

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

