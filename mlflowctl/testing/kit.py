"""The serving suite's set-up: a real project folder, a real registry with three versions, the target.

Version ``N`` (1 and 2) is a classifier that answers class ``N`` for a blank image, so which
version answered a request is visible; version 3 is broken (a target must refuse to serve it).
``build_version(folder, answer)`` writes a version: by default a TensorFlow SavedModel with the
registry's signature (``images`` float32 [-1, 784] -> ``probabilities`` float32 [-1, 10]); a
target whose server reads another format passes its own builder.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

PIXELS, CLASSES = 784, 10
MODEL_NAME = "kit"
ANSWERS = {1: 1, 2: 2}   # version -> the class it answers for a blank image
BROKEN = 3               # a version no target can serve


def save_classifier(folder: Path, answer: int) -> None:
    """A SavedModel answering ``softmax(logits)`` with ``logits[answer] = 5`` (TensorFlow needed)."""
    import tensorflow as tf

    class Classifier(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            bias = [0.0] * CLASSES
            bias[answer] = 5.0
            self.bias = tf.Variable(bias, dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None, PIXELS], tf.float32, name="images")])
        def serve(self, images):
            logits = self.bias[None, :] + 0.0 * tf.reduce_sum(images, axis=1, keepdims=True)
            return {"probabilities": tf.nn.softmax(logits)}

    model = Classifier()
    tf.saved_model.save(model, str(folder), signatures={"serving_default": model.serve.get_concrete_function()})


def save_broken(folder: Path) -> None:
    """A version folder whose model cannot be loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    (folder / "model.json").write_text("{not json")


@dataclass
class ServingKit:
    """The project, its registered versions and the target under test (``project.serving``)."""

    project: Any
    target: Any
    versions: dict[int, Any]
    answers: dict[int, int] = field(default_factory=lambda: dict(ANSWERS))
    broken: int = BROKEN
    supports_weights: bool = True      # does the target route unlabelled traffic by canary weight?
    supports_stop: bool = True         # can mlflowctl stop (and re-deploy after) the target?
    timeout: float = 30.0

    def predict(self, endpoint: Any, image: list[float] | None = None) -> int:
        """The class ``endpoint`` answers for ``image`` (a blank one by default), in its protocol."""
        from mlflowctl.testing.protocols import predict

        return predict(endpoint, image or [0.0] * PIXELS, self.timeout)


@contextlib.contextmanager
def make_serving_kit(root: Path, target: str, overrides: Mapping[str, str] | None = None, *,
                     build_version: Callable[[Path, int], None] = save_classifier,
                     build_broken: Callable[[Path], None] = save_broken,
                     stage_code: Path | None = None, extra_plugins: tuple[Any, ...] = (),
                     **options: Any) -> Iterator[ServingKit]:
    """A project in ``root`` serving with ``target`` (``serving.<target>.<key>`` overrides given as
    ``{"key": "value"}``), versions 1, 2 (working) and 3 (broken) registered; the target is stopped
    at the end. ``stage_code`` is copied as the project's ``image/`` (the built-in target's server
    lives there). ``options`` set :class:`ServingKit` fields (``supports_weights=False``, ...).
    """
    import shutil

    from mlflowctl.project import Project

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "mlflowctl.yaml").write_text(
        f"project: kit\nmodel_name: {MODEL_NAME}\nbackend: local\nstore: file://.mlflowctl/store\n"
        f"serving:\n  target: {target}\n")
    (root / "image").mkdir(exist_ok=True)
    if stage_code is not None:
        shutil.copytree(stage_code, root / "image", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    settings = {f"serving.{target}.{k}": str(v) for k, v in (overrides or {}).items()}
    project = Project(root, settings, extra_plugins=extra_plugins)
    versions = {}
    with tempfile.TemporaryDirectory(dir=project.state_dir) as tmp:
        for number in (*ANSWERS, BROKEN):
            src = Path(tmp) / str(number)
            if number == BROKEN:
                build_broken(src)
            else:
                build_version(src, ANSWERS[number])
            (src / "metadata.json").write_text(json.dumps({"kit": number}))
            versions[number] = project.models.register(src, {"kit": number})
    if sorted(v.number for v in versions.values()) != [1, 2, 3]:
        raise RuntimeError(f"the kit's registry is not empty: {sorted(v.number for v in versions.values())}")
    kit = ServingKit(project=project, target=project.serving, versions=versions, **options)
    try:
        yield kit
    finally:
        with contextlib.suppress(Exception):
            kit.target.stop()
