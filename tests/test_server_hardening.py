"""The model server's hardening (issue 11, "Model server"): each test reproduces one attack of the
adversarial review against a real ``image/serve.py`` on 127.0.0.1 and checks the fixed behaviour.

Limits (header size, idle connections, concurrency) and the fuzz suite are in test_server_fuzz.py.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import time
from pathlib import Path

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
WEIRD_VERSIONS = ["²", "١", "٣", "9" * 5000, "1" * 19, "01", "-1", "+1", " 1", "1e3", "0x1", "1_0"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """Versions 1 and 2 as in serving_fixtures; 3..6 are version 2 with a concept model whose
    threshold.json is missing (3), negative (4), outside its own training histogram (5), not a
    number (6)."""
    base = fx.build_registry(tmp_path_factory.mktemp("store") / "models" / NAME)
    for n in (3, 4, 5, 6):
        shutil.copytree(base / "2", base / str(n))
    (base / "3" / "concept" / "threshold.json").unlink()
    for n, value in ((4, -0.5), (5, 1e300), (6, "high")):
        th = base / str(n) / "concept" / "threshold.json"
        info = json.loads(th.read_text())
        info["threshold"] = value
        th.write_text(json.dumps(info))
    return base


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    routing = work / "routing.json"
    fx.write_routing(routing, [1, 2, 3, 4, 5, 6], {"stable": 1, "canary": 2}, 0.0)
    with fx.running_server(NAME, registry, routing, work / "server.log") as srv:
        srv.session = requests.Session()
        srv.log_path = work / "server.log"
        yield srv


def drift(srv, version: int = 2) -> dict:
    r = get(srv, f"/monitor/v1/models/{NAME}/drift?version={version}")
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- version segments
def test_version_segments_are_bounded_ascii_digits(server):
    """``²`` (isdigit, not int), ``١`` (int('١') == 1) and 5000 digits (int() refuses) were 500s with the
    exception text, or aliased version 1; now: a clean 404/400 naming the segment, never 500."""
    for seg in WEIRD_VERSIONS:
        if seg == "01":
            continue  # leading zeros: TF Serving's int64 parse accepts them (version 1)
        q = requests.utils.quote(seg, safe="")
        for method, path in (("GET", f"/v1/models/{NAME}/versions/{q}"),
                             ("GET", f"/v1/models/{NAME}/versions/{q}/metadata"),
                             ("POST", f"/v1/models/{NAME}/versions/{q}:predict"),
                             ("GET", f"/v2/models/{NAME}/versions/{q}"),
                             ("GET", f"/v2/models/{NAME}/versions/{q}/ready"),
                             ("POST", f"/v2/models/{NAME}/versions/{q}/infer")):
            body = json.dumps({"instances": [BLANK]} if "v1" in path else
                              {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": BLANK}]})
            r = server.session.request(method, server.url + path, data=body if method == "POST" else None, timeout=10)
            assert r.status_code == 404, (seg[:20], path[:80], r.status_code, r.text[:300])
            assert "Traceback" not in r.text and "ValueError" not in r.text
        r = get(server, f"/monitor/v1/models/{NAME}/drift?version={q}")
        assert_error(r, 400, "version")
    # leading zeros still name the version (as before)
    assert get(server, f"/v1/models/{NAME}/versions/01").json()["model_version_status"][0]["version"] == "1"


def test_scan_ignores_non_ascii_and_huge_version_folders(registry, tmp_path):
    """Without a routing file the highest version folder is served: folders named ``²``, ``١`` or with
    5000 digits crashed the start (or aliased a version); now they are ignored."""
    base = tmp_path / "models" / NAME
    base.mkdir(parents=True)
    shutil.copytree(registry / "1", base / "1")
    for seg in ("²", "١", "٣", "9" * 200, "1" * 19, "01"):
        shutil.copytree(registry / "2", base / seg)  # a classifier that answers class 2 when blank
    with fx.running_server(NAME, base, tmp_path / "no-routing.json", tmp_path / "server.log") as srv:
        st = requests.get(f"{srv.url}/v1/models/{NAME}", timeout=10).json()["model_version_status"]
        assert [s["version"] for s in st] == ["1"]
        r = requests.post(f"{srv.url}/v1/models/{NAME}:predict", json={"instances": [BLANK]}, timeout=10)
        assert r.status_code == 200 and max(range(10), key=r.json()["predictions"][0].__getitem__) == 1


def test_registry_numbers_ignore_non_ascii_and_huge_folders(tmp_path):
    """The same parse in mlflowctl/model_registry.py (the registry lists versions by folder name)."""
    from contract_fixtures import local_store
    from mlflowctl.model_registry import ModelRegistry

    store = local_store(tmp_path)
    for seg in ("1", "2", "²", "١", "9" * 200, "1" * 19, "01", "x"):
        (tmp_path / "store" / "models" / NAME / seg).mkdir(parents=True)
    assert ModelRegistry(store, NAME).numbers() == [1, 2]


# ----------------------------------------------------------------------------- concept model without a usable threshold
@pytest.mark.parametrize("number,why", [(3, "threshold.json"), (4, "threshold"), (5, "threshold"), (6, "threshold")])
def test_concept_without_usable_threshold_is_refused(server, number, why):
    """A concept model whose threshold.json is missing or absurd was served with drift scoring silently
    off (and the monitor passed). Now the version is refused: state END, FAILED_PRECONDITION, a message
    naming the file; requests for it are 404 with that state; the other versions serve on."""
    st = get(server, f"/v1/models/{NAME}/versions/{number}").json()["model_version_status"][0]
    assert st["state"] == "END", st
    assert st["status"]["error_code"] == "FAILED_PRECONDITION", st
    assert why in st["status"]["error_message"] and "drift" in st["status"]["error_message"], st
    r = post(server, f"/v1/models/{NAME}/versions/{number}:predict", {"instances": [BLANK]})
    assert_error(r, 404, "state END")
    ok = post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [BLANK]})
    assert ok.status_code == 200
    assert drift(server, 2)["drift_scoring"] is True


# ----------------------------------------------------------------------------- 5xx bodies
def test_internal_error_body_has_no_exception_text():
    """A bug inside a handler answers 500 with a fixed text: no exception type, message or path."""
    image = Path(fx.SERVE).parent
    sys.path.insert(0, str(image))
    try:
        import serve_app
        import serve_errors
        from serve_metrics import Metrics
    finally:
        sys.path.remove(str(image))

    class BrokenModel:
        name = NAME

        def select(self, *a):
            raise RuntimeError("secret at /etc/shadow: token=hunter2")

    app = serve_app.App(BrokenModel(), Metrics(NAME), 1 << 20)
    sent: list[dict] = []

    async def run() -> None:
        async def receive():
            return {"type": "http.request", "body": json.dumps({"instances": [BLANK]}).encode(), "more_body": False}

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "method": "POST", "path": f"/v1/models/{NAME}:predict", "query_string": b"",
                 "headers": [(b"host", b"127.0.0.1:8501"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 5555)}
        await app(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body == {"error": serve_errors.INTERNAL_ERROR}
    assert "hunter2" not in sent[1]["body"].decode() and "RuntimeError" not in sent[1]["body"].decode()


# ----------------------------------------------------------------------------- Host and Origin
def test_cross_origin_text_plain_post_is_refused(server):
    """A web page's "simple" cross-origin POST (text/plain, no preflight) was scored as live traffic."""
    before = drift(server)
    body = json.dumps({"instances": [WHITE]})
    for origin in ("https://evil.example", "null", "http://localhost:3000"):
        r = server.session.post(f"{server.url}/v1/models/{NAME}/versions/2:predict", data=body, timeout=10,
                                headers={"Content-Type": "text/plain", "Origin": origin})
        assert_error(r, 403, "origin")
        r = server.session.post(f"{server.url}/v2/models/{NAME}/versions/2/infer", timeout=10,
                                data=json.dumps({"inputs": [{"name": "images", "shape": [1, 784],
                                                             "datatype": "FP32", "data": WHITE}]}),
                                headers={"Content-Type": "text/plain", "Origin": origin})
        assert_error(r, 403, "origin")
        assert_error(post(server, "/admin/reload", b"", headers={"Origin": origin}), 403, "origin")
    after = drift(server)
    assert (after["scored"], after["test"]["scored"]) == (before["scored"], before["test"]["scored"])
    # no Origin (curl, requests, the monitor, the integration test): served as before
    assert post(server, f"/v1/models/{NAME}/versions/2:predict", body,
                headers={"Content-Type": "text/plain"}).status_code == 200


