"""The model server with real third-party clients: Triton's ``tritonclient`` (V2 JSON and the binary
tensor extension), TF Serving's gRPC stubs (``tensorflow-serving-api``), and dynamic batching.

Real servers (image/serve.py subprocesses on free 127.0.0.1 ports) serving the tiny SavedModels of
tests/serving_fixtures.py; every loop is bounded.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("tensorflow")
grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving.apis")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_fixtures as fx  # noqa: E402

NAME = "mnist"
MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return fx.build_registry(tmp_path_factory.mktemp("store") / "models" / NAME)


def start(registry, tmp_path_factory, label: str, extra: list[str], routing_extra: dict | None = None):
    work = tmp_path_factory.mktemp(label)
    routing = work / "routing.json"
    fx.write_routing(routing, [1, 2], {"stable": 1, "canary": 2}, 0.0)
    if routing_extra:
        routing.write_text(json.dumps({**json.loads(routing.read_text()), **routing_extra}))
    srv = fx.ServerProcess(NAME, registry, routing, work / "server.log", ["--max-body-bytes", str(MAX_BODY), *extra])
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    srv = start(registry, tmp_path_factory, "plain", [])
    yield srv
    srv.stop()


def rest_predict(srv, x: np.ndarray, version: int | str = 2, headers: dict | None = None) -> np.ndarray:
    r = requests.post(f"{srv.url}/v1/models/{NAME}/versions/{version}:predict",
                      data=json.dumps({"instances": x.tolist()}), headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["predictions"], dtype=np.float32)


def images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` images; brightness varies so some rows are drift outliers (mean(x^2) > 0.25) and some are not."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, 784)) * rng.uniform(0.0, 1.3, (n, 1))).astype(np.float32)


def drift(srv, version: int = 2) -> dict:
    return requests.get(f"{srv.url}/monitor/v1/models/{NAME}/drift?version={version}", timeout=10).json()


def still_answers(srv) -> None:
    assert requests.get(f"{srv.url}/v2/health/ready", timeout=10).status_code == 200
    assert rest_predict(srv, np.zeros((1, 784), np.float32)).argmax() == 2


# ----------------------------------------------------------------------------- V2 with tritonclient
@pytest.fixture()
def triton(server):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=30.0)
    yield client
    client.close()


def test_tritonclient_metadata_advertises_binary_extension(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata(NAME, "2")
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 784]}]


@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False), (False, True)])
def test_tritonclient_infer_matches_rest(server, triton, binary_in, binary_out):
    x = images(5, seed=1)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)
    res = triton.infer(NAME, [inp], model_version="2", outputs=[out], request_id="r1")
    got = res.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (5, 10)
    np.testing.assert_array_equal(got, rest_predict(server, x))
    response = res.get_response()
    assert response["model_version"] == "2" and response["id"] == "r1"
    assert ("parameters" in response["outputs"][0]) == binary_out


def test_tritonclient_default_mode_is_binary_both_ways(server, triton):
    """tritonclient's defaults: binary inputs and, with no outputs named, binary_data_output."""
    x = images(3, seed=2)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = triton.infer(NAME, [inp])  # the default version (stable = 1)
    out = res.get_output("probabilities")
    assert out["parameters"] == {"binary_data_size": 3 * 10 * 4}
    np.testing.assert_array_equal(res.as_numpy("probabilities"), rest_predict(server, x, version=1))


def test_tritonclient_errors_are_exceptions_with_the_message(triton):
    x = np.zeros((1, 783), np.float32)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="shape"):
        triton.infer(NAME, [inp], model_version="2")
    with pytest.raises(InferenceServerException, match="not found"):
        triton.infer(NAME, [inp], model_version="7")


def binary_request(server, header: bytes, blob: bytes, hlen: int | str | None = None, version: int = 2):
    headers = {"Content-Type": "application/octet-stream"}
    if hlen is not None:
        headers["Inference-Header-Content-Length"] = str(hlen)
    return requests.post(f"{server.url}/v2/models/{NAME}/versions/{version}/infer", data=header + blob,
                         headers=headers, timeout=10)


def infer_header(shape: list[int], size: int, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": shape, "datatype": "FP32",
                                   "parameters": {"binary_data_size": size}}], **extra}).encode()


