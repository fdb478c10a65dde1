"""Serving throughput and latency: mlflowctl's model server vs Seldon Core and MLServer, side by side.

What it measures
    Batch-1 predictions over HTTP on loopback (127.0.0.1 only): one 28x28 image as JSON
    (784 floats, the first Fashion-MNIST t10k image / 255, the same body for every request),
    with drift scoring on (every request also runs the concept autoencoder), all servers
    serving the SAME SavedModel version copied into a temporary registry. For each server:
    start it, wait for readiness (bounded), check one request answers with 10 probabilities
    summing to 1, warm up, then ``wrk -t1 -c2`` and ``wrk -t2 -c8`` (``--latency``, a Lua
    script POSTing the body), then SIGTERM (SIGKILL after 10 s) and check nothing is left
    listening. Servers run one at a time (the machine has 2 cores; wrk shares them).

    Rows: ``mlflowctl`` (``image/serve.py``, engine ``auto``: TFLite when it converts and
    matches), ``mlflowctl --engine tf`` (pure TensorFlow, for honesty), ``seldon``
    (``seldon-core-microservice``, its defaults: gunicorn, 1 worker, 1 thread), ``seldon
    2 workers`` (one per core, the best a user could tune it to here), ``mlserver``
    (``parallel_workers: 0``, ``debug: false``). Peers' wrappers are in
    ``bench/serving_peers/`` and do the same work per request (classifier + concept model +
    threshold count). Figures: requests/s, p50/p99 (wrk's latency distribution), errors
    (non-2xx + socket errors), and the server's CPU time per request (user+sys of its process
    group during the run; steadier than wall figures on a busy machine).

    Targets (from the issue; printed next to the figures, never asserted): at 8 connections
    mlflowctl >= 3x Seldon's requests/s, >= 1x MLServer's, p99 <= 10 ms.

    Issue 14 (protocols and batching): the ``mlflowctl (auto)`` server also gets 64 connections,
    its gRPC port (``mlflowctl gRPC``: a PredictRequest from tensorflow-serving-api's protos, loaded
    by nghttp2's ``h2load``, one call in flight per connection) and V2 infer in JSON and with the
    binary tensor extension; ``mlflowctl batching`` is the server with ``--batching on`` at 2, 8 and
    64 connections. Then the issue's comparisons run again as alternating pairs (``--pairs`` rounds
    of ``--pair-duration`` s per side, medians): gRPC vs REST @8, binary vs JSON @8, batching on vs
    off @64 (target >= 2x req/s, p99 <= 10 ms) and @2 (no loss).

How to run
    .venv/bin/python bench/bench_serving.py [--duration 8] [--warmup 2] [--only mlflowctl,seldon,...]
                                            [--model VERSION_DIR] [--no-install] [--peer-tf-threads 1]

What it installs, and where (once; cached, git-ignored)
    bench/.cache/seldon-venv    seldon-core 1.18 (Business Source License: bench only, never a
                                project dependency) + tensorflow-cpu 2.14 (2.13 as fallback;
                                seldon-core pins protobuf<4 and numpy<2) + setuptools<81; run
                                with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python.
    bench/.cache/mlserver-venv  mlserver (newest that resolves, 1.6 as fallback) + tensorflow-cpu 2.21.
    A failed install skips that peer with a printed note (the pip error's last line). The model
    is the newest complete version under ``.mlflowctl/store/models/mnist/<N>/`` (classifier at
    the top, autoencoder in ``concept/`` with ``threshold.json``); without one, a tiny one is
    trained once into ``bench/.cache/serving-model/`` by the stage scripts (EPOCHS=1 STEPS=50).
    wrk is Debian's package (``apt-get install wrk``); the gRPC rows need nghttp2's h2load
    (``apt-get install nghttp2-client``) and are skipped with a note without it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_DIR, CACHE_DIR, PYTHON, ROOT, header, record  # noqa: E402

PEERS_DIR = BENCH_DIR / "serving_peers"
SELDON_VENV = CACHE_DIR / "seldon-venv"
MLSERVER_VENV = CACHE_DIR / "mlserver-venv"
STORE = ROOT / ".mlflowctl" / "store" / "models" / "mnist"
BUILD_DIR = CACHE_DIR / "serving-model"
T10K_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

# Each entry is one attempt (a fresh venv each); the first that installs is kept.
SELDON_SPECS = (
    ("seldon-core==1.18.*", "tensorflow-cpu==2.14.*", "setuptools<81"),
    ("seldon-core==1.18.*", "tensorflow-cpu==2.13.*", "setuptools<81"),
)
SELDON_DISTS = ("seldon-core", "tensorflow-cpu", "numpy", "protobuf", "gunicorn", "flask")
MLSERVER_SPECS = (
    ("mlserver", "tensorflow-cpu==2.21.*"),
    ("mlserver==1.6.*", "tensorflow-cpu==2.21.*"),
)
MLSERVER_DISTS = ("mlserver", "tensorflow-cpu", "numpy", "protobuf", "uvicorn", "fastapi")

TARGET_SELDON = 3.0
TARGET_MLSERVER = 1.0
TARGET_P99_MS = 10.0
TARGET_BATCH_GAIN = 2.0
STOP_GRACE = 10.0


# ------------------------------------------------------------------ venvs
def _pip_tail(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]  # this machine's pip config is chatty
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return ((errors or lines or ["?"])[-1])[:200]


def _versions(python: Path, dists: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for d in sys.argv[1:]:\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        proc = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout or "{}")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return {}


def ensure_venv(venv: Path, specs: tuple[tuple[str, ...], ...], dists: tuple[str, ...], label: str,
                install: bool, timeout: float = 1500.0) -> tuple[Path | None, str]:
    """A venv at ``venv`` with one of ``specs`` installed (cached by a stamp file); (python or None, note)."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    if stamp.exists() and python.exists():
        return python, stamp.read_text().strip()
    if not install:
        return None, f"{label}: no cached venv at {venv} (--no-install)"
    base = getattr(sys, "_base_executable", "") or shutil.which("python3") or sys.executable
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    note = ""
    for spec in specs:
        # An existing venv without stamp (an interrupted install) is reused: pip finishes it.
        if not python.exists():
            shutil.rmtree(venv, ignore_errors=True)
            proc = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
            if proc.returncode != 0:
                return None, f"{label}: venv creation failed: {_pip_tail(proc.stderr or proc.stdout)}"
        print(f"{label}: pip install {' '.join(spec)} into {venv} (once; cached afterwards) ...", flush=True)
        left = timeout - (time.monotonic() - started)
        try:
            proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *spec],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                  timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv, ignore_errors=True)
            return None, f"{label}: install timed out after {timeout:g}s"
        if proc.returncode == 0:
            versions = _versions(python, dists)
            text = ", ".join(f"{k} {v}" for k, v in versions.items())
            stamp.write_text(text + "\n")
            print(f"{label}: installed in {time.monotonic() - started:.0f}s: {text}", flush=True)
            return python, text
        note = f"{label}: pip install {' '.join(spec)} failed: {_pip_tail(proc.stderr or proc.stdout)}"
        print(note, flush=True)
        shutil.rmtree(venv, ignore_errors=True)
    return None, note


