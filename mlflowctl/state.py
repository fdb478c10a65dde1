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
