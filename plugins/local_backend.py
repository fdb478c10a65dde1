"""The ``local`` backend: each stage is a subprocess of this machine's Python."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mlflowctl import hookimpl
from mlflowctl.backends import Backend, LogWriter, StageResult, StageRun, host_environment
from mlflowctl.config import Setting
from mlflowctl.errors import MlflowctlError

POLL_SECONDS = 0.1


class LocalBackend(Backend):
    """Runs the stage command in its own process group; Ctrl-C stops the whole group."""

    name = "local"
    supports_replicas = True
    description = "stages run as processes on this machine"
    settings = {
        "python": Setting(str, "", "interpreter for stage scripts (default: the one running mlflowctl)"),
        "stop_timeout": Setting(float, 10.0, "seconds between SIGTERM and SIGKILL when a stage is cancelled",
                                min=0, max=3600),
        "pass_env": Setting(list, [], "more variables of your environment that stages see (names or patterns such "
                                      "as MY_*), besides PATH, HOME, locale, proxies and CA bundles; they are not part "
                                      "of the cache key, so pass nothing that changes results"),
    }

    def interpreter(self) -> str:
        return self.config.get("python") or sys.executable

    def profile(self) -> dict[str, Any]:
        return {"backend": self.name}

    def command(self, run: StageRun) -> list[str]:
        cmd = list(run.command)
        if cmd and cmd[0] in ("python", "python3"):
            cmd[0] = self.interpreter()
        return cmd

    def environment(self, run: StageRun) -> dict[str, str]:
        env = {**host_environment([*(self.config.get("pass_env") or ()), *run.pass_env]), **run.env}
        env.update({name: str(path) for name, path in {**run.inputs, **run.outputs}.items()})
        return env

    def run(self, run: StageRun) -> StageResult:
        started = time.monotonic()
        cmd = self.command(run)
        env = self.environment(run)
        with tempfile.TemporaryDirectory(prefix=f"mlflowctl-{run.stage}-replicas-") as scratch, LogWriter(run) as log:
            procs: list[tuple[str, subprocess.Popen]] = []
            readers = []
            try:
                for label, replica_env in self.replica_envs(run, env, Path(scratch)):
                    try:
                        proc = subprocess.Popen(
                            cmd, cwd=run.workdir, env=replica_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            text=True, errors="replace", bufsize=1,
                        )
                    except OSError as exc:
                        raise MlflowctlError(f"stage {run.stage}: cannot start {shlex.join(cmd)}: {exc.strerror}",
                                             hint="check backends.local.python in mlflowctl.yaml") from None
                    procs.append((label, proc))
                    reader = threading.Thread(target=_pump, args=(proc, log, label), daemon=True)
                    reader.start()
                    readers.append(reader)
                failed = self._wait(run, procs, started)
            except BaseException:
                for _, proc in procs:
                    self._stop_group(proc)
                for reader in readers:
                    reader.join(timeout=2)
                raise
            if failed is not None:  # one replica failed: the others would wait for it forever
                for _, proc in procs:
                    self._stop_group(proc)
            for reader in readers:
                reader.join()
            if failed is not None and len(procs) > 1:
                label, proc = failed
                own = [line[len(label) + 2:] for line in log.tail if line.startswith(f"{label}: ")]
                log.line(f"{label} exited with code {proc.returncode}" + (f" ({own[-1]})" if own else "")
                         + "; stopped the other replicas")
        code = failed[1].returncode if failed is not None else 0
        return StageResult(code, time.monotonic() - started, run.log_path,
                           detail={"replicas": run.replicas} if run.replicas > 1 else {})

    def _wait(self, run: StageRun, procs: list[tuple[str, subprocess.Popen]],
              started: float) -> tuple[str, subprocess.Popen] | None:
        """Wait until every replica has exited (None) or one has failed (that one)."""
        while True:
            running = False
            for label, proc in procs:
                code = proc.poll()
                if code is None:
                    running = True
                elif code != 0:
                    return label, proc
            if not running:
                return None
            if len(procs) == 1:
                try:
                    procs[0][1].wait(timeout=POLL_SECONDS)  # returns the moment the stage exits
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(POLL_SECONDS)
            if any(proc.poll() is None for _, proc in procs):
                run.raise_if_stopped(started)

    def replica_envs(self, run: StageRun, env: dict[str, str], scratch: Path) -> list[tuple[str, dict[str, str]]]:
        """(log label, environment) per replica: one as it is, or N with a TF_CONFIG on free loopback ports,
        worker 0 (the chief) writing the outputs and the others each a throwaway folder under ``scratch``."""
        if run.replicas <= 1:
            return [("", env)]
        ports = free_loopback_ports(run.replicas)
        cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
        out = []
        for index in range(run.replicas):
            replica = dict(env, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            if index:
                for name in run.outputs:
                    throwaway = scratch / f"worker-{index}" / name
                    throwaway.mkdir(parents=True)
                    replica[name] = str(throwaway)
            out.append((f"worker {index}", replica))
        return out

    def _stop_group(self, proc: subprocess.Popen) -> None:
        """SIGTERM the stage's process group, then SIGKILL what is left after stop_timeout."""
        for sig, wait in ((signal.SIGTERM, float(self.config.get("stop_timeout", 10.0))), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                # the leader is gone; make sure its children are too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
            return

    def render(self, run: StageRun, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / f"{run.stage}.sh"
        env = {**run.env, **{k: str(v) for k, v in {**run.inputs, **run.outputs}.items()}}
        lines = ["#!/bin/sh", "set -e", f"cd {shlex.quote(str(run.workdir))}"]
        if run.replicas > 1:
            lines.insert(1, f"# one of {run.replicas} replicas: mlflowctl runs {run.replicas} copies, each with a "
                            f"TF_CONFIG on loopback ports (worker 0 writes the outputs)")
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
        lines.append("exec " + shlex.join(self.command(run)))
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        return [script]


def _pump(proc: subprocess.Popen, log: LogWriter, label: str = "") -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.line(f"{label}: {line}" if label else line)


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (held together while picked, so no repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@hookimpl
def mlflowctl_add_backends(registry: Any) -> None:
    registry.add_backend(LocalBackend)