# ------------------------------------------------------------------ model
def _complete(vdir: Path) -> bool:
    return ((vdir / "saved_model.pb").is_file() and (vdir / "concept" / "saved_model.pb").is_file()
            and (vdir / "concept" / "threshold.json").is_file())


def find_version() -> Path | None:
    """The newest complete version of the project's registry (classifier + concept + threshold)."""
    if not STORE.is_dir():
        return None
    numbers = sorted((int(p.name) for p in STORE.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    for n in numbers:
        if _complete(STORE / str(n)):
            return STORE / str(n)
    return None


def build_version(timeout: float = 900.0) -> Path:
    """Train a tiny model + concept model once with the stage scripts into bench/.cache/serving-model/."""
    version = BUILD_DIR / "version"
    if _complete(version):
        return version
    shutil.rmtree(BUILD_DIR, ignore_errors=True)
    BUILD_DIR.mkdir(parents=True)
    env = dict(os.environ, MNIST_DATA_DIR=str(BUILD_DIR / "data"), EPOCHS="1", STEPS="50",
               TF_CPP_MIN_LOG_LEVEL="2")
    steps = (("download.py", BUILD_DIR / "unused"), ("train_model.py", BUILD_DIR / "model"),
             ("train_concept.py", BUILD_DIR / "concept"))
    for script, out in steps:
        print(f"model: running image/{script} ...", flush=True)
        proc = subprocess.run([PYTHON, str(ROOT / "image" / script)], cwd=ROOT / "image",
                              env=dict(env, MNIST_MODELS_DIR=str(out)), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"bench: image/{script} failed (exit {proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    tmp = BUILD_DIR / "version.tmp"
    shutil.copytree(BUILD_DIR / "model" / "saved_model", tmp)
    shutil.copytree(BUILD_DIR / "concept" / "saved_model", tmp / "concept")
    shutil.copy2(BUILD_DIR / "concept" / "threshold.json", tmp / "concept" / "threshold.json")
    tmp.rename(version)
    return version


def test_image() -> tuple[list[float], str]:
    """784 floats in [0, 1]: the first Fashion-MNIST t10k image, or a seeded random one."""
    try:
        with gzip.open(T10K_IMAGES, "rb") as fh:
            raw = fh.read(16 + 784)
        if len(raw) == 16 + 784:
            return [round(b / 255.0, 6) for b in raw[16:]], f"first image of {T10K_IMAGES.name}"
    except OSError:
        pass
    import random
    rng = random.Random(0)
    return [round(rng.random(), 6) for _ in range(784)], "seeded random image (dataset not found)"


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def group_cpu(pgid: int) -> float:
    """User+sys seconds of the live processes of a process group (children it reaped included)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        f = stat[stat.rfind(")") + 2:].split()
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
    return total / tick


def stop(proc: subprocess.Popen, ports: list[int]) -> str:
    """SIGTERM the server's process group, SIGKILL after STOP_GRACE s; report anything left listening."""
    pgid = proc.pid  # started with start_new_session=True: its own group
    how = "SIGTERM"
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not group_members(pgid):
            break
        time.sleep(0.1)
    else:
        how = f"SIGKILL after {STOP_GRACE:g}s"
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for _ in range(50):
            if not group_members(pgid):
                break
            time.sleep(0.1)
    left = [p for p in ports if listening(p)]
    alive = group_members(pgid)
    msg = f"stopped ({how})"
    if left or alive:
        msg += f"; WARNING: still listening on {left}, processes left {alive}"
    return msg


# --------------------------------------------------------------------- HTTP
def http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_probs(values: Any) -> tuple[bool, str]:
    try:
        probs = [float(v) for v in values]
    except (TypeError, ValueError):
        return False, f"not a list of numbers: {str(values)[:120]}"
    if len(probs) != 10:
        return False, f"{len(probs)} values, expected 10"
    total = sum(probs)
    if abs(total - 1.0) > 1e-3 or min(probs) < 0:
        return False, f"probabilities sum to {total:.5f}"
    top = max(range(10), key=probs.__getitem__)
    return True, f"10 probabilities, sum {total:.5f}, class {top} ({probs[top]:.3f})"


# ---------------------------------------------------------------------- wrk
@dataclass
class Row:
    server: str
    conns: int
    rps: float = float("nan")
    p50: float = float("nan")
    p75: float = float("nan")
    p90: float = float("nan")
    p99: float = float("nan")
    requests: int = 0
    errors: int = 0
    cpu_us: float = float("nan")
    note: str = ""


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str, row: Row) -> Row:
    for pct, value, unit in re.findall(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        setattr(row, f"p{pct}", float(value) * _UNIT[unit])
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        row.rps = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        row.requests = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        row.errors += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        row.errors += int(m.group(1))
    return row


def run_wrk(url: str, script: Path, threads: int, conns: int, seconds: float, latency: bool = True) -> str:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(script)]
    if latency:
        cmd.append("--latency")
    proc = subprocess.run([*cmd, url], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=seconds + 30)
    return proc.stdout + proc.stderr


def wrk_script(tmp: Path, key: str, body: bytes, headers: dict[str, str]) -> Path:
    body_file = tmp / f"{key}.body"
    body_file.write_bytes(body)
    script = tmp / f"{key}.lua"
    script.write_text('wrk.method = "POST"\n'
                      + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
                      + f"local f = assert(io.open({json.dumps(str(body_file))}, \"rb\"))\n"
                      "wrk.body = f:read(\"*a\")\n"
                      "f:close()\n")
    return script


def run_h2load(load: Load, tmp: Path, seconds: float) -> Row:
    """gRPC load with nghttp2's h2load: ``conns`` HTTP/2 connections, one call in flight on each (like wrk),
    the framed request body POSTed to the method's path; latency percentiles from its per-request log."""
    row = Row(load.label, load.conns)
    body = tmp / "grpc-request.bin"
    body.write_bytes(load.body)
    log = tmp / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = ["h2load", "-c", str(load.conns), "-m", "1", "-t", "1" if load.conns <= 2 else "2", "-D", f"{seconds:g}",
           "-d", str(body), "--log-file", str(log), *[a for k, v in load.headers.items() for a in ("-H", f"{k}: {v}")],
           load.url]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          timeout=seconds + 30)
    out = proc.stdout + proc.stderr
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    if m:
        row.rps = float(m.group(2))
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", out)
    if m:
        row.requests = int(m.group(3))
        row.errors += int(m.group(4)) + int(m.group(5)) + int(m.group(6))
    try:
        durations = sorted(int(line.split("\t")[2]) / 1e3 for line in log.read_text().splitlines() if line.count("\t") >= 2)
    except (OSError, ValueError, IndexError):
        durations = []
    if durations:
        for pct in (50, 75, 90, 99):
            setattr(row, f"p{pct}", durations[min(len(durations) - 1, int(len(durations) * pct / 100))])
    if row.rps != row.rps:
        row.note = "h2load output not understood: " + " | ".join(out.strip().splitlines()[-3:])[:200]
    return row


def grpc_errors(metrics_url: str) -> int:
    """gRPC Predict calls the server answered with a status other than OK (h2load sees HTTP 200 either way)."""
    if not metrics_url:
        return 0
    try:
        _, data = http("GET", metrics_url)
    except (OSError, urllib.error.URLError):
        return 0
    total = 0.0
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("mlflowctl_serving_requests_total{") and 'endpoint="grpc_predict"' in line \
                and 'code="OK"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def batch_stats(drift_url: str) -> tuple[int, int]:
    """(requests, model calls) of the batcher so far, from the drift JSON ((0, 0) without one)."""
    if not drift_url:
        return 0, 0
    try:
        _, data = http("GET", drift_url)
        stats = json.loads(data)["versions"]["1"]["batching"] or {}
        return int(stats.get("requests", 0)), int(stats.get("batches", 0)) + int(stats.get("run_at_once", 0))
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError):
        return 0, 0


