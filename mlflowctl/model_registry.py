"""The model registry: integer versions under ``models/<name>/<N>/`` in the store.

The layout is the one TensorFlow Serving reads directly: each version folder
holds the classifier's SavedModel, plus ``concept/`` (the drift
autoencoder and its threshold) and ``metadata.json``. Version numbers are
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


def register_trained_model(project: Any, ctx: Any) -> None:
    """Stage action of ``register``: copy the classifier and its concept model into a new version.

    The version folder is TF Serving's layout (the SavedModel at its top) plus
    ``concept/`` (the autoencoder SavedModel and ``threshold.json``) and
    ``metadata.json`` (params, metrics, data and code digests, time).
    """
    import json
    import shutil

    model_dir, concept_dir = ctx.inputs["MODEL_DIR"], ctx.inputs["CONCEPT_DIR"]
    if not (model_dir / "saved_model" / "saved_model.pb").is_file():
        raise MlflowctlError(f"register: {model_dir} holds no saved_model/saved_model.pb", hint="doit train_model")

    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    model_manifest, concept_manifest = read(model_dir / "_manifest.json"), read(concept_dir / "_manifest.json")
    metadata = {
        "metrics": read(model_dir / "metrics.json"),
        "concept_metrics": read(concept_dir / "metrics.json"),
        "params": model_manifest.get("components", {}).get("params", {}),
        "concept_params": concept_manifest.get("components", {}).get("params", {}),
        "data_digest": model_manifest.get("components", {}).get("inputs", {}).get("data"),
        "code_digests": {**model_manifest.get("components", {}).get("code", {}),
                         **{f"concept:{k}": v for k, v in concept_manifest.get("components", {}).get("code", {}).items()}},
        "model_digest": model_manifest.get("digest"),
        "concept_digest": concept_manifest.get("digest"),
        "backend": {**model_manifest.get("components", {}).get("backend", {}), **model_manifest.get("run", {})},
    }
    with project.store.staging("version") as version_dir:
        shutil.copytree(model_dir / "saved_model", version_dir, dirs_exist_ok=True)
        if (concept_dir / "saved_model" / "saved_model.pb").is_file():
            shutil.copytree(concept_dir / "saved_model", version_dir / "concept")
            if (concept_dir / "threshold.json").is_file():
                shutil.copyfile(concept_dir / "threshold.json", version_dir / "concept" / "threshold.json")
        version = project.models.find_identical(version_dir)
        if version is not None:
            ctx.log.line(f"version {version.number} already holds these files (a registration that was "
                         f"interrupted before its result was recorded): adopting it")
        else:
            version = project.models.register(version_dir, metadata)
    accuracy = metadata["metrics"].get("accuracy")
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
