"""One predict request in each protocol of :data:`mlflowctl.serving.PROTOCOLS`, for the serving suite.

(The stage scripts in ``image/`` speak the same shapes; they run without mlflowctl installed, so
they keep their own copy in ``image/integration_test.py``.)
"""
from __future__ import annotations

from typing import Any

TEST_HEADER = {"X-Mlflowctl-Traffic": "test"}


def request_body(protocol: str, rows: list[list[float]]) -> dict[str, Any]:
    if protocol == "tfserving":
        return {"instances": rows}
    if protocol == "v2":
        return {"inputs": [{"name": "images", "shape": [len(rows), len(rows[0])], "datatype": "FP32",
                            "data": [x for row in rows for x in row]}]}
    if protocol == "hydrosphere":
        return {"images": rows}
    return {"data": {"ndarray": rows}}  # seldon


def scores(protocol: str, data: Any) -> list[list[float]]:
    """The class scores of each row of a predict response (ValueError: not the protocol's shape)."""
    def pick(row: Any) -> Any:
        if isinstance(row, dict):
            return row["probabilities"] if "probabilities" in row else next(iter(row.values()))
        return row

    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if protocol == "tfserving":
        rows = [pick(r) for r in data["predictions"]]
    elif protocol == "v2":
        outputs = data["outputs"]
        out = next((o for o in outputs if o.get("name") == "probabilities"), outputs[0])
        flat, n = list(out["data"]), int(out["shape"][0])
        width = len(flat) // n
        rows = [flat[i * width:(i + 1) * width] for i in range(n)]
    elif protocol == "hydrosphere":
        rows = pick(data)
    else:
        body = data["data"]
        rows = body["ndarray"] if "ndarray" in body else body["tensor"]["values"]
    return [[float(x) for x in row] for row in rows]


def predict(endpoint: Any, image: list[float], timeout: float = 30.0) -> int:
    """POST one ``image`` to ``endpoint.predict_url`` (tagged as test traffic); the argmax class."""
    import requests

    r = requests.post(endpoint.predict_url, json=request_body(endpoint.protocol, [image]), headers=TEST_HEADER,
                      timeout=timeout)
    if r.status_code != 200:
        raise AssertionError(f"POST {endpoint.predict_url} answered {r.status_code}: {r.text[:300]}")
    row = scores(endpoint.protocol, r.json())[0]
    return max(range(len(row)), key=row.__getitem__)