@pytest.mark.parametrize("case, needle", [
    ("truncated", "truncated"),
    ("beyond_body", "body has only"),
    ("size_vs_shape", "needs 3136"),
    ("leftover", "belong to no input"),
    ("no_header", "no Inference-Header-Content-Length"),
    ("bad_header_value", "must be an integer"),
    ("negative_header", "must not be negative"),
    ("header_cuts_json", "malformed JSON"),
    ("data_and_size", "not both"),
    ("bad_binary_flag", "'binary_data' must be true or false"),
])
def test_binary_bad_input_is_a_clean_400(server, case, needle):
    x = images(1, seed=3)
    blob = x.tobytes()
    head = infer_header([1, 784], len(blob))
    if case == "truncated":
        r = binary_request(server, head, blob[:-100], len(head))
    elif case == "beyond_body":
        r = binary_request(server, head, blob, len(head) + len(blob) + 1)
    elif case == "size_vs_shape":
        r = binary_request(server, infer_header([1, 784], 100), blob[:100], len(infer_header([1, 784], 100)))
    elif case == "leftover":
        r = binary_request(server, head, blob + b"\0\0\0\0", len(head))
    elif case == "no_header":
        r = requests.post(f"{server.url}/v2/models/{NAME}/versions/2/infer", data=head, timeout=10)
    elif case == "bad_header_value":
        r = binary_request(server, head, blob, "12x")
    elif case == "negative_header":
        r = binary_request(server, head, blob, -5)
    elif case == "header_cuts_json":
        r = binary_request(server, head, blob, len(head) - 3)
    elif case == "data_and_size":
        h = json.dumps({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784,
                                    "parameters": {"binary_data_size": len(blob)}}]}).encode()
        r = binary_request(server, h, blob, len(h))
    else:
        h = infer_header([1, 784], len(blob), outputs=[{"name": "probabilities", "parameters": {"binary_data": "yes"}}])
        r = binary_request(server, h, blob, len(h))
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and needle in body["error"], body
    still_answers(server)


def test_binary_nan_is_rejected_like_json(server):
    x = np.full((1, 784), np.nan, np.float32)
    head = infer_header([1, 784], x.nbytes)
    r = binary_request(server, head, x.tobytes(), len(head))
    assert r.status_code == 400 and "NaN" in r.json()["error"]


def test_binary_inference_is_drift_scored(server):
    before = drift(server)
    x = np.ones((2, 784), np.float32)  # error 1.0 > threshold: outliers
    head = infer_header([2, 784], x.nbytes)
    r = binary_request(server, head, x.tobytes(), len(head))
    assert r.status_code == 200 and "inference-header-content-length" not in {k.lower() for k in r.headers}
    after = drift(server)
    assert (after["scored"] - before["scored"], after["outliers"] - before["outliers"]) == (2, 2)


# ----------------------------------------------------------------------------- gRPC with tensorflow-serving-api
@pytest.fixture(scope="module")
def stubs(server):
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", -1)])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)
    channel.close()


def predict_request(x: np.ndarray, version: int | None = None, label: str | None = None, signature: str = ""):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    req = predict_pb2.PredictRequest()
    req.model_spec.name = NAME
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    if signature:
        req.model_spec.signature_name = signature
    req.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
    return req


def test_grpc_predict_by_version_and_label(server, stubs):
    import tensorflow as tf

    predict, _ = stubs
    x = images(4, seed=4)
    resp = predict.Predict(predict_request(x, version=2), timeout=30)
    assert resp.model_spec.name == NAME and resp.model_spec.version.value == 2
    assert resp.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["probabilities"]), rest_predict(server, x))
    blank = np.zeros((1, 784), np.float32)
    for label, want in (("canary", 2), ("stable", 1)):
        resp = predict.Predict(predict_request(blank, label=label), timeout=30)
        assert resp.model_spec.version.value == want
        assert tf.make_ndarray(resp.outputs["probabilities"]).argmax() == want
    resp = predict.Predict(predict_request(blank), timeout=30)  # no version: the stable one
    assert resp.model_spec.version.value == 1


