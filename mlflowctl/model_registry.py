"""The model registry: integer versions under ``models/<name>/<N>/`` in the store.

The layout is the one TensorFlow Serving reads directly: each version folder
holds the servable model at its top, plus ``concept/`` (the drift model,
if the project has one) and ``metadata.json``; which stage output is which
is declared by the registering stage (:class:`mlflowctl.pipeline.Registration`). Version numbers are
allocated by publishing: the store's atomic publish refuses an existing
version, so two registrations never get the same number and a killed one
leaves nothing behind. Labels (``stable``, ``canary``) and each version's
verdict live beside the versions in ``labels.json`` and ``status/<N>.json``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflowctl.errors import MlflowctlError
from mlflowctl.stores import MANIFEST, Store

MAX_ALLOCATION_TRIES = 1000
CONCEPT_DIR = "concept"  # where a version holds its concept (drift) model, beside the servable at its top


@dataclass
class ModelVersion:
    """One registered version of a model."""

    name: str
    number: int
    path: str  # the store path, models/<name>/<N>
    metadata: dict[str, Any] = field(default_factory=dict)


def version_number(name: str) -> int | None:
    """A version folder's number: ASCII digits, at most 18, no leading zero; else None (``²``, ``١``,
    ``01``, 5000 digits are not versions). The model server's scan (image/serve_paths.py) reads the same."""
    if 0 < len(name) <= 18 and name.isascii() and name.isdigit() and (name == "0" or name[0] != "0"):
        return int(name)
    return None


class ModelRegistry:
    """Versions, labels and verdicts of one model name in one store."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        self.base = f"models/{name}"

    def numbers(self) -> list[int]:
        return sorted(n for n in map(version_number, self.store.list(self.base)) if n is not None)

    def get(self, number: int) -> ModelVersion:
        path = f"{self.base}/{number}"
        if not self.store.exists(path):
            raise MlflowctlError(f"model {self.name} has no version {number}", hint="mlflowctl models lists them")
        meta = self.store.read_json(f"{path}/metadata.json", default={})
        return ModelVersion(self.name, number, path, meta)

    def servable(self, number: int) -> ModelVersion:
        """The version, after checking every file against its manifest (sizes and sha256): a damaged
        version is reported and never served."""
        version = self.get(number)
        problem = self.store.damaged(version.path, deep=True)
        if problem is not None:
            raise MlflowctlError(f"model {self.name} version {number} is damaged ({problem}): not served",
                                 hint="register it again (doit) or make another version stable (mlflowctl rollback)")
        return version

    def versions(self) -> list[ModelVersion]:
        return [self.get(n) for n in self.numbers()]

    def register(self, src: Path, metadata: dict[str, Any]) -> ModelVersion:
        """Publish the local folder ``src`` as the next version; returns it.

        ``metadata.json`` is written into ``src`` first, so a version is
        never visible without its metadata.
        """
        import json

        numbers = self.numbers()
        number = (numbers[-1] if numbers else 0) + 1
        for _ in range(MAX_ALLOCATION_TRIES):
            meta = {**metadata, "name": self.name, "version": number, "registered_at": time.time()}
            (src / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if self.store.publish(src, f"{self.base}/{number}", manifest={"kind": "model-version"}):
                return ModelVersion(self.name, number, f"{self.base}/{number}", meta)
            number += 1
        raise MlflowctlError(f"could not allocate a version number for model {self.name}")

    def find_identical(self, src: Path) -> ModelVersion | None:
        """The newest version whose files (all but ``metadata.json``) equal those of the local folder ``src``.

        A registration killed after its version was published but before the
        ``register`` result was leaves such a version: the re-run adopts it
        instead of registering the same files as the next number.
        """
        from mlflowctl.manifest import file_manifest

        wanted = content_digest(file_manifest(src))
        for number in reversed(self.numbers()):
            try:
                manifest = self.store.read_json(f"{self.base}/{number}/{MANIFEST}", default={})
            except (OSError, ValueError):
                continue  # a damaged version is never adopted
            if (isinstance(manifest, dict) and content_digest(manifest) == wanted
                    and self.store.damaged(f"{self.base}/{number}", deep=True) is None):
                return self.get(number)
        return None

    # -- labels and verdicts -------------------------------------------
    def labels(self) -> dict[str, int]:
        return self.store.read_json(f"{self.base}/labels.json", default={}) or {}

    def set_label(self, label: str, number: int | None) -> dict[str, int]:
        labels = self.labels()
        if number is None:
            labels.pop(label, None)
        else:
            labels[label] = number
        self.store.write_json(f"{self.base}/labels.json", labels)
        return labels

    def verdict(self, number: int) -> dict[str, Any]:
        return self.store.read_json(f"{self.base}/status/{number}.json", default={}) or {}

    def set_verdict(self, number: int, state: str, reason: str, **extra: Any) -> None:
        """Record why a version is (or is not) served: promoted, rejected, rolled-back, ..."""
        history = self.verdict(number).get("history", [])
        entry = {"state": state, "reason": reason, "time": time.time(), **extra}
        self.store.write_json(f"{self.base}/status/{number}.json", {**entry, "history": history + [entry]})


def content_digest(manifest: dict[str, Any]) -> str | None:
    """Digest of a version's files apart from ``metadata.json`` (which names the number and the time)."""
    import hashlib

    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    items = sorted((name, entry.get("sha256")) for name, entry in files.items()
                   if name != "metadata.json" and isinstance(entry, dict))
    return hashlib.sha256(repr(items).encode()).hexdigest()


