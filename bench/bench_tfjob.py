"""Distributed training costs: samples/s of 1 vs 2 workers here, and TFJob submit -> all replicas running.

1. ``doit train_model`` (local backend: the replicas are processes on this machine, TF_CONFIG on loopback
   ports, the same MultiWorkerMirroredStrategy code a TFJob runs) with ``workers`` 1 and 2, same global
   batch, same steps. The figure is the LAST epoch (the first one includes tracing), from the stage's own
   per-epoch line. On 2 cores no speed-up is expected: each TF process already uses both cores, so two
   replicas share them, and every step adds an all-reduce of the gradients over loopback gRPC. The
   synchronisation cost per step is estimated as ``step(2 workers) - step(1 worker) / 2`` (what a step
   costs beyond a perfect split of the work), printed next to the raw step times. Note also that the
   single-worker path uses Keras ``fit`` with several steps per compiled call, the distributed one a
   custom loop, one step per call: part of the difference is that, not the network.
2. TFJob submit -> all replicas running, on the test cluster with the real training operator: a tiny
   image (python:3.11-slim + a script that sleeps), chief + 1 and chief + 2 workers, median of N.

Printed, never asserted; bounded in runs and time. (2) needs ``make cluster`` (the operator is started
by scripts/ensure-tfjob-operator.sh) and Docker; without them it is skipped.

Usage: .venv/bin/python bench/bench_tfjob.py [--steps 500] [--epochs 2] [--start-runs 3] [--skip-training]
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import common as bench

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
EPOCH = re.compile(r"epoch (\d+)/(\d+): .*\((\d+(?:\.\d+)?)s[,)]")


def last_epoch_seconds(log: str, epochs: int) -> float | None:
    """Seconds of the last epoch: the shortest of the replicas' own per-epoch lines (a replica that finished
    the previous epoch first starts this one early and then waits for its peer in the first step)."""
    found = [float(m.group(3)) for m in map(EPOCH.search, log.splitlines()) if m and int(m.group(1)) == epochs]
    return min(found) if found else None


def training(args) -> None:
    import yaml

    root = bench.project_copy()
    config = yaml.safe_load((root / "mlflowctl.yaml").read_text())
    config.update({"project": "benchtfjob", "backend": "local",
                   "train_model": {**config.get("train_model", {}), "epochs": args.epochs, "steps": args.steps}})
    (root / "mlflowctl.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    doit = [bench.PYTHON, "-m", "doit"]
    subprocess.run([*doit, "data"], cwd=root, env=bench.bench_env(), capture_output=True, text=True, timeout=600,
                   check=True)
    rows = {}
    for workers in (1, 2):
        proc = subprocess.run([*doit, "train_model", f"train_model.workers={workers}"], cwd=root,
                              env=bench.bench_env(), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            print(f"train_model with {workers} worker(s) failed: {proc.stderr[-500:]}")
            bench.remove(root)
            return
        log = (root / ".mlflowctl" / "logs" / "train_model.log").read_text()
        seconds = last_epoch_seconds(log, args.epochs)
        batch = int(config["train_model"].get("batch_size", 128))
        rows[workers] = (seconds, args.steps * batch / seconds if seconds else None,
                         seconds / args.steps if seconds else None)
        print(f"workers={workers}: last epoch {seconds} s for {args.steps} steps of global batch {batch}", flush=True)
    bench.remove(root)
    (s1, r1, t1), (s2, r2, t2) = rows[1], rows[2]
    print(f"{'workers':>8} {'samples/s':>10} {'s/step':>8}")
    for w, (s, r, t) in rows.items():
        print(f"{w:>8} {r or float('nan'):>10.0f} {t or float('nan'):>8.4f}")
    bench.record("training samples/s, 1 worker", r1, "samples/s")
    bench.record("training samples/s, 2 workers (local processes)", r2, "samples/s",
                 note="2 cores: no speed-up expected")
    if t1 and t2:
        bench.record("per-step synchronisation cost (2 workers)", (t2 - t1 / 2) * 1000, "ms",
                     note="step(2) - step(1)/2: all-reduce over loopback + the two replicas sharing 2 cores")


def tfjob_start(args) -> None:
    import kube_fixtures as kf
    from kubernetes import client, config

    from mlflowctl.backends import StageRun, StoreLocation
    from mlflowctl_plugins.k8s_backend import TFJOB_LABEL, KubeBackend
    from mlflowctl_plugins.pvc_store import PvcStore

    try:
        api = config.new_client_from_config(config_file=kf.KUBECONFIG)
        core = client.CoreV1Api(api)
        core.list_node(_request_timeout=10)
    except Exception as exc:  # noqa: BLE001 - no cluster: nothing to measure
        print(f"test cluster unavailable ({type(exc).__name__}); run make cluster")
        bench.record("TFJob submit -> all replicas running", None, "s", note="no test cluster")
        return
    op = subprocess.run([str(REPO / "scripts" / "ensure-tfjob-operator.sh"), "up"], capture_output=True, text=True,
                        timeout=1800)
    if op.returncode != 0:
        print(f"no training operator: {op.stderr[-300:]}")
        bench.record("TFJob submit -> all replicas running", None, "s", note="no operator")
        return
    c = types.SimpleNamespace(api=api, core=core)
    namespace = f"mlflowctl-bench-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": namespace, "labels": {"mlflowctl.io/test": "1"}}})
    work = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-tfjob-"))
    try:
        kf.make_claim(c, namespace)
        code = work / "image"
        code.mkdir()
        (code / "Dockerfile").write_text("FROM python:3.11-slim\nWORKDIR /app\nCOPY *.py ./\n")
        (code / "hold.py").write_text("import time\ntime.sleep(4)\n")
        (work / "state").mkdir()
        k8s = kf.k8s_settings(namespace)
        project = types.SimpleNamespace(root=work, name="benchtf", model_name="m", state_dir=work / "state",
                                        stage_code_dir=code, config={"backends": {"k8s": k8s, "docker": {}}})
        project.store = PvcStore("pvc://store/bench", {}, project)
        kube = KubeBackend(k8s, project)
        kube.preflight()
        kube.image(lambda line: None)  # build + load once, outside the timings

        def once(replicas: int) -> float | None:
            submitted: list[float] = []
            running: list[float] = []
            with project.store.remote_staging("hold") as staging:
                run = StageRun(stage="hold", command=["python", "hold.py"], workdir=code, env={}, inputs={},
                               outputs={}, replicas=replicas,
                               locations={"OUT": StoreLocation(project.store, staging, read_only=False)},
                               log_path=work / "hold.log",
                               echo=lambda line: submitted.append(time.perf_counter()) if "submitted" in line else None)
                done = threading.Event()

                def watch() -> None:
                    deadline = time.monotonic() + 300
                    while not done.is_set() and time.monotonic() < deadline:
                        pods = core.list_namespaced_pod(namespace, label_selector=TFJOB_LABEL).items
                        up = [p for p in pods if p.status and p.status.phase == "Running"]
                        if len(up) >= replicas:
                            running.append(time.perf_counter())
                            return
                        time.sleep(0.1)

                t = threading.Thread(target=watch, daemon=True)
                t.start()
                ok = kube.run(run).ok
                done.set()
                t.join(timeout=10)
            if not ok or not submitted or not running:
                return None
            return running[0] - submitted[0]

        for replicas in (2, 3):
            times = [t for t in (once(replicas) for _ in range(args.start_runs)) if t is not None]
            if not times:
                print(f"{replicas} replicas: no successful run")
                continue
            print(f"TFJob with {replicas} replicas: submit -> all running median {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f}, max {max(times):.2f}, n={len(times)})", flush=True)
            bench.record(f"TFJob submit -> all {replicas} replicas running", statistics.median(times), "s")
    finally:
        core.delete_namespace(namespace, propagation_policy="Background")
        kf.drop_claims(c, namespace)
        bench.remove(work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--start-runs", type=int, default=3)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    bench.header("distributed training: 1 vs 2 workers here; TFJob start on the test cluster")
    if not args.skip_training:
        training(args)
    tfjob_start(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
