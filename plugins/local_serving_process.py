"""The ``process`` runtime of the ``local`` serving target: the model server as a detached local process
of ``serving.local.python`` (its own session); ``server.pid`` names it."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflowctl.errors import MlflowctlError, UnavailableError
from mlflowctl.state import pid_alive as _pid_alive
from mlflowctl_plugins.local_serving_runtime import SERVER_SCRIPT, STOP_TIMEOUT, RuntimeHost, is_our_server


class ProcessRuntime:
    """The server as a detached local process of ``serving.local.python``; ``server.pid`` names it."""

    name = "process"
    missing_module_hint = "install the server's requirements (image/requirements.txt) into serving.local.python"

    def __init__(self, target: "RuntimeHost") -> None:
        self.target = target
        self.proc: subprocess.Popen | None = None  # the server this object started

    def pid(self) -> int | None:
        """The pid of the running server, or None (a stale pid file is removed)."""
        pid_file = self.target.pid_file
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and is_our_server(pid, self.target.routing_file):
            return pid
        with contextlib.suppress(OSError):
            pid_file.unlink()
        return None

    def alive(self, info: dict[str, Any]) -> bool:
        return self.pid() is not None

    def describe(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"pid": self.pid(), "container": None}

    def log_hint(self, info: dict[str, Any]) -> str:
        return f"see {self.target.log_file}"

    def spawn(self, args: list[str], base: Path) -> dict[str, Any]:
        t = self.target
        script = Path(t.project.stage_code_dir) / SERVER_SCRIPT
        if not script.is_file():
            raise MlflowctlError(f"model server script {script} is missing", hint="is this an mlflowctl project folder?")
        python = str(t.setting("python"))
        cmd = [python, str(script), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        with open(t.log_file, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(cmd, cwd=str(script.parent), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise UnavailableError(f"cannot start the model server with {python}: {exc.strerror or exc}",
                                       hint="set serving.local.python to an interpreter with tensorflow and uvicorn") from None
        self.proc = proc
        t.pid_file.write_text(f"{proc.pid}\n")
        return {"pid": proc.pid, "python": python}

    def exit_code(self) -> int | None:
        """The exit code of the server :meth:`spawn` started, or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def serves(self, ready: dict[str, Any]) -> bool:
        """Is the server answering ready the one :meth:`spawn` started (not another on the port)?"""
        return self.proc is not None and ready.get("pid") == self.proc.pid

    def discard(self, info: dict[str, Any]) -> None:
        """Clean up after a server that exited by itself (a process leaves nothing behind)."""

    def stop(self, info: dict[str, Any], timeout: float = STOP_TIMEOUT) -> None:
        pid = self.pid()
        if pid is None and self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
        if pid is not None:
            self._terminate(pid, timeout)

    def hangup(self, info: dict[str, Any]) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    def _terminate(self, pid: int, timeout: float = STOP_TIMEOUT) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.1)
            else:
                time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _pid_alive(pid) and time.monotonic() < end:
                time.sleep(0.05)
        if self.proc is not None and self.proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
            self.proc = None
