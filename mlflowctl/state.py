"""The project's state folder, ``.mlflowctl/``: created atomically, marked as a cache."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

STATE_DIR = ".mlflowctl"

README = """\
# mlflowctl state

This folder is written by mlflowctl: the default artifact store (store/),
doit's dependency database, stage logs and the local model server's files.
`make clean` removes it; nothing in here should be committed.
"""

CACHEDIR_TAG = """\
Signature: 8a477f597d28d172789f06886806bc55
# This file is a cache directory tag created by mlflowctl.
# For information about cache directory tags, see https://bford.info/cachedir/
"""


def ensure_state_dir(root: Path) -> Path:
    """Return ``root/.mlflowctl``, creating it (with README, .gitignore, CACHEDIR.TAG) all at once."""
    path = root / STATE_DIR
    if path.is_dir():
        return path
    tmp = Path(tempfile.mkdtemp(prefix=".mlflowctl-", dir=root))
    try:
        (tmp / "README.md").write_text(README)
        (tmp / ".gitignore").write_text("# created by mlflowctl\n*\n")
        (tmp / "CACHEDIR.TAG").write_text(CACHEDIR_TAG)
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():  # not a lost race with another process: a real error
            raise
    return path


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` runs on this machine (a zombie child of ours is reaped and counts as gone)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


LOCK_FILE = "run.lock"
LOCK_TIMEOUT_ENV = "MLFLOWCTL_LOCK_TIMEOUT"
_held: dict[str, int] = {}  # lock path -> fd, held until the process ends


def run_lock(state_dir: Path, timeout: float | None = None) -> bool:
    """Take the project's run lock (``.mlflowctl/run.lock``) for the rest of this process.

    One ``doit`` at a time runs stages of a project: another one waits up to
    ``timeout`` seconds (default ``$MLFLOWCTL_LOCK_TIMEOUT`` or 600), then
    fails with one line. The kernel drops the lock when the holder exits,
    even on ``kill -9``. Returns True when it had to wait.
    """
    import fcntl
    import sys
    import time

    from mlflowctl.errors import UnavailableError

    path = Path(state_dir) / LOCK_FILE
    if str(path) in _held:
        return False
    if timeout is None:
        try:
            timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, "600"))
        except ValueError:
            timeout = 600.0
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline, waited = time.monotonic() + max(0.0, timeout), False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise UnavailableError(
                    f"another doit run{holder} is running stages of this project; waited {timeout:g}s for it",
                    hint=f"let it finish or stop it; {LOCK_TIMEOUT_ENV}=seconds waits longer") from None
            if not waited:
                print(f"mlflowctl: waiting for another doit run{holder} on this project (up to {timeout:g}s)",
                      file=sys.stderr, flush=True)
                waited = True
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[str(path)] = fd
    return waited


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
    return ""
