"""The embedded model server (image/serve.py) and the ``local`` serving target, end to end.

A real server runs as a subprocess on a free 127.0.0.1 port, serving tiny SavedModels
with the registry's signatures (see tests/serving_fixtures.py). Every loop is bounded.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("tensorflow")
pytest.importorskip("uvicorn")
pytest.importorskip("orjson")
pytest.importorskip("prometheus_client")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_fixtures as fx  # noqa: E402
from serving_fixtures import assert_error, get, post  # noqa: E402

NAME = "mnist"
BLANK = [0.0] * 784
WHITE = [1.0] * 784


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    return fx.build_registry(tmp_path_factory.mktemp("store") / "models" / NAME)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    routing = work / "routing.json"
    fx.write_routing(routing, [1, 2], {"stable": 1, "canary": 2}, 0.0)
    with fx.running_server(NAME, registry, routing, work / "server.log",
                           extra=["--max-body-bytes", str(1024 * 1024)]) as srv:
        srv.routing = routing
        srv.session = requests.Session()
        yield srv


def argmaxes(preds):
    return [max(range(len(p)), key=p.__getitem__) for p in preds]


def set_routing(srv, versions, labels=None, weight=0.0):
    fx.write_routing(srv.routing, versions, labels, weight)
    r = post(srv, "/admin/reload", b"")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def default_routing(server):
    yield
    set_routing(server, [1, 2], {"stable": 1, "canary": 2}, 0.0)


# ----------------------------------------------------------------------------- TF Serving: status & metadata
def test_model_status_lists_versions(server):
    r = get(server, f"/v1/models/{NAME}")
    assert r.status_code == 200
    st = r.json()["model_version_status"]
    assert {s["version"] for s in st} == {"1", "2"}
    for s in st:
        assert isinstance(s["version"], str)
        assert s["state"] == "AVAILABLE"
        assert s["status"] == {"error_code": "OK", "error_message": ""}


def test_version_and_label_status(server):
    r = get(server, f"/v1/models/{NAME}/versions/2")
    assert r.json() == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    r = get(server, f"/v1/models/{NAME}/labels/canary")
    assert r.json()["model_version_status"][0]["version"] == "2"
    r = get(server, f"/v1/models/{NAME}/labels/stable")
    assert r.json()["model_version_status"][0]["version"] == "1"


def test_metadata_shape(server):
    r = get(server, f"/v1/models/{NAME}/versions/2/metadata")
    assert r.status_code == 200
    body = r.json()
    assert body["model_spec"] == {"name": NAME, "signature_name": "", "version": "2"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    sd = sigs["serving_default"]
    assert sd["method_name"] == "tensorflow/serving/predict"
    images = sd["inputs"]["images"]
    assert images["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in images["tensor_shape"]["dim"]] == ["-1", "784"]
    assert images["name"]
    probs = sd["outputs"]["probabilities"]
    assert probs["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in probs["tensor_shape"]["dim"]] == ["-1", "10"]
    assert "pair" in sigs
    # default version (stable=1) and labels work too
    assert get(server, f"/v1/models/{NAME}/metadata").json()["model_spec"]["version"] == "1"
    assert get(server, f"/v1/models/{NAME}/labels/canary/metadata").json()["model_spec"]["version"] == "2"


# ----------------------------------------------------------------------------- TF Serving: predict
def test_predict_row_format(server):
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK, WHITE]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(len(p) == 10 for p in preds)
    assert all(abs(sum(p) - 1) < 1e-4 for p in preds)
    assert argmaxes(preds) == [1, 9]  # stable = version 1; a white image is class 9


def test_predict_row_format_named_instances(server):
    r = post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [{"images": BLANK}]})
    assert r.status_code == 200, r.text
    assert argmaxes(r.json()["predictions"]) == [2]


def test_predict_columnar_format(server):
    r = post(server, f"/v1/models/{NAME}/versions/2:predict", {"inputs": [BLANK, BLANK, WHITE]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert argmaxes(out) == [2, 2, 9]
    r = post(server, f"/v1/models/{NAME}/versions/2:predict", {"inputs": {"images": [BLANK]}})
    assert argmaxes(r.json()["outputs"]) == [2]


def test_predict_by_version_and_label(server):
    for path, want in [("/versions/1", 1), ("/versions/2", 2), ("/labels/stable", 1), ("/labels/canary", 2), ("", 1)]:
        r = post(server, f"/v1/models/{NAME}{path}:predict", {"instances": [BLANK]})
        assert r.status_code == 200, (path, r.text)
        assert argmaxes(r.json()["predictions"]) == [want], path


def test_predict_other_signature_multiple_outputs(server):
    body = {"signature_name": "pair", "instances": [{"a": [1, 2], "b": [3, 4]}, {"a": [0, 0], "b": [1, 1]}]}
    r = post(server, f"/v1/models/{NAME}/versions/2:predict", body)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [{"diff": [-2.0, -2.0], "sum": [4.0, 6.0]}, {"diff": [-1.0, -1.0], "sum": [1.0, 1.0]}]
    body = {"signature_name": "pair", "inputs": {"a": [[1, 2]], "b": [[3, 4]]}}
    r = post(server, f"/v1/models/{NAME}/versions/2:predict", body)
    assert r.json()["outputs"] == {"diff": [[-2.0, -2.0]], "sum": [[4.0, 6.0]]}


def test_predict_signature_errors(server):
    r = post(server, f"/v1/models/{NAME}/versions/2:predict", {"signature_name": "nope", "instances": [BLANK]})
    assert_error(r, 400, "nope")
    r = post(server, f"/v1/models/{NAME}/versions/2:predict",
             {"signature_name": "pair", "instances": [{"a": [1, 2]}]})
    assert_error(r, 400, "missing")
    r = post(server, f"/v1/models/{NAME}/versions/2:predict",
             {"signature_name": "pair", "inputs": {"a": [[1, 2]], "b": [[1, 2], [3, 4]]}})
    assert_error(r, 400, "batch")


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "malformed json"),
    (b"", 400, "empty"),
    (b"[1, 2, 3]", 400, "json object"),
    (json.dumps({"instances": [BLANK], "inputs": [BLANK]}), 400, "both"),
    (json.dumps({"signature_name": "serving_default"}), 400, "missing"),
    (json.dumps({"instances": [[0.0] * 783]}), 400, "shape"),
    (json.dumps({"instances": BLANK}), 400, "shape"),
    (json.dumps({"instances": [[[0.0] * 784]]}), 400, "shape"),
    (json.dumps({"instances": []}), 400, "empty"),
    (json.dumps({"instances": [BLANK, [0.0] * 10]}), 400, "ragged"),
    (json.dumps({"instances": [["x"] * 784]}), 400, "strings"),
    (json.dumps({"instances": [[True] * 784]}), 400, "booleans"),
    (json.dumps({"instances": [[None] * 784]}), 400, "null"),
    (json.dumps({"instances": [{"b64": "aGVsbG8="}]}), 400, "b64"),
    (json.dumps({"instances": [{"pixels": BLANK}]}), 400, "unknown"),
    (json.dumps({"instances": "abc"}), 400, "list"),
    (json.dumps({"inputs": {"images": [BLANK], "extra": [1]}}), 400, "unknown"),
    (json.dumps({"instances": [BLANK], "signature_name": 7}), 400, "string"),
    (json.dumps({"instances": [[1e300] * 784]}), 400, "nan or infinity"),
    (b'{"instances": [[NaN' + b", 0.0" * 783 + b"]]}", 400, "nan"),
    (b'{"instances": [[Infinity' + b", 0.0" * 783 + b"]]}", 400, "infinity"),
    (json.dumps({"instances": [[10 ** 40] * 784]}), 400, "infinity"),
    (json.dumps({"instances": [[10 ** 400] * 784]}), 400, "json"),
])
def test_predict_bad_input_is_400(server, body, status, needle):
    r = post(server, f"/v1/models/{NAME}:predict", body)
    assert_error(r, status, needle)


def test_not_found_errors(server):
    assert_error(post(server, "/v1/models/other:predict", {"instances": [BLANK]}), 404, "other")
    assert_error(post(server, f"/v1/models/{NAME}/versions/7:predict", {"instances": [BLANK]}), 404, "7")
    assert_error(post(server, f"/v1/models/{NAME}/labels/gold:predict", {"instances": [BLANK]}), 404, "gold")
    assert_error(post(server, f"/v1/models/{NAME}/versions/x:predict", {"instances": [BLANK]}), 404)
    assert_error(get(server, "/v1/models/other"), 404)
    assert_error(get(server, f"/v1/models/{NAME}/versions/9"), 404, "9")
    assert_error(get(server, f"/v1/models/{NAME}/labels/gold"), 404, "gold")
    assert_error(get(server, f"/v1/models/{NAME}/versions/9/metadata"), 404)
    assert_error(get(server, "/nope"), 404)
    assert_error(post(server, f"/v1/models/{NAME}:explode", {"instances": [BLANK]}), 404)


def test_classify_and_regress_rejected(server):
    assert_error(post(server, f"/v1/models/{NAME}:classify", {"examples": [{}]}), 400, "predict")
    assert_error(post(server, f"/v1/models/{NAME}:regress", {"examples": [{}]}), 400, "predict")


def test_wrong_method(server):
    r = get(server, f"/v1/models/{NAME}:predict")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"
    assert_error(post(server, f"/v1/models/{NAME}", {}), 405)
    assert_error(server.session.put(server.url + f"/v1/models/{NAME}:predict", data=b"{}", timeout=10), 405)
    assert_error(server.session.delete(server.url + "/metrics", timeout=10), 405)
    assert_error(post(server, "/metrics", {}), 405)
    assert_error(get(server, f"/v2/models/{NAME}/infer"), 405)


def test_body_too_large(server):
    big = b'{"instances": [[' + b"0.0, " * 300_000 + b"0.0]]}"  # > the 1 MiB limit of this server
    assert_error(post(server, f"/v1/models/{NAME}:predict", big), 413, "limit")

    def chunks():  # chunked upload without Content-Length
        for _ in range(40):
            yield b" " * 32768
    r = server.session.post(server.url + f"/v1/models/{NAME}:predict", data=chunks(), timeout=10)
    assert_error(r, 413, "limit")
    assert post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]}).status_code == 200


# ----------------------------------------------------------------------------- routing
def test_canary_weight_splits_unlabelled_traffic(server, default_routing):
    set_routing(server, [1, 2], {"stable": 1, "canary": 2}, 0.3)
    n, canary = 400, 0
    for _ in range(n):
        r = post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]})
        canary += argmaxes(r.json()["predictions"]) == [2]
    # binomial(400, 0.3): mean 120, sd 9.2 -> far outside 5 sd is a bug
    assert 70 <= canary <= 170, canary
    # labelled and versioned requests are never split
    for _ in range(30):
        r = post(server, f"/v1/models/{NAME}/labels/stable:predict", {"instances": [BLANK]})
        assert argmaxes(r.json()["predictions"]) == [1]


def test_reload_changes_routing(server, default_routing):
    d = set_routing(server, [2], {"stable": 2})
    assert d["labels"] == {"stable": 2}
    st = {s["version"]: s["state"] for s in get(server, f"/v1/models/{NAME}").json()["model_version_status"]}
    assert st == {"1": "END", "2": "AVAILABLE"}
    r = post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]})
    assert argmaxes(r.json()["predictions"]) == [2]
    assert_error(post(server, f"/v1/models/{NAME}/versions/1:predict", {"instances": [BLANK]}), 404, "1")
    # no labels: the highest loaded version serves (TF Serving's default)
    set_routing(server, [1, 2], {})
    assert argmaxes(post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]}).json()["predictions"]) == [2]


def test_sighup_rereads_routing(server, default_routing):
    fx.write_routing(server.routing, [1, 2], {"stable": 2})
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = get(server, f"/v1/models/{NAME}/labels/stable")
        if r.status_code == 200 and r.json()["model_version_status"][0]["version"] == "2":
            break
        time.sleep(0.1)
    else:
        pytest.fail("SIGHUP did not change the routing")


def test_bad_routing_is_refused_and_old_kept(server, default_routing):
    fx.write_routing(server.routing, [1], {"stable": 5})
    assert_error(post(server, "/admin/reload", b""), 400, "not in 'versions'")
    server.routing.write_text("{broken")
    assert_error(post(server, "/admin/reload", b""), 400, "routing")
    assert post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]}).status_code == 200


def test_missing_version_reported_not_fatal(server, default_routing):
    d = set_routing(server, [1, 2, 5], {"stable": 1})
    v5 = [v for v in d["versions"] if v["version"] == 5][0]
    assert v5["state"] == "END" and "saved_model.pb" in v5["error"]
    st = get(server, f"/v1/models/{NAME}/versions/5").json()["model_version_status"][0]
    assert st["state"] == "END" and st["status"]["error_code"] == "NOT_FOUND"
    assert post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]}).status_code == 200


# ----------------------------------------------------------------------------- V2
def test_v2_health_and_server_metadata(server):
    assert get(server, "/v2/health/live").status_code == 200
    assert get(server, "/v2/health/ready").status_code == 200
    meta = get(server, "/v2").json()
    assert meta["name"] and "version" in meta and "extensions" in meta


def test_v2_model_metadata_and_ready(server):
    m = get(server, f"/v2/models/{NAME}").json()
    assert m["name"] == NAME and m["versions"] == ["1", "2"]
    assert m["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]
    assert m["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert get(server, f"/v2/models/{NAME}/versions/2").json()["name"] == NAME
    assert get(server, f"/v2/models/{NAME}/ready").status_code == 200
    assert get(server, f"/v2/models/{NAME}/versions/2/ready").json() == {"name": NAME, "ready": True}
    assert_error(get(server, f"/v2/models/{NAME}/versions/9/ready"), 404)
    assert_error(get(server, "/v2/models/other"), 404)
    assert_error(get(server, "/v2/models/other/ready"), 404)


def test_v2_infer_flat_and_nested(server):
    body = {"id": "req-1", "inputs": [{"name": "images", "shape": [2, 784], "datatype": "FP32", "data": BLANK + WHITE}]}
    r = post(server, f"/v2/models/{NAME}/versions/2/infer", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == NAME and out["model_version"] == "2" and out["id"] == "req-1"
    (o,) = out["outputs"]
    assert o["name"] == "probabilities" and o["datatype"] == "FP32" and o["shape"] == [2, 10]
    assert len(o["data"]) == 20
    assert argmaxes([o["data"][:10], o["data"][10:]]) == [2, 9]
    body["inputs"][0]["data"] = [BLANK, WHITE]
    r = post(server, f"/v2/models/{NAME}/infer", body)
    assert r.status_code == 200 and r.json()["model_version"] == "1"
    body["outputs"] = [{"name": "probabilities"}]
    assert post(server, f"/v2/models/{NAME}/infer", body).status_code == 200


@pytest.mark.parametrize("body, needle", [
    ({"inputs": []}, "inputs"),
    ({}, "inputs"),
    ({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": BLANK}]}, "unknown input"),
    ({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP64", "data": BLANK}]}, "datatype"),
    ({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": BLANK[:-1]}]}, "elements"),
    ({"inputs": [{"name": "images", "shape": [1, 783], "datatype": "FP32", "data": BLANK[:-1]}]}, "shape"),
    ({"inputs": [{"name": "images", "shape": "1x784", "datatype": "FP32", "data": BLANK}]}, "shape"),
    ({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32"}]}, "data"),
    ({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": ["a"] * 784}]}, "strings"),
    ({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": BLANK}],
      "outputs": [{"name": "logits"}]}, "unknown outputs"),
    ({"inputs": ["images"]}, "object"),
])
def test_v2_infer_errors(server, body, needle):
    assert_error(post(server, f"/v2/models/{NAME}/infer", body), 400, needle)


def test_v2_infer_unknown_model_and_malformed(server):
    body = {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": BLANK}]}
    assert_error(post(server, "/v2/models/other/infer", body), 404)
    assert_error(post(server, f"/v2/models/{NAME}/versions/9/infer", body), 404)
    assert_error(post(server, f"/v2/models/{NAME}/infer", b"{{"), 400, "malformed")


# ----------------------------------------------------------------------------- metrics & drift
def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_metrics_and_drift_counters(server):
    before = get(server, "/metrics").text
    ok = post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [BLANK, BLANK, BLANK]})
    assert ok.status_code == 200
    ood = post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [WHITE, WHITE]})
    assert ood.status_code == 200
    assert set(ood.json()) == {"predictions"}  # nothing extra on the TF Serving wire
    post(server, f"/v1/models/{NAME}/versions/1:predict", {"instances": [WHITE]})  # v1: no concept model
    post(server, f"/v1/models/{NAME}:predict", b"{bad")
    r = get(server, "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = r.text

    def delta(name, **lab):
        return metric(after, name, **lab) - metric(before, name, **lab)

    assert delta("mlflowctl_serving_drift_scored_total", version="2") == 5
    assert delta("mlflowctl_serving_drift_outliers_total", version="2") == 2
    assert delta("mlflowctl_serving_drift_scored_total", version="1") == 0
    assert delta("mlflowctl_serving_predictions_total", version="2") == 5
    assert delta("mlflowctl_serving_predictions_total", version="1") == 1
    assert delta("mlflowctl_serving_requests_total", endpoint="predict", version="2", code="200") == 2
    assert delta("mlflowctl_serving_requests_total", endpoint="predict", code="400") == 1
    assert metric(after, "mlflowctl_serving_drift_threshold", version="2") == pytest.approx(fx.CONCEPT_THRESHOLD)
    assert delta("mlflowctl_serving_request_duration_seconds_count", endpoint="predict") >= 4


def test_drift_monitor_endpoint(server):
    post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [WHITE, BLANK]})
    r = get(server, f"/monitor/v1/models/{NAME}/drift?version=2")
    assert r.status_code == 200
    d = r.json()
    assert d["version"] == "2" and d["drift_scoring"] is True
    assert d["threshold"] == pytest.approx(fx.CONCEPT_THRESHOLD) and d["quantile"] == 0.99
    assert d["scored"] >= 2 and 0 < d["outliers"] <= d["scored"]
    assert d["outlier_rate"] == pytest.approx(d["outliers"] / d["scored"])
    assert d["training_histogram"]["counts"] == fx.HIST_COUNTS
    assert d["live_histogram"]["edges"] == pytest.approx(fx.HIST_EDGES)
    live = d["live_histogram"]
    assert sum(live["counts"]) + live["underflow"] + live["overflow"] == d["window"]["size"]
    assert live["overflow"] >= 1  # white images have error 1.0 > the last edge 0.5
    assert d["recent_errors"][-2:] == [1.0, 0.0]
    assert len(d["recent_errors"]) <= 5000
    assert set(d["versions"]) == {"1", "2"}
    # the default version (stable = 1) has no concept model
    d1 = get(server, f"/monitor/v1/models/{NAME}/drift").json()
    assert d1["version"] == "1" and d1["drift_scoring"] is False
    assert get(server, f"/monitor/v1/models/{NAME}/drift?label=canary").json()["version"] == "2"
    assert_error(get(server, "/monitor/v1/models/other/drift"), 404)
    assert_error(get(server, f"/monitor/v1/models/{NAME}/drift?version=x"), 400)


def test_test_traffic_is_counted_apart_from_live_traffic(server):
    """The integration test marks its requests; the monitor's live statistics never see them."""
    def drift():
        return get(server, f"/monitor/v1/models/{NAME}/drift?version=2").json()

    before = drift()
    before_metrics = get(server, "/metrics").text
    tagged = post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [WHITE, WHITE, BLANK]},
                  headers={"X-Mlflowctl-Traffic": "test"})
    assert tagged.status_code == 200 and set(tagged.json()) == {"predictions"}
    after = drift()
    assert after["test"]["scored"] - before["test"]["scored"] == 3
    assert after["test"]["outliers"] - before["test"]["outliers"] == 2
    assert (after["scored"], after["outliers"], after["window"]["size"]) == \
        (before["scored"], before["outliers"], before["window"]["size"])
    assert after["versions"]["2"]["test"] == after["test"]
    after_metrics = get(server, "/metrics").text
    assert metric(after_metrics, "mlflowctl_serving_drift_scored_total", version="2") == \
        metric(before_metrics, "mlflowctl_serving_drift_scored_total", version="2")
    # untagged traffic is live again
    post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [WHITE]})
    assert drift()["scored"] == before["scored"] + 1


