"""The ``s3://bucket/prefix`` artifact store: results and model versions in any S3 bucket.

An object store has no rename, so a directory is published in two steps:

1. every file is uploaded under the final path, in a folder of its own upload
   (``<path>/_files/<upload-id>/<file>``), with ``boto3``'s transfer manager
   (multipart and parallel for large files, several files at once);
2. the completion marker ``<path>/_manifest.json`` (the files' sizes and
   sha256, and the upload id) is written last, with ``If-None-Match: *``.

Readers trust only a marked result and read the files of the marker's
upload, so a crashed upload (no marker) is never taken for a result, two
racing publishers never mix their files, and exactly one of them wins: the
server refuses every marker but the first. A later publish of the same path
deletes the uploads nobody marked. On an endpoint that ignores
``If-None-Match`` the store refuses to publish (``conditional_writes: auto``)
unless told that only one machine publishes at a time
(``conditional_writes: off``).

Fetched results land in a local read cache under ``.mlflowctl/s3-cache/``:
files by sha256 (``blobs/``), results by the digest of their marker
(``dirs/``), so an unchanged input is never downloaded twice, and whatever
this machine publishes is already there.

:class:`S3Tree` holds all of it and needs only a botocore/boto3 S3 client, a
bucket, a prefix and a local cache folder, so code running elsewhere (a
Kubernetes pod pulling a stage's inputs and pushing its outputs) uses the very
same functions: ``python -m mlflowctl_plugins.s3_store fetch|publish ...``.
``boto3`` is imported only when the store is first used.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

from mlflowctl import hookimpl
from mlflowctl.config import Setting
from mlflowctl.errors import ConfigError, MlflowctlError, UnavailableError
from mlflowctl.stores import (MANIFEST, ReplacingWriter, Store, created_mode, file_manifest, loads_json, manifest_files,
                              staging_dir)

FILES = "_files"          # <path>/_files/<upload-id>/<file>: the uploads of a published directory
CACHE_DIR = "s3-cache"     # under the project's state folder
PROBE = ".mlflowctl-probe"
MB = 1 << 20
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")

# error codes of botocore's ClientError, by what the user has to do about them
_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "UnrecognizedClientException"}
_LOST = {"PreconditionFailed", "412"}
_CONFLICT = {"ConditionalRequestConflict", "409"}


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; one-line errors for what S3 refuses."""
    if not url.startswith("s3://"):
        raise ConfigError(f"store: {url!r} is not an s3:// URL", hint="e.g. s3://my-bucket/mlflowctl")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ConfigError(f"store: {_redact(url)!r}: credentials and ports do not belong in the store URL",
                          hint="use stores.s3.access_key_id / secret_access_key as secrets, "
                               "and stores.s3.endpoint_url for the server")
    if not bucket:
        raise ConfigError(f"store: {url!r} names no bucket", hint="e.g. s3://my-bucket/mlflowctl")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(f"store: {url!r}: {bucket!r} is not a valid S3 bucket name",
                          hint="3-63 characters: lower-case letters, digits, dots and hyphens")
    parts = [p for p in prefix.split("/") if p]
    for p in parts:
        if p in (".", ".."):
            raise ConfigError(f"store: {url!r}: the prefix may not contain {p!r}", hint="e.g. s3://my-bucket/team/mlflowctl")
        if p == FILES:
            raise ConfigError(f"store: {url!r}: {FILES!r} is reserved in store paths")
    return bucket, "/".join(parts)


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


def make_client(endpoint_url: str = "", region: str = "", addressing_style: str = "auto", verify: bool = True,
                ca_bundle: str = "", access_key_id: str = "", secret_access_key: str = "", session_token: str = "",
                profile: str = "", max_concurrency: int = 10, connect_timeout: float = 5.0,
                read_timeout: float = 60.0, max_attempts: int = 3) -> Any:
    """A botocore S3 client. Credentials: the given keys, else the standard AWS chain (env, profile, role)."""
    try:
        import botocore.session
        from botocore.config import Config
    except ImportError:
        raise UnavailableError("the s3:// store needs boto3, which is not installed",
                               hint="pip install 'mlflowctl[s3]' (or pip install boto3)") from None

    session = botocore.session.Session(profile=profile or None)
    config = Config(
        s3={"addressing_style": addressing_style},
        signature_version="s3v4",
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max(10, max_concurrency + 4),
        # we check every file's sha256 ourselves; old MinIO/Ceph reject the newer default checksums
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    keys: dict[str, Any] = {}
    if access_key_id or secret_access_key:
        keys = {"aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key,
                "aws_session_token": session_token or None}
    return session.create_client("s3", endpoint_url=endpoint_url or None, region_name=region or None,
                                 verify=(ca_bundle or None) if verify else False, config=config, **keys)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", "") or "")
    return code or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MB), b""):
            h.update(chunk)
    return h.hexdigest()


