"""The ``local`` backend: each stage is a subprocess of this machine's Python."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlflowctl import hookimpl
from mlflowctl.backends import Backend, LogWriter, StageResult, StageRun
from mlflowctl.config import Setting
from mlflowctl.errors import MlflowctlError

POLL_SECONDS = 0.1


class LocalBackend(Backend):
    """Runs the stage command in its own process group; Ctrl-C stops the whole group."""

    name = "local"
    description = "stages run as processes on this machine"
    settings = {
        "python": Setting(str, "", "interpreter for stage scripts (default: the one running mlflowctl)"),
        "stop_timeout": Setting(float, 10.0, "seconds between SIGTERM and SIGKILL when a stage is cancelled"),
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
        env = {**os.environ, **run.env}
        env.update({name: str(path) for name, path in {**run.inputs, **run.outputs}.items()})
        return env

    def run(self, run: StageRun) -> StageResult:
        started = time.monotonic()
        cmd = self.command(run)
        try:
            proc = subprocess.Popen(
                cmd, cwd=run.workdir, env=self.environment(run), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                text=True, errors="replace", bufsize=1,
            )
        except OSError as exc:
            raise MlflowctlError(f"stage {run.stage}: cannot start {shlex.join(cmd)}: {exc.strerror}",
                                 hint="check backends.local.python in mlflowctl.yaml") from None
        with LogWriter(run) as log:
            reader = threading.Thread(target=_pump, args=(proc, log), daemon=True)
            reader.start()
            try:
                while True:
                    try:
                        proc.wait(timeout=POLL_SECONDS)  # returns the moment the stage exits
                        break
                    except subprocess.TimeoutExpired:
                        run.raise_if_stopped(started)
            except BaseException:
                self._stop_group(proc)
                reader.join(timeout=2)
                raise
            reader.join()
        return StageResult(proc.returncode, time.monotonic() - started, run.log_path)

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
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
        lines.append("exec " + shlex.join(self.command(run)))
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        return [script]


def _pump(proc: subprocess.Popen, log: LogWriter) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.line(line)


@hookimpl
def mlflowctl_add_backends(registry: Any) -> None:
    registry.add_backend(LocalBackend)
