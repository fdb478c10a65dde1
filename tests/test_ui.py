"""``mlflowctl ui`` without a browser: the JSON and HTML builders, the SVG, the HTTP rules, the CLI.

The states are real: tiny stage scripts run through the real Pipeline, or a
store filled through the Store API (tests/ui_fixtures.py). The server is the
real one on 127.0.0.1 (port 0); the browser tests are in test_ui_browser.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import VENV_BIN, doit_env, make_project
from mlflowctl import ui, ui_svg
from mlflowctl.pipeline import Pipeline
from mlflowctl.project import Project
from test_pipeline import CONSUME, STAGES, root  # noqa: F401 - the fixture: a folder with tiny stage scripts
from ui_fixtures import Ui, make_state

MLFLOWCTL = str(VENV_BIN / "mlflowctl")


# ---------------------------------------------------------------- SVG builders
PIPELINE_EDGES = [("data", "train_model"), ("data", "train_concept"), ("train_model", "register"),
                  ("train_concept", "register"), ("register", "deploy"), ("data", "integration_test"),
                  ("deploy", "integration_test"), ("integration_test", "promote"), ("deploy", "promote"),
                  ("promote", "monitor")]


def test_layers_follow_the_longest_path():
    names = ["data", "train_model", "train_concept", "register", "deploy", "integration_test", "promote", "monitor"]
    assert ui_svg.layers(names, PIPELINE_EDGES) == {"data": 0, "train_model": 1, "train_concept": 1, "register": 2,
                                                    "deploy": 3, "integration_test": 4, "promote": 5, "monitor": 6}
    assert ui_svg.layers(["a", "b"], [("a", "b"), ("b", "a")])  # a cycle ends, whatever the columns


def test_pipeline_graph_has_a_box_per_stage_and_an_arrow_per_edge():
    stages = [{"name": n, "state": "fresh" if n != "deploy" else "stale", "label": "x"}
              for n in ("data", "train_model", "train_concept", "register", "deploy", "integration_test",
                        "promote", "monitor")]
    svg = ui_svg.pipeline_graph(stages, PIPELINE_EDGES)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert re.findall(r'data-stage="([^"]+)" data-state="([^"]+)"', svg) == [(s["name"], s["state"]) for s in stages]
    assert len(re.findall(r'data-edge="', svg)) == len(PIPELINE_EDGES)
    # names are escaped
    evil = ui_svg.pipeline_graph([{"name": "<script>", "state": "fresh"}], [])
    assert "<script>" not in evil and "&lt;script&gt;" in evil


def test_drift_chart_points_threshold_and_empty_state():
    pts = [{"time": 1000.0 + 600 * i, "rate": r, "version": 1, "source": "stage"} for i, r in enumerate((0.1, 0.7))]
    svg = ui_svg.drift_chart(pts, 0.5, [{"time": 2500.0, "rate": 0.2}])
    assert svg.count('class="report-point') == 2 and svg.count('class="report-point over') == 1
    assert 'class="threshold"' in svg and "max 0.5" in svg and 'class="live-point"' in svg
    # the threshold is drawn at the height of 0.5 on the same scale as the points
    y = lambda cls: [float(v) for v in re.findall(rf'<circle class="{cls}"[^>]* cy="([\d.]+)"', svg)]
    thr = float(re.search(r'<line class="threshold"[^>]* y1="([\d.]+)"', svg).group(1))
    low, high = y("report-point")[0], y("report-point over")[0]
    assert high < thr < low  # SVG y grows downwards: 0.7 above the line, 0.1 below
    empty = ui_svg.drift_chart([], 0.5)
    assert "no drift figures yet" in empty


def test_histogram_densities_and_threshold():
    edges = [0.0, 0.1, 0.2, 0.3]
    svg = ui_svg.histogram(edges, [10, 30, 10], [0, 5, 5], 0.25)
    assert 'class="train-area"' in svg and 'class="live-area"' in svg and "threshold 0.25" in svg
    assert "live traffic: none yet" in ui_svg.histogram(edges, [10, 30, 10], [0, 0, 0], 0.25)
    assert "no training histogram" in ui_svg.histogram(None, None, None, None)
    assert ui_svg.nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_curl_command_and_input_width():
    meta = {"metadata": {"signature_def": {"signature_def": {"serving_default": {"inputs": {"images": {
        "tensor_shape": {"dim": [{"size": "-1"}, {"size": "28"}, {"size": "28"}]}}}}}}}}
    assert ui.input_width(meta) == 784
    assert ui.input_width({"nonsense": 1}) is None
    cmd = ui.curl_command("http://127.0.0.1:8501/v1/models/m:predict", 3)
    assert cmd.endswith("-d @- http://127.0.0.1:8501/v1/models/m:predict") and "[[0.0] * 3]" in cmd


# ---------------------------------------------------------------- state from real runs (tiny stages)
def tiny_loader(root: Path, overrides: dict) -> Pipeline:
    return Pipeline(Project(root, overrides, stages=STAGES), STAGES)


def by_name(state: dict) -> dict:
    return {s["name"]: s for s in state["pipeline"]["stages"]}


def test_nothing_has_run_yet(root):
    state = ui.Dashboard(root, {}, loader=tiny_loader).state()
    assert state["nothing_has_run"] is True
    stages = by_name(state)
    assert stages["produce"]["state"] == "stale" and stages["produce"]["reasons"] == ["never run with this store"]
    assert stages["consume"]["reasons"] == ["input produce will change first"]
    html = ui.Renderer().page(state)
    assert "nothing has run; run `doit`" in html and 'id="no-versions"' in html and 'id="no-reports"' in html


def test_stage_states_follow_real_runs_and_a_changed_param_shows_its_reason(root, monkeypatch):
    pipeline = tiny_loader(root, {})
    pipeline.run("produce")
    pipeline.run("consume")
    dash = ui.Dashboard(root, {}, loader=tiny_loader)
    stages = by_name(dash.state())
    assert stages["produce"]["state"] == stages["consume"]["state"] == "fresh"
    assert stages["other"]["state"] == "stale"
    assert stages["produce"]["key"] == pipeline.resolve(pipeline.stages["produce"]).key
    assert isinstance(stages["produce"]["duration"], float) and stages["produce"]["runs"] == 1
    changed = by_name(ui.Dashboard(root, {"train_model.learning_rate": "0.02"}, loader=tiny_loader).state())
    assert changed["produce"]["state"] == "stale"
    assert changed["produce"]["reasons"] == ["param learning_rate changed: 0.01 -> 0.02"]
    assert changed["consume"]["reasons"] == ["input produce will change first"]
    # a failed run of the current key shows as failed, with the error
    monkeypatch.setenv("FAIL_CONSUME", "1")
    (root / "image" / "consume.py").write_text(CONSUME + "\n# changed\n")
    with pytest.raises(Exception):
        tiny_loader(root, {}).run("consume")
    time.sleep(ui.STATE_TTL)
    failed = by_name(dash.state())["consume"]
    assert failed["state"] == "failed" and "consumer exploded" in failed["error"]
    assert failed["reasons"] == ["code consume.py changed"]
    # the stage's log page serves the failed run's log
    source, text = dash.stage_log("consume")
    assert "consumer exploded" in text and source.endswith("consume.log")


def test_a_config_edit_is_picked_up_and_a_broken_one_is_shown(root):
    dash = ui.Dashboard(root, {}, loader=tiny_loader)
    assert by_name(dash.state())["produce"]["reasons"] == ["never run with this store"]
    tiny_loader(root, {}).run("produce")
    config = root / "mlflowctl.yaml"
    config.write_text("train_model:\n  learning_rate: 0.05\n")
    time.sleep(ui.STATE_TTL)
    assert by_name(dash.state())["produce"]["reasons"] == ["param learning_rate changed: 0.01 -> 0.05"]
    config.write_text("train_model: [1, 2\n")
    time.sleep(ui.STATE_TTL)
    state = dash.state()
    assert "not valid YAML" in state["config_error"] and "showing the last valid configuration" in state["config_error"]
    assert len(state["pipeline"]["stages"]) == 3
    assert "not valid YAML" in ui.Renderer().page(state)
    config.write_text("train_model:\n  learning_rate: 0.01\n")
    time.sleep(ui.STATE_TTL)
    state = dash.state()
    assert state["config_error"] is None and by_name(state)["produce"]["state"] == "fresh"


def test_a_running_stage_and_an_interrupted_one(root):
    pipeline = tiny_loader(root, {})
    path = pipeline.run_state_path("produce")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = pipeline.resolve(pipeline.stages["produce"]).key
    path.write_text(json.dumps({"state": "running", "pid": os.getpid(), "key": key, "started_at": time.time() - 5}))
    dash = ui.Dashboard(root, {}, loader=tiny_loader)
    running = by_name(dash.state())["produce"]
    assert running["state"] == "running" and running["duration"] >= 5 and running["label"] == "running"
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"state": "running", "pid": dead.pid, "key": key, "started_at": time.time()}))
    time.sleep(ui.STATE_TTL)
    gone = by_name(dash.state())["produce"]
    assert gone["state"] == "stale" and "its last run was interrupted" in gone["reasons"]


def test_run_state_records_written_by_the_pipeline(root, monkeypatch):
    pipeline = tiny_loader(root, {})
    pipeline.run("produce")
    record = json.loads(pipeline.run_state_path("produce").read_text())
    assert record["state"] == "succeeded" and record["pid"] == os.getpid() and record["duration"] >= 0
    assert record["key"] == pipeline.resolve(pipeline.stages["produce"]).key
    monkeypatch.setenv("FAIL_CONSUME", "1")
    with pytest.raises(Exception):
        pipeline.run("consume")
    failed = json.loads(pipeline.run_state_path("consume").read_text())
    assert failed["state"] == "failed" and "exit code 3" in failed["error"]


# ---------------------------------------------------------------- state from a synthesized store
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("ui") / "proj")
    made = make_state(root, versions=4, runs=24, reports=3)
    assert made["stable"] == 4
    return root


def test_versions_and_drift_from_the_store(synthetic):
    state = ui.Dashboard(synthetic, {}).state()
    rows = state["versions"]["rows"]
    assert [r["number"] for r in rows] == [4, 3, 2, 1]
    assert [r["state"] for r in rows] == ["promoted", "rejected", "superseded", "superseded"]
    assert rows[0]["labels"] == ["stable"] and rows[1]["passed"] is False and "below the floor" in rows[1]["reason"]
    assert rows[0]["floor"] == 0.6 and rows[0]["ood"]["noisy"] == 0.4
    assert rows[0]["endpoint"] is None  # no server runs: no curl to offer
    stages = by_name(state)
    assert len(stages) == 8 and stages["data"]["state"] == "fresh"
    assert stages["deploy"]["state"] == "stale"  # nothing serves the version: its result no longer holds
    assert stages["data"]["runs"] == 1 + 3  # 24 old runs over 8 stages, and the current one
    drift = state["drift"]
    assert drift["max_rate"] == 0.5 and len(drift["points"]) == 3 + 3 + 1  # old runs, reports, current
    assert drift["chosen"] == 4 and drift["histogram"]["edges"] and drift["histogram"]["live"] is None
    assert drift["histogram"]["live_note"] == "the model server is not running"
    html = ui.Renderer().page(state)
    assert html.count('class="version-row') == 4 and "nothing has run" not in html
    assert html.count('class="report-point') == 7


def test_a_corrupted_verdict_shows_in_its_row_and_the_page_still_loads(synthetic):
    status = synthetic / ".mlflowctl" / "store" / "models" / "mnist" / "status" / "2.json"
    good = status.read_text()
    try:
        status.write_text('{"state": "promo')
        state = ui.Dashboard(synthetic, {}).state()
        rows = {r["number"]: r for r in state["versions"]["rows"]}
        assert rows[2]["errors"] == ["models/mnist/status/2.json: not valid JSON "
                                     "(Unterminated string starting at, line 1 column 11)"]
        assert rows[1]["state"] == "superseded" and not rows[1]["errors"]
        html = ui.Renderer().page(state)
        assert "models/mnist/status/2.json: not valid JSON" in html and html.count('class="version-row') == 4
    finally:
        status.write_text(good)


def test_a_corrupted_monitor_report_shows_in_its_row(synthetic):
    folder = synthetic / ".mlflowctl" / "monitor" / "20260101-000000"
    folder.mkdir(parents=True)
    try:
        (folder / "drift.json").write_text("not json")
        state = ui.Dashboard(synthetic, {}).state()
        bad = [r for r in state["drift"]["reports"] if r.get("error")]
        assert len(bad) == 1 and "drift.json: not valid JSON" in bad[0]["error"]
        assert "drift.json: not valid JSON" in ui.Renderer().page(state)
    finally:
        (folder / "drift.json").unlink()
        folder.rmdir()


# ---------------------------------------------------------------- the HTTP server
@pytest.fixture(scope="module")
def server(synthetic):
    srv = ui.UiServer(0, ui.Dashboard(synthetic, {}), ui.Renderer())
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_page_and_api(server):
    r = requests.get(server.url, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert '<script src="/static/ui.js"' in r.text and "http" not in re.sub(r"http://127\.0\.0\.1[^\"'<> ]*", "",
                                                                           r.text.split("<body")[0])
    state = requests.get(server.url + "api/state", timeout=10).json()
    assert state["project"] == "mnist" and len(state["pipeline"]["stages"]) == 8
    same = requests.get(server.url + f"api/sections?since={state['digest']}", timeout=10).json()
    assert same == {"digest": state["digest"], "changed": False}
    fresh = requests.get(server.url + "api/sections?since=x&version=2", timeout=10).json()
    assert fresh["changed"] and set(fresh["sections"]) == {"header", "pipeline", "versions", "drift"}
    assert 'data-version="2"' in fresh["sections"]["drift"]
    assert requests.get(server.url + "static/ui.css", timeout=10).headers["Content-Type"].startswith("text/css")


def test_logs_and_artifacts_come_through_the_store(server, synthetic):
    r = requests.get(server.url + "log/data", timeout=10)
    assert r.status_code == 200 and "log of data with key" in r.text and "results/data/" in r.text
    assert requests.get(server.url + "log/nope", timeout=10).status_code == 404
    key = by_name(requests.get(server.url + "api/state", timeout=10).json())["monitor"]["key"]
    r = requests.get(server.url + f"artifact/results/monitor/{key}/drift.json", timeout=10)
    assert r.status_code == 200 and r.json()["rate"] == 0.3
    for bad in ("artifact/results/monitor/../../../mlflowctl.yaml", "artifact/models/mnist/labels.json",
                "artifact/results/monitor/x/../../../../etc/passwd", "on-demand/../../mlflowctl.yaml",
                "static/../ui.py"):
        assert requests.get(server.url + bad, timeout=10).status_code == 404, bad


def test_host_header_and_read_only(server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert requests.get(server.url, headers={"Host": host}, timeout=10).status_code == 200, host
    for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}"):
        r = requests.get(server.url, headers={"Host": host}, timeout=10)
        assert r.status_code == 403 and "forbidden" in r.text, host
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = requests.request(method, server.url + "api/state", timeout=10)
        assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD", method
    assert requests.head(server.url, timeout=10).status_code == 200


# ---------------------------------------------------------------- the command
def test_port_in_use_is_one_line_and_exit_5(project_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "ui", "--port", str(port)], env=doit_env(),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"mlflowctl: ui: port {port} on 127.0.0.1 is already in use "
        "(pick another with mlflowctl ui --port N (0: any free port))"]
    bad = subprocess.run([MLFLOWCTL, "-C", str(project_dir), "ui", "--port", "70000"], env=doit_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 3 and "expected 0..65535" in bad.stderr and "Traceback" not in bad.stderr


def test_ui_prints_its_url_serves_and_stops_cleanly_on_ctrl_c(project_dir):
    ui_proc = Ui(project_dir)
    try:
        r = requests.get(ui_proc.url, timeout=30)
        assert r.status_code == 200 and "nothing has run; run `doit`" in r.text
    finally:
        err = ui_proc.stop()
    assert err.strip() == "mlflowctl ui: stopped"
    # SIGTERM (a service manager, kill) stops it the same way
    ui_proc = Ui(project_dir)
    ui_proc.proc.send_signal(signal.SIGTERM)
    _, err = ui_proc.proc.communicate(timeout=30)
    assert ui_proc.proc.returncode == 0 and err.strip() == "mlflowctl ui: stopped", err


def test_help_does_not_import_the_ui():
    probe = ("import sys, runpy\nsys.argv = ['mlflowctl', '--help']\n"
             "try:\n    runpy.run_module('mlflowctl.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('LOADED:' + ','.join(m for m in ('jinja2', 'mlflowctl.ui', 'http.server') if m in sys.modules))\n")
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.rstrip().endswith("LOADED:"), proc.stdout + proc.stderr


def test_a_client_that_resets_its_connection_prints_no_traceback(project_dir):
    """Browsers drop connections (reset) all the time: the server says nothing about it."""
    import socket
    import struct
    from urllib.parse import urlparse

    ui_proc = Ui(project_dir)
    port = urlparse(ui_proc.url).port
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1")  # half a request, then a reset (SO_LINGER 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert requests.get(ui_proc.url, timeout=10).status_code == 200  # still serving
    err = ui_proc.stop()  # asserts exit 0 and no traceback
    assert "Exception occurred" not in err and "ConnectionResetError" not in err
