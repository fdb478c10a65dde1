"""The s3:// store on a real S3 server (moto's, on 127.0.0.1): transfer throughput and the no-op re-run.

1. Publish and fetch of a 50 MB result (one 30 MB file and four of 5 MB)
   through the store (sha256 of every file, parallel multipart upload, the
   conditional marker; each time a new process's view, sharing the
   publisher's cache folder as runs of one project do; fetch into an empty
   cache, every file checked) next to
   bare boto3 ``upload_file`` / ``download_file`` of the same files on the same
   endpoint, alternating (which goes first alternates too), 5 rounds after a warm-up. Target: store >= 0.8x bare boto3's throughput.
2. The no-op re-run of the pipeline with ``store=s3://...``: after one real run
   of ``data train_model train_concept register`` with tiny training, the same
   ``doit`` again (10 runs after 1 warm-up). Target <= 0.5 s. Twice: as
   configured by default (results this machine has seen are remembered: no
   request, no botocore import) and with ``stores.s3.remember_results=false``
   (one GET of the marker per stage, and botocore's import and client).

moto's stock server (threaded, ``python -m moto.server``) is the endpoint:
both sides of each comparison talk to the same one.

Usage: .venv/bin/python bench/bench_s3.py [--runs 5] [--noop-runs 10]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common as bench

sys.path.insert(0, str(bench.ROOT / "tests"))
sys.path.insert(0, str(bench.ROOT))

import s3_server  # noqa: E402  (tests/s3_server.py: starts moto's server on a free port)

SIZES = {"big.bin": 30 << 20, "part-1.bin": 5 << 20, "part-2.bin": 5 << 20, "part-3.bin": 5 << 20,
         "part-4.bin": 5 << 20}
STAGES = ["data", "train_model", "train_concept", "register"]
TINY = ["train_model.epochs=1", "train_model.steps=5", "train_concept.epochs=1", "train_concept.steps=5"]
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def transfer(server, runs: int, budget: float) -> tuple[bench.Timing, bench.Timing, bench.Timing, bench.Timing]:
    import boto3

    from mlflowctl_plugins.s3_store import S3Tree, make_client

    work = Path(tempfile.mkdtemp(prefix="mlflowctl-bench-s3-"))
    try:
        source = work / "source"
        source.mkdir()
        for name, size in SIZES.items():
            (source / name).write_bytes(os.urandom(size))
        bare = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")
        bare.create_bucket(Bucket="bench")

        def tree(cache: Path) -> S3Tree:
            client = make_client(endpoint_url=server.url, region="us-east-1", access_key_id="testing",
                                 secret_access_key="testing")
            return S3Tree(client, "bench", "store", cache)

        pub, fet, up, down = (bench.Timing("store: publish 50 MB"), bench.Timing("store: fetch 50 MB (empty cache)"),
                              bench.Timing("bare boto3: upload_file x5"), bench.Timing("bare boto3: download_file x5"))
        deadline = time.monotonic() + budget
        for i in range(runs + 1):  # the first round warms both up and is not counted
            if time.monotonic() > deadline:
                pub.note = f"budget {budget:g}s hit after {max(i - 1, 0)} rounds"
                break
            staged = work / f"staged-{i}"
            shutil.copytree(source, staged)  # publish consumes its folder
            out = work / f"bare-{i}"
            out.mkdir()

            def store_side() -> tuple[float, float]:
                writer = tree(work / "cache-w")  # the publishing machine's cache, as in a project
                t0 = time.perf_counter()
                ok = writer.publish(staged, f"results/bench/{i}")
                t_pub = time.perf_counter() - t0
                reader = tree(work / f"cache-r-{i}")
                t0 = time.perf_counter()
                got = reader.fetch(f"results/bench/{i}")
                t_fet = time.perf_counter() - t0
                assert ok and (got / "big.bin").stat().st_size == SIZES["big.bin"]
                return t_pub, t_fet

            def bare_side() -> tuple[float, float]:
                t0 = time.perf_counter()
                for name in SIZES:
                    bare.upload_file(str(source / name), "bench", f"bare/{i}/{name}")
                t_up = time.perf_counter() - t0
                t0 = time.perf_counter()
                for name in SIZES:
                    bare.download_file("bench", f"bare/{i}/{name}", str(out / name))
                return t_up, time.perf_counter() - t0

            if i % 2:
                (t_up, t_down), (t_pub, t_fet) = bare_side(), store_side()
            else:
                (t_pub, t_fet), (t_up, t_down) = store_side(), bare_side()
            for path in (work / f"cache-r-{i}", out):
                shutil.rmtree(path, ignore_errors=True)
            if i == 0:
                continue
            for timing, value in ((pub, t_pub), (fet, t_fet), (up, t_up), (down, t_down)):
                timing.wall.append(value)
        return pub, fet, up, down
    finally:
        shutil.rmtree(work, ignore_errors=True)


def noop(server, runs: int, budget: float) -> list[bench.Timing]:
    import boto3

    boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bench-noop")
    project = bench.project_copy()
    env = bench.bench_env(**CREDS)
    args = [f"store=s3://bench-noop/p", f"stores.s3.endpoint_url={server.url}", *TINY, *STAGES]
    try:
        print(f"no-op: first, real run in {project}: doit {' '.join(args)}", flush=True)
        wall, _cpu, proc = bench.run_once([bench.DOIT, *args], cwd=project, env=env, timeout=900)
        if proc.returncode != 0:
            print(f"no-op: the real run failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
            return []
        print(f"no-op: real run done in {wall:.1f} s", flush=True)

        def nothing_ran(p) -> bool:
            return p.returncode == 0 and not [ln for ln in p.stdout.splitlines() if ln.startswith(".  ")]

        timings = []
        for label, extra in (("remembered", []), ("remember_results=false", ["stores.s3.remember_results=false"])):
            timings.append(bench.time_command(f"doit <4 stages> on s3://, {label}", [bench.DOIT, *extra, *args],
                                              runs=runs, warmups=1, cwd=project, env=env, timeout=60, budget=budget,
                                              check=nothing_ran))
            mods, top = bench.imported_top_modules(["-m", "doit", *extra, *args], cwd=project, env=env)
            print(f"{label}: heavy imports of the no-op run: {bench.heavy_found(mods) or 'none'}"
                  f"{' (botocore too)' if 'botocore' in mods else ''}; slowest top-level imports: {top}")
        return timings
    finally:
        bench.remove(project)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--noop-runs", type=int, default=10)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds at most per timed series")
    args = ap.parse_args()
    bench.header("s3:// store against moto's server on 127.0.0.1")
    server = s3_server.start(serial=False)
    try:
        pub, fet, up, down = transfer(server, args.runs, args.budget)
        bench.print_table("50 MB result: the store vs bare boto3 on the same endpoint", [pub, fet, up, down])
        mb = sum(SIZES.values()) / (1 << 20)
        if pub.wall and up.wall:
            ratio_up, ratio_down = up.median / pub.median, down.median / fet.median
            print(f"throughput: publish {mb / pub.median:.0f} MB/s vs upload {mb / up.median:.0f} MB/s; "
                  f"fetch {mb / fet.median:.0f} MB/s vs download {mb / down.median:.0f} MB/s")
            best_up, best_down = min(up.wall) / min(pub.wall), min(down.wall) / min(fet.wall)
            bench.record("s3 publish throughput / bare boto3 upload", ratio_up, "x", target=">= 0.8x",
                         peer=f"bare upload {bench.fmt_s(up)}",
                         note=f"publish {bench.fmt_s(pub)} incl. sha256; best-of-runs ratio {best_up:.2f}x")
            bench.record("s3 fetch throughput / bare boto3 download", ratio_down, "x", target=">= 0.8x",
                         peer=f"bare download {bench.fmt_s(down)}",
                         note=f"fetch {bench.fmt_s(fet)} incl. sha256 check; best-of-runs ratio {best_down:.2f}x")
        timings = noop(server, args.noop_runs, args.budget)
        if timings:
            bench.print_table("no-op re-run with an S3 store", timings)
        for label, t in zip(("s3://", "s3://, remember_results=false"), timings or [None, None]):
            bench.record(f"no-op pipeline re-run (doit, 4 stages, {label})", t.median if t and t.wall else None, "s",
                         limit=0.5, target="<= 0.5 s",
                         note=f"min {min(t.wall):.3f} s, cpu {t.cpu_median:.3f} s" if t and t.wall else "")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
