"""Overhead of the local backend on ``train_model`` (target <= 5 %), and on a no-op stage.

Produces train.npz/t10k.npz once (image/download.py with MNIST_DATA_DIR set),
then runs ``train_model.py`` (EPOCHS=1, STEPS=0: one full epoch) alternately
as a plain subprocess and through ``LocalBackend(...).run(StageRun(...))``,
3 runs each; then a no-op stage (``python -c pass``) the same way, 10 runs each.
The backend's live lines go to a no-op ``echo`` (the direct run's output is
captured too), so neither pays for printing to the terminal.

Usage: .venv/bin/python bench/bench_local_backend.py [--runs 3] [--noop-runs 10]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import types
from pathlib import Path

import common as bench


def _direct(cmd: list[str], workdir: Path, env: dict[str, str], timeout: float) -> tuple[float, float, int]:
    wall, cpu, proc = bench.run_once(cmd, cwd=workdir, env=env, timeout=timeout)
    return wall, cpu, proc.returncode


def _through_backend(backend, run) -> tuple[float, float, int]:
    import resource

    def cpu() -> float:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ch.ru_utime + ch.ru_stime + time.process_time()

    c0, t0 = cpu(), time.perf_counter()
    result = backend.run(run)
    return time.perf_counter() - t0, cpu() - c0, result.exit_code


def overhead(d: bench.Timing, b: bench.Timing) -> float | None:
    if not d.wall or not b.wall:
        return None
    return (b.median - d.median) / d.median * 100.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--noop-runs", type=int, default=10)
    ap.add_argument("--budget", type=float, default=900.0, help="seconds at most for the train_model pairs")
    args = ap.parse_args()

    from mlflowctl.backends import StageRun
    from mlflowctl_plugins.local_backend import LocalBackend

    bench.header(f"local backend overhead: train_model {args.runs}+{args.runs} runs, "
                 f"no-op stage {args.noop_runs}+{args.noop_runs}, alternating")
    project = bench.project_copy()
    work = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-backend-"))
    image = project / "image"
    data = work / "data"
    base_env = bench.bench_env(TF_CPP_MIN_LOG_LEVEL="2")
    try:
        print(f"data: running download.py into {data} ...", flush=True)
        wall, _cpu, proc = bench.run_once([bench.PYTHON, "download.py"], cwd=image,
                                          env={**base_env, "MNIST_DATA_DIR": str(data)}, timeout=600)
        if proc.returncode != 0:
            print(f"data: failed (exit {proc.returncode}); skipped:\n{(proc.stdout + proc.stderr)[-800:]}")
            bench.record("local backend overhead on train_model", None, "%", target="<= 5 %", note="data failed")
            return 0
        print(f"data: done in {wall:.1f} s", flush=True)

        ns = types.SimpleNamespace(root=project, name="bench", state_dir=work / "state",
                                   stage_code_dir=image)
        backend = LocalBackend({"python": bench.PYTHON}, ns)
        lines: list[str] = []

        def stage_run(stage: str, command: list[str], env: dict[str, str], outputs: dict[str, Path],
                      i: int) -> StageRun:
            return StageRun(stage=stage, command=command, workdir=image, env=env,
                            inputs={"MNIST_DATA_DIR": data} if stage == "train_model" else {},
                            outputs=outputs, log_path=work / "logs" / f"{stage}-{i}.log",
                            echo=lines.append)

        # ---------------------------------------------------------- train_model
        train_env = {"EPOCHS": "1", "STEPS": "0"}

        def direct_train(i: int):
            out = work / f"direct-{i}"
            env = {**base_env, **train_env, "MNIST_DATA_DIR": str(data), "MNIST_MODELS_DIR": str(out)}
            return _direct([bench.PYTHON, "train_model.py"], image, env, timeout=900)

        def backend_train(i: int):
            out = work / f"backend-{i}"
            return _through_backend(backend, stage_run("train_model", ["python", "train_model.py"], train_env,
                                                       {"MNIST_MODELS_DIR": out}, i))

        print(f"train_model: {args.runs} pairs, one full epoch each ...", flush=True)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the backend passes os.environ on
        td, tb = bench.alternate("train_model 1 epoch", args.runs, (("direct subprocess", direct_train), ("LocalBackend.run", backend_train)), args.budget)

        # ---------------------------------------------------------- no-op stage
        def direct_noop(i: int):
            return _direct([bench.PYTHON, "-c", "pass"], image, {**base_env}, timeout=60)

        def backend_noop(i: int):
            return _through_backend(backend, stage_run("noop", ["python", "-c", "pass"], {}, {}, 100 + i))

        nd, nb = bench.alternate("no-op stage", args.noop_runs, (("direct subprocess", direct_noop), ("LocalBackend.run", backend_noop)), 120.0)
        bench.print_table("local backend vs direct subprocess", [td, tb, nd, nb])

        train_pct, noop_pct = overhead(td, tb), overhead(nd, nb)
        if nd.wall and nb.wall:
            print(f"no-op stage: backend adds {1000 * (nb.median - nd.median):.0f} ms per stage "
                  "(wall medians: log file, reader thread, process group)")
        if td.wall:
            print("train_model runs in order (direct / backend): " + "  ".join(
                f"{d:.2f}/{b:.2f}" for d, b in zip(td.wall, tb.wall)))
        if td.wall and tb.wall:
            print(f"train_model: backend - direct = {tb.median - td.median:+.2f} s on {td.median:.1f} s "
                  f"(wall medians, {len(td.wall)} pairs; on this shared machine run-to-run spread is "
                  f"{min(td.wall):.1f}-{max(td.wall):.1f} s direct)")
        print()
        cpu_note = (f"cpu overhead {(tb.cpu_median - td.cpu_median) / td.cpu_median * 100:+.1f} %, "
                    f"min-to-min {(min(tb.wall) - min(td.wall)) / min(td.wall) * 100:+.1f} %"
                    if td.cpu and tb.cpu else "")
        if td.wall and nd.wall and nb.wall:
            # The steadier estimate: the backend's fixed per-stage cost (no-op pairs) over the training time.
            fixed = nb.median - nd.median
            cpu_note += (f"; fixed per-stage cost {1000 * fixed:.0f} ms = {100 * fixed / td.median:.1f} % "
                         f"of train_model")
        bench.record("local backend overhead on train_model", train_pct, "%", limit=5.0, target="<= 5 %",
                     peer=f"direct {bench.fmt_s(td)}, backend {bench.fmt_s(tb)}", note=cpu_note)
        bench.record("local backend overhead, no-op stage", noop_pct, "%", target="(info)",
                     peer=f"direct {bench.fmt_s(nd)}, backend {bench.fmt_s(nb)}",
                     note=(f"+{1000 * (nb.median - nd.median):.0f} ms per stage" if nd.wall and nb.wall else ""))
    except subprocess.TimeoutExpired as exc:
        print(f"timed out: {exc}")
        bench.record("local backend overhead on train_model", None, "%", target="<= 5 %", note="timed out")
    finally:
        bench.remove(project)
        bench.remove(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
