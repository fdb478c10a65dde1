"""A real S3 endpoint on loopback for the tests: moto's standalone server, in its own process.

``start()`` runs ``python -m moto.server`` on a free port (port 0: the server
picks one and prints it). ``serial=True`` runs the same moto application
answering one request at a time: moto checks ``If-None-Match`` and then
writes, in two steps, so its threaded server can let two conditional writes
through where S3 itself (and MinIO) decide atomically; serialised, the check
and the write are atomic again and the race tests test our code, not moto's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

SERIAL = """
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
run_simple("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False,
           request_handler=MotoRequestHandler)
"""


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM it when the test process dies, even by SIGKILL (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class S3Server:
    proc: subprocess.Popen
    url: str

    def client(self, **kw):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing", **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start(serial: bool = False, env: dict[str, str] | None = None, timeout: float = 30.0) -> S3Server:
    cmd = [sys.executable, "-c", SERIAL] if serial else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"]
    full_env = {**os.environ, "MOTO_PORT": "0", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
                            preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
        if m:
            # keep draining its log so the pipe never fills up
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return S3Server(proc, m.group(1))
    proc.kill()
    raise RuntimeError(f"moto server did not start: {''.join(seen)[-2000:]}")


SEAWEEDFS_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                   "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port",
                   "metricsPort")


def start_seaweedfs(binary: str, workdir: str, timeout: float = 90.0) -> S3Server:
    """SeaweedFS's ``weed mini`` (master, volume, filer and S3 gateway in one process), every port a free one."""
    import socket

    socks = []
    for _ in SEAWEEDFS_PORTS:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = dict(zip(SEAWEEDFS_PORTS, (s.getsockname()[1] for s in socks)))
    for s in socks:
        s.close()
    os.makedirs(workdir, exist_ok=True)
    cmd = [binary, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
           "-admin.port.legacy=0", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           *(f"-{name}={port}" for name, port in ports.items())]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no credentials: anonymous access
    log = open(os.path.join(workdir, "weed.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    server = S3Server(proc, f"http://127.0.0.1:{ports['s3.port']}")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            server.client().list_buckets()
            return server
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not start (exit {proc.poll()}, last error {last}); see {workdir}/weed.log")