def test_admin_reload_only_post(server):
    assert_error(get(server, "/admin/reload"), 405)


# ----------------------------------------------------------------------------- load & robustness
def test_concurrency(server):
    body = json.dumps({"instances": [BLANK]})

    def worker(i: int) -> list[int]:
        s = requests.Session()
        codes = []
        for j in range(50):
            path = f"/v1/models/{NAME}/versions/{1 + (i + j) % 2}:predict"
            codes.append(s.post(server.url + path, data=body, timeout=30).status_code)
        s.close()
        return codes

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        codes = [c for cs in pool.map(worker, range(16)) for c in cs]
    assert len(codes) == 800 and set(codes) == {200}
    assert time.monotonic() - t0 < 120


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["num", "str", "bool", "null", "list", "dict", "nan", "big"] if depth < 4 else ["num", "str", "null"]
    k = rng.choice(kinds)
    if k == "num":
        return rng.choice([rng.random(), rng.randint(-5, 5), -1e-9, 0])
    if k == "str":
        return "".join(rng.choice("ab\u00e9\"\\{}[]:,0") for _ in range(rng.randint(0, 8)))
    if k == "bool":
        return rng.random() < 0.5
    if k == "null":
        return None
    if k == "nan":
        return rng.choice([math.nan, math.inf, -math.inf])
    if k == "big":
        return rng.choice([10 ** 40, -10 ** 400, 1e308])
    if k == "list":
        if depth <= 1 and rng.random() < 0.4:  # image-sized rows of scalars, sometimes with a bad element
            n = rng.choice([784, 785, 392])
            row = [rng.random() for _ in range(n)]
            if rng.random() < 0.5:
                row[rng.randrange(n)] = _random_json(rng, 4)
            return row
        return [_random_json(rng, depth + 1) for _ in range(rng.choice([0, 1, 2, 3]))]
    keys = ["instances", "inputs", "signature_name", "images", "name", "shape", "datatype", "data", "outputs", "b64", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_fuzz_never_5xx(server):
    rng = random.Random(1234)
    paths = [f"/v1/models/{NAME}:predict", f"/v1/models/{NAME}/versions/2:predict", f"/v1/models/{NAME}/labels/canary:predict",
             f"/v2/models/{NAME}/infer", f"/v2/models/{NAME}/versions/2/infer", f"/v1/models/{NAME}:classify",
             "/v1/models/%00:predict", "/v1/models//versions/:predict", f"/v1/models/{NAME}/versions/99999999999999999999:predict"]
    deadline = time.monotonic() + 30
    sent = 0
    for i in range(500):
        if time.monotonic() > deadline:
            break
        path = rng.choice(paths)
        mode = rng.random()
        if mode < 0.15:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif mode < 0.3:
            good = {"instances": [[rng.random() for _ in range(784)]]}
            raw = json.dumps(good).encode()
            cut = rng.randint(0, len(raw))
            data = raw[:cut] + bytes([rng.getrandbits(8)]) + raw[cut + 1:]
        elif mode < 0.4:
            shape = rng.choice([[1, 784], [784], [2, 392], [0, 784], [1, -784], [10 ** 12, 1]])
            data = json.dumps({"inputs": [{"name": "images", "shape": shape, "datatype": rng.choice(["FP32", "BYTES", 5]),
                                           "data": [0.5] * rng.choice([784, 0, 1])}]})
        else:
            data = json.dumps({"instances" if rng.random() < 0.5 else "inputs": _random_json(rng)}
                              if rng.random() < 0.7 else _random_json(rng), allow_nan=True)
        method = rng.choice(["POST"] * 8 + ["GET", "PUT"])
        r = server.session.request(method, server.url + path, data=data, timeout=10)
        sent += 1
        assert r.status_code < 500, (path, data[:200], r.status_code, r.text[:300])
        assert r.headers["content-type"] == "application/json"
        if r.status_code >= 400:
            assert "error" in r.json()
    assert sent >= 50
    assert server.proc.poll() is None
    assert get(server, "/v2/health/live").status_code == 200
    assert post(server, f"/v1/models/{NAME}:predict", {"instances": [BLANK]}).status_code == 200


def test_engines_agree(server, registry, tmp_path):
    """The default engine runs serving_default on TFLite (verified against TF at load time);
    --engine tf runs the TF concrete functions (classifier and concept fused in one graph call).
    Both must answer the same, and both must score drift."""
    assert "engine tflite, concept model on tflite" in server.log.read_text()
    routing = tmp_path / "routing.json"
    fx.write_routing(routing, [1, 2], {"stable": 1, "canary": 2})
    rng = random.Random(7)
    batch = [BLANK, WHITE] + [[rng.random() for _ in range(784)] for _ in range(3)]
    with fx.running_server(NAME, registry, routing, tmp_path / "tf.log", extra=["--engine", "tf"]) as tf_srv:
        assert "engine tf, concept model on tf" in (tmp_path / "tf.log").read_text()
        for path in (f"/v1/models/{NAME}/versions/1:predict", f"/v1/models/{NAME}/versions/2:predict"):
            for body in ({"instances": batch}, {"inputs": batch[:1]}, {"instances": batch[2:3]}):
                a = post(server, path, body).json()
                b = requests.post(tf_srv.url + path, json=body, timeout=10).json()
                key = "predictions" if "instances" in body else "outputs"
                for ra, rb in zip(a[key], b[key]):
                    assert ra == pytest.approx(rb, rel=1e-3, abs=1e-5)
        d = requests.get(f"{tf_srv.url}/monitor/v1/models/{NAME}/drift?version=2", timeout=10).json()
        sent = batch + batch[:1] + batch[2:3]  # what version 2 saw
        expected = sum(sum(p * p for p in img) / 784 > fx.CONCEPT_THRESHOLD for img in sent)
        assert d["scored"] == 7 and d["outliers"] == expected
        assert d["recent_errors"][:2] == [0.0, 1.0]


# ----------------------------------------------------------------------------- process behaviour
def test_port_in_use_exits_with_one_line(registry, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        import subprocess
        p = subprocess.run([sys.executable, str(fx.SERVE), "--model-name", NAME, "--base-path", str(registry),
                            "--host", "127.0.0.1", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "already in use" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_no_routing_file_serves_highest_and_sigterm_is_clean(registry, tmp_path):
    srv = fx.ServerProcess(NAME, registry, tmp_path / "absent.json", tmp_path / "log")
    try:
        srv.wait_ready()
        st = requests.get(f"{srv.url}/v1/models/{NAME}", timeout=10).json()["model_version_status"]
        assert [s["version"] for s in st] == ["2"]
        r = requests.post(f"{srv.url}/v1/models/{NAME}:predict", json={"instances": [BLANK]}, timeout=10)
        assert argmaxes(r.json()["predictions"]) == [2]
    finally:
        code = srv.stop()
    assert code == 0
    log = (tmp_path / "log").read_text()
    assert f"http://127.0.0.1:{srv.port}" in log and "serve: stopped" in log


# ----------------------------------------------------------------------------- the `local` serving target
@pytest.fixture()
def plugin_module():
    repo = Path(__file__).resolve().parents[1]
    try:
        return importlib.import_module("mlflowctl_plugins.local_serving")
    except ImportError:
        sys.path.insert(0, str(repo))
        spec = importlib.util.spec_from_file_location("_local_serving_under_test", repo / "plugins" / "local_serving.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def make_project(tmp_path: Path, models_root: Path) -> SimpleNamespace:
    state = tmp_path / ".mlflowctl"
    state.mkdir()

    class Store:
        def fetch(self, path: str) -> Path:
            p = models_root / path
            if not p.is_dir():
                raise FileNotFoundError(path)
            return p

    return SimpleNamespace(root=tmp_path, state_dir=state, model_name=NAME,
                           stage_code_dir=fx.SERVE.parent, store=Store())


def test_plugin_registers(plugin_module):
    from mlflowctl.plugin_manager import Registry

    reg = Registry()
    plugin_module.mlflowctl_add_serving_targets(registry=reg)
    assert reg.serving_target("local") is plugin_module.LocalServing
    assert set(plugin_module.LocalServing.settings) == {"host", "port", "max_body_bytes", "canary_weight",
                                                       "start_timeout", "python", "runtime", "grpc_port", "batching",
                                                       "batch_window_us", "max_batch", "batch_queue"}


def test_plugin_import_is_light():
    import subprocess

    code = ("import sys; import mlflowctl_plugins.local_serving as m; "
            "bad = [x for x in ('tensorflow', 'numpy', 'uvicorn', 'requests') if x in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fx.REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    if "No module named 'mlflowctl_plugins'" in p.stderr:
        pytest.skip("mlflowctl_plugins is not installed (pip install -e .)")
    assert p.returncode == 0, p.stdout + p.stderr


def test_plugin_lifecycle(plugin_module, registry, tmp_path):
    from mlflowctl.errors import MlflowctlError, UnavailableError

    models_root = registry.parent.parent  # .../store  (registry = store/models/mnist)
    project = make_project(tmp_path, models_root)
    port, grpc_port = fx.free_port(), fx.free_port()
    target = plugin_module.LocalServing({"port": port, "grpc_port": grpc_port, "start_timeout": 90.0}, project)
    other = None
    V = SimpleNamespace  # noqa: N806 - a ModelVersion look-alike
    try:
        st = target.status()
        assert st["running"] is False and st["versions"] == []
        ep = target.deploy(V(name=NAME, number=1, path=f"models/{NAME}/1", metadata={}), label="stable")
        assert ep.url == f"http://127.0.0.1:{port}" and ep.version == 1 and ep.protocol == "tfserving"
        assert ep.grpc == f"127.0.0.1:{grpc_port}"
        assert ep.predict_url == f"http://127.0.0.1:{port}/v1/models/{NAME}/versions/1:predict"
        pid = int((project.state_dir / "serve" / "server.pid").read_text())
        r = requests.post(ep.predict_url, json={"instances": [BLANK]}, timeout=10)
        assert argmaxes(r.json()["predictions"]) == [1]

        ep2 = target.deploy(V(name=NAME, number=2, path=f"models/{NAME}/2", metadata={}), label="canary", weight=0.5)
        assert ep2.version == 2
        st = target.status()
        assert st["running"] and st["pid"] == pid  # reloaded, not restarted
        assert st["versions"] == [{"version": 1, "state": "AVAILABLE", "error": ""},
                                  {"version": 2, "state": "AVAILABLE", "error": ""}]
        assert st["labels"] == {"stable": 1, "canary": 2} and st["canary_weight"] == 0.5
        assert st["predict_url"] == f"http://127.0.0.1:{port}/v1/models/{NAME}:predict"
        assert st["grpc"] == f"127.0.0.1:{grpc_port}"
        assert target.metrics_url() == f"http://127.0.0.1:{port}/metrics"
        assert requests.get(target.metrics_url(), timeout=10).status_code == 200
        routing = json.loads((project.state_dir / "serve" / "routing.json").read_text())
        assert routing == {"versions": [1, 2], "labels": {"stable": 1, "canary": 2}, "canary_weight": 0.5}

        assert target.endpoint(label="canary").predict_url.endswith(f"/v1/models/{NAME}/labels/canary:predict")
        assert target.endpoint().version == 1
        with pytest.raises(MlflowctlError):
            target.endpoint(version=7)

        # promote: stable -> 2, drop the canary label
        target.set_label("stable", 2)
        target.set_label("canary", None)
        r = requests.post(target.endpoint().predict_url, json={"instances": [BLANK]}, timeout=10)
        assert argmaxes(r.json()["predictions"]) == [2]
        with pytest.raises(MlflowctlError, match="not deployed"):
            target.set_label("stable", 9)

        target.undeploy(1)
        st = target.status()
        assert [v["version"] for v in st["versions"]] == [2] and st["labels"] == {"stable": 2}
        r = requests.get(f"{ep.url}/v1/models/{NAME}/versions/1", timeout=10)
        assert r.json()["model_version_status"][0]["state"] == "END"
        assert target.serves(2) and not target.serves(1) and not target.serves(7)

        # a version the server cannot load: error, routing rolled back, the rest keeps serving
        with pytest.raises(MlflowctlError, match="version 3"):
            target.deploy(V(name=NAME, number=3, path=f"models/{NAME}/3", metadata={}), label="canary")
        assert json.loads((project.state_dir / "serve" / "routing.json").read_text())["versions"] == [2]
        assert requests.post(target.endpoint().predict_url, json={"instances": [BLANK]}, timeout=10).status_code == 200

        # start() on a running server is a no-op reload
        assert target.start().version == 2
        assert target.status()["pid"] == pid

        # a second server on the same port: one-line UnavailableError naming the port
        other_state = tmp_path / "other"
        other_state.mkdir()
        other = plugin_module.LocalServing({"port": port, "grpc_port": fx.free_port(), "start_timeout": 60.0},
                                           SimpleNamespace(**{**vars(project), "state_dir": other_state}))
        with pytest.raises(UnavailableError, match="already in use") as ei:
            other.start()
        assert "\n" not in str(ei.value)
    finally:
        target.stop()
        if other is not None:
            other.stop()  # only does something if the test failed half-way
    assert not (project.state_dir / "serve" / "server.pid").exists()
    assert target.status()["running"] is False and not target.serves(2)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)


def test_plugin_stale_pid_and_restart(plugin_module, registry, tmp_path):
    project = make_project(tmp_path, registry.parent.parent)
    port = fx.free_port()
    target = plugin_module.LocalServing({"port": port, "grpc_port": 0, "start_timeout": 90.0}, project)
    serve_dir = project.state_dir / "serve"
    serve_dir.mkdir()
    (serve_dir / "server.pid").write_text("999999\n")  # no such process
    fx.write_routing(serve_dir / "routing.json", [2], {"stable": 2})
    try:
        assert target.status()["running"] is False
        assert not (serve_dir / "server.pid").exists()
        ep = target.start()
        assert ep is not None and ep.version == 2
        assert target.status()["running"] is True
    finally:
        target.stop()
        target.stop()  # idempotent
    assert target.status()["running"] is False


def test_plugin_nothing_registered(plugin_module, tmp_path):
    from mlflowctl.errors import MlflowctlError

    project = make_project(tmp_path, tmp_path / "empty-store")
    target = plugin_module.LocalServing({"port": fx.free_port(), "grpc_port": 0}, project)
    with pytest.raises(MlflowctlError, match="no registered version"):
        target.start()
    assert target.status()["running"] is False


def test_plugin_start_failures_are_one_line(plugin_module, registry, tmp_path):
    from mlflowctl.errors import UnavailableError

    project = make_project(tmp_path, registry.parent.parent)
    bad_python = plugin_module.LocalServing({"port": fx.free_port(), "grpc_port": 0, "python": str(tmp_path / "no-python")},
                                            project)
    with pytest.raises(UnavailableError, match="cannot start the model server") as ei:
        bad_python.start()
    assert "\n" not in str(ei.value) and "serving.local.python" in str(ei.value)

    serve_dir = project.state_dir / "serve"
    (serve_dir / "routing.json").write_text('{"versions": "all of them"}')
    target = plugin_module.LocalServing({"port": fx.free_port(), "grpc_port": 0, "start_timeout": 90.0}, project)
    try:
        with pytest.raises(UnavailableError, match="exited at start") as ei:
            target.start()
        assert "'versions' must be a list" in str(ei.value) and "\n" not in str(ei.value)
        assert not (serve_dir / "server.pid").exists()
    finally:
        target.stop()


def test_plugin_grpc_and_batching_settings_restart_the_server(plugin_module, registry, tmp_path):
    """A change of grpc_port or batching restarts the running server with the new arguments."""
    project = make_project(tmp_path, registry.parent.parent)
    port, grpc_port = fx.free_port(), fx.free_port()
    (project.state_dir / "serve").mkdir()
    fx.write_routing(project.state_dir / "serve" / "routing.json", [2], {"stable": 2})
    first = plugin_module.LocalServing({"port": port, "grpc_port": 0, "start_timeout": 90.0}, project)
    second = plugin_module.LocalServing({"port": port, "grpc_port": grpc_port, "batching": True, "max_batch": 16,
                                         "start_timeout": 90.0}, project)
    try:
        assert first.start().grpc == ""
        pid = first.status()["pid"]
        drift = requests.get(f"http://127.0.0.1:{port}/monitor/v1/models/{NAME}/drift", timeout=10).json()
        assert drift["versions"]["2"]["batching"] is None
        ep = second.start()
        st = second.status()
        assert st["pid"] != pid and st["grpc"] == ep.grpc == f"127.0.0.1:{grpc_port}"
        drift = requests.get(f"http://127.0.0.1:{port}/monitor/v1/models/{NAME}/drift", timeout=10).json()
        assert drift["versions"]["2"]["batching"]["max_batch"] == 16
        assert second.start().version == 2 and second.status()["pid"] == st["pid"]  # same settings: no restart
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=5):
            pass
    finally:
        second.stop()
        first.stop()