def test_dns_rebinding_host_is_refused(server):
    """``Host: attacker.example`` (a name rebound to 127.0.0.1) is refused on every path; the hosts the
    server is really reached by -- loopback names, IP literals (a pod IP, the API server's proxy, a
    published docker port), Kubernetes service names -- are accepted."""
    port = server.port
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.attacker.example"):
        for method, path in (("POST", f"/v1/models/{NAME}:predict"), ("GET", f"/v1/models/{NAME}"),
                             ("GET", f"/monitor/v1/models/{NAME}/drift"), ("POST", "/admin/reload")):
            r = server.session.request(method, server.url + path, timeout=10, headers={"Host": host},
                                       data=json.dumps({"instances": [BLANK]}) if method == "POST" else None)
            assert_error(r, 403, "host")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "10.244.0.17:8501",
                 "mnist-serving", "mnist-serving.default.svc", "mnist-serving.default.svc.cluster.local:8501",
                 "app.localhost"):
        r = server.session.post(f"{server.url}/v1/models/{NAME}:predict", timeout=10, headers={"Host": host},
                                data=json.dumps({"instances": [BLANK]}))
        assert r.status_code == 200, (host, r.text)


def test_allowed_hosts_and_origins_are_configurable(registry, tmp_path):
    routing = tmp_path / "routing.json"
    fx.write_routing(routing, [1])
    with fx.running_server(NAME, registry, routing, tmp_path / "server.log",
                           extra=["--allowed-hosts", "serve.example.com,.models.example.org",
                                  "--allowed-origins", "https://ui.example.com"]) as srv:
        url = f"{srv.url}/v1/models/{NAME}:predict"
        body = json.dumps({"instances": [BLANK]})
        for host in ("serve.example.com", "serve.example.com:443", "a.models.example.org", "127.0.0.1"):
            assert requests.post(url, data=body, headers={"Host": host}, timeout=10).status_code == 200, host
        r = requests.post(url, data=body, headers={"Host": "other.example.com"}, timeout=10)
        assert r.status_code == 403
        assert requests.post(url, data=body, headers={"Origin": "https://ui.example.com"}, timeout=10).status_code == 200
        assert requests.post(url, data=body, headers={"Origin": "https://evil.example"}, timeout=10).status_code == 403


# ----------------------------------------------------------------------------- traffic class
def test_traffic_class_is_per_request_when_interleaved(server):
    """A test-marked request whose body arrives slowly, interleaved with live requests: each is counted
    in its own class (an app-wide attribute would swap them)."""
    before = drift(server)
    test_body = json.dumps({"instances": [WHITE, WHITE, WHITE]}).encode()
    head = (f"POST /v1/models/{NAME}/versions/2:predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Type: application/json\r\nX-Mlflowctl-Traffic: test\r\n"
            f"Content-Length: {len(test_body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + test_body[:100])
        time.sleep(0.3)  # the test request is in flight (headers read, body pending) ...
        for _ in range(4):  # ... while live requests come and go
            assert post(server, f"/v1/models/{NAME}/versions/2:predict", {"instances": [BLANK]}).status_code == 200
        s.sendall(test_body[100:])
        reply = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    after = drift(server)
    assert after["scored"] - before["scored"] == 4
    assert after["outliers"] - before["outliers"] == 0
    assert after["test"]["scored"] - before["test"]["scored"] == 3
    assert after["test"]["outliers"] - before["test"]["outliers"] == 3
