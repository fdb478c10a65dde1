"""Run every benchmark in sequence (each a subprocess with a time limit) and print one summary table.

Usage: .venv/bin/python bench/run_all.py [--only startup,noop,data,local_backend,s3] [--no-dvc]
(``make bench`` runs it.) Figures are printed, never asserted: the verdict
column says ok/over against the issue's targets; the exit code is 0 unless a
benchmark crashed or timed out.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import common as bench

# name, script, time limit in seconds
BENCHES = (
    ("startup", "bench_startup.py", 300),
    ("noop", "bench_noop.py", 1200),
    ("data", "bench_data.py", 300),
    ("local_backend", "bench_local_backend.py", 1500),
    ("s3", "bench_s3.py", 900),
    ("ui", "bench_ui.py", 300),
    ("k8s", "bench_k8s.py", 1800),
    ("tfjob", "bench_tfjob.py", 1800),
)


def run_limited(cmd: list[str], limit: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ``cmd`` with its output live; kill its process group after ``limit`` s. (exit code or None, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=bench.BENCH_DIR, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        code: int | None = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        code = None
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        raise
    finally:
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
    return code, time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(b[0] for b in BENCHES))
    ap.add_argument("--no-dvc", action="store_true", help="skip installing and timing dvc")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {b[0] for b in BENCHES}
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    fd, results_path = tempfile.mkstemp(prefix="mlflowctl-bench-", suffix=".jsonl")
    os.close(fd)
    env = {**os.environ, "BENCH_RESULTS": results_path, "PYTHONUNBUFFERED": "1"}
    load_before = bench.load_average()
    started = time.monotonic()
    status: list[tuple[str, str]] = []
    crashed = False
    try:
        if not args.no_dvc and (not only or only & {"startup", "noop"}):
            # Install dvc first (once, cached) so that bench_startup can time `dvc --help` too.
            code, secs = run_limited([sys.executable, "common.py", "--ensure-dvc"], 900, env)
            status.append(("dvc install", "timed out" if code is None else f"exit {code}, {secs:.0f} s"))
        for name, script, limit in BENCHES:
            if only and name not in only:
                continue
            print(f"\n######## {name}: {script} (time limit {limit} s)\n", flush=True)
            cmd = [sys.executable, script] + (["--no-dvc"] if args.no_dvc and name == "noop" else [])
            code, secs = run_limited(cmd, limit, env)
            if code is None:
                crashed = True
                status.append((name, f"TIMED OUT after {limit} s (killed)"))
            else:
                crashed |= code != 0
                status.append((name, f"exit {code}, {secs:.0f} s"))
        with open(results_path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    finally:
        os.unlink(results_path)

    print("\n" + "=" * 100)
    print(f"SUMMARY  ({time.monotonic() - started:.0f} s; load average before {load_before}, "
          f"after {bench.load_average()})")
    print("wall-time medians; the machine is shared and noisy, so the CPU figures in the notes are the steadier ones")
    rows = [("figure", "value", "target", "peer", "verdict")]
    for r in records:
        value = "-" if r["value"] is None else f"{bench.num(r['value']).strip()} {r['unit']}".strip()
        rows.append((r["figure"], value, r["target"] or "-", r["peer"] or "-", r["verdict"]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
        if i == 0:
            print("-" * (sum(widths) + 2 * 4 + 7))
    notes = [(r["figure"], r["note"]) for r in records if r.get("note")]
    if notes:
        print("\nnotes:")
        for figure, note in notes:
            print(f"  {figure}: {note}")
    print("\nruns:")
    for name, text in status:
        print(f"  {name:<14} {text}")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