def test_grpc_float_val_inputs_and_other_signature(stubs):
    """A TensorProto with float_val (no tensor_content), and a two-input signature with output_filter."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    predict, _ = stubs
    req = predict_pb2.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = NAME, "pair"
    req.model_spec.version.value = 2
    for alias, vals in (("a", [1.0, 2.0]), ("b", [0.5, 0.5])):
        req.inputs[alias].CopyFrom(tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, float_val=vals,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1),
                                                                tensor_shape_pb2.TensorShapeProto.Dim(size=2)])))
    req.output_filter.append("diff")
    resp = predict.Predict(req, timeout=30)
    assert list(resp.outputs) == ["diff"]
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["diff"]), [[0.5, 1.5]])


def test_grpc_metadata_and_status(stubs):
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

    predict, models = stubs
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = NAME
    req.model_spec.version_label = "canary"
    req.metadata_field.append("signature_def")
    resp = predict.GetModelMetadata(req, timeout=30)
    assert resp.model_spec.version.value == 2
    sigs = get_model_metadata_pb2.SignatureDefMap()
    assert resp.metadata["signature_def"].Unpack(sigs)
    sd = sigs.signature_def["serving_default"]
    assert sd.method_name == "tensorflow/serving/predict"
    assert [d.size for d in sd.inputs["images"].tensor_shape.dim] == [-1, 784]
    assert "pair" in sigs.signature_def

    sreq = get_model_status_pb2.GetModelStatusRequest()
    sreq.model_spec.name = NAME
    st = models.GetModelStatus(sreq, timeout=30)
    assert sorted((s.version, s.state) for s in st.model_version_status) == [(1, 30), (2, 30)]  # AVAILABLE
    assert all(s.status.error_code == 0 and s.status.error_message == "" for s in st.model_version_status)
    sreq.model_spec.version_label = "canary"
    assert [s.version for s in models.GetModelStatus(sreq, timeout=30).model_version_status] == [2]


def grpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        call(*args, timeout=30)
    return ei.value


def test_grpc_errors_map_to_status_codes(server, stubs):
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

    predict, models = stubs
    blank = np.zeros((1, 784), np.float32)
    other = predict_request(blank)
    other.model_spec.name = "other"
    cases = [
        (other, grpc.StatusCode.NOT_FOUND, "not served here"),
        (predict_request(blank, version=7), grpc.StatusCode.NOT_FOUND, "Specific(mnist, 7)"),
        (predict_request(blank, label="nope"), grpc.StatusCode.NOT_FOUND, "label 'nope'"),
        (predict_request(np.zeros((1, 783), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "[1,783]"),
        (predict_request(np.full((1, 784), np.inf, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "Infinity"),
        (predict_request(blank, signature="nope"), grpc.StatusCode.INVALID_ARGUMENT, "signature"),
        (predict_request(np.array([["x"] * 784])), grpc.StatusCode.INVALID_ARGUMENT, "is DT_STRING, the model expects DT_FLOAT"),
        (predict_request(np.zeros((1, 784), np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "DT_DOUBLE"),
    ]
    for req, code, needle in cases:
        err = grpc_error(predict.Predict, req)
        assert err.code() == code and needle in err.details(), (code, err.details())
    req = predict_request(blank)
    del req.inputs["images"]
    err = grpc_error(predict.Predict, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "missing ['images']" in err.details()

    meta = get_model_metadata_pb2.GetModelMetadataRequest()
    meta.model_spec.name = NAME
    assert grpc_error(predict.GetModelMetadata, meta).code() == grpc.StatusCode.INVALID_ARGUMENT  # no field asked
    st = get_model_status_pb2.GetModelStatusRequest()
    st.model_spec.name = NAME
    st.model_spec.version.value = 9
    assert grpc_error(models.GetModelStatus, st).code() == grpc.StatusCode.NOT_FOUND
    from tensorflow_serving.apis import classification_pb2

    assert grpc_error(predict.Classify, classification_pb2.ClassificationRequest()).code() == \
        grpc.StatusCode.UNIMPLEMENTED
    still_answers(server)


def test_grpc_message_over_the_size_limit(server, stubs):
    predict, _ = stubs
    big = np.zeros((MAX_BODY // (784 * 4) + 1, 784), np.float32)  # just over --max-body-bytes
    err = grpc_error(predict.Predict, predict_request(big))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    resp = predict.Predict(predict_request(big[:10], version=2), timeout=30)  # the channel and server live on
    assert resp.model_spec.version.value == 2
    still_answers(server)


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_grpc_drift_metrics_and_test_traffic(server, stubs):
    predict, _ = stubs
    before, mbefore = drift(server), requests.get(f"{server.url}/metrics", timeout=10).text
    white, blank = np.ones((1, 784), np.float32), np.zeros((1, 784), np.float32)
    predict.Predict(predict_request(np.concatenate([white, blank, white]), version=2), timeout=30)
    predict.Predict(predict_request(white, version=2), timeout=30, metadata=[("x-mlflowctl-traffic", "test")])
    grpc_error(predict.Predict, predict_request(blank, version=7))
    after, mafter = drift(server), requests.get(f"{server.url}/metrics", timeout=10).text
    assert (after["scored"] - before["scored"], after["outliers"] - before["outliers"]) == (3, 2)
    assert (after["test"]["scored"] - before["test"]["scored"], after["test"]["outliers"] - before["test"]["outliers"]) == (1, 1)

    def delta(name, **lab):
        return metric(mafter, name, **lab) - metric(mbefore, name, **lab)

    assert delta("mlflowctl_serving_requests_total", endpoint="grpc_predict", version="2", code="OK") == 2
    assert delta("mlflowctl_serving_requests_total", endpoint="grpc_predict", code="NOT_FOUND") == 1
    assert delta("mlflowctl_serving_drift_scored_total", version="2") == 3
    assert delta("mlflowctl_serving_predictions_total", version="2") == 4


def test_grpc_port_in_use_is_one_line(registry, tmp_path):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        routing = tmp_path / "routing.json"
        fx.write_routing(routing, [1])
        srv = fx.ServerProcess(NAME, registry, routing, tmp_path / "log", ["--grpc-port", str(port)])
        code = srv.proc.wait(timeout=60)
        srv.stop()
    lines = [ln for ln in (tmp_path / "log").read_text().splitlines() if ln.strip()]
    assert code == 1 and lines[-1] == (f"serve: gRPC port {port} on 127.0.0.1 is already in use (stop what listens "
                                       f"there, or pick another --grpc-port, or 0 to turn gRPC off)")


def test_grpc_off(registry, tmp_path_factory):
    srv = start(registry, tmp_path_factory, "nogrpc", ["--grpc-port", "0"])
    try:
        assert "gRPC" not in srv.log.read_text()
        channel = grpc.insecure_channel(srv.grpc_target)
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=1)
        channel.close()
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- dynamic batching
@pytest.fixture(scope="module")
def batching_server(registry, tmp_path_factory):
    # version 1 is opted out in the routing file: per-version override of the server's --batching on
    srv = start(registry, tmp_path_factory, "batching", ["--batching", "on", "--batch-window-us", "3000"],
                routing_extra={"batching": {"1": False}})
    yield srv
    srv.stop()


def test_batching_gives_the_batch_1_answers_and_drift_adds_up(server, batching_server):
    x = images(64, seed=42)
    want = [rest_predict(server, x[i:i + 1]) for i in range(64)]  # batch-1 answers, unbatched server
    before = drift(batching_server)
    barrier_session = [requests.Session() for _ in range(64)]
    start_together = threading.Barrier(64)

    def one(i: int) -> np.ndarray:
        with contextlib.suppress(threading.BrokenBarrierError):
            start_together.wait(timeout=10)  # all 64 in flight at once, so the batcher has something to merge
        r = barrier_session[i].post(f"{batching_server.url}/v1/models/{NAME}/versions/2:predict",
                                    data=json.dumps({"instances": x[i:i + 1].tolist()}), timeout=60)
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["predictions"], dtype=np.float32)

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64)))
    for i in range(64):
        np.testing.assert_array_equal(got[i], want[i], err_msg=f"client {i}")
    after = drift(batching_server)
    expected_outliers = int(np.count_nonzero(np.mean(x.astype(np.float64) ** 2, axis=1) > fx.CONCEPT_THRESHOLD))
    assert 0 < expected_outliers < 64
    assert after["scored"] - before["scored"] == 64
    assert after["outliers"] - before["outliers"] == expected_outliers
    stats = after["versions"]["2"]["batching"]
    assert stats["requests"] - (before["versions"]["2"]["batching"]["requests"]) == 64
    assert after["versions"]["1"]["batching"] is None  # opted out in the routing file
    for _ in range(3):  # a loaded machine may serialise one round's clients: give the batcher up to 3 more rounds
        if stats["largest_batch"] > 1:
            break
        start_together.reset()
        with ThreadPoolExecutor(64) as pool:
            assert all(np.array_equal(g, w) for g, w in zip(pool.map(one, range(64)), want))
        stats = drift(batching_server)["versions"]["2"]["batching"]
    for session in barrier_session:
        session.close()
    assert stats["largest_batch"] > 1 and stats["batches"] < stats["requests"]  # requests really shared calls


def test_batching_mixed_requests_each_get_their_own_answer(server, batching_server):
    """Concurrent requests of different sizes, bad shapes, test traffic and gRPC, through one batcher."""
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    import tensorflow as tf

    x = images(30, seed=7)
    sizes = [1, 3, 5, 2, 1, 4, 6, 8]
    starts = np.cumsum([0] + sizes)
    channel = grpc.insecure_channel(batching_server.grpc_target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    before = drift(batching_server)

    def job(k: int):
        if k < len(sizes):
            rows = x[starts[k]:starts[k + 1]]
            test = k == 2
            r = requests.post(f"{batching_server.url}/v1/models/{NAME}/versions/2:predict",
                              data=json.dumps({"instances": rows.tolist()}), timeout=60,
                              headers={"X-Mlflowctl-Traffic": "test"} if test else None)
            return ("ok", rows, test, r.status_code, r.json())
        if k < len(sizes) + 3:  # wrong row length: a 400 for that request only
            r = requests.post(f"{batching_server.url}/v1/models/{NAME}/versions/2:predict",
                              data=json.dumps({"instances": [[0.5] * 700]}), timeout=60)
            return ("bad", None, False, r.status_code, r.json())
        rows = x[-2:]
        resp = stub.Predict(predict_request(rows, version=2), timeout=60)
        return ("grpc", rows, False, 200, tf.make_ndarray(resp.outputs["probabilities"]))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(job, range(len(sizes) + 5)))
    channel.close()
    live_rows, test_rows = [], []
    for kind, rows, test, status, body in results:
        if kind == "bad":
            assert status == 400 and "[1,700]" in body["error"], body
            continue
        assert status == 200, body
        got = np.asarray(body["predictions"] if kind == "ok" else body, dtype=np.float32)
        np.testing.assert_array_equal(got, np.concatenate([rest_predict(server, rows[i:i + 1])
                                                           for i in range(len(rows))]))
        (test_rows if test else live_rows).append(rows)
    after = drift(batching_server)

    def outliers(parts):
        allr = np.concatenate(parts)
        return len(allr), int(np.count_nonzero(np.mean(allr.astype(np.float64) ** 2, axis=1) > fx.CONCEPT_THRESHOLD))

    assert (after["scored"] - before["scored"], after["outliers"] - before["outliers"]) == outliers(live_rows)
    assert (after["test"]["scored"] - before["test"]["scored"],
            after["test"]["outliers"] - before["test"]["outliers"]) == outliers(test_rows)


def test_batching_queue_full_is_503_with_retry_after(registry, tmp_path_factory):
    srv = start(registry, tmp_path_factory, "tinyqueue",
                ["--batching", "on", "--batch-window-us", "400000", "--batch-idle-rounds", "0", "--batch-queue", "2",
                 "--grpc-port", "0"])
    import socket

    # idle keep-alive clients: the batch cannot close on "one request per open connection" before the window
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(10)]
    try:
        body = json.dumps({"instances": [[0.0] * 784]})

        def one(_):
            r = requests.post(f"{srv.url}/v1/models/{NAME}/versions/2:predict", data=body, timeout=60)
            return r.status_code, r.headers.get("retry-after"), r.json()

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(6)))
        codes = sorted(c for c, _, _ in results)
        assert codes.count(200) >= 2 and 503 in codes, codes
        for code, retry, payload in results:
            if code == 503:
                assert retry == "1" and "queue is full" in payload["error"]
            else:
                assert code == 200 and np.argmax(payload["predictions"][0]) == 2
        assert requests.post(f"{srv.url}/v1/models/{NAME}/versions/2:predict", data=body, timeout=60).status_code == 200
    finally:
        for sock in idle:
            sock.close()
        srv.stop()


def test_batching_flag_shows_in_the_start_line(batching_server):
    text = batching_server.log.read_text()
    assert re.search(r"gRPC at 127\.0\.0\.1:\d+; batching on", text), text[-500:]


# ----------------------------------------------------------------------------- the integration test over gRPC
def run_integration(tmp_path: Path, endpoint: dict, **env) -> tuple:
    import os
    import subprocess

    data = tmp_path / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(5)
    np.savez(data / "t10k.npz", x=rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 60, dtype=np.uint8))
    (tmp_path / "ep").mkdir()
    (tmp_path / "ep" / "endpoint.json").write_text(json.dumps(endpoint))
    full = {k: v for k, v in os.environ.items() if k not in ("TRANSPORT", "SAMPLES", "OUTPUT_DIR")}
    full.update(MNIST_DATA_DIR=str(data), ENDPOINT_DIR=str(tmp_path / "ep"), OUTPUT_DIR=str(tmp_path / "out"),
                SAMPLES="40", BATCH_SIZE="16", MIN_ACCURACY="0", TIMEOUT="20", **env)
    proc = subprocess.run([sys.executable, "integration_test.py"], cwd=fx.SERVE.parent, env=full,
                          capture_output=True, text=True, timeout=180)
    report = tmp_path / "out" / "report.json"
    return proc, json.loads(report.read_text()) if report.is_file() else None


def test_integration_test_over_grpc(server, tmp_path):
    endpoint = {"url": server.url, "predict_url": f"{server.url}/v1/models/{NAME}/versions/2:predict",
                "model_name": NAME, "version": 2, "protocol": "tfserving", "grpc": server.grpc_target}
    before = drift(server)
    proc, report = run_integration(tmp_path, endpoint, TRANSPORT="grpc")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["transport"] == "grpc" and report["requests"] == 3 + 3 + 1  # 40, 40 and 10 images by 16
    assert f"gRPC {server.grpc_target}" in proc.stdout
    after = drift(server)
    # every image went through the gRPC Predict of version 2, tagged as test traffic
    assert after["test"]["scored"] - before["test"]["scored"] == 90
    assert (after["scored"], after["outliers"]) == (before["scored"], before["outliers"])
    assert report["ood_counts"]["random"] == {"scored": 10, "outliers": 10}  # uniform noise: mean(x^2) ~ 1/3
    assert "gRPC" in (tmp_path / "out" / "report.md").read_text()


def test_integration_test_grpc_failures_are_one_line(server, tmp_path):
    base = {"url": server.url, "predict_url": f"{server.url}/v1/models/{NAME}:predict", "model_name": NAME,
            "version": 2, "protocol": "tfserving"}
    proc, _ = run_integration(tmp_path / "a", base, TRANSPORT="grpc")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 3 and len(lines) == 1 and "names no gRPC address" in lines[0], proc.stderr
    proc, _ = run_integration(tmp_path / "b", {**base, "grpc": f"127.0.0.1:{fx.free_port()}"}, TRANSPORT="grpc")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 5 and len(lines) == 1 and "cannot connect" in lines[0], proc.stderr
    proc, _ = run_integration(tmp_path / "c", {**base, "version": 7, "grpc": server.grpc_target}, TRANSPORT="grpc")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 5 and len(lines) == 1 and "NOT_FOUND" in lines[0], proc.stderr


def test_batching_one_client_runs_at_once(server, batching_server):
    """Sequential requests have no one to batch with: after the first few they run at once (no waiting)."""
    x = images(40, seed=11)
    before = drift(batching_server)["versions"]["2"]["batching"]
    with requests.Session() as s:
        for i in range(40):
            r = s.post(f"{batching_server.url}/v1/models/{NAME}/versions/2:predict",
                       data=json.dumps({"instances": x[i:i + 1].tolist()}), timeout=30)
            assert r.status_code == 200
            np.testing.assert_array_equal(np.asarray(r.json()["predictions"], np.float32), rest_predict(server, x[i:i + 1]))
    after = drift(batching_server)["versions"]["2"]["batching"]
    assert after["requests"] - before["requests"] == 40
    assert after["run_at_once"] - before["run_at_once"] >= 30, (before, after)
