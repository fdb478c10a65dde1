"""The stage image: its build context's digest (the tag) and building it with the Docker engine.

The image is built from the build context (``image/`` by default) and tagged
``mlflowctl/<project>:<context digest>``: the first 12 hex digits of a digest
of every file the build would send (``.dockerignore`` honoured) plus the
Dockerfile. A tag that already exists is reused without calling the builder,
so an unchanged context never rebuilds, and a changed script rebuilds only the
layers after its ``COPY`` (the requirements layer stays cached).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from mlflowctl.errors import MlflowctlError
from mlflowctl_plugins.docker_container import LABEL_PROJECT, _api_reason, _reason

LABEL_DIGEST = "mlflowctl.context-digest"
# Never part of an image: Python caches and test/bench droppings in the stage code folder.
# (Also excluded from the digest, so running stages locally does not change the image tag.)
DEFAULT_IGNORE = ("**/__pycache__", "**/*.pyc", "**/*.pyo", "**/.pytest_cache", "**/.benchmarks", ".git")
# Bump when the digest recipe changes, so old tags are not taken for new contexts.
DIGEST_RECIPE = "mlflowctl-docker-context/1"


def build_image(client: Any, ctx: "ContextInfo", tag: str, *, network: str, pull: bool, project: str,
                log_path: Path, echo: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """Build ``ctx`` as ``tag``, streaming the builder's lines to ``echo`` and ``log_path``; returns the image
    and what the build was (tag, id, built, seconds, lines). A failed build is one line with its last lines."""
    import docker.errors
    import requests
    from docker.utils.build import create_archive

    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    image_id = None
    error = None
    started = time.monotonic()
    echo(f"building {tag} from {ctx.root} ({len(ctx.files)} files, network {network})")
    extra = [(ctx.dockerfile_name, ctx.dockerfile.read_text())] if ctx.dockerfile_outside else []
    with open(log_path, "w", encoding="utf-8") as log, \
            create_archive(str(ctx.root), files=ctx.tar_members, extra_files=extra) as fileobj:
        try:
            stream = client.api.build(
                fileobj=fileobj, custom_context=True, dockerfile=ctx.dockerfile_name, tag=tag,
                network_mode=network, rm=True, forcerm=True, decode=True, pull=pull,
                labels={LABEL_PROJECT: project, LABEL_DIGEST: ctx.digest},
            )
            for chunk in _build_lines(stream):
                kind, text = chunk
                if kind == "id":
                    image_id = text
                    continue
                if kind == "error":
                    error = text
                lines.append(text)
                log.write(text + "\n")
                log.flush()
                echo(text)
        except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
            error = _reason(exc)
    seconds = time.monotonic() - started
    if error is not None:
        tail = " | ".join(line.strip() for line in lines[-5:] if line.strip())
        raise MlflowctlError(f"docker build of {tag} failed: {tail or error}"[:1000],
                             hint=f"full build log: {log_path}")
    try:
        image = client.images.get(image_id or tag)
    except docker.errors.APIError as exc:
        raise MlflowctlError(f"docker build of {tag} reported success but the image is missing: "
                             f"{_api_reason(exc)}", hint=f"full build log: {log_path}") from None
    echo(f"built {tag} ({image.short_id}) in {seconds:.1f} s")
    return image, {"tag": tag, "id": image.id, "built": True, "seconds": seconds, "lines": lines}


def build_args(ctx: "ContextInfo", tag: str, *, network: str, project: str, base_url: str = "") -> list[str]:
    """The ``docker build`` command line equivalent to :func:`build_image`."""
    args = ["docker"] + (["--host", base_url] if base_url else [])
    return args + ["build", "--network", network, "--tag", tag, "--label", f"{LABEL_PROJECT}={project}",
                   "--label", f"{LABEL_DIGEST}={ctx.digest}", "--file", str(ctx.dockerfile), str(ctx.root)]


def prune_images(client: Any, project: str, repository: str, current: str | None, keep: int = 1) -> list[str]:
    """Remove the project's images but the newest ``keep`` and ``current``; return the tags removed."""
    import docker.errors

    images = client.images.list(filters={"label": f"{LABEL_PROJECT}={project}"})
    images = [im for im in images if any(t.startswith(repository + ":") for t in im.tags)]
    images.sort(key=_created, reverse=True)
    protected = {im.id for im in images[:max(0, keep)]}
    if current is not None:
        try:
            protected.add(client.images.get(current).id)
        except docker.errors.ImageNotFound:
            pass
    in_use = {c.attrs.get("Image") for c in client.containers.list(all=True, ignore_removed=True)}
    removed = []
    for image in images:
        if image.id in protected or image.id in in_use:
            continue
        for tag in image.tags:
            try:
                client.images.remove(tag, noprune=False)
                removed.append(tag)
            except docker.errors.APIError:
                pass
    return removed


