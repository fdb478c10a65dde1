"""Shared helpers of the benchmarks: timing, project copies, result records.

Benchmarks PRINT figures (median of N runs, with min and max); they never
assert. Every run is bounded in count and in time. Each benchmark appends its
headline figures as JSON lines to ``$BENCH_RESULTS`` (when set) so that
``run_all.py`` can print one summary table.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"

# The project's venv (doit, mlflowctl, tensorflow); fall back to the running interpreter's.
_VENV_BIN = ROOT / ".venv" / "bin"
BIN = _VENV_BIN if (_VENV_BIN / "doit").exists() else Path(sys.executable).parent
PYTHON = str(BIN / "python")
DOIT = str(BIN / "doit")
MLFLOWCTL = str(BIN / "mlflowctl")

PROJECT_FILES = ("dodo.py", "tasks", "image", "mlflowctl.yaml")
HEAVY_MODULES = ("tensorflow", "docker", "kubernetes", "boto3", "botocore", "keras", "numpy")
# numpy is not forbidden, but worth seeing; the issue names the first four.
FORBIDDEN_MODULES = ("tensorflow", "docker", "kubernetes", "boto3")


# ----------------------------------------------------------------- environment
def bench_env(**extra: str) -> dict[str, str]:
    """The environment for timed commands: quiet TensorFlow, no bytecode writes, the venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # let .pyc files be written: timed runs after warm-ups use them
    env.update(extra)
    return env


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (on {os.cpu_count()} cores)"


def header(title: str) -> None:
    print(f"== {title}", flush=True)
    print(f"   python {sys.version.split()[0]}, venv {BIN}, load average {load_average()}", flush=True)


