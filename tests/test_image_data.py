"""The ``data`` stage script (image/download.py): IDX parsing, source fallback, outputs."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

IMAGE_DIR = Path(__file__).resolve().parents[1] / "image"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train-images-idx3-ubyte.gz": (60000, 28, 28),
    "train-labels-idx1-ubyte.gz": (60000,),
    "t10k-images-idx3-ubyte.gz": (10000, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (10000,),
}

pytestmark = pytest.mark.skipif(
    not all((DEBIAN_DIR / name).is_file() for name in FILES),
    reason=f"Fashion-MNIST not installed at {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)

sys.path.insert(0, str(IMAGE_DIR))
import download  # noqa: E402  (image/download.py)


def run_download(out_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("DATASET", "DATA_SOURCES", "DATA_CACHE_DIR")}
    full_env.update(PYTHONDONTWRITEBYTECODE="1", MNIST_DATA_DIR=str(out_dir), **env)
    return subprocess.run(
        [sys.executable, "download.py"], cwd=IMAGE_DIR, env=full_env, capture_output=True, text=True, timeout=120
    )


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("name", sorted(FILES))
def test_read_idx_real_files(name):
    arr = download.read_idx(DEBIAN_DIR / name)
    assert arr.shape == FILES[name]
    assert arr.dtype == np.uint8
    if "labels" in name:
        assert set(np.unique(arr).tolist()) == set(range(10))
    else:
        assert arr.max() > 200 and arr.min() == 0
    # bytes in (gzipped or raw) give the same array
    gz = (DEBIAN_DIR / name).read_bytes()
    np.testing.assert_array_equal(download.read_idx(gz), arr)
    np.testing.assert_array_equal(download.read_idx(gzip.decompress(gz)), arr)


def test_read_idx_rejects_malformed():
    labels = gzip.decompress((DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(download.IdxError, match="truncated gzip"):
        download.read_idx(gzip.compress(labels)[:-100])
    with pytest.raises(download.IdxError, match="magic"):
        download.read_idx(b"\x00\x00\x99\x01" + labels[4:])
    with pytest.raises(download.IdxError, match="payload"):
        download.read_idx(labels[:-1])
    with pytest.raises(download.IdxError, match="gzip"):
        download.read_idx(b"\x1f\x8bnot really gzip")


# ----------------------------------------------------------- source fallback
@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory):
    """Three directories of broken copies: truncated .gz, wrong IDX magic, altered labels."""
    root = tmp_path_factory.mktemp("sources")
    truncated, bad_magic, altered = root / "truncated", root / "bad_magic", root / "altered"
    for d in (truncated, bad_magic, altered):
        d.mkdir()
    for name in FILES:
        gz = (DEBIAN_DIR / name).read_bytes()
        (truncated / name).write_bytes(gz[: len(gz) // 2])
        raw = gzip.decompress(gz)
        (bad_magic / name).write_bytes(gzip.compress(b"\x00\x00\x08\x07" + raw[4:], compresslevel=1))
        if "labels" in name:  # structurally valid, wrong content: only the sha256 catches it
            changed = bytearray(raw)
            changed[-1] = (changed[-1] + 1) % 10
            (altered / name).write_bytes(gzip.compress(bytes(changed), compresslevel=1))
    return {"truncated": truncated, "bad_magic": bad_magic, "altered": altered, "missing": root / "missing"}


def test_corrupt_sources_fall_through_to_good_one(tmp_path, bad_sources):
    out = tmp_path / "out"
    out.mkdir()
    good = f"file://{DEBIAN_DIR}/"
    sources = [str(bad_sources[k]) for k in ("missing", "truncated", "bad_magic", "altered")] + [good]
    proc = run_download(out, DATA_SOURCES=json.dumps(sources))
    assert proc.returncode == 0, proc.stderr
    name = "train-labels-idx1-ubyte.gz"
    assert f"data: {name} from {bad_sources['missing'] / name}: not found; trying next source" in proc.stdout
    assert f"data: {name} from {bad_sources['truncated'] / name}: truncated gzip stream; trying next source" in proc.stdout
    assert f"data: {name} from {bad_sources['bad_magic'] / name}: bad IDX magic" in proc.stdout
    assert f"data: {name} from {bad_sources['altered'] / name}: sha256 mismatch" in proc.stdout
    meta = json.loads((out / "data.json").read_text())
    assert {f["source"] for f in meta["files"].values()} == {good + n for n in FILES}
    assert sorted(os.listdir(out)) == ["data.json", "t10k.npz", "train.npz"]


def test_all_sources_failing_exits_nonzero_and_writes_nothing(tmp_path, bad_sources):
    out = tmp_path / "out"
    out.mkdir()
    sources = [str(bad_sources["truncated"]), str(bad_sources["missing"])]
    proc = run_download(out, DATA_SOURCES=json.dumps(sources))
    assert proc.returncode == 3
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert "could not get" in lines[0] and "Traceback" not in proc.stderr
    assert str(bad_sources["truncated"]) in lines[0] and str(bad_sources["missing"]) in lines[0]
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"DATASET": "cifar"}, "DATASET"),
        ({"DATA_SOURCES": "not json"}, "DATA_SOURCES"),
        ({"DATA_SOURCES": '{"a": 1}'}, "DATA_SOURCES"),
        ({"DOWNLOAD_TIMEOUT": "soon"}, "DOWNLOAD_TIMEOUT"),
        ({"DOWNLOAD_TIMEOUT": "-1"}, "DOWNLOAD_TIMEOUT"),
    ],
)
def test_bad_setting_exits_2_naming_the_variable(tmp_path, env, variable):
    proc = run_download(tmp_path, **env)
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) == 1 and variable in lines[0], proc.stderr
    assert os.listdir(tmp_path) == []


def test_cache_is_looked_up_first(tmp_path):
    cache = tmp_path / "cache"
    (cache / "fashion-mnist").mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(DEBIAN_DIR / name, cache / "fashion-mnist" / name)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_download(out, DATA_SOURCES=json.dumps([str(tmp_path / "nowhere")]), DATA_CACHE_DIR=str(cache))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "data.json").read_text())
    assert all(f["source"].startswith(str(cache)) for f in meta["files"].values())


# ------------------------------------------------------------------ happy path
def test_default_sources_write_the_three_outputs(tmp_path):
    proc = run_download(tmp_path)  # DATA_SOURCES unset: the built-in list, Debian copy first
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    assert sorted(os.listdir(tmp_path)) == ["data.json", "t10k.npz", "train.npz"]
    for split, n in (("train", 60000), ("t10k", 10000)):
        with np.load(tmp_path / f"{split}.npz") as npz:
            assert npz["x"].shape == (n, 28, 28) and npz["x"].dtype == np.uint8
            assert npz["y"].shape == (n,) and npz["y"].dtype == np.uint8
            assert npz["y"].max() == 9
    meta = json.loads((tmp_path / "data.json").read_text())
    assert meta["dataset"] == "fashion-mnist"
    assert (meta["train_count"], meta["test_count"]) == (60000, 10000)
    assert set(meta["files"]) == set(FILES)
    for name, info in meta["files"].items():
        assert info["source"] == f"file://{DEBIAN_DIR}/{name}"
        assert info["bytes"] == (DEBIAN_DIR / name).stat().st_size
        assert info["sha256"] == download.GZ_SHA256_DEBIAN[name]


# ------------------------------------------------------------------- over HTTP
@pytest.fixture()
def http_root(tmp_path):
    """A local HTTP server over tmp_path/www (good/ holds the Debian files), plus a silent socket."""
    import functools
    import http.server
    import socket
    import threading

    www = tmp_path / "www"
    (www / "good").mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(DEBIAN_DIR / name, www / "good" / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    yield {"http": f"http://127.0.0.1:{server.server_port}", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    server.shutdown()
    server.server_close()
    silent.close()


def test_http_sources_timeout_404_then_success_and_cache(tmp_path, http_root):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    sources = [http_root["silent"] + "/", http_root["http"] + "/missing/", http_root["http"] + "/good/"]
    proc = run_download(out, DATA_SOURCES=json.dumps(sources), DATA_CACHE_DIR=str(cache), DOWNLOAD_TIMEOUT="0.5")
    assert proc.returncode == 0, proc.stderr
    name = "t10k-labels-idx1-ubyte.gz"
    assert f"data: {name} from {http_root['silent']}/{name}: " in proc.stdout
    assert "timed out; trying next source" in proc.stdout
    assert f"data: {name} from {http_root['http']}/missing/{name}: HTTP 404" in proc.stdout
    meta = json.loads((out / "data.json").read_text())
    assert meta["files"][name]["source"] == f"{http_root['http']}/good/{name}"
    # fetched files were cached (per dataset) and are used first next time, even with no source at all
    assert sorted(os.listdir(cache / "fashion-mnist")) == sorted(FILES)
    out2 = tmp_path / "out2"
    proc = run_download(out2, DATA_SOURCES=json.dumps([str(tmp_path / "nowhere")]), DATA_CACHE_DIR=str(cache))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out2)) == ["data.json", "t10k.npz", "train.npz"]


def test_mnist_checks_structure_only(tmp_path):
    # No sha256 table for MNIST: any structurally valid 60k/10k 28×28 IDX set is accepted.
    proc = run_download(tmp_path, DATASET="mnist", DATA_SOURCES=json.dumps([str(DEBIAN_DIR)]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data.json").read_text())["dataset"] == "mnist"
