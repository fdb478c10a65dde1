"""Stage ``data``: fetch, verify and convert (Fashion-)MNIST to ``train.npz``/``t10k.npz``.

Env: MNIST_DATA_DIR (output dir), DATASET (fashion-mnist | mnist), DATA_SOURCES
(JSON list of base URLs/paths tried in order: https://, file:// or a path; plain
http:// is refused), DATA_CACHE_DIR (optional cache of
the .gz files, looked up first), DOWNLOAD_TIMEOUT (seconds, default 30).

Outputs in MNIST_DATA_DIR: train.npz, t10k.npz (x uint8 N×28×28, y uint8 N) and
data.json.  Exit 2 on a bad setting, 3 when a file cannot be had from any source.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np

from common import EXIT_DATA, SettingError, StageError, env_dir, env_float, env_str, log, main, make_dir

STAGE = "data"

FILES = {
    # name: (split, kind, item count)
    "train-images-idx3-ubyte.gz": ("train", "x", 60000),
    "train-labels-idx1-ubyte.gz": ("train", "y", 60000),
    "t10k-images-idx3-ubyte.gz": ("t10k", "x", 10000),
    "t10k-labels-idx1-ubyte.gz": ("t10k", "y", 10000),
}

DEFAULT_SOURCES = {
    "fashion-mnist": [
        "file:///usr/share/datasets/fashion-mnist/",
        # Keras's HTTPS mirror of the upstream files (the upstream S3 *website* endpoint is plain HTTP only,
        # which fetch() refuses); integrity comes from the sha256 table either way.
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ],
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
}

# sha256 of the *decompressed* IDX payload: independent of how the .gz was
# (re)compressed, so the Debian copy and the upstream mirror both verify.
# Computed from the Debian package dataset-fashion-mnist.
CONTENT_SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
# sha256 of the Debian .gz files themselves (an exact match skips the content hash).
GZ_SHA256_DEBIAN = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

MAX_BYTES = 64 * 1024 * 1024  # no valid file is bigger than ~30 MB compressed
MAX_RAW_BYTES = 64 * 1024 * 1024  # read_idx's bound on a decompressed file when its size is not known

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxError(ValueError):
    """The bytes are not a valid (gzipped) IDX file."""


# ------------------------------------------------------------------------ parse
def raw_size(name: str) -> int:
    """The exact size of a decompressed IDX file of ``FILES``: header plus count × item (uint8)."""
    _split, kind, count = FILES[name]
    return 16 + count * 28 * 28 if kind == "x" else 8 + count


def _decompress(data: bytes, limit: int = MAX_RAW_BYTES) -> bytes:
    """gunzip ``data`` (one or more members), producing at most ``limit`` bytes: a gzip bomb stops at the
    bound instead of filling memory. The gzip trailer (CRC-32, size) is checked by zlib."""
    out = bytearray()
    pending = bytes(data)
    try:
        while pending:
            d = zlib.decompressobj(zlib.MAX_WBITS | 16)
            while True:
                part = d.decompress(pending, limit + 1 - len(out))  # never 0 (= unbounded): we stop above limit
                out += part
                if len(out) > limit:
                    raise IdxError(f"decompresses to more than {limit} bytes (a gzip bomb, or the wrong file)")
                pending = d.unconsumed_tail
                if d.eof or (not pending and not part):
                    break
            if not d.eof:
                raise IdxError("truncated gzip stream")
            pending = d.unused_data
            if pending and pending[:2] != b"\x1f\x8b":
                if pending.strip(b"\x00"):
                    raise IdxError("trailing garbage after the gzip stream")
                break
    except zlib.error as exc:
        raise IdxError(f"not a valid gzip file ({exc})") from None
    return bytes(out)


def read_idx(path_or_bytes) -> np.ndarray:
    """Parse an IDX file (gzipped or raw; a path or bytes) into an ndarray.

    The result is a read-only view on the decompressed buffer (no copy).
    Raises :class:`IdxError` with a short reason on anything malformed.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as fh:
            data = fh.read()
    if data[:2] == b"\x1f\x8b":
        data = _decompress(data, MAX_RAW_BYTES)
    if len(data) < 4:
        raise IdxError(f"too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise IdxError(f"bad IDX magic 0x{data[:4].hex()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError("truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise IdxError(f"negative IDX dimension {dims}")
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxError(f"IDX payload is {len(data) - header} bytes, header {dims} says {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def verify(name: str, gz: bytes, dataset: str) -> tuple[np.ndarray, str]:
    """Check one fetched .gz; return (array, sha256 of the .gz) or raise IdxError.

    The .gz is hashed before anything is decompressed: the exact known file needs no more. Any other
    file is decompressed up to the exact size the file must have (a bomb stops there), then its
    content is hashed.
    """
    split, kind, count = FILES[name]
    gz_digest = hashlib.sha256(gz).hexdigest()
    known = CONTENT_SHA256.get(dataset, {}).get(name)
    if dataset == "fashion-mnist" and gz_digest == GZ_SHA256_DEBIAN[name]:
        known = None  # the exact Debian file: no need to hash the decompressed payload too
    raw = _decompress(gz, raw_size(name))
    if known is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != known:
            # Structure errors are more useful than a bare checksum mismatch.
            read_idx(raw)
            raise IdxError(f"sha256 mismatch (content {digest[:12]}…, expected {known[:12]}…)")
    arr = read_idx(raw)
    if arr.dtype != np.uint8:
        raise IdxError(f"expected uint8 data, got {arr.dtype}")
    want = (count, 28, 28) if kind == "x" else (count,)
    if arr.shape != want:
        raise IdxError(f"expected shape {want}, got {arr.shape}")
    if kind == "y" and arr.max(initial=0) > 9:
        raise IdxError(f"label {int(arr.max())} out of range 0..9")
    return arr, gz_digest


# ------------------------------------------------------------------------ fetch
def _join(base: str, name: str) -> str:
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def fetch(location: str, timeout: float) -> bytes:
    """Read ``location`` (http(s)://, file:// URL or a plain path); raise OSError-ish with a reason."""
    scheme = urllib.parse.urlsplit(location).scheme if "://" in location else ""
    if scheme in ("", "file"):
        path = urllib.request.url2pathname(urllib.parse.urlsplit(location).path) if scheme else location
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise IdxError(f"file too large ({size} bytes)")
        with open(path, "rb") as fh:
            return fh.read()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {scheme!r}")
    if scheme == "http":
        raise ValueError("plain HTTP refused (no TLS: anyone on the path can swap the file); use an https:// "
                         "mirror or a local copy")
    request = urllib.request.Request(location, headers={"User-Agent": "mlflowctl-data/1"})
    with urllib.request.build_opener(_HttpsOnlyRedirects).open(request, timeout=timeout) as resp:
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        if total is not None and total > MAX_BYTES:
            raise IdxError(f"file too large ({total} bytes)")
        chunks, got, next_report = [], 0, 8 * 1024 * 1024
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > MAX_BYTES:
                raise IdxError(f"file too large (> {MAX_BYTES} bytes)")
            if got >= next_report:
                of = f"/{total}" if total else ""
                log(STAGE, f"  {location}: {got}{of} bytes")
                next_report += 8 * 1024 * 1024
        if total is not None and got != total:
            raise IdxError(f"connection closed after {got} of {total} bytes")
        return b"".join(chunks)


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to https:// only: a mirror cannot send us to plain HTTP."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise ValueError(f"plain HTTP refused (redirected to {newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def obtain(name: str, sources: list[str], cache_dir: str | None, dataset: str, timeout: float):
    """Return (array, record) for one file, trying the cache then each source in order."""
    tried = []
    cache_path = os.path.join(cache_dir, dataset, name) if cache_dir else None
    candidates = ([("cache", cache_path)] if cache_path and os.path.isfile(cache_path) else []) + [
        (base, _join(base, name)) for base in sources
    ]
    for label, location in candidates:
        try:
            gz = fetch(location, timeout)
            arr, digest = verify(name, gz, dataset)
        except Exception as exc:  # every failure of one source is "try the next one"
            reason = _reason(exc)
            tried.append(f"{location} ({reason})")
            log(STAGE, f"{name} from {location}: {reason}; trying next source")
            continue
        log(STAGE, f"{name}: {len(gz)} bytes from {location}, shape {arr.shape}, verified")
        if cache_path and label != "cache" and "://" in location and not location.startswith("file:"):
            _store_cache(cache_path, gz)
        return arr, {"sha256": digest, "source": location, "bytes": len(gz)}
    raise StageError(f"could not get {name} from any source; tried: {'; '.join(tried) or 'nothing'}", EXIT_DATA)


def _store_cache(path: str, gz: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as fh:
            fh.write(gz)
        os.replace(tmp, path)
    except OSError as exc:
        log(STAGE, f"warning: cannot write cache {path}: {_reason(exc)}")


# ------------------------------------------------------------------------- main
def _sources(dataset: str) -> list[str]:
    raw = os.environ.get("DATA_SOURCES", "").strip()
    if not raw:
        return list(DEFAULT_SOURCES[dataset])
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise SettingError(f"environment variable DATA_SOURCES={raw!r}: expected a JSON list of strings") from None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SettingError(f"environment variable DATA_SOURCES={raw!r}: expected a JSON list of strings")
    return value or list(DEFAULT_SOURCES[dataset])


def _save_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, x=x, y=y)


def run() -> None:
    out_dir = env_dir("MNIST_DATA_DIR", must_exist=False)
    dataset = env_str("DATASET", "fashion-mnist", choices=tuple(DEFAULT_SOURCES))
    sources = _sources(dataset)
    cache_dir = os.environ.get("DATA_CACHE_DIR", "").strip() or None
    timeout = env_float("DOWNLOAD_TIMEOUT", 30.0, low=0.0)
    make_dir("MNIST_DATA_DIR", out_dir)

    log(STAGE, f"dataset {dataset}; sources: {', '.join(sources)}" + (f"; cache {cache_dir}" if cache_dir else ""))
    arrays, files = {}, {}
    for name, (split, kind, _count) in FILES.items():
        arrays[(split, kind)], files[name] = obtain(name, sources, cache_dir, dataset, timeout)

    meta = {
        "dataset": dataset,
        "files": files,
        "train_count": int(len(arrays[("train", "y")])),
        "test_count": int(len(arrays[("t10k", "y")])),
    }
    # Write everything to temp names first, then rename: no half-written outputs.
    pending = {}
    try:
        for split in ("train", "t10k"):
            tmp = os.path.join(out_dir, f".{split}.npz.tmp")
            pending[tmp] = os.path.join(out_dir, f"{split}.npz")
            _save_npz(tmp, arrays[(split, "x")], arrays[(split, "y")])
        tmp = os.path.join(out_dir, ".data.json.tmp")
        pending[tmp] = os.path.join(out_dir, "data.json")
        with open(tmp, "w") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)
            fh.write("\n")
        for tmp, final in pending.items():
            os.replace(tmp, final)
    except BaseException as exc:
        for tmp, final in pending.items():
            for p in (tmp, final):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        if isinstance(exc, OSError):
            raise StageError(f"cannot write to {out_dir}: {_reason(exc)}") from None
        raise
    log(STAGE, f"wrote train.npz ({meta['train_count']}), t10k.npz ({meta['test_count']}), data.json to {out_dir}")


if __name__ == "__main__":
    main(STAGE, run)