class S3Tree:
    """Published directories and small files under ``s3://bucket/prefix``, with a local read cache.

    Needs only an S3 client (``make_client``), a bucket, a prefix and a local
    ``cache`` folder: no project, no config. ``label`` names the store in
    error messages (never credentials). ``conditional_writes``: ``auto``
    (use ``If-None-Match: *``; refuse to publish where the endpoint ignores
    it) or ``off`` (check, then write: only safe with one publisher at a time).
    """

    def __init__(self, client: Any, bucket: str, prefix: str, cache: Path, label: str = "",
                 conditional_writes: str = "auto", multipart_threshold: int = 8 * MB,
                 multipart_chunksize: int = 8 * MB, max_concurrency: int = 10, remember: bool = False,
                 origin: str = "") -> None:
        # ``client`` may be a callable making the client: then botocore is imported only on first need
        self._client = client
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.remember = remember
        self.origin = origin  # which server (its endpoint URL): part of what a remembered marker is of
        self.cache = Path(cache)
        self.label = label or f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.conditional_writes = conditional_writes
        self._conditional_ok: bool | None = None if conditional_writes == "auto" else False
        self._transfer_args = dict(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                   max_concurrency=max_concurrency)
        self._markers: dict[str, tuple[bytes, dict[str, Any]]] = {}  # path -> marker (immutable once there)
        self._manager: Any = None
        self._lock = threading.Lock()  # doit -n runs stages in threads: make the client and manager once

    @property
    def client(self) -> Any:
        if callable(self._client) and not hasattr(self._client, "meta"):
            with self._lock:
                if callable(self._client) and not hasattr(self._client, "meta"):
                    self._client = self._client()
        return self._client

    # ------------------------------------------------------------ plumbing
    def key(self, path: str) -> str:
        parts = [p for p in str(path).split("/") if p]
        if any(p in ("..", ".") for p in parts):
            raise ValueError(f"store path {path!r} leaves the store")
        return "/".join(([self.prefix] if self.prefix else []) + parts)

    def _norm(self, path: str) -> str:
        return self.key(path)[len(self.prefix) + 1:] if self.prefix else self.key(path)

    def error(self, exc: BaseException, doing: str) -> MlflowctlError:
        """The one-line error for a failed S3 call (``exc`` from botocore)."""
        name = type(exc).__name__
        endpoint = getattr(getattr(self.client, "meta", None), "endpoint_url", "?")
        where = f"store {self.label}"
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return ConfigError(f"{where}: no usable AWS credentials ({name})",
                               hint="set stores.s3.access_key_id and secret_access_key as "
                                    '{"$env": VAR} secrets, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or a profile')
        if name == "SSLError":
            return UnavailableError(f"{where}: TLS to {endpoint} failed while {doing}",
                                    hint="set stores.s3.ca_bundle, or stores.s3.verify=false for a test server")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ProxyConnectionError", "ConnectionError", "HTTPClientError"):
            return UnavailableError(f"{where}: cannot reach the S3 endpoint {endpoint} while {doing} ({name})",
                                    hint="is the S3 server running? check stores.s3.endpoint_url")
        if isinstance(exc, MlflowctlError):
            return exc
        code = _code(exc)
        if code == "NoSuchBucket" or (code in _MISSING and getattr(exc, "operation_name", "") == "HeadBucket"):
            return UnavailableError(f"{where}: bucket {self.bucket!r} does not exist at {endpoint}",
                                    hint=f"create it (aws s3 mb s3://{self.bucket}) or fix store in mlflowctl.yaml")
        if code in _DENIED:
            return ConfigError(f"{where}: the S3 server refused the credentials while {doing} ({code})",
                               hint="check stores.s3.access_key_id/secret_access_key or your AWS profile")
        message = str(exc).splitlines()[0] if str(exc) else name
        return UnavailableError(f"{where}: S3 failed while {doing}: {message}")

    @contextlib.contextmanager
    def _s3(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (MlflowctlError, ValueError, FileNotFoundError):
            raise
        except Exception as exc:  # botocore's exceptions, imported lazily
            raise self.error(exc, doing) from None

    def _get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        with self._s3(f"reading {key}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except Exception as exc:
                if _code(exc) in _MISSING:
                    return None
                raise

    def _head(self, key: str) -> bool:
        with self._s3(f"looking up {key}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except Exception as exc:
                if _code(exc) in _MISSING:
                    return False
                raise

    def _list(self, prefix: str, delimiter: str = "", max_keys: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
        """(objects, common prefixes) under ``prefix``, every page (or the first ``max_keys``)."""
        contents: list[dict[str, Any]] = []
        prefixes: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if max_keys:
            kwargs["MaxKeys"] = max_keys
        with self._s3(f"listing {prefix or '/'}"):
            while True:
                page = self.client.list_objects_v2(**kwargs)
                contents += page.get("Contents", [])
                prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
                if max_keys or not page.get("IsTruncated"):
                    return contents, prefixes
                kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def _delete_keys(self, keys: list[str]) -> None:
        with self._s3("deleting objects"):
            for i in range(0, len(keys), 1000):
                chunk = keys[i:i + 1000]
                if chunk:
                    self.client.delete_objects(Bucket=self.bucket,
                                               Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})

    def manager(self) -> Any:
        """boto3's transfer manager (multipart, parallel) on this client."""
        client = self.client
        with self._lock:
            if self._manager is None:
                from boto3.s3.transfer import TransferConfig
                from s3transfer.manager import TransferManager

                self._manager = TransferManager(client, TransferConfig(use_threads=True, **self._transfer_args))
        return self._manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None

    # -------------------------------------------------------------- markers
    def _seen(self, path: str) -> Path:
        ident = hashlib.sha256(f"{self.origin} {self.bucket}/{self.key(path)}".encode()).hexdigest()
        return self.cache / "markers" / ident[:2] / f"{ident}.json"

    def marker(self, path: str) -> dict[str, Any] | None:
        """The completion marker of the published directory ``path`` (one GET, then remembered).

        With ``remember``, a marker once seen is also kept on disk and trusted
        by later processes without asking the bucket: a marker is written once
        and never replaced, so only a result deleted by hand goes unnoticed.
        """
        path = self._norm(path)
        if path in self._markers:
            return self._markers[path][1]
        raw = None
        if self.remember:
            with contextlib.suppress(OSError):
                raw = self._seen(path).read_bytes()
        from_bucket = raw is None
        if from_bucket:
            raw = self._get(self.key(f"{path}/{MANIFEST}"))
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None  # not ours: not a result
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            return None
        self._markers[path] = (raw, data)
        if from_bucket:
            self._remember(path, raw)
        return data

    def _remember(self, path: str, raw: bytes) -> None:
        if not self.remember:
            return
        seen = self._seen(path)
        with contextlib.suppress(OSError):
            seen.parent.mkdir(parents=True, exist_ok=True)
            tmp = seen.with_name(f".{seen.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(raw)
            os.replace(tmp, seen)

    @staticmethod
    def _ancestors(path: str) -> list[str]:
        """``a/b/c`` -> ``["a/b", "a"]`` (deepest first)."""
        parts = path.split("/")
        return ["/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]

    def _in_published(self, path: str, probe: bool) -> tuple[str, str] | None:
        """(published ancestor, path inside it) of ``path``: from the markers known, or (``probe``) by asking."""
        for base in self._ancestors(path):
            if base in self._markers:
                return base, path[len(base) + 1:]
        if probe:
            for base in self._ancestors(path):
                if self.marker(base) is not None:
                    return base, path[len(base) + 1:]
        return None

    def _file_key(self, path: str, probe: bool = False) -> str | None:
        """The key holding the bytes of the store file ``path`` (None: a name its published folder lacks)."""
        found = self._in_published(path, probe)
        if found is None or found[1] == MANIFEST:
            return self.key(path)
        base, rel = found
        marker = self._markers[base][1]
        return self.key(f"{base}/{FILES}/{marker['upload']}/{rel}") if rel in marker["files"] else None

    # ------------------------------------------------------- small objects
    def exists(self, path: str) -> bool:
        path = self._norm(path)
        if self.marker(path) is not None:
            return True
        key = self._file_key(path)
        if self._in_published(path, probe=False):
            return key is not None  # inside a known result: its marker lists the files
        if self._head(self.key(path)):
            return True
        objects, prefixes = self._list(self.key(path) + "/", delimiter="/", max_keys=2)
        if objects or any(not p.endswith(f"/{FILES}/") for p in prefixes):
            return True
        return self._in_published(path, probe=True) is not None and self._file_key(path) is not None

    def read_bytes(self, path: str) -> bytes | None:
        """A store file's bytes (a small file, or a file of a published directory), or None."""
        norm = self._norm(path)
        if norm.endswith(f"/{MANIFEST}") and self.marker(norm[: -len(MANIFEST) - 1]) is not None:
            return self._markers[norm[: -len(MANIFEST) - 1]][0]
        key = self._file_key(norm)
        data = self._get(key) if key else None
        if data is None and key and self._in_published(norm, probe=False) is None:
            key = self._file_key(norm, probe=True)  # perhaps a file of a result we have not met yet
            if key and key != self.key(norm):
                data = self._get(key)
        return data

    def write_bytes(self, path: str, data: bytes) -> None:
        """Replace the small file ``path`` (one PUT: S3 replaces an object atomically)."""
        key = self.key(path)
        self._check_writable(path)
        with self._s3(f"writing {key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def _check_writable(self, path: str) -> None:
        if FILES in self._norm(path).split("/"):
            raise ValueError(f"store path {path!r}: {FILES!r} is reserved")

    def list(self, prefix: str) -> list[str]:
        """Direct children of ``prefix``: small files, folders, and published directories (never bare uploads)."""
        norm = self._norm(prefix) if prefix.strip("/") else ""
        base = self.key(norm) + "/" if norm else (self.prefix + "/" if self.prefix else "")
        objects, _ = self._list(base, delimiter=f"/{FILES}/")
        names: set[str] = set()
        own_marker = False
        for obj in objects:
            rel = obj["Key"][len(base):]
            first = rel.split("/", 1)[0]
            if rel == MANIFEST:
                own_marker = True
            elif first and first != FILES and not first.startswith("."):
                names.add(first)
        if own_marker and norm:
            marker = self.marker(norm)
            if marker is not None:
                return sorted({name.split("/", 1)[0] for name in marker["files"]} | names)
        return sorted(names)

    def put_file(self, src: Path, path: str) -> None:
        key = self.key(path)
        self._check_writable(path)
        with self._s3(f"uploading {key}"):
            self.manager().upload(str(src), self.bucket, key).result()

    def get_file(self, path: str, dest: Path) -> Path:
        key = self._file_key(self._norm(path), probe=True)
        if key is None:
            raise FileNotFoundError(f"{self.label}: {path} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        try:
            with self._s3(f"downloading {key}"):
                try:
                    self.manager().download(self.bucket, key, str(tmp)).result()
                except Exception as exc:
                    if _code(exc) in _MISSING:
                        raise FileNotFoundError(f"{self.label}: {path} does not exist") from None
                    raise
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def delete(self, path: str) -> None:
        """Remove a file, a folder or a published directory (its marker first, so readers stop trusting it)."""
        norm = self._norm(path)
        with self._s3(f"deleting {norm}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(f"{norm}/{MANIFEST}"))
            self._markers.pop(norm, None)
            self._seen(norm).unlink(missing_ok=True)
            self.client.delete_object(Bucket=self.bucket, Key=self.key(norm))
        objects, _ = self._list(self.key(norm) + "/")
        self._delete_keys([o["Key"] for o in objects])
        for known in [p for p in self._markers if p.startswith(norm + "/")]:
            self._markers.pop(known, None)
            self._seen(known).unlink(missing_ok=True)

    # ------------------------------------------------------------- publish
    def supports_conditional_writes(self) -> bool:
        """Does the endpoint refuse a second ``If-None-Match: *`` PUT? (3 small requests, once a day).

        A "yes" is kept in the cache folder for a day, for this endpoint and bucket.
        """
        known = self.cache / "probes" / (hashlib.sha256(f"{self.origin} {self.bucket}".encode()).hexdigest()[:24]
                                         + ".conditional")
        if self._conditional_ok is None:
            with contextlib.suppress(OSError):
                if time.time() - known.stat().st_mtime < 24 * 3600:
                    self._conditional_ok = True
        if self._conditional_ok is None:
            key = self.key(f"{PROBE}/{uuid.uuid4().hex}")
            with self._s3("checking conditional writes"):
                self.client.put_object(Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*")
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
                    self._conditional_ok = False
                except Exception as exc:
                    if _code(exc) not in _LOST | _CONFLICT:
                        raise
                    self._conditional_ok = True
                finally:
                    self.client.delete_object(Bucket=self.bucket, Key=key)
            if self._conditional_ok:
                with contextlib.suppress(OSError):
                    known.parent.mkdir(parents=True, exist_ok=True)
                    known.write_text(f"{time.time()}\n")
        return self._conditional_ok

    def publish(self, src: Path, path: str, manifest: dict[str, Any] | None = None) -> bool:
        """Upload the local folder ``src`` as the directory ``path``; False if ``path`` was published first.

        On success the files of ``src`` move into the local read cache; on
        ``False`` ``src`` stays as it was.
        """
        path = self._norm(path)
        self._check_writable(path)
        if self.conditional_writes == "auto" and not self.supports_conditional_writes():
            raise UnavailableError(
                f"store {self.label}: the S3 endpoint ignores If-None-Match, so two machines could "
                "publish the same result or model version",
                hint="use an endpoint with conditional writes (AWS S3, recent MinIO), or set "
                     "stores.s3.conditional_writes=off if only one machine publishes at a time")
        if self.marker(path) is not None:
            return False
        upload = f"{time.time_ns():x}-{uuid.uuid4().hex[:12]}"
        rels = [p.relative_to(src).as_posix() for p in manifest_files(src)]
        try:
            # the files' sha256 are computed while they upload (hashlib lets the transfer threads run)
            data = self._upload_files(src, rels, f"{path}/{FILES}/{upload}",
                                      lambda: {**file_manifest(src, manifest), "upload": upload})
            if set(data["files"]) != set(rels):
                raise MlflowctlError(f"store {self.label}: the files of {src} changed while they were published")
            body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
            won = self._write_marker(path, body, upload)
        except BaseException:
            with contextlib.suppress(Exception):
                self._drop_upload(path, upload)
            raise
        if not won:
            with contextlib.suppress(MlflowctlError):
                self._drop_upload(path, upload)
            return False
        self._markers[path] = (body, data)
        self._remember(path, body)
        with contextlib.suppress(MlflowctlError):
            self.clean(path)
        self._adopt(src, body, data)
        return True

    def _upload_files(self, src: Path, files: Any, under: str, meanwhile: Any = None) -> Any:
        """Upload ``src/<rel>`` for each ``rel`` in ``files`` under ``under``; returns ``meanwhile()``, run
        while the transfers go on."""
        manager = self.manager()
        with self._s3(f"uploading to {under}"):
            futures = [manager.upload(str(src / rel), self.bucket, self.key(f"{under}/{rel}")) for rel in files]
            try:
                result = meanwhile() if meanwhile else None
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return result

    def _write_marker(self, path: str, body: bytes, upload: str) -> bool:
        key = self.key(f"{path}/{MANIFEST}")
        with self._s3(f"writing the marker {key}"):
            if not self._conditional_ok:  # conditional_writes: off -- check, then write
                if self._head(key):
                    return False
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/json")
                return True
            for attempt in range(6):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*",
                                           ContentType="application/json")
                    return True
                except Exception as exc:
                    code = _code(exc)
                    if code in _CONFLICT and attempt < 5:  # a concurrent write in flight: S3 says retry
                        time.sleep(0.05 * (attempt + 1))
                        continue
                    if code not in _LOST and code not in _CONFLICT:
                        raise
                    # refused: someone else's marker -- unless a retried request of ours had landed
                    theirs = self._get(key)
                    try:
                        return bool(theirs) and json.loads(theirs).get("upload") == upload
                    except ValueError:
                        return False
        return False

    def _drop_upload(self, path: str, upload: str) -> None:
        folder = self.key(f"{path}/{FILES}/{upload}") + "/"
        objects, _ = self._list(folder)
        self._delete_keys([o["Key"] for o in objects])
        with self._s3(f"aborting unfinished uploads under {folder}"):
            for up in self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=folder).get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])

    def clean(self, path: str) -> list[str]:
        """Delete the uploads under the published directory ``path`` that its marker does not name.

        Once a directory is marked, no other upload under it can ever become
        its content, so this is safe while other publishers are still busy.
        Returns the upload ids removed.
        """
        path = self._norm(path)
        marker = self.marker(path)
        if marker is None:
            return []
        base = self.key(f"{path}/{FILES}") + "/"
        objects, _ = self._list(base)
        mine = f"{marker['upload']}/"
        stale = [o["Key"] for o in objects if not o["Key"][len(base):].startswith(mine)]
        self._delete_keys(stale)
        with self._s3(f"aborting unfinished uploads under {base}"):  # the parts of a killed multipart upload
            pending = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=base).get("Uploads", [])
            for up in pending:
                if not up["Key"][len(base):].startswith(mine):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    stale.append(up["Key"])
        return sorted({k[len(base):].split("/", 1)[0] for k in stale})

    def sweep(self, older_than: float = 24 * 3600.0, dry_run: bool = False) -> list[str]:
        """Delete every upload no marker names, once older than ``older_than`` seconds; returns their folders.

        :meth:`clean` tidies a path when it is published; this finds the
        uploads of paths nobody published again (a killed run whose inputs
        changed since). Upload ids start with their start time, so a young
        upload -- perhaps still running -- is left alone.
        """
        base = self.prefix + "/" if self.prefix else ""
        objects, holders = self._list(base, delimiter=f"/{FILES}/")
        markers = {o["Key"][len(base):-len(MANIFEST) - 1] for o in objects if o["Key"].endswith(f"/{MANIFEST}")}
        now_ns, removed = time.time_ns(), []
        for holder in holders:  # ".../<path>/_files/"
            path = holder[len(base):-len(f"/{FILES}/")]
            kept = self.marker(path)["upload"] if path in markers and self.marker(path) else None
            _, uploads = self._list(holder, delimiter="/")
            for folder in uploads:
                upload = folder[len(holder):].rstrip("/")
                try:
                    started = int(upload.split("-", 1)[0], 16)
                except ValueError:
                    continue  # not one of ours
                if upload == kept or now_ns - started < older_than * 1e9:
                    continue
                removed.append(f"{path}/{FILES}/{upload}")
                if not dry_run:
                    self._drop_upload(path, upload)
        return removed

    # ------------------------------------------------------- local cache
    def _blob(self, sha: str) -> Path:
        return self.cache / "blobs" / sha[:2] / sha

    def _dir_for(self, body: bytes) -> Path:
        return self.cache / "dirs" / hashlib.sha256(body).hexdigest()[:32]

    def _adopt(self, src: Path, body: bytes, data: dict[str, Any]) -> None:
        """Move the files just published into the read cache (a later fetch downloads nothing)."""
        try:
            for rel, info in data["files"].items():
                blob = self._blob(info["sha256"])
                if not blob.exists():
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    tmp = blob.with_name(f".{blob.name}.{uuid.uuid4().hex[:8]}")
                    try:
                        os.rename(src / rel, tmp)
                    except OSError:
                        shutil.copyfile(src / rel, tmp)
                    tmp.chmod(created_mode(0o444))
                    os.replace(tmp, blob)
            self._materialise(body, data)
        except OSError:
            pass  # only a cache: the next fetch downloads
        shutil.rmtree(src, ignore_errors=True)

    def _materialise(self, body: bytes, data: dict[str, Any]) -> Path:
        """The cached directory of a marker: hard links to the blobs, plus the marker as ``_manifest.json``."""
        final = self._dir_for(body)
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        try:
            for rel, info in data["files"].items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self._blob(info["sha256"]), target)
                except OSError:
                    shutil.copyfile(self._blob(info["sha256"]), target)
            (tmp / MANIFEST).write_bytes(body)
            tmp.chmod(created_mode(0o777))
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def fetch(self, path: str) -> Path:
        """A local directory with the published directory ``path`` (read only; from the cache when unchanged).

        Every downloaded file is checked against the marker's sha256. A
        folder holding published directories (``models/<name>``) is mirrored
        as links to each of them.
        """
        path = self._norm(path)
        marker = self.marker(path)
        if marker is None:
            children = [c for c in self.list(path) if self.marker(f"{path}/{c}") is not None]
            if not children:
                raise FileNotFoundError(f"{self.label}: {path} is not a published folder")
            return self._mirror(path, children)
        body = self._markers[path][0]
        final = self._dir_for(body)
        if final.is_dir():
            return final
        missing = {info["sha256"]: (rel, info) for rel, info in marker["files"].items()
                   if not self._blob(info["sha256"]).is_file()}
        if missing:
            self._download(path, marker["upload"], missing)
        return self._materialise(body, marker)

    def _download(self, path: str, upload: str, missing: dict[str, tuple[str, dict[str, Any]]]) -> None:
        tmpdir = self.cache / "blobs" / ".incoming"
        tmpdir.mkdir(parents=True, exist_ok=True)
        manager = self.manager()
        jobs = []
        try:
            with self._s3(f"downloading {path}"):
                for sha, (rel, _info) in missing.items():
                    tmp = tmpdir / f"{sha}.{uuid.uuid4().hex[:8]}"
                    key = self.key(f"{path}/{FILES}/{upload}/{rel}")
                    jobs.append((sha, rel, tmp, manager.download(self.bucket, key, str(tmp))))
                for _sha, rel, _tmp, future in jobs:
                    try:
                        future.result()
                    except Exception as exc:
                        if _code(exc) in _MISSING:
                            raise UnavailableError(f"store {self.label}: {path}/{rel} is missing from the bucket "
                                                   "although the result's marker names it",
                                                   hint="the result was damaged; delete it and re-run its stage") from None
                        raise
            for sha, rel, tmp, _future in jobs:
                got = _sha256(tmp)
                if got != sha:
                    raise UnavailableError(f"store {self.label}: {path}/{rel} does not match its manifest "
                                           f"(sha256 {got[:12]}..., expected {sha[:12]}...)",
                                           hint="the object was changed in the bucket; delete the result and re-run")
                blob = self._blob(sha)
                blob.parent.mkdir(parents=True, exist_ok=True)
                tmp.chmod(created_mode(0o444))
                os.replace(tmp, blob)
        finally:
            for _sha, _rel, tmp, _future in jobs:
                tmp.unlink(missing_ok=True)

    def _mirror(self, path: str, children: list[str]) -> Path:
        """``cache/mirrors/<hash>/<child>`` -> each child's cached directory (stable path, updated in place)."""
        mirror = self.cache / "mirrors" / hashlib.sha256(f"{self.label}/{path}".encode()).hexdigest()[:24]
        mirror.mkdir(parents=True, exist_ok=True)
        for child in children:
            target = self.fetch(f"{path}/{child}")
            link = mirror / child
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            tmp = mirror / f".{child}.{uuid.uuid4().hex[:8]}"
            os.symlink(target, tmp)
            os.replace(tmp, link)
        for stale in mirror.iterdir():
            if stale.name not in children and stale.is_symlink():
                stale.unlink(missing_ok=True)
        return mirror


class _Writer(ReplacingWriter):
    """A small store file written in memory, uploaded in one PUT on a clean close."""

    def __init__(self, tree: S3Tree, path: str, mode: str) -> None:
        tree._check_writable(path)
        self._tree, self._path = tree, path
        self._raw = io.BytesIO()
        super().__init__(self._raw if "b" in mode else io.TextIOWrapper(self._raw, encoding="utf-8"))

    def _commit(self) -> None:
        self._fh.flush()
        self._tree.write_bytes(self._path, self._raw.getvalue())

    def _discard(self) -> None:
        pass


class S3Store(Store):
    """Results and models in ``s3://bucket/prefix`` (AWS S3, MinIO, Ceph, any S3 endpoint)."""

    scheme = "s3"
    description = "an S3 bucket shared by every machine that can reach it; publish = upload, then a conditional marker"
    settings = {
        "endpoint_url": Setting(str, "", "S3 endpoint (empty: AWS); e.g. http://127.0.0.1:9000 for MinIO"),
        "region": Setting(str, "", "region (empty: from the AWS config, else us-east-1)"),
        "addressing_style": Setting(str, "auto", "bucket in the host name or in the path",
                                    choices=("auto", "path", "virtual")),
        "verify": Setting(bool, True, "verify the endpoint's TLS certificate"),
        "ca_bundle": Setting(str, "", "CA bundle file to verify the endpoint with (empty: the system's)"),
        "profile": Setting(str, "", "AWS profile to take credentials from (empty: the standard AWS chain)"),
        "access_key_id": Setting(str, "", 'access key id, as a secret: {"$env": VAR} or {"$file": path}',
                                 secret=True),
        "secret_access_key": Setting(str, "", 'secret access key, as a secret: {"$env": VAR} or {"$file": path}',
                                     secret=True),
        "session_token": Setting(str, "", "session token of temporary credentials, as a secret", secret=True),
        "conditional_writes": Setting(str, "auto", "auto: first publisher wins through If-None-Match (refuse "
                                      "endpoints without it); off: check-then-write, one publisher at a time only",
                                      choices=("auto", "off")),
        "max_concurrency": Setting(int, 10, "parallel transfers (files and parts)"),
        "multipart_mb": Setting(int, 8, "files above this size go in parts of this size"),
        "connect_timeout": Setting(float, 5.0, "seconds to connect to the endpoint"),
        "remember_results": Setting(bool, True, "trust a result this machine has seen in the bucket without asking "
                                    "again (results are never replaced); false: one request per stage check"),
    }

    def __init__(self, url: str, settings: dict[str, Any], project: Any) -> None:
        super().__init__(url, settings, project)
        self.bucket, self.prefix = parse_url(url)
        if int(settings.get("max_concurrency", 10)) < 1 or int(settings.get("multipart_mb", 8)) < 5:
            raise ConfigError("stores.s3: max_concurrency must be >= 1 and multipart_mb >= 5 (S3's smallest part)")
        self._tree: S3Tree | None = None

    @property
    def tree(self) -> S3Tree:
        if self._tree is None:
            cfg = self.config
            client = lambda: make_client(  # noqa: E731 - botocore is imported on the first request only
                endpoint_url=cfg.get("endpoint_url", ""), region=cfg.get("region", ""),
                addressing_style=cfg.get("addressing_style", "auto"), verify=cfg.get("verify", True),
                ca_bundle=cfg.get("ca_bundle", ""), access_key_id=cfg.get("access_key_id", ""),
                secret_access_key=cfg.get("secret_access_key", ""), session_token=cfg.get("session_token", ""),
                profile=cfg.get("profile", ""), max_concurrency=int(cfg.get("max_concurrency", 10)),
                connect_timeout=float(cfg.get("connect_timeout", 5.0)))
            part = int(cfg.get("multipart_mb", 8)) * MB
            self._tree = S3Tree(client, self.bucket, self.prefix, Path(self.project.state_dir) / CACHE_DIR,
                                label=self.url, conditional_writes=cfg.get("conditional_writes", "auto"),
                                multipart_threshold=part, multipart_chunksize=part,
                                max_concurrency=int(cfg.get("max_concurrency", 10)),
                                remember=bool(cfg.get("remember_results", True)),
                                origin=cfg.get("endpoint_url", "") or "aws")
        return self._tree

    def preflight(self) -> None:
        """The bucket exists, the credentials work, the store is writable (and, with auto, conditional)."""
        tree = self.tree
        with tree._s3("checking the bucket"):
            tree.client.head_bucket(Bucket=self.bucket)
        if tree.conditional_writes == "auto":
            tree.supports_conditional_writes()
        else:
            tree.write_bytes(f"{PROBE}/{uuid.uuid4().hex}", b"")

    # -- objects --------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.tree.exists(path)

    def list(self, prefix: str) -> list[str]:
        return self.tree.list(prefix)

    def open(self, path: str, mode: str = "rb") -> IO[Any]:
        if "w" in mode:
            return _Writer(self.tree, path, mode)  # type: ignore[return-value]
        data = self.tree.read_bytes(path)
        if data is None:
            raise FileNotFoundError(f"{self.url}: {path} does not exist")
        return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))  # type: ignore[return-value]

    def read_json(self, path: str, default: Any = None) -> Any:
        data = self.tree.read_bytes(path)  # one GET, where the base class would look first and read then
        return default if data is None else loads_json(data, self, path)

    def put(self, src: Path, path: str) -> None:
        self.tree.put_file(src, path)

    def get(self, path: str, dest: Path) -> Path:
        if self.tree.marker(path) is not None:
            shutil.copytree(self.tree.fetch(path), dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
            return dest
        return self.tree.get_file(path, dest)

    def delete(self, path: str) -> None:
        self.tree.delete(path)

    # -- directories ----------------------------------------------------
    def fetch(self, path: str) -> Path:
        return self.tree.fetch(path)

    def staging(self, label: str = "out") -> contextlib.AbstractContextManager[Path]:
        return staging_dir(Path(self.project.state_dir) / CACHE_DIR / "staging", label)

    def publish(self, src: Path, path: str, manifest: dict[str, Any] | None = None) -> bool:
        return self.tree.publish(src, path, manifest)


@hookimpl
def mlflowctl_add_stores(registry: Any) -> None:
    registry.add_store(S3Store)


# -- the same code from a shell or a pod: no project, the AWS chain for credentials ----------------
def main(argv: list[str] | None = None) -> int:
    """``python -m mlflowctl_plugins.s3_store fetch s3://b/p/results/x/KEY DEST`` / ``publish SRC s3://b/p/PATH``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m mlflowctl_plugins.s3_store", description=main.__doc__)
    ap.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3", ""))
    ap.add_argument("--cache", default=os.environ.get("MLFLOWCTL_S3_CACHE", str(Path.home() / ".cache" / "mlflowctl-s3")))
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="copy a published directory into DEST (checked against its manifest)")
    f.add_argument("url")
    f.add_argument("dest")
    p = sub.add_parser("publish", help="publish the local folder SRC at URL; exit 0 also when it was there already")
    p.add_argument("src")
    p.add_argument("url")
    w = sub.add_parser("sweep", help="delete uploads no result names, older than --hours (default 24)")
    w.add_argument("url")
    w.add_argument("--hours", type=float, default=24.0)
    w.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    try:
        bucket, path = parse_url(args.url)
        client = make_client(endpoint_url=args.endpoint_url)
        if args.cmd == "sweep":
            tree = S3Tree(client, bucket, path, Path(args.cache), label=args.url)
            for folder in tree.sweep(args.hours * 3600, dry_run=args.dry_run):
                print(("would remove " if args.dry_run else "removed ") + folder)
            return 0
        tree = S3Tree(client, bucket, "", Path(args.cache), label=args.url)
        if args.cmd == "fetch":
            shutil.copytree(tree.fetch(path), args.dest, dirs_exist_ok=True)
        else:
            print("published" if tree.publish(Path(args.src), path) else "already published")
        tree.close()
    except (MlflowctlError, FileNotFoundError, ValueError) as exc:
        print(f"mlflowctl s3: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