def grpc_body(image: list[float]) -> bytes:
    """A gRPC-framed PredictRequest (1x784 float32 as tensor_content), built with tensorflow-serving-api's protos."""
    code = ("import json, struct, sys\n"
            "import numpy as np\n"
            "from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2\n"
            "from tensorflow_serving.apis import predict_pb2\n"
            "x = np.asarray([json.load(sys.stdin)], dtype=np.float32)\n"
            "req = predict_pb2.PredictRequest()\n"
            "req.model_spec.name = 'mnist'\n"
            "req.inputs['images'].CopyFrom(tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=x.tobytes(),\n"
            "    tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in x.shape])))\n"
            "b = req.SerializeToString()\n"
            "sys.stdout.buffer.write(b'\\x00' + struct.pack('>I', len(b)) + b)\n")
    proc = subprocess.run([PYTHON, "-c", code], input=json.dumps(image).encode(), capture_output=True, timeout=120,
                          env=clean_env(TF_ENABLE_ONEDNN_OPTS="0"))
    if proc.returncode != 0:
        raise ValueError(f"cannot build the gRPC request: {proc.stderr.decode(errors='replace').strip()[-200:]}")
    return proc.stdout


def v2_bodies(image: list[float]) -> tuple[bytes, bytes, int]:
    """V2 infer bodies: JSON in and out; binary in and out (the tensor extension); the binary one's JSON header length."""
    import struct

    as_json = json.dumps({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": image}],
                          "outputs": [{"name": "probabilities"}]}).encode()
    head = json.dumps({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 784 * 4}}],
                       "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return as_json, head + struct.pack("<784f", *image), len(head)


