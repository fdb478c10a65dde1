"""The ``pvc://`` store's server: a small HTTP file service over the claim, run in the cluster.

Standard library only (plus ``manifest.py``, shipped beside it in the same ConfigMap), so it runs
in any image with Python 3. The orchestrator reaches it through the API server's service proxy;
every operation is the one the ``file://`` store does on a local folder, done here on the volume,
so publishing is a ``rename`` on the volume (atomic; the first publisher wins) and version numbers
are never shared by two registrations.

    python3 store_server.py --root /store/<path> --port 8080

Routes (``path`` is store-relative, ``/``-separated; ``..``, absolute paths and NUL are refused):

    GET    /healthz
    GET    /v1/stat?path=P             {"exists", "dir", "size"}
    GET    /v1/list?path=P             {"names": [...]}  (dot-names hidden)
    GET    /v1/file?path=P             the bytes (404 if missing)
    PUT    /v1/file?path=P             replace atomically (temporary file + fsync + rename)
    DELETE /v1/path?path=P             a file, or a folder (renamed away first, then removed)
    GET    /v1/tar?path=P              a folder as an uncompressed tar stream
    POST   /v1/untar?path=P            extract the tar body into the staging folder P
    POST   /v1/staging?path=P          create the staging folder P (its parent must be named .staging)
    POST   /v1/publish?src=S&dst=D     write S/_manifest.json (body: extra fields), rename S to D;
                                       {"published": true, "digest"} or 409 {"published": false}; with
                                       "_expect": {file: {"bytes", "sha256"}} in the body, S must hold
                                       exactly those files (else 400, nothing published)
    GET    /v1/damaged?path=P&deep=1   {"problem": null | "what is wrong"}: P against its _manifest.json
                                       (sizes; sha256 too with deep=1)

    PUT /v1/file with an X-Content-SHA256 header: the body must match it (else 400, nothing replaced).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from manifest import MANIFEST, created_mode, file_manifest, folder_problem, sha256_file  # noqa: E402  (shipped beside)

STAGING = ".staging"
MAX_SMALL_FILE = 64 << 20
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


class BadRequest(Exception):
    status = 400


class NotFound(Exception):
    status = 404


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)

    def path(self, rel: str | None, allow_root: bool = True) -> Path:
        rel = rel or ""
        if "\x00" in rel or rel.startswith("/") or any(p == ".." for p in rel.split("/")):
            raise BadRequest(f"bad store path {rel!r}")
        parts = [p for p in rel.split("/") if p and p != "."]
        if not parts and not allow_root:
            raise BadRequest("a store path is required")
        return self.root.joinpath(*parts)

    def staging_path(self, rel: str | None) -> Path:
        path = self.path(rel, allow_root=False)
        if path.parent.name != STAGING or not _LABEL.match(path.name):
            raise BadRequest(f"{rel!r} is not a staging folder (<dir>/.staging/<name>)")
        return path

    def delete(self, target: Path) -> None:
        if target.is_dir() and not target.is_symlink():
            trash = self.root / STAGING / f"deleted-{uuid.uuid4().hex}"
            os.rename(target, trash)  # readers never see a half-deleted result
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                target.unlink()
            except FileNotFoundError:
                pass

    def write_atomic(self, target: Path, stream, length: int, sha256: str = "") -> None:
        import hashlib

        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                left = length
                while left > 0:
                    chunk = stream.read(min(left, 1 << 20))
                    if not chunk:
                        raise BadRequest("body shorter than Content-Length")
                    out.write(chunk)
                    h.update(chunk)
                    left -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if sha256 and h.hexdigest() != sha256.lower():
                raise BadRequest(f"body does not match its sha256 ({h.hexdigest()[:12]}..., sent "
                                 f"{sha256[:12]}...): nothing written")
            os.chmod(tmp, created_mode())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def untar(self, dest: Path, stream) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for member in tf:
                name = member.name
                if name.startswith("/") or any(p == ".." for p in name.split("/")):
                    raise BadRequest(f"tar member {name!r} leaves the folder")
                if not (member.isfile() or member.isdir()):
                    continue  # no links, devices or fifos
                target = dest / name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.chmod(target, created_mode(0o777 if member.mode & 0o111 else 0o666))

    def publish(self, src: Path, dst: Path, extra: dict) -> dict:
        if not src.is_dir():
            raise NotFound(f"staging folder {src.name} does not exist")
        if dst.exists():
            return {"published": False}
        expect = extra.pop("_expect", None)
        manifest = file_manifest(src, extra)
        if expect is not None:  # what the client sent must be what landed on the volume
            got = manifest["files"]
            for rel in sorted(set(got) | set(expect)):
                want, have = expect.get(rel), got.get(rel)
                if want is None or have is None or (want.get("bytes"), want.get("sha256")) != (have["bytes"], have["sha256"]):
                    what = "is missing" if have is None else "was not sent" if want is None else "differs from what was sent"
                    raise BadRequest(f"upload damaged: {rel} {what} (sizes and sha256 checked); nothing published")
        (src / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dst)  # atomic; refused when dst appeared meanwhile (never empty: it has a manifest)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                (src / MANIFEST).unlink(missing_ok=True)
                return {"published": False}
            raise
        return {"published": True, "digest": manifest["digest"]}


class Handler(BaseHTTPRequestHandler):
    server_version = "mlflowctl-store/1"
    protocol_version = "HTTP/1.1"
    store: Store

    def log_message(self, fmt: str, *args) -> None:  # one short line per request on stderr
        sys.stderr.write("store: %s %s\n" % (self.command, fmt % args))

    def _q(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlparse(self.path).query, keep_blank_values=True).items()}

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        self._send(status, json.dumps(data).encode())

    def _length(self) -> int:
        try:
            return int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None

    def _dispatch(self) -> None:
        route = urlparse(self.path).path
        q = self._q()
        s = self.store
        self._body_read = False  # a route that read the body sets it: an error then drains nothing more
        try:
            handler = ROUTES.get((self.command, route))
            if handler is None:
                self._json(404 if route not in {r for _, r in ROUTES} else 405, {"error": f"no route {self.command} {route}"})
                return
            handler(self, s, q)
        except (BadRequest, NotFound) as exc:
            self._drain()
            self._json(exc.status, {"error": str(exc)})
        except tarfile.TarError as exc:
            self._json(400, {"error": f"bad tar stream: {exc}"})
        except OSError as exc:
            self._json(500, {"error": f"{type(exc).__name__}: {exc.strerror or exc}"})

    def _drain(self) -> None:
        if getattr(self, "_body_read", False):
            return
        try:
            left = self._length()
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        except (BadRequest, OSError):
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = _dispatch

    # -- routes --------------------------------------------------------------------------------
    def healthz(self, s: Store, q) -> None:
        self._json(200, {"ok": True, "root": str(s.root)})

    def stat(self, s: Store, q) -> None:
        p = s.path(q.get("path"))
        self._json(200, {"exists": p.exists(), "dir": p.is_dir(), "size": p.stat().st_size if p.is_file() else 0})

    def listing(self, s: Store, q) -> None:
        p = s.path(q.get("path"))
        names = sorted(c.name for c in p.iterdir() if not c.name.startswith(".")) if p.is_dir() else []
        self._json(200, {"names": names})

    def get_file(self, s: Store, q) -> None:
        p = s.path(q.get("path"), allow_root=False)
        if not p.is_file():
            raise NotFound(f"{q.get('path')} not found")
        size = p.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(p, "rb") as fh:
            shutil.copyfileobj(fh, self.wfile, 1 << 20)

    def put_file(self, s: Store, q) -> None:
        p = s.path(q.get("path"), allow_root=False)
        length = self._length()
        try:
            s.write_atomic(p, self.rfile, length, self.headers.get("X-Content-SHA256", ""))
        except BadRequest as exc:
            self._body_read = "nothing written" in str(exc)  # the whole body was read before the check
            raise
        self._json(200, {"ok": True})

    def damaged(self, s: Store, q) -> None:
        p = s.path(q.get("path"), allow_root=False)
        if not p.is_dir():
            raise NotFound(f"{q.get('path')} is not a published folder")
        self._json(200, {"problem": folder_problem(p, deep=q.get("deep") == "1", digest=sha256_file)})

    def delete(self, s: Store, q) -> None:
        s.delete(s.path(q.get("path"), allow_root=False))
        self._json(200, {"ok": True})

    def tar(self, s: Store, q) -> None:
        p = s.path(q.get("path"))
        if not p.exists():
            raise NotFound(f"{q.get('path')} not found")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        writer = _Chunked(self.wfile)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            if p.is_file():
                tf.add(p, arcname=p.name)
            else:
                for child in sorted(p.rglob("*")):
                    tf.add(child, arcname=child.relative_to(p).as_posix(), recursive=False)
        writer.close()

    def untar(self, s: Store, q) -> None:
        dest = s.staging_path(q.get("path"))
        s.untar(dest, _Limited(self.rfile, self._length()))
        self._json(200, {"ok": True})

    def staging(self, s: Store, q) -> None:
        s.staging_path(q.get("path")).mkdir(parents=True, exist_ok=True)
        self._json(200, {"ok": True})

    def publish(self, s: Store, q) -> None:
        src, dst = s.staging_path(q.get("src")), s.path(q.get("dst"), allow_root=False)
        length = self._length()
        if length > MAX_SMALL_FILE:
            raise BadRequest("manifest too large")
        body = self.rfile.read(length)
        self._body_read = True
        try:
            extra = json.loads(body or b"{}")
        except ValueError:
            raise BadRequest("body: expected a JSON object") from None
        if not isinstance(extra, dict):
            raise BadRequest("body: expected a JSON object")
        with s_lock:
            answer = s.publish(src, dst, extra)
        self._json(200 if answer["published"] else 409, answer)


s_lock = threading.Lock()
ROUTES = {
    ("GET", "/healthz"): Handler.healthz,
    ("GET", "/v1/stat"): Handler.stat,
    ("GET", "/v1/list"): Handler.listing,
    ("GET", "/v1/file"): Handler.get_file,
    ("PUT", "/v1/file"): Handler.put_file,
    ("DELETE", "/v1/path"): Handler.delete,
    ("GET", "/v1/tar"): Handler.tar,
    ("POST", "/v1/untar"): Handler.untar,
    ("POST", "/v1/staging"): Handler.staging,
    ("POST", "/v1/publish"): Handler.publish,
    ("GET", "/v1/damaged"): Handler.damaged,
}


class _Chunked:
    """A write-only file object that sends HTTP/1.1 chunks."""

    def __init__(self, out) -> None:
        self.out = out

    def write(self, data: bytes) -> int:
        if data:
            self.out.write(b"%x\r\n%s\r\n" % (len(data), data))
        return len(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:
        self.out.write(b"0\r\n\r\n")
        self.out.flush()


class _Limited:
    """Read at most ``n`` bytes of the request body (tarfile's stream mode reads ahead)."""

    def __init__(self, raw, n: int) -> None:
        self.raw, self.left = raw, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        self.left -= len(data)
        return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args()
    Handler.store = Store(Path(args.root))
    for leftover in (Handler.store.root / STAGING).glob("deleted-*"):  # from a server killed mid-delete
        shutil.rmtree(leftover, ignore_errors=True)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"store: serving {Handler.store.root} on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
