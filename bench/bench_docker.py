"""The Docker backend's costs: per-stage container overhead, image rebuilds, and training in a container.

1. A no-op stage (``python -c pass``): ``DockerBackend.run`` vs ``LocalBackend.run``, alternating, median
   of 5 each; plus the container's phases (create / start / wait / remove) timed with docker-py directly.
2. Rebuilds: a fresh backend on an unchanged context (digest + tag lookup, no build), and a rebuild after
   touching one stage script (``train_model.py``) with the requirements layer cached (3 runs; the
   touched images are removed afterwards).
3. ``train_model`` (EPOCHS=1, STEPS=0: one full epoch) through the docker backend vs the local backend,
   2 runs each, alternating, on data produced once by ``download.py``.

The image is the project's own (``image/``, tensorflow-cpu): the first run builds it (minutes, from PyPI
through the host network), later runs reuse it. Figures are printed, never asserted; every part is bounded
in runs and time. Needs a Docker engine (``make docker``).

Usage: .venv/bin/python bench/bench_docker.py [--noop-runs 5] [--train-runs 2] [--rebuilds 3] [--budget 900]
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import common as bench


def _timed_run(backend, run) -> tuple[float, float, int]:
    import resource

    def cpu() -> float:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ch.ru_utime + ch.ru_stime + time.process_time()

    c0, t0 = cpu(), time.perf_counter()
    result = backend.run(run)
    return time.perf_counter() - t0, cpu() - c0, result.exit_code


def container_phases(client, image_id: str, runs: int) -> dict[str, float]:
    """Median seconds of create / start / wait / remove of a ``python -c pass`` container."""
    phases: dict[str, list[float]] = {"create": [], "start": [], "wait": [], "remove": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        c = client.containers.create(image_id, ["python", "-c", "pass"], init=True, network_mode="host",
                                     user=f"{os.getuid()}:{os.getgid()}", labels={"mlflowctl.project": "bench"},
                                     name=f"mlflowctl-bench-noop-{secrets.token_hex(4)}")
        t1 = time.perf_counter()
        try:
            c.start()
            t2 = time.perf_counter()
            c.wait()
            t3 = time.perf_counter()
        finally:
            c.remove(force=True)
        t4 = time.perf_counter()
        for name, secs in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name].append(secs)
    return {name: statistics.median(v) for name, v in phases.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-runs", type=int, default=5)
    ap.add_argument("--train-runs", type=int, default=2)
    ap.add_argument("--rebuilds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=900.0, help="seconds at most for the train_model pairs")
    args = ap.parse_args()

    from mlflowctl.backends import StageRun
    from mlflowctl.errors import MlflowctlError
    from mlflowctl_plugins.docker_backend import DockerBackend
    from mlflowctl_plugins.local_backend import LocalBackend

    bench.header(f"docker backend: no-op stage {args.noop_runs}+{args.noop_runs}, {args.rebuilds} rebuilds, "
                 f"train_model {args.train_runs}+{args.train_runs} (one full epoch), alternating")
    project = bench.project_copy()
    work = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-docker-"))
    image_dir = project / "image"
    ns = types.SimpleNamespace(root=project, name="mnist", state_dir=work / "state", stage_code_dir=image_dir,
                               config={})
    docker_settings = {k: s.default for k, s in DockerBackend.settings.items()}
    made_tags: list[str] = []
    docker = DockerBackend(dict(docker_settings), ns)
    try:
        try:
            docker.preflight()
        except MlflowctlError as exc:
            print(f"docker backend unavailable: {exc}")
            bench.record("docker no-op stage overhead", None, "ms", note="no Docker engine")
            return 0
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the local backend passes os.environ on
        local = LocalBackend({"python": bench.PYTHON, "stop_timeout": 5.0}, ns)
        lines: list[str] = []

        print("image: resolving the project image (builds it the first time) ...", flush=True)
        t0 = time.perf_counter()
        image = docker.ensure_image(echo=lambda line: None)
        info = docker.build_info
        print(f"image: {info['tag']} ({image.short_id}) {'built' if info['built'] else 'present'} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)

        def stage_run(stage: str, command: list[str], env: dict[str, str], inputs: dict[str, Path],
                      outputs: dict[str, Path], tag: str) -> StageRun:
            return StageRun(stage=stage, command=command, workdir=image_dir, env=env, inputs=inputs,
                            outputs=outputs, log_path=work / "logs" / f"{stage}-{tag}.log", echo=lines.append)

        # ---------------------------------------------------------- 1. no-op stage
        empty_in, noop_out = work / "noop-in", work / "noop-out"
        empty_in.mkdir()

        def noop(backend, kind: str):
            def fn(i: int):
                out = noop_out / f"{kind}-{i}"
                out.mkdir(parents=True)
                return _timed_run(backend, stage_run("noop", ["python", "-c", "pass"], {}, {"IN_DIR": empty_in},
                                                     {"OUT_DIR": out}, f"{kind}-{i}"))
            return fn

        print(f"no-op stage: {args.noop_runs} pairs ...", flush=True)
        nl, nd = bench.alternate("no-op stage", args.noop_runs, (("LocalBackend.run", noop(local, "local")),
                                                           ("DockerBackend.run", noop(docker, "docker"))), 180.0)
        phases = container_phases(docker.client(), image.id, args.noop_runs)

        # ---------------------------------------------------------- 2. rebuilds
        print(f"rebuilds: unchanged context, then {args.rebuilds} x touching train_model.py ...", flush=True)
        hit = bench.Timing("fresh backend, unchanged context (no build)")
        rebuild = bench.Timing("rebuild after touching train_model.py")
        cached_pip = []
        for _ in range(args.rebuilds):
            b = DockerBackend(dict(docker_settings), ns)
            t0 = time.perf_counter()
            b.profile()
            hit.wall.append(time.perf_counter() - t0)
        script = image_dir / "train_model.py"
        original = script.read_text()
        try:
            for i in range(args.rebuilds):
                script.write_text(original + f"\n# bench touch {secrets.token_hex(6)}\n")
                b = DockerBackend(dict(docker_settings), ns)
                t0 = time.perf_counter()
                b.ensure_image(echo=lambda line: None)
                rebuild.wall.append(time.perf_counter() - t0)
                made_tags.append(b.build_info["tag"])
                text = "\n".join(b.build_info.get("lines", []))
                pip_step = text.find("RUN pip install")
                cached_pip.append(pip_step >= 0 and "Using cache" in text[pip_step:text.find("COPY *.py")])
        finally:
            script.write_text(original)

        # ---------------------------------------------------------- 3. train_model
        data = work / "data"
        print(f"data: running download.py into {data} ...", flush=True)
        wall, _cpu, proc = bench.run_once([bench.PYTHON, "download.py"], cwd=image_dir,
                                          env={**bench.bench_env(), "MNIST_DATA_DIR": str(data)}, timeout=600)
        tl = td = None
        if proc.returncode != 0:
            print(f"data: failed (exit {proc.returncode}); train_model skipped:\n{(proc.stdout + proc.stderr)[-800:]}")
        else:
            print(f"data: done in {wall:.1f} s", flush=True)
            train_env = {"EPOCHS": "1", "STEPS": "0", "PYTHONUNBUFFERED": "1", "STAGE_NAME": "train_model"}

            def train(backend, kind: str):
                def fn(i: int):
                    out = work / f"train-{kind}-{i}"
                    out.mkdir()
                    return _timed_run(backend, stage_run("train_model", ["python", "train_model.py"], train_env,
                                                         {"MNIST_DATA_DIR": data}, {"MNIST_MODELS_DIR": out},
                                                         f"{kind}-{i}"))
                return fn

            print(f"train_model: {args.train_runs} pairs, one full epoch each ...", flush=True)
            tl, td = bench.alternate("train_model 1 epoch", args.train_runs,
                               (("LocalBackend.run", train(local, "local")),
                                ("DockerBackend.run", train(docker, "docker"))), args.budget)

        bench.print_table("docker backend vs local backend", [t for t in (nl, nd, hit, rebuild, tl, td) if t])
        print("container phases of a no-op stage (docker-py, median of "
              f"{args.noop_runs}): " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in phases.items())
              + f"; total {1000 * sum(phases.values()):.0f} ms")
        overhead_ms = 1000 * (nd.median - nl.median) if nl.wall and nd.wall else None
        if overhead_ms is not None:
            print(f"no-op stage: the docker backend adds {overhead_ms:.0f} ms per stage over the local backend")
        if rebuild.wall:
            print(f"rebuild after a script change: {rebuild.median:.1f} s median; requirements layer cached in "
                  f"{sum(cached_pip)}/{len(cached_pip)} rebuilds")
        ratio = td.median / tl.median if tl and td and tl.wall and td.wall else None
        if ratio is not None:
            print(f"train_model one epoch: docker {td.median:.1f} s vs local {tl.median:.1f} s "
                  f"(ratio {ratio:.2f}; includes TensorFlow start-up in both)")
        print()
        bench.record("docker no-op stage overhead", overhead_ms, "ms", target="(info)",
                     peer=f"local {bench.fmt_s(nl)}, docker {bench.fmt_s(nd)}",
                     note="create/start/wait/remove " + "/".join(f"{1000 * v:.0f}" for v in phases.values()) + " ms")
        bench.record("docker rebuild after touching a script", rebuild.median if rebuild.wall else None, "s",
                     target="(info)", peer=f"no-change lookup {bench.fmt_s(hit)}",
                     note=f"pip layer cached {sum(cached_pip)}/{len(cached_pip)}")
        bench.record("docker/local train_model wall ratio", ratio, "x", target="(info)",
                     peer=f"local {bench.fmt_s(tl)}, docker {bench.fmt_s(td)}")
    except subprocess.TimeoutExpired as exc:
        print(f"timed out: {exc}")
        bench.record("docker/local train_model wall ratio", None, "x", note="timed out")
    finally:
        try:
            client = docker.client() if docker._client is not None else None
            for tag in made_tags:
                if client is not None:
                    try:
                        client.images.remove(tag)
                    except Exception:  # noqa: BLE001 - best effort
                        pass
            if client is not None:
                for c in client.containers.list(all=True, filters={"label": "mlflowctl.project=bench"}):
                    c.remove(force=True)
        finally:
            bench.remove(project)
            bench.remove(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