def check_v2_binary(url: str, body: bytes, hlen: int) -> str:
    import struct

    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)})
    with urllib.request.urlopen(req, timeout=30) as resp:
        data, n = resp.read(), int(resp.headers["Inference-Header-Content-Length"])
    out = json.loads(data[:n])["outputs"][0]
    if out["parameters"]["binary_data_size"] != 40 or len(data) - n != 40:
        raise ValueError(f"expected 40 bytes of binary output, got {out}")
    ok, what = check_probs(struct.unpack("<10f", data[n:]))
    if not ok:
        raise ValueError(what)
    return what


def check_grpc(metrics_url: str, url: str, body: bytes, tmp: Path) -> str:
    """One gRPC call with h2load; the server's metrics must count it OK."""
    def ok_count() -> float:
        _, data = http("GET", metrics_url)
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in data.decode().splitlines()
                   if ln.startswith("mlflowctl_serving_requests_total{") and 'endpoint="grpc_predict"' in ln
                   and 'code="OK"' in ln)

    before = ok_count()
    (tmp / "grpc-check.bin").write_bytes(body)
    subprocess.run(["h2load", "-n", "1", "-c", "1", "-d", str(tmp / "grpc-check.bin"), "-H", "content-type: application/grpc",
                    "-H", "te: trailers", url], capture_output=True, timeout=30)
    if ok_count() != before + 1:
        raise ValueError("the gRPC Predict call was not answered OK (see the server's metrics)")
    return "1 gRPC Predict answered OK"


# ------------------------------------------------------------------ servers
@dataclass
class Server:
    key: str
    label: str
    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    ports: list[int]
    ready_url: str
    predict_url: str
    body: bytes
    probs: Callable[[Any], Any]
    setup: Callable[[], None] | None = None
    note: str = ""
    loads: list["Load"] | None = None  # default: wrk on predict_url with body at 2 and 8 connections
    metrics_url: str = ""               # mlflowctl: /metrics, to count gRPC answers that were errors
    drift_url: str = ""                 # mlflowctl: the drift JSON (batching statistics, drift counts)


@dataclass
class Load:
    """One measured run: ``tool`` (wrk over HTTP/1.1, h2load for gRPC) at ``conns`` connections."""

    label: str
    conns: int
    url: str
    body: bytes
    headers: dict[str, str]
    tool: str = "wrk"
    check: Callable[[], str] | None = None  # raises ValueError when the server answers wrongly