# -------------------------------------------------------------- project copies
def project_copy(prefix: str = "mlflowctl-bench-") -> Path:
    """A temporary copy of the project (dodo.py, tasks/, image/, mlflowctl.yaml); the repo's state is untouched."""
    dest = Path(tempfile.mkdtemp(prefix=prefix))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".mlflowctl")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
        else:
            raise SystemExit(f"bench: {src} is missing; run from a complete checkout")
    return dest


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall and CPU (user+sys of the child processes) seconds of repeated runs."""

    label: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    failures: int = 0
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")

    def row(self) -> str:
        if not self.wall:
            return f"{self.label:<44} {'-':>8} {'-':>8} {'-':>8} {'-':>8} {0:>3}  {self.note}"
        return (f"{self.label:<44} {num(self.median)} {num(min(self.wall))} {num(max(self.wall))} "
                f"{num(self.cpu_median)} {self.n:>3}  {self.note}").rstrip()


def num(v: float) -> str:
    """8 characters: 3 decimals, or 5 below 0.01 so small figures do not print as 0.000."""
    return f"{v:8.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:8.5f}"


TABLE_HEAD = f"{'what':<44} {'median':>8} {'min':>8} {'max':>8} {'cpu med':>8} {'n':>3}"


def print_table(title: str, timings: Sequence[Timing]) -> None:
    print(f"\n{title} (seconds: wall time, and CPU time user+sys of the timed process and its children)")
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD))
    for t in timings:
        print(t.row())
    print(flush=True)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(cmd: Sequence[str], *, cwd: Path | str | None = None, env: dict[str, str] | None = None,
             timeout: float = 60.0) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd`` once; return (wall s, CPU s, completed process). Output is captured, not shown."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", timeout=timeout)
    wall = time.perf_counter() - t0
    return wall, _children_cpu() - cpu0, proc


def time_command(label: str, cmd: Sequence[str], *, runs: int, warmups: int = 0, cwd: Path | str | None = None,
                 env: dict[str, str] | None = None, timeout: float = 60.0, budget: float = 120.0,
                 check: Callable[[subprocess.CompletedProcess], bool] | None = None) -> Timing:
    """Time ``runs`` runs of ``cmd`` after ``warmups``; stop early (and say so) past ``budget`` seconds."""
    timing = Timing(label)
    deadline = time.monotonic() + budget
    env = env if env is not None else bench_env()
    for i in range(warmups + runs):
        if time.monotonic() > deadline:
            timing.note = f"budget {budget:g}s hit after {timing.n} runs"
            break
        try:
            wall, cpu, proc = run_once(cmd, cwd=cwd, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            timing.failures += 1
            timing.note = f"a run timed out after {timeout:g}s"
            break
        ok = proc.returncode == 0 if check is None else check(proc)
        if not ok:
            timing.failures += 1
            timing.note = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
            break
        if i >= warmups:
            timing.wall.append(wall)
            timing.cpu.append(cpu)
    return timing


def time_call(label: str, fn: Callable[[], object], *, runs: int, warmups: int = 0, budget: float = 120.0) -> Timing:
    """Time an in-process call (CPU time here is this process's user+sys)."""
    timing = Timing(label)
    deadline = time.monotonic() + budget
    for i in range(warmups + runs):
        if time.monotonic() > deadline:
            timing.note = f"budget {budget:g}s hit after {timing.n} runs"
            break
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        if i >= warmups:
            timing.wall.append(wall)
            timing.cpu.append(cpu)
    return timing


# ------------------------------------------------------------- heavy imports
def imported_top_modules(cmd_after_python: Sequence[str], *, cwd: Path | str | None = None,
                         env: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[set[str], str]:
    """Top-level packages imported by ``python -X importtime <cmd_after_python>``; and the slowest imports."""
    proc = subprocess.run([PYTHON, "-X", "importtime", *cmd_after_python], cwd=cwd, env=env or bench_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=timeout)
    mods: set[str] = set()
    rows: list[tuple[int, str]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        mods.add(name.split(".")[0])
        if not parts[2].startswith("   "):  # a top-level import (least indented): its cumulative time
            rows.append((int(parts[1]), name))
    rows.sort(reverse=True)
    top = ", ".join(f"{name} {us / 1000:.0f}ms" for us, name in rows[:6])
    return mods, top


def heavy_found(mods: set[str]) -> list[str]:
    return sorted(m for m in HEAVY_MODULES if m in mods)


# ------------------------------------------------------------ summary records
def record(figure: str, value: float | None, unit: str, *, limit: float | None = None, target: str = "",
           peer: str = "", note: str = "") -> dict:
    """Print one headline figure next to its target and peer, and append it to $BENCH_RESULTS."""
    if value is None or value != value:  # None or NaN
        verdict = "n/a"
    elif limit is None:
        verdict = "-"
    else:
        verdict = "ok" if value <= limit else "over"
    rec = {"figure": figure, "value": value, "unit": unit, "target": target, "peer": peer,
           "verdict": verdict, "note": note}
    shown = "-" if value is None or value != value else f"{num(value).strip()} {unit}".strip()
    print(f"RESULT  {figure}: {shown}  target {target or '-'}  peer {peer or '-'}  -> {verdict}"
          + (f"  ({note})" if note else ""), flush=True)
    path = os.environ.get("BENCH_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
    return rec


def fmt_s(t: Timing | None) -> str:
    return "-" if t is None or not t.wall else f"{num(t.median).strip()} s"


# ------------------------------------------------------------------------- dvc
DVC_VENV = CACHE_DIR / "dvc-venv"
_DVC_STAMP = DVC_VENV / ".bench-installed"


def dvc_path() -> Path | None:
    """The cached dvc of the bench venv, when a previous install finished."""
    exe = DVC_VENV / "bin" / "dvc"
    return exe if exe.exists() and _DVC_STAMP.exists() else None


def dvc_env(workdir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{DVC_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_NO_UPDATER"] = "1"  # older dvc; newer ones read core.check_update
    env.setdefault("GIT_AUTHOR_NAME", "bench")
    env.setdefault("GIT_AUTHOR_EMAIL", "bench@localhost")
    env.setdefault("GIT_COMMITTER_NAME", "bench")
    env.setdefault("GIT_COMMITTER_EMAIL", "bench@localhost")
    return env


def ensure_dvc(timeout: float = 900.0) -> tuple[Path | None, str]:
    """Create bench/.cache/dvc-venv with ``pip install dvc`` once; return (dvc path or None, note)."""
    exe = dvc_path()
    if exe:
        return exe, "cached"
    base = getattr(sys, "_base_executable", "") or shutil.which("python3") or sys.executable
    shutil.rmtree(DVC_VENV, ignore_errors=True)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"dvc: installing dvc into {DVC_VENV} (once; cached afterwards) ...", flush=True)
    steps = ([base, "-m", "venv", str(DVC_VENV)],
             [str(DVC_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "dvc"])
    for cmd in steps:
        left = timeout - (time.monotonic() - started)
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            shutil.rmtree(DVC_VENV, ignore_errors=True)
            return None, f"dvc install timed out after {timeout:g}s"
        except OSError as exc:
            shutil.rmtree(DVC_VENV, ignore_errors=True)
            return None, f"dvc install failed: {exc}"
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            shutil.rmtree(DVC_VENV, ignore_errors=True)
            return None, f"dvc install failed ({' '.join(cmd[-2:])}): {tail[0][:160]}"
    version = subprocess.run([str(DVC_VENV / "bin" / "dvc"), "--version"], capture_output=True, text=True,
                             env=dvc_env(), timeout=120).stdout.strip()
    _DVC_STAMP.write_text(version + "\n")
    print(f"dvc: installed dvc {version} in {time.monotonic() - started:.0f}s", flush=True)
    return dvc_path(), f"installed dvc {version}"


def dvc_version() -> str:
    return _DVC_STAMP.read_text().strip() if _DVC_STAMP.exists() else ""


# ---------------------------------------------- the equivalent 4-stage graph
# data -> train_model, train_concept -> register: trivial commands, files as deps/outs.
# ``data`` depends on a source file (as the real stage depends on its code and the dataset):
# a task without any dependency is never up to date for doit.
SOURCE = "raw/source.txt"
GRAPH = (
    ("data", (SOURCE,), "data/train.txt"),
    ("train_model", ("data/train.txt",), "models/model.txt"),
    ("train_concept", ("data/train.txt",), "concept/concept.txt"),
    ("register", ("models/model.txt", "concept/concept.txt"), "registry/v1.txt"),
)


def graph_command(out: str) -> str:
    folder = os.path.dirname(out)
    return (f"python -c \"import os; os.makedirs('{folder}', exist_ok=True); "
            f"open('{out}', 'w').write('{folder}')\"")


def write_source(folder: Path) -> None:
    (folder / SOURCE).parent.mkdir(parents=True, exist_ok=True)
    (folder / SOURCE).write_text("raw data\n")


def write_dvc_yaml(folder: Path) -> None:
    write_source(folder)
    lines = ["stages:"]
    for name, deps, out in GRAPH:
        lines.append(f"  {name}:")
        lines.append(f"    cmd: {json.dumps(graph_command(out))}")
        if deps:
            lines.append("    deps:")
            lines += [f"      - {d}" for d in deps]
        lines.append("    outs:")
        lines.append(f"      - {out}")
    (folder / "dvc.yaml").write_text("\n".join(lines) + "\n")


def write_bare_dodo(folder: Path) -> None:
    """A plain doit dodo.py with the same graph (file_dep/targets), nothing of mlflowctl."""
    write_source(folder)
    lines = ['"""Bare doit: the 4-stage graph of the benchmarks."""', ""]
    for name, deps, out in GRAPH:
        lines += [f"def task_{name}():",
                  f"    return {{'actions': [{graph_command(out)!r}], 'file_dep': {list(deps)!r}, "
                  f"'targets': [{out!r}]}}", ""]
    (folder / "dodo.py").write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] == ["--ensure-dvc"]:
        path, note = ensure_dvc()
        print(f"dvc: {path or 'not available'} ({note})")
        raise SystemExit(0)
    raise SystemExit("usage: common.py --ensure-dvc")


def alternate(label: str, n: int, pairs: tuple, budget: float) -> tuple[Timing, Timing]:
    """Alternate two ways of running the same thing, n each, within ``budget`` seconds.

    ``pairs`` is ((label_a, fn_a), (label_b, fn_b)); each fn(i) returns (wall, cpu, exit code).
    """
    (la, fa), (lb, fb) = pairs
    a, b = Timing(f"{label}: {la}"), Timing(f"{label}: {lb}")
    deadline = time.monotonic() + budget
    for i in range(n):
        if time.monotonic() > deadline:
            a.note = b.note = f"budget {budget:g}s hit after {i} pairs"
            break
        for timing, fn in ((a, fa), (b, fb)):
            wall, cpu, code = fn(i)
            if code != 0:
                timing.failures += 1
                timing.note = f"exit {code}"
                return a, b
            timing.wall.append(wall)
            timing.cpu.append(cpu)
    return a, b
