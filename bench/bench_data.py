"""Parsing speed of ``read_idx`` (image/download.py) on Fashion-MNIST's train images (target <= 1 s).

Times, median of 5 after 1 warm-up, in this process:
  * read_idx(path of the .gz): read + gunzip + parse (the stage's real path)
  * read_idx(raw bytes): parse only, decompression excluded
  * gzip.decompress alone, and a classic one-line loader as the peer
    (np.frombuffer(gzip.open(path).read(), uint8, offset=16)).

Usage: .venv/bin/python bench/bench_data.py [--runs 5] [--file PATH]
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import sys
from pathlib import Path

import common as bench

DEFAULT_FILE = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def load_download_module():
    """Import image/download.py by path. It does ``from common import ...`` (image/common.py), a name this
    benchmark's own helper module also has: swap sys.modules['common'] while it loads."""
    image = bench.ROOT / "image"
    ours = sys.modules.pop("common", None)
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # leave image/ untouched
    sys.path.insert(0, str(image))
    try:
        spec = importlib.util.spec_from_file_location("mlflowctl_bench_download", image / "download.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(image))
        sys.dont_write_bytecode = write_bytecode
        sys.modules.pop("common", None)
        if ours is not None:
            sys.modules["common"] = ours
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--file", default=DEFAULT_FILE)
    args = ap.parse_args()

    bench.header(f"read_idx: median of {args.runs} runs after 1 warm-up")
    path = Path(args.file)
    if not path.is_file():
        print(f"note: {path} is missing (make data installs it); skipped")
        bench.record("read_idx train images (.gz, incl. gunzip)", None, "s", target="<= 1 s", note="file missing")
        return 0
    import numpy as np

    download = load_download_module()
    gz = path.read_bytes()
    raw = gzip.decompress(gz)
    print(f"file {path}: {len(gz) / 1e6:.1f} MB gzipped, {len(raw) / 1e6:.1f} MB raw")
    arr = download.read_idx(str(path))
    print(f"read_idx -> shape {arr.shape}, dtype {arr.dtype}")

    def classic():
        with gzip.open(path, "rb") as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)

    kw = dict(runs=args.runs, warmups=1, budget=120.0)
    incl = bench.time_call("read_idx(path .gz): read+gunzip+parse", lambda: download.read_idx(str(path)), **kw)
    excl = bench.time_call("read_idx(raw bytes): parse only", lambda: download.read_idx(raw), **kw)
    gunzip = bench.time_call("gzip.decompress alone (in memory)", lambda: gzip.decompress(gz), **kw)
    peer = bench.time_call("peer: gzip.open + np.frombuffer one-liner", classic, **kw)
    bench.print_table("read_idx on train-images-idx3-ubyte.gz", [incl, excl, gunzip, peer])

    bench.record("read_idx train images (.gz, incl. gunzip)", incl.median, "s", limit=1.0, target="<= 1 s",
                 peer=f"gzip.open+frombuffer {bench.fmt_s(peer)}")
    bench.record("read_idx train images (raw, excl. gunzip)", excl.median, "s", limit=1.0, target="<= 1 s",
                 peer=f"gzip.decompress alone {bench.fmt_s(gunzip)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
