"""The k8s backend's costs on the test cluster: a no-op stage as a Job, a no-op pipeline re-run, cluster start.

1. A no-op stage (``python -c pass``) through ``KubeBackend.run`` (submit -> running -> done, log saved,
   Job deleted) next to ``DockerBackend.run`` of the same tiny image, alternating, median of N each.
   Targets: <= 5 s, and <= 4x docker.
2. ``doit`` with nothing to do, ``backend=k8s store=pvc://...``, after the whole pipeline ran once with
   tiny training settings (every up-to-date check goes through the API server to the store server and,
   for deploy, to the model server). Target: <= 1 s.
3. Cluster start: the cold build time recorded by ``scripts/ensure-cluster.sh`` and, with ``--restart``,
   a warm ``down`` + ``up`` (binary cached).

Printed, never asserted; bounded in runs and time. Needs the test cluster (``make cluster``) and Docker.

Usage: .venv/bin/python bench/bench_k8s.py [--noop-runs 5] [--pipeline-runs 5] [--restart]
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import common as bench

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def cluster():
    import kube_fixtures as kf
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kf.KUBECONFIG)
    return kf, types.SimpleNamespace(api=api, core=client.CoreV1Api(api), batch=client.BatchV1Api(api))


def noop_stage(args, kf, c, namespace: str) -> None:
    from mlflowctl.backends import StageRun, StoreLocation
    from mlflowctl_plugins.docker_backend import DockerBackend
    from mlflowctl_plugins.k8s_backend import KubeBackend
    from mlflowctl_plugins.pvc_store import PvcStore

    work = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-k8s-"))
    code = work / "image"
    code.mkdir()
    (code / "Dockerfile").write_text("FROM python:3.11-slim\nWORKDIR /app\nCOPY *.py ./\n")
    (code / "noop.py").write_text("pass\n")
    (work / "state").mkdir()
    k8s = kf.k8s_settings(namespace)
    project = types.SimpleNamespace(root=work, name="benchk8s", model_name="m", state_dir=work / "state",
                                    stage_code_dir=code, config={"backends": {"k8s": k8s, "docker": {}}})
    project.store = PvcStore("pvc://store/bench", {}, project)
    kube, docker = KubeBackend(k8s, project), DockerBackend({}, project)
    kube.preflight()
    docker.preflight()
    kube.image(lambda line: None)  # build + load once, outside the timings
    out = work / "out"

    def k8s_once() -> float:
        with project.store.remote_staging("noop") as staging:
            run = StageRun(stage="noop", command=["python", "noop.py"], workdir=code, env={}, inputs={}, outputs={},
                           locations={"OUT": StoreLocation(project.store, staging, read_only=False)},
                           log_path=work / "k8s.log", echo=lambda line: None)
            t0 = time.perf_counter()
            assert kube.run(run).ok
            return time.perf_counter() - t0

    def docker_once() -> float:
        out.mkdir(exist_ok=True)
        run = StageRun(stage="noop", command=["python", "noop.py"], workdir=code, env={}, inputs={},
                       outputs={"OUT": out}, log_path=work / "docker.log", echo=lambda line: None)
        t0 = time.perf_counter()
        assert docker.run(run).ok
        return time.perf_counter() - t0

    k8s_times, docker_times = [], []
    deadline = time.monotonic() + 600
    for _ in range(args.noop_runs):
        if time.monotonic() > deadline:
            break
        k8s_times.append(k8s_once())
        docker_times.append(docker_once())
    k, d = statistics.median(k8s_times), statistics.median(docker_times)
    print(f"no-op stage as a Job:      median {k:.2f} s (min {min(k8s_times):.2f}, max {max(k8s_times):.2f}, "
          f"n={len(k8s_times)})")
    print(f"no-op stage in docker:     median {d:.2f} s (min {min(docker_times):.2f}, max {max(docker_times):.2f})")
    bench.record("k8s no-op stage (submit -> done)", k, "s", limit=5.0, target="<= 5 s")
    bench.record("k8s / docker no-op stage", k / d, "x", limit=4.0, target="<= 4x docker")


def noop_pipeline(args, kf, namespace: str) -> None:
    import yaml

    root = bench.project_copy()
    config = yaml.safe_load((root / "mlflowctl.yaml").read_text())
    config.update({"project": "benchk8s", "backend": "k8s", "store": "pvc://store/pipeline",
                   "train_model": {**config["train_model"], "epochs": 1, "steps": 20},
                   "train_concept": {**config["train_concept"], "epochs": 1, "steps": 20},
                   "integration_test": {**config["integration_test"], "min_accuracy": 0.3, "samples": 100}})
    config.setdefault("backends", {})["k8s"] = kf.k8s_settings(namespace)
    config["serving"] = {"target": "local", "local": {"port": 8501, "start_timeout": 240}}
    (root / "mlflowctl.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    doit = [bench.PYTHON, "-m", "doit"]
    print("pipeline: first run on the cluster (tiny training) ...", flush=True)
    t0 = time.perf_counter()
    first = subprocess.run([*doit, "-n", "2"], cwd=root, env=bench.bench_env(), capture_output=True, text=True,
                           timeout=1800)
    if first.returncode != 0:
        print(f"pipeline run failed ({first.returncode}): {first.stderr[-500:]}")
        return
    print(f"pipeline: first run {time.perf_counter() - t0:.1f} s", flush=True)
    timing = bench.time_command("doit (no-op), backend=k8s store=pvc://", doit, runs=args.pipeline_runs, warmups=1,
                                cwd=root, env=bench.bench_env())
    bench.print_table("no-op re-run of the whole pipeline on the cluster", [timing])
    bench.record("k8s no-op pipeline re-run", timing.median, "s", limit=1.0, target="<= 1 s")
    subprocess.run([bench.PYTHON, "-m", "mlflowctl.cli", "-C", str(root), "serve", "stop"], env=bench.bench_env(),
                   capture_output=True, timeout=300)
    bench.remove(root)


def cluster_start(args) -> None:
    builds = sorted(Path("/var/cache/mlflowctl/k8s").glob("*/build-seconds"))
    if builds:
        print(f"cold build of kube-all (recorded by ensure-cluster.sh): {builds[-1].read_text().strip()} s")
    if not args.restart:
        print("warm start: pass --restart to time `ensure-cluster.sh down` + `up` (stops the running cluster)")
        return
    script = REPO / "scripts" / "ensure-cluster.sh"
    subprocess.run([str(script), "down"], capture_output=True, timeout=600)
    t0 = time.perf_counter()
    subprocess.run([str(script), "up"], capture_output=True, timeout=1800, check=True)
    warm = time.perf_counter() - t0
    print(f"warm cluster start (cached binary, to a Ready node): {warm:.1f} s")
    bench.record("warm cluster start", warm, "s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-runs", type=int, default=5)
    ap.add_argument("--pipeline-runs", type=int, default=5)
    ap.add_argument("--restart", action="store_true", help="also time a warm restart of the cluster")
    args = ap.parse_args()
    bench.header("k8s backend on the test cluster: no-op Job vs docker, no-op pipeline, cluster start")
    try:
        kf, c = cluster()
        c.core.list_node(_request_timeout=10)
    except Exception as exc:  # noqa: BLE001 - no cluster: nothing to measure
        print(f"test cluster unavailable ({type(exc).__name__}); run make cluster")
        bench.record("k8s no-op stage (submit -> done)", None, "s", note="no test cluster")
        return 0
    namespace = f"mlflowctl-bench-{secrets.token_hex(3)}"
    c.core.create_namespace({"metadata": {"name": namespace, "labels": {"mlflowctl.io/test": "1"}}})
    try:
        kf.make_claim(c, namespace)
        noop_stage(args, kf, c, namespace)
        noop_pipeline(args, kf, namespace)
    finally:
        c.core.delete_namespace(namespace, propagation_policy="Background")
        kf.drop_claims(c, namespace)
    cluster_start(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
