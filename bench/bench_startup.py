"""Startup time: ``mlflowctl --help`` (target <= 0.2 s) and ``doit list`` in a project copy (<= 0.3 s).

Peers, timed the same way: bare ``doit --help``, bare ``doit list`` on a plain
4-task dodo, and ``dvc --help`` when bench/.cache/dvc-venv exists (bench_noop.py
or ``run_all.py`` creates it). Then checks, with ``python -X importtime``, that
neither command imports tensorflow, docker, kubernetes or boto3.

Usage: .venv/bin/python bench/bench_startup.py [--runs 15] [--warmups 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common as bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds at most per command")
    args = ap.parse_args()

    bench.header(f"startup: median of {args.runs} runs after {args.warmups} warm-ups")
    project = bench.project_copy()
    bare = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-bare-"))
    bench.write_bare_dodo(bare)
    env = bench.bench_env()
    kw = dict(runs=args.runs, warmups=args.warmups, budget=args.budget, timeout=30.0, env=env)
    try:
        mlf_help = bench.time_command("mlflowctl --help", [bench.MLFLOWCTL, "--help"], cwd=project, **kw)
        mlf_list = bench.time_command("doit list (mlflowctl project copy)", [bench.DOIT, "list"], cwd=project, **kw)
        doit_help = bench.time_command("doit --help (bare doit)", [bench.DOIT, "--help"], cwd=bare, **kw)
        bare_list = bench.time_command("doit list (bare 4-task dodo)", [bench.DOIT, "list"], cwd=bare, **kw)
        py_bare = bench.time_command("python -c pass (venv interpreter floor)", [bench.PYTHON, "-c", "pass"],
                                     cwd=bare, **kw)
        timings = [mlf_help, mlf_list, doit_help, bare_list, py_bare]
        dvc = bench.dvc_path()
        dvc_help = None
        if dvc:
            dvc_help = bench.time_command(f"dvc --help (dvc {bench.dvc_version()})", [str(dvc), "--help"], cwd=bare,
                                          **{**kw, "env": bench.dvc_env()})
            timings.append(dvc_help)
        else:
            print("note: dvc is not installed in bench/.cache/dvc-venv; `dvc --help` skipped "
                  "(run bench_noop.py or run_all.py to install it)")
        bench.print_table("startup", timings)

        print("heavy imports (python -X importtime; top-level packages among "
              f"{', '.join(bench.HEAVY_MODULES)}):")
        heavy: dict[str, list[str]] = {}
        for label, cmd in (("mlflowctl --help", ["-m", "mlflowctl.cli", "--help"]),
                           ("doit list", ["-m", "doit", "list"])):
            mods, top = bench.imported_top_modules(cmd, cwd=project, env=env)
            found = bench.heavy_found(mods)
            heavy[label] = [m for m in found if m in bench.FORBIDDEN_MODULES]
            print(f"  {label:<18} heavy: {found or '[] (none)'}")
            print(f"  {'':<18} slowest top-level imports: {top}")
        print()

        peer_help = f"doit --help {bench.fmt_s(doit_help)}" + (f", dvc --help {bench.fmt_s(dvc_help)}" if dvc_help else "")
        bench.record("mlflowctl --help", mlf_help.median if mlf_help.wall else None, "s", limit=0.2,
                     target="<= 0.2 s", peer=peer_help, note=f"min {min(mlf_help.wall, default=0):.3f} s, cpu {mlf_help.cpu_median:.3f} s")
        bench.record("doit list (project copy)", mlf_list.median if mlf_list.wall else None, "s", limit=0.3,
                     target="<= 0.3 s", peer=f"bare doit list {bench.fmt_s(bare_list)}",
                     note=f"min {min(mlf_list.wall, default=0):.3f} s, cpu {mlf_list.cpu_median:.3f} s; "
                          f"bare doit list cpu {bare_list.cpu_median:.3f} s")
        for label, forbidden in heavy.items():
            bench.record(f"heavy imports: {label}", float(len(forbidden)), "", limit=0.0, target="none",
                         note=", ".join(forbidden) or "none of tensorflow/docker/kubernetes/boto3")
    finally:
        bench.remove(project)
        bench.remove(bare)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