# -- the build context ---------------------------------------------------------------------
class ContextInfo:
    """The files of a build context (after ``.dockerignore``) and their digest."""

    def __init__(self, root: Path, dockerfile: Path, files: list[str], digest: str) -> None:
        self.root = root
        self.dockerfile = dockerfile
        self.files = files              # regular files and symlinks, relative, sorted
        self.digest = digest
        try:
            self.dockerfile_name = dockerfile.relative_to(root).as_posix()
            self.dockerfile_outside = False
        except ValueError:
            self.dockerfile_name = ".mlflowctl.Dockerfile"
            self.dockerfile_outside = True
        self.tar_members: list[str] = []  # files and directories sent to the builder
        self.environment_digest = digest  # the context without the stage scripts (see is_stage_script)


def is_stage_script(rel: str) -> bool:
    """Top-level ``*.py`` files are stage code: each stage keys the ones it runs by their own digests."""
    return "/" not in rel and rel.endswith(".py")


def read_dockerignore(root: Path) -> list[str]:
    try:
        text = (root / ".dockerignore").read_text()
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def context_info(root: Path, dockerfile: Path) -> ContextInfo:
    """Digest the context as the builder will see it: sorted paths, kinds, exec bits, contents, and the Dockerfile."""
    from docker.utils.build import exclude_paths

    patterns = list(DEFAULT_IGNORE) + read_dockerignore(root)
    try:
        df_rel = dockerfile.relative_to(root).as_posix()
    except ValueError:
        df_rel = None
    members = sorted(exclude_paths(str(root), patterns, dockerfile=df_rel or "Dockerfile"))
    h = hashlib.sha256(DIGEST_RECIPE.encode() + b"\0")
    env = hashlib.sha256(DIGEST_RECIPE.encode() + b"\0environment\0")
    files = []
    for rel in members:
        path = root / rel
        if path.is_symlink():
            entry = {"path": rel, "link": os.readlink(path)}
        elif path.is_file():
            with open(path, "rb") as f:
                content = hashlib.file_digest(f, "sha256").hexdigest()
            entry = {"path": rel, "exec": bool(path.stat().st_mode & 0o111), "sha256": content}
        else:
            continue
        files.append(rel)
        h.update(json.dumps(entry, sort_keys=True).encode() + b"\n")
        if not is_stage_script(rel):
            env.update(json.dumps(entry, sort_keys=True).encode() + b"\n")
    h.update(b"dockerfile\0" + dockerfile.read_bytes())
    env.update(b"dockerfile\0" + dockerfile.read_bytes())
    info = ContextInfo(root, dockerfile, files, h.hexdigest())
    info.environment_digest = env.hexdigest()
    info.tar_members = members
    return info


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _created(image: Any) -> str:
    """An image's creation time as a sortable string (the API trims trailing zeros of the nanoseconds)."""
    stamp = str(image.attrs.get("Created", "")).rstrip("Z")
    whole, _, frac = stamp.partition(".")
    return f"{whole}.{frac[:9]:0<9}"


def _print_build_line(text: str) -> None:
    print(f"[docker build] {text}", flush=True)


def _build_lines(stream: Iterable[dict[str, Any]]) -> Iterable[tuple[str, str]]:
    """("line", text) / ("error", text) / ("id", image id) from the builder's JSON stream."""
    pending = ""
    for item in stream:
        if "error" in item:
            if pending:
                yield "line", pending
                pending = ""
            detail = item.get("errorDetail", {}).get("message") or item["error"]
            yield "error", str(detail).strip()
            continue
        aux = item.get("aux")
        if isinstance(aux, dict) and aux.get("ID"):
            yield "id", aux["ID"]
        text = item.get("stream")
        if text is None and item.get("status"):
            text = " ".join(str(item[k]) for k in ("id", "status", "progress") if item.get(k)) + "\n"
        if not text:
            continue
        pending += _ANSI.sub("", text)
        *complete, pending = re.split(r"\r?\n", pending)
        for line in complete:
            if line.strip():
                yield "line", line
    if pending.strip():
        yield "line", pending