def register_model(project: Any, ctx: Any) -> None:
    """Stage action of a registering stage: copy what its :class:`~mlflowctl.pipeline.Registration` names
    into a new version.

    The servable's folder becomes the version's top level (the layout a server such as TF Serving reads), the
    concept model's folder ``concept/``, the declared files their declared paths; ``metadata.json`` gets the
    declared metrics and, from the producing stages' manifests, their params, code, input and result digests.
    """
    import json
    import shutil

    spec = ctx.registration
    if spec is None:
        raise MlflowctlError(f"stage {ctx.stage}: register_model needs the stage to declare registers=Registration(...)")

    def source(part: tuple[str, str], what: str) -> Path:
        env, rel = part
        if env not in ctx.inputs:
            raise MlflowctlError(f"stage {ctx.stage}: registers the {what} from input {env}, which the stage "
                                 f"does not have (inputs: {', '.join(sorted(ctx.inputs)) or 'none'})")
        return ctx.inputs[env] / rel

    def read(path: Path) -> dict[str, Any]:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    servable = source(spec.servable, "servable")
    if not servable.is_dir() or not any(servable.iterdir()):
        raise MlflowctlError(f"stage {ctx.stage}: {servable} holds no model (the declared servable)",
                             hint=f"doit {ctx.producers.get(spec.servable[0], '')}".rstrip())
    concept = source(spec.concept, "concept model") if spec.concept else None
    model_manifest = read(ctx.inputs[spec.servable[0]] / MANIFEST)
    concept_manifest = read(ctx.inputs[spec.concept[0]] / MANIFEST) if spec.concept else {}
    components = model_manifest.get("components", {})
    concept_components = concept_manifest.get("components", {})
    metadata: dict[str, Any] = {key: read(source(part, key)) for key, part in spec.metrics.items()}
    metadata.update({
        "params": components.get("params", {}),
        "concept_params": concept_components.get("params", {}),
        **{f"{up}_digest": digest for up, digest in sorted(components.get("inputs", {}).items())},
        "code_digests": {**components.get("code", {}),
                         **{f"concept:{k}": v for k, v in concept_components.get("code", {}).items()}},
        "model_digest": model_manifest.get("digest"),
        "concept_digest": concept_manifest.get("digest"),
        "backend": {**components.get("backend", {}), **model_manifest.get("run", {})},
    })
    with project.store.staging("version") as version_dir:
        shutil.copytree(servable, version_dir, dirs_exist_ok=True)
        if concept is not None and concept.is_dir() and any(concept.iterdir()):
            shutil.copytree(concept, version_dir / CONCEPT_DIR)
        for env, rel, dest in spec.files:
            src = source((env, rel), dest)
            if src.is_file() and (version_dir / dest).parent.is_dir():
                shutil.copyfile(src, version_dir / dest)
        version = project.models.find_identical(version_dir)
        if version is not None:
            ctx.log.line(f"version {version.number} already holds these files (a registration that was "
                         f"interrupted before its result was recorded): adopting it")
        else:
            version = project.models.register(version_dir, metadata)
    accuracy = metadata.get("metrics", {}).get("accuracy") if isinstance(metadata.get("metrics"), dict) else None
    shown = f", test accuracy {accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    ctx.log.line(f"registered {version.name} version {version.number}{shown}")
    (ctx.output / "version.json").write_text(json.dumps({"name": version.name, "version": version.number}) + "\n")
    project.pm.hook.mlflowctl_model_registered(version=version)


def drop_superseded_version(project: Any, ours: Path | None, theirs: Path) -> None:
    """``register`` lost a race: another run's result names a version; drop ours if it is a copy of it.

    Only an unlabelled version with exactly the same files is removed, so
    nothing that is served or tested disappears.
    """
    import json

    def number(folder: Path | None) -> int | None:
        try:
            value = json.loads((folder / "version.json").read_text())["version"]  # type: ignore[operator]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return value if isinstance(value, int) else None

    mine, kept = number(ours), number(theirs)
    if mine is None or kept is None or mine == kept or mine in project.models.labels().values():
        return
    registry, store = project.models, project.store
    a = store.read_json(f"{registry.base}/{mine}/{MANIFEST}", default={}) or {}
    b = store.read_json(f"{registry.base}/{kept}/{MANIFEST}", default={}) or {}
    if content_digest(a) is not None and content_digest(a) == content_digest(b):
        store.delete(f"{registry.base}/{mine}")
