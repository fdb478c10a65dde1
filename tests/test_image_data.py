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


# ------------------------------------------------------------------- over HTTPS
def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the client trusts it through SSL_CERT_FILE)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def serve(www: Path, tls: tuple[Path, Path] | None = None, redirect_to: str = ""):
    """A server over ``www`` on 127.0.0.1 (TLS when ``tls``); counts requests; ``/redirect/x`` -> ``redirect_to/x``."""
    import http.server
    import ssl
    import threading

    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a, **k):
            pass

        def do_GET(self):
            seen.append(self.path)
            if self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", redirect_to + self.path[len("/redirect/"):])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.seen = seen
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_port}"
    return server


@pytest.fixture()
def https_root(tmp_path):
    """A local HTTPS server over tmp_path/www (good/ holds the Debian files), its certificate, a silent socket."""
    import socket

    www = tmp_path / "www"
    (www / "good").mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(DEBIAN_DIR / name, www / "good" / name)
    cert, key = self_signed_cert(tmp_path)
    server = serve(www, tls=(cert, key))
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    yield {"https": server.url, "silent": f"https://127.0.0.1:{silent.getsockname()[1]}", "cert": str(cert),
           "server": server, "www": www}
    server.shutdown()
    server.server_close()
    silent.close()


def test_https_sources_timeout_404_then_success_and_cache(tmp_path, https_root):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    sources = [https_root["silent"] + "/", https_root["https"] + "/missing/", https_root["https"] + "/good/"]
    proc = run_download(out, DATA_SOURCES=json.dumps(sources), DATA_CACHE_DIR=str(cache), DOWNLOAD_TIMEOUT="0.5",
                        SSL_CERT_FILE=https_root["cert"])
    assert proc.returncode == 0, proc.stderr
    name = "t10k-labels-idx1-ubyte.gz"
    assert f"data: {name} from {https_root['silent']}/{name}: " in proc.stdout
    assert "timed out" in proc.stdout
    assert f"data: {name} from {https_root['https']}/missing/{name}: HTTP 404" in proc.stdout
    meta = json.loads((out / "data.json").read_text())
    assert meta["files"][name]["source"] == f"{https_root['https']}/good/{name}"
    # fetched files were cached (per dataset) and are used first next time, even with no source at all
    assert sorted(os.listdir(cache / "fashion-mnist")) == sorted(FILES)
    out2 = tmp_path / "out2"
    proc = run_download(out2, DATA_SOURCES=json.dumps([str(tmp_path / "nowhere")]), DATA_CACHE_DIR=str(cache))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out2)) == ["data.json", "t10k.npz", "train.npz"]


def test_an_untrusted_certificate_is_a_failed_source(tmp_path, https_root):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_download(out, DATA_SOURCES=json.dumps([https_root["https"] + "/good/"]))  # no SSL_CERT_FILE
    assert proc.returncode == 3, proc.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr and os.listdir(out) == []


def test_plain_http_is_refused_before_any_request_and_so_are_redirects_to_it(tmp_path, https_root):
    plain = serve(https_root["www"])  # the same files over plain HTTP on 127.0.0.1
    redirecting = serve(https_root["www"], tls=(Path(https_root["cert"]), tmp_path / "key.pem"),
                        redirect_to=plain.url + "/good/")
    try:
        out = tmp_path / "out"
        out.mkdir()
        sources = [plain.url + "/good/", redirecting.url + "/redirect/", f"file://{DEBIAN_DIR}/"]
        proc = run_download(out, DATA_SOURCES=json.dumps(sources), SSL_CERT_FILE=https_root["cert"])
    finally:
        for srv in (plain, redirecting):
            srv.shutdown()
            srv.server_close()
    assert proc.returncode == 0, proc.stderr
    name = "train-labels-idx1-ubyte.gz"
    assert f"data: {name} from {plain.url}/good/{name}: plain HTTP refused" in proc.stdout
    assert f"data: {name} from {redirecting.url}/redirect/{name}: plain HTTP refused (redirected to " in proc.stdout
    assert plain.seen == []  # not one request went out in clear text
    assert len(redirecting.seen) == len(FILES)
    meta = json.loads((out / "data.json").read_text())
    assert {f["source"] for f in meta["files"].values()} == {f"file://{DEBIAN_DIR}/{n}" for n in FILES}


def test_the_default_mirror_is_https():
    for dataset, sources in download.DEFAULT_SOURCES.items():
        assert all(s.startswith(("https://", "file://")) for s in sources), (dataset, sources)


# ------------------------------------------------------- bounded decompression
def gzip_bomb(size: int) -> bytes:
    """A small gzip of ``size`` zero bytes (512 MiB -> about 0.5 MB)."""
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = bytes(1 << 20)
    return b"".join([*(c.compress(chunk) for _ in range(size >> 20)), c.flush()])


@pytest.mark.parametrize("name", ["train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"])
def test_a_gzip_bomb_is_refused_within_the_files_own_size(name):
    import tracemalloc

    bomb = gzip_bomb(512 << 20)
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(download.IdxError, match=f"decompresses to more than {download.raw_size(name)} bytes"):
            download.verify(name, bomb, "fashion-mnist")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the bound is the file's exact decompressed size (47 MB for the training images), never the bomb's 512 MiB
    assert peak < 3 * download.raw_size(name) + (4 << 20), peak


def test_a_bomb_from_a_source_falls_through_to_the_next_one(tmp_path):
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    for name in FILES:
        (bombs / name).write_bytes(gzip_bomb(64 << 20))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_download(out, DATA_SOURCES=json.dumps([str(bombs), str(DEBIAN_DIR)]))
    assert proc.returncode == 0, proc.stderr
    assert f"data: t10k-labels-idx1-ubyte.gz from {bombs}/t10k-labels-idx1-ubyte.gz: decompresses to more than " \
           f"10008 bytes" in proc.stdout


def test_bounded_decompression_keeps_multi_member_and_trailer_checks():
    raw = (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    payload = gzip.decompress(raw)
    two = gzip.compress(payload[:5000]) + gzip.compress(payload[5000:])
    assert download._decompress(two, len(payload)) == payload
    with pytest.raises(download.IdxError, match="more than"):
        download._decompress(two, len(payload) - 1)
    bad_crc = bytearray(gzip.compress(payload))
    bad_crc[-6] ^= 0xFF
    with pytest.raises(download.IdxError, match="not a valid gzip"):
        download._decompress(bytes(bad_crc))


def test_mnist_checks_structure_only(tmp_path):
    # No sha256 table for MNIST: any structurally valid 60k/10k 28×28 IDX set is accepted.
    proc = run_download(tmp_path, DATASET="mnist", DATA_SOURCES=json.dumps([str(DEBIAN_DIR)]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data.json").read_text())["dataset"] == "mnist"
