"""What Hydrosphere is told about a model: the contract (manager API) and the ``hs apply`` YAML.

The registry's signatures (``mlflowctl``'s classifier and concept model, ``serving_default``):
the classifier takes ``images`` float32 [-1, 784] and answers ``probabilities`` float32 [-1, 10];
the concept model takes ``images`` and answers ``reconstruction_error`` float32 [-1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CLASSIFIER = {"inputs": {"images": [-1, 784]}, "outputs": {"probabilities": [-1, 10]}}
CONCEPT = {"inputs": {"images": [-1, 784]}, "outputs": {"reconstruction_error": [-1]}}


def fields_of(folder: Path | str) -> dict[str, dict[str, list[int]]]:
    """The signature of a version folder: the concept model's for ``.../concept``, else the classifier's."""
    return CONCEPT if Path(folder).name == "concept" else CLASSIFIER


def model_signature(signature: str, folder: Path | str) -> dict[str, Any]:
    """``modelSignature`` of the manager's upload metadata (hydrosdk 3.x's shape)."""
    f = fields_of(folder)

    def field(name: str, dims: list[int], profile: str) -> dict[str, Any]:
        return {"name": name, "dtype": "DT_FLOAT", "shape": {"dims": dims}, "profile": profile}

    return {"signatureName": signature,
            "inputs": [field(n, d, "IMAGE") for n, d in f["inputs"].items()],
            "outputs": [field(n, d, "NUMERICAL") for n, d in f["outputs"].items()]}


def model_yaml(name: str, runtime: str, concept: bool = False) -> str:
    """``serving.yaml`` (``kind: Model``, 3.x) for ``hs apply`` / ``hs upload`` in the version folder."""
    f = CONCEPT if concept else CLASSIFIER
    doc = {"kind": "Model", "name": name, "runtime": runtime, "install-command": "",
           "payload": ["./saved_model.pb", "./variables/"],
           "contract": {"name": "predict",
                        "inputs": {n: {"shape": d, "type": "float32", "profile": "image"} for n, d in f["inputs"].items()},
                        "outputs": {n: {"shape": d, "type": "float32", "profile": "numerical"}
                                    for n, d in f["outputs"].items()}}}
    return yaml.safe_dump(doc, sort_keys=False)


def application_yaml(app: str, model: str, runtime: str, concept: str | None = None,
                     threshold: float | None = None) -> str:
    """The seeds' ``kind: Application`` (``singular``, with the concept model as an ``Autoencoder`` check)."""
    singular: dict[str, Any] = {"model": model, "runtime": runtime}
    if concept is not None:
        singular["monitoring"] = [{"name": concept.split(":")[0], "input": "images", "type": "Autoencoder",
                                   "app": concept.split(":")[0],
                                   "healthcheck": {"enabled": True, "threshold": float(threshold or 0.0)}}]
    return yaml.safe_dump({"kind": "Application", "name": app, "singular": singular}, sort_keys=False)