def start_server(srv: Server, args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen | None, str]:
    """Start one server, wait until ready, check one answer, warm up; (process or None, why not)."""
    if srv.setup:
        srv.setup()
    log_path = tmp / f"{srv.key}.log"
    print(f"\n-- {srv.label}: starting ({' '.join(srv.cmd[:3])} ...)", flush=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(srv.cmd, cwd=srv.cwd, env=srv.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail() -> str:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-400:]

    def give_up(why: str) -> tuple[None, str]:
        print(f"   {stop(proc, srv.ports)}", flush=True)
        return None, why

    deadline = t0 + args.ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return give_up(f"exited with {proc.returncode} before ready: {log_tail()}")
        try:
            status, _ = http("GET", srv.ready_url, timeout=2)
            if status == 200:
                break
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    else:
        return give_up(f"not ready after {args.ready_timeout:g}s: {log_tail()}")
    print(f"   ready in {time.monotonic() - t0:.1f}s", flush=True)
    status, data = http("POST", srv.predict_url, srv.body, timeout=30)
    try:
        ok, what = (status == 200, "") if status != 200 else check_probs(srv.probs(json.loads(data)))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        ok, what = False, f"unexpected answer ({type(exc).__name__}): {data[:160]!r}"
    if not ok:
        return give_up(f"check request failed: HTTP {status} {what or data[:160]!r}")
    print(f"   check: {what}", flush=True)
    if args.warmup > 0:
        run_wrk(srv.predict_url, wrk_script(tmp, srv.key, srv.body, {"Content-Type": "application/json"}), 2, 8,
                args.warmup, latency=False)
    return proc, ""


def measure(srv: Server, proc: subprocess.Popen, load: Load, tmp: Path, seconds: float) -> Row:
    """One run of ``load`` against the running ``srv``: a row with the server's CPU per request."""
    bad0 = grpc_errors(srv.metrics_url) if load.tool == "h2load" else 0
    batched0 = batch_stats(srv.drift_url)
    cpu0 = group_cpu(proc.pid)
    if load.tool == "h2load":
        row = run_h2load(load, tmp, seconds)
    else:
        key = f"{srv.key}-{abs(hash((load.url, load.body))) % 10**8}"
        out = run_wrk(load.url, wrk_script(tmp, key, load.body, load.headers), 1 if load.conns <= 2 else 2,
                      load.conns, seconds)
        row = parse_wrk(out, Row(load.label, load.conns))
        if row.rps != row.rps:
            row.note = "wrk output not understood: " + " | ".join(out.strip().splitlines()[-3:])[:200]
    cpu = group_cpu(proc.pid) - cpu0
    if load.tool == "h2load":
        row.errors += max(0, grpc_errors(srv.metrics_url) - bad0)
    if row.requests:
        row.cpu_us = cpu / row.requests * 1e6
    batched = batch_stats(srv.drift_url)
    if batched[1] > batched0[1]:
        per = (batched[0] - batched0[0]) / (batched[1] - batched0[1])
        row.note = (row.note + "; " if row.note else "") + f"{per:.1f} req/batch"
    return row


def run_checks(load: Load) -> str:
    """'' when the load's own check passes (or it has none), else why not."""
    if load.check is None:
        return ""
    try:
        print(f"   check {load.label}: {load.check()}", flush=True)
        return ""
    except (ValueError, KeyError, OSError, urllib.error.URLError) as exc:
        return f"check failed: {exc}"[:200]


def run_server(srv: Server, args: argparse.Namespace, tmp: Path) -> tuple[list[Row], str]:
    """Start, check, load and stop one server; (rows, note)."""
    loads = srv.loads or [Load(srv.label, c, srv.predict_url, srv.body, {"Content-Type": "application/json"})
                          for c in (2, 8)]
    proc, note = start_server(srv, args, tmp)
    if proc is None:
        return [], note
    rows: list[Row] = []
    try:
        for load in loads:
            failed = run_checks(load)
            if failed:
                rows.append(Row(load.label, load.conns, note=failed))
                continue
            row = measure(srv, proc, load, tmp, args.duration)
            rows.append(row)
            print(f"   {load.label} c={load.conns}: {row.rps:.0f} req/s, p50 {row.p50:.2f} ms, p99 {row.p99:.2f} ms, "
                  f"errors {row.errors}, server CPU {row.cpu_us:.0f} us/req {row.note}".rstrip(), flush=True)
    finally:
        stopped = stop(proc, srv.ports)
        print(f"   {stopped}", flush=True)
        if "WARNING" in stopped:
            note = stopped
    return rows, note


def median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run_pairs(servers: list[Server], args: argparse.Namespace, tmp: Path) -> list[tuple[str, Row, Row]]:
    """Issue 14's comparisons, each side measured alternately (A B A B ...) ``--pairs`` times for
    ``--pair-duration`` s, so a load change on the shared machine hits both sides alike; medians."""
    by_key = {s.key: s for s in servers}
    plain, batching = by_key.get("mlflowctl"), by_key.get("mlflowctl-batching")
    if plain is None:
        return []
    loads = {ld.label + f"@{ld.conns}": ld for ld in plain.loads or []}
    want = [("gRPC vs REST @8", (plain, loads.get("mlflowctl (auto)@8")), (plain, loads.get("mlflowctl gRPC@8"))),
            ("V2 binary vs V2 JSON @8", (plain, loads.get("mlflowctl V2 JSON@8")),
             (plain, loads.get("mlflowctl V2 binary@8")))]
    if batching is not None:
        for conns in (64, 2):
            want.append((f"batching on vs off @{conns}", (plain, loads.get(f"mlflowctl (auto)@{conns}")),
                         (batching, next((ld for ld in batching.loads or [] if ld.conns == conns), None))))
    want = [w for w in want if w[1][1] is not None and w[2][1] is not None]
    if not want or args.pairs <= 0:
        return []
    procs: dict[str, subprocess.Popen] = {}
    out: list[tuple[str, Row, Row]] = []
    print(f"\n-- paired runs: {args.pairs} x {args.pair_duration:g}s per side, alternating", flush=True)
    try:
        for srv in {id(w[i][0]): w[i][0] for w in want for i in (1, 2)}.values():
            proc, note = start_server(srv, args, tmp)
            if proc is None:
                print(f"   paired runs skipped: {srv.label}: {note}", flush=True)
                return []
            procs[srv.key] = proc
        for title, (sa, la), (sb, lb) in want:
            if run_checks(la) or run_checks(lb):
                continue
            runs: dict[str, list[Row]] = {"a": [], "b": []}
            for _ in range(args.pairs):
                for side, srv, load in (("a", sa, la), ("b", sb, lb)):
                    runs[side].append(measure(srv, procs[srv.key], load, tmp, args.pair_duration))
            summary = []
            for side, label in (("a", la.label), ("b", lb.label if lb.label != la.label else lb.label + " (b)")):
                rs = runs[side]
                row = Row(label, rs[0].conns, rps=median([r.rps for r in rs]), p50=median([r.p50 for r in rs]),
                          p90=median([r.p90 for r in rs]), p99=median([r.p99 for r in rs]),
                          requests=sum(r.requests for r in rs), errors=sum(r.errors for r in rs),
                          cpu_us=median([r.cpu_us for r in rs]),
                          note=f"req/s {', '.join(f'{r.rps:.0f}' for r in rs)}"
                               + (f"; {rs[-1].note}" if rs[-1].note else ""))
                summary.append(row)
            out.append((title, summary[0], summary[1]))
            print(f"   {title}: {summary[1].rps:.0f} vs {summary[0].rps:.0f} req/s (medians; "
                  f"{summary[1].note} vs {summary[0].note})", flush=True)
    finally:
        for key, proc in procs.items():
            print(f"   {by_key[key].label}: {stop(proc, by_key[key].ports)}", flush=True)
    return out


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def make_servers(args: argparse.Namespace, tmp: Path, version_dir: Path, image: list[float],
                 seldon_py: Path | None, mlserver_py: Path | None, notes: list[str]) -> list[Server]:
    servers: list[Server] = []
    wanted = set(args.only.split(",")) if args.only else None

    def want(key: str) -> bool:
        return wanted is None or key in wanted

    base = tmp / "registry" / "models" / "mnist"
    number = 1
    routing = tmp / "routing.json"
    routing.write_text(json.dumps({"versions": [number], "labels": {"stable": number}}))
    model_dir = base / str(number)

    rest_body = json.dumps({"instances": [image]}).encode()
    rest_headers = {"Content-Type": "application/json"}
    for key, label, extra in (("mlflowctl", "mlflowctl (auto)", []),
                              ("mlflowctl-batching", "mlflowctl batching", ["--batching", "on"]),
                              ("mlflowctl-tf", "mlflowctl (--engine tf)", ["--engine", "tf"])):
        if not want(key):
            continue
        port, gport = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        predict = f"{url}/v1/models/mnist:predict"
        loads = [Load(label, c, predict, rest_body, rest_headers) for c in (2, 8)]
        if key == "mlflowctl":
            v2_json, v2_bin, hlen = v2_bodies(image)
            infer = f"{url}/v2/models/mnist/infer"
            loads.append(Load(label, 64, predict, rest_body, rest_headers))
            try:
                if not shutil.which("h2load"):
                    raise ValueError("h2load is not installed (apt-get install nghttp2-client)")
                body = grpc_body(image)
                gurl = f"http://127.0.0.1:{gport}/tensorflow.serving.PredictionService/Predict"
                loads += [Load("mlflowctl gRPC", c, gurl, body, {"content-type": "application/grpc", "te": "trailers"},
                               "h2load", check=(lambda gurl=gurl, body=body, url=url: check_grpc(f"{url}/metrics", gurl, body, tmp)))
                          for c in (2, 8)]
            except (ValueError, OSError, subprocess.SubprocessError) as exc:
                notes.append(f"gRPC rows skipped: {exc}")
            loads += [Load("mlflowctl V2 JSON", 8, infer, v2_json, rest_headers),
                      Load("mlflowctl V2 binary", 8, infer, v2_bin,
                           {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(hlen)},
                           check=lambda infer=infer, v2_bin=v2_bin, hlen=hlen: check_v2_binary(infer, v2_bin, hlen))]
        elif key == "mlflowctl-batching":
            loads.append(Load(label, 64, predict, rest_body, rest_headers))
        servers.append(Server(
            key, label,
            [PYTHON, str(ROOT / "image" / "serve.py"), "--model-name", "mnist", "--base-path", str(base),
             "--routing", str(routing), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--grpc-port", str(gport) if key == "mlflowctl" else "0", *extra],
            ROOT, clean_env(), [port, gport], f"http://127.0.0.1:{port}/v2/models/mnist/ready",
            predict, rest_body, lambda r: r["predictions"][0], loads=loads, metrics_url=f"{url}/metrics",
            drift_url=f"{url}/monitor/v1/models/mnist/drift" if key == "mlflowctl-batching" else ""))

    peer_env = {"PEER_TF_THREADS": str(args.peer_tf_threads)}
    for key, workers in (("seldon", 1), ("seldon-2w", 2)):
        if not want(key):
            continue
        if seldon_py is None:
            continue
        http_port, metrics_port, grpc_port = free_port(), free_port(), free_port()
        params = json.dumps([{"name": "model_dir", "value": str(model_dir), "type": "STRING"}])
        servers.append(Server(
            key, "seldon" + (f" ({workers} workers)" if workers > 1 else ""),
            [str(seldon_py.parent / "seldon-core-microservice"), "SeldonMnist", "--service-type", "MODEL",
             "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--grpc-port", str(grpc_port),
             "--grpc-workers", "0", "--workers", str(workers), "--log-level", "WARNING", "--parameters", params],
            PEERS_DIR,
            clean_env(PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python",
                      PATH=f"{seldon_py.parent}{os.pathsep}{os.environ.get('PATH', '')}", **peer_env),
            [http_port, metrics_port, grpc_port], f"http://127.0.0.1:{http_port}/health/ping",
            f"http://127.0.0.1:{http_port}/api/v1.0/predictions",
            json.dumps({"data": {"ndarray": [image]}}).encode(), lambda r: r["data"]["ndarray"][0]))

    if want("mlserver") and mlserver_py is not None:
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        folder = tmp / "mlserver"

        def setup(folder=folder, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port) -> None:
            (folder / "mnist").mkdir(parents=True, exist_ok=True)
            (folder / "settings.json").write_text(json.dumps({
                "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": http_port,
                "grpc_port": grpc_port, "metrics_port": metrics_port}, indent=2))
            (folder / "mnist" / "model-settings.json").write_text(json.dumps({
                "name": "mnist", "implementation": "mlserver_runtime.MnistRuntime",
                "parameters": {"uri": str(model_dir)}}, indent=2))

        servers.append(Server(
            "mlserver", "mlserver",
            [str(mlserver_py.parent / "mlserver"), "start", str(folder)], folder.parent,
            clean_env(PYTHONPATH=str(PEERS_DIR), PATH=f"{mlserver_py.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                      **peer_env),
            [http_port, grpc_port, metrics_port], f"http://127.0.0.1:{http_port}/v2/models/mnist/ready",
            f"http://127.0.0.1:{http_port}/v2/models/mnist/infer",
            json.dumps({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": image}]}).encode(),
            lambda r: r["outputs"][0]["data"], setup=setup))
    return servers


# -------------------------------------------------------------------- report
def fmt(v: float, digits: int = 2) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def print_table(rows: list[Row], skipped: list[tuple[str, str]]) -> None:
    head = f"{'server':<26} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} " \
           f"{'srv CPU us/req':>14} {'errors':>6}"
    print("\nBatch-1 predict on 127.0.0.1, drift scoring on (HTTP: wrk --latency; gRPC: h2load, one call in flight "
          "per connection)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.server:<26} {r.conns:>5} {fmt(r.rps, 0):>8} {fmt(r.p50):>7} {fmt(r.p90):>7} {fmt(r.p99):>7} "
              f"{fmt(r.cpu_us, 0):>14} {r.errors:>6}  {r.note}".rstrip())
    for label, why in skipped:
        print(f"{label:<26} {'-':>5} {'-':>8} {'-':>7} {'-':>7} {'-':>7} {'-':>14} {'-':>6}  skipped: {why}")


def at8(rows: list[Row], server: str, conns: int = 8) -> Row | None:
    return next((r for r in rows if r.server == server and r.conns == conns and r.rps == r.rps), None)


def print_pairs(pairs: list[tuple[str, Row, Row]]) -> None:
    """Issue 14's figures from the alternating runs: the two sides, their ratio, the targets (never asserted)."""
    if not pairs:
        return
    head = f"{'comparison':<26} {'side':<22} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'errors':>6}"
    print("\nProtocols and batching (issue 14): medians of alternating runs, same machine load for both sides")
    print(head)
    print("-" * len(head))
    for title, a, b in pairs:
        for r in (a, b):
            print(f"{title:<26} {r.server:<22} {fmt(r.rps, 0):>8} {fmt(r.p50):>7} {fmt(r.p99):>7} {fmt(r.cpu_us, 0):>10} "
                  f"{r.errors:>6}  {r.note}".rstrip())
    targets = {"batching on vs off @64": TARGET_BATCH_GAIN, "batching on vs off @2": 1.0}
    head = f"{'figure':<52} {'value':>9}  {'target':<10} verdict"
    print()
    print(head)
    print("-" * len(head))
    lines = []
    for title, a, b in pairs:
        target = targets.get(title)
        ratio = b.rps / a.rps
        lines.append((f"{title}: req/s ratio", ratio, "x", "(info)" if target is None else f">= {target:g}x",
                      None if target is None else ratio >= target))
        lines.append((f"{title}: server CPU per request ratio", b.cpu_us / a.cpu_us, "x", "(info)", None))
        if "@2" not in title:
            lines.append((f"{title}: {b.server} p99", b.p99, "ms", f"<= {TARGET_P99_MS:g} ms", b.p99 <= TARGET_P99_MS))
    for fig, value, unit, target, ok in lines:
        verdict = "-" if ok is None or value != value else ("ok" if ok else "MISSED")
        print(f"{fig:<52} {value:>7.2f}{unit:>2}  {target:<10} {verdict}")
    print()
    for title, a, b in pairs:
        if title.startswith("batching on vs off @64"):
            record("serving: batching on/off req/s @64 conns", b.rps / a.rps, "x", target=f">= {TARGET_BATCH_GAIN:g}x",
                   peer=f"off {a.rps:.0f} req/s")
        elif title.startswith("gRPC vs REST"):
            record("serving: gRPC/REST req/s @8 conns", b.rps / a.rps, "x", target="(info)",
                   peer=f"REST {a.rps:.0f} req/s")


def print_targets(rows: list[Row]) -> None:
    print("\nTargets at 8 connections (from the issue; printed, never asserted)")
    head = f"{'figure':<52} {'value':>9}  {'target':<10} verdict"
    print(head)
    print("-" * len(head))
    seldon, seldon2, mls = at8(rows, "seldon"), at8(rows, "seldon (2 workers)"), at8(rows, "mlserver")
    for label in ("mlflowctl (auto)", "mlflowctl (--engine tf)"):
        me = at8(rows, label)
        if me is None:
            continue
        lines = []
        if seldon:
            lines.append((f"{label} / seldon req/s", me.rps / seldon.rps, "x", f">= {TARGET_SELDON:g}x",
                          me.rps / seldon.rps >= TARGET_SELDON))
        if seldon2:
            lines.append((f"{label} / seldon (2 workers) req/s", me.rps / seldon2.rps, "x", "(info)", None))
        if mls:
            lines.append((f"{label} / mlserver req/s", me.rps / mls.rps, "x", f">= {TARGET_MLSERVER:g}x",
                          me.rps / mls.rps >= TARGET_MLSERVER))
        lines.append((f"{label} p99", me.p99, "ms", f"<= {TARGET_P99_MS:g} ms", me.p99 <= TARGET_P99_MS))
        for fig, value, unit, target, ok in lines:
            verdict = "-" if ok is None else ("ok" if ok else "MISSED")
            print(f"{fig:<52} {value:>7.2f}{unit:>2}  {target:<10} {verdict}")
    me = at8(rows, "mlflowctl (auto)")
    if me is not None:
        print()
        if seldon:
            record("serving: mlflowctl/seldon req/s @8 conns", me.rps / seldon.rps, "x",
                   target=f">= {TARGET_SELDON:g}x", peer=f"seldon {seldon.rps:.0f} req/s")
        if mls:
            record("serving: mlflowctl/mlserver req/s @8 conns", me.rps / mls.rps, "x",
                   target=f">= {TARGET_MLSERVER:g}x", peer=f"mlserver {mls.rps:.0f} req/s")
        record("serving: mlflowctl p99 @8 conns", me.p99 / 1e3, "s", limit=TARGET_P99_MS / 1e3,
               target=f"<= {TARGET_P99_MS / 1e3:g} s", peer=f"{me.rps:.0f} req/s")


# ---------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds of each wrk run (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk warm-up per server (default 2)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for a server (default 120)")
    p.add_argument("--budget", type=float, default=900.0,
                   help="seconds for all server runs; servers not started by then are skipped (default 900)")
    p.add_argument("--pairs", type=int, default=3,
                   help="alternating rounds for issue 14's comparisons (gRPC vs REST, binary vs JSON, batching on vs "
                        "off at 64 and 2 connections); 0 skips them (default 3)")
    p.add_argument("--pair-duration", type=float, default=5.0, help="seconds of each side of a round (default 5)")
    p.add_argument("--only", default="", help="comma list of: mlflowctl,mlflowctl-batching,mlflowctl-tf,seldon,"
                                              "seldon-2w,mlserver")
    p.add_argument("--model", default="", help="a version folder (classifier SavedModel + concept/); default: "
                                                "the newest complete one in .mlflowctl/store, else a tiny one trained once")
    p.add_argument("--no-install", action="store_true", help="skip a peer whose venv is not cached yet")
    p.add_argument("--peer-tf-threads", type=int, default=1,
                   help="TF intra-op threads in the peers (default 1, as mlflowctl's server; 0: TF's defaults, "
                        "which measured slower for the peers under load here)")
    args = p.parse_args()

    header("bench_serving: batch-1 predict over HTTP, mlflowctl vs Seldon Core vs MLServer")
    if not shutil.which("wrk"):
        print("bench: wrk is not installed (apt-get install wrk); nothing measured")
        return 0
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    print(f"   wrk: {wrk_version[0] if wrk_version else '?'}")
    print(f"   mlflowctl venv: {', '.join(f'{k} {v}' for k, v in _versions(Path(PYTHON), ('tensorflow-cpu', 'tensorflow', 'numpy', 'uvicorn', 'orjson', 'uvloop', 'httptools')).items())}")

    wanted = set(args.only.split(",")) if args.only else None
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    seldon_py = mlserver_py = None
    if wanted is None or wanted & {"seldon", "seldon-2w"}:
        seldon_py, note = ensure_venv(SELDON_VENV, SELDON_SPECS, SELDON_DISTS, "seldon", not args.no_install)
        print(f"   seldon venv: {note}")
        if seldon_py is None:
            skipped.append(("seldon", note))
    if wanted is None or "mlserver" in wanted:
        mlserver_py, note = ensure_venv(MLSERVER_VENV, MLSERVER_SPECS, MLSERVER_DISTS, "mlserver", not args.no_install)
        print(f"   mlserver venv: {note}")
        if mlserver_py is None:
            skipped.append(("mlserver", note))

    if args.model:
        version_dir = Path(args.model).resolve()
        if not _complete(version_dir):
            raise SystemExit(f"bench: {version_dir} is not a complete version (saved_model.pb, concept/, threshold.json)")
    else:
        version_dir = find_version() or build_version()
    image, image_note = test_image()
    print(f"   model: {version_dir} (copied into a temporary registry as version 1)")
    print(f"   request: {image_note}; wrk -t1 -c2 and -t2 -c8, {args.duration:g}s each after {args.warmup:g}s warm-up")

    tmp = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-serving-"))
    rows: list[Row] = []
    pairs: list[tuple[str, Row, Row]] = []
    started = time.monotonic()
    try:
        shutil.copytree(version_dir, tmp / "registry" / "models" / "mnist" / "1",
                        ignore=shutil.ignore_patterns("__pycache__"))
        servers = make_servers(args, tmp, version_dir, image, seldon_py, mlserver_py, notes)
        for srv in servers:
            if time.monotonic() - started > args.budget:
                skipped.append((srv.label, f"time budget {args.budget:g}s used up"))
                continue
            try:
                got, note = run_server(srv, args, tmp)
            except (OSError, subprocess.SubprocessError) as exc:
                got, note = [], f"{type(exc).__name__}: {exc}"
            rows.extend(got)
            if not got:
                print(f"   skipped: {note}", flush=True)
                skipped.append((srv.label, note))
            elif note:
                for r in got:
                    r.note = (r.note + "; " if r.note else "") + note
        if time.monotonic() - started > args.budget:
            notes.append(f"paired runs skipped: time budget {args.budget:g}s used up")
        else:
            try:
                pairs = run_pairs(servers, args, tmp)
            except (OSError, subprocess.SubprocessError) as exc:
                notes.append(f"paired runs failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print_table(rows, skipped)
    print_targets(rows)
    print_pairs(pairs)
    for note in notes:
        print(f"note: {note}")
    print(f"\nservers measured in {time.monotonic() - started:.0f}s; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("wrk runs on the same 2 cores as the server: figures are per-machine, not per-server-core.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
