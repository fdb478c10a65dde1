"""The ``SeldonDeployment`` (``machinelearning.seldon.io/v1``) of a project's served versions.

One predictor per served version, named ``v<N>``; ``traffic`` (int %) sends unlabelled requests to
the ``stable`` version, ``round(100 * weight)`` of them to the ``canary`` (Seldon's canary: two
predictors and ``traffic``, needs Istio or Ambassador), 0 to the others (reachable at their
predictor's Service). Each graph is one ``MODEL`` node: the prepackaged ``TENSORFLOW_SERVER`` on the
version's SavedModel (``modelUri``), or, with an ``image``, the Python wrapper around the model class
(:mod:`mlflowctl_seldon.model.MlflowctlModel`) whose ``model_dir`` is where Seldon's storage
initializer puts ``modelUri`` (``/mnt/models``).
"""
from __future__ import annotations

import re
from typing import Any

GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
NODE = "classifier"


def dns(*parts: str, limit: int = 63) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return name[:limit].rstrip("-") or "mlflowctl"


def traffic(versions: list[int], labels: dict[str, int], weight: float) -> dict[int, int]:
    """Version -> traffic %: the stable version's share, the canary's, 0 for the rest (sums to 100)."""
    stable, canary = labels.get("stable"), labels.get("canary")
    if stable not in versions:
        stable = max(versions) if versions else None
    share = int(round(100 * weight)) if canary in versions and canary != stable else 0
    out = {v: 0 for v in versions}
    if stable is not None:
        out[stable] = 100 - share
    if share:
        out[canary] = share
    return out


def seldon_deployment(name: str, namespace: str, model: str, model_uri: str, versions: list[int],
                      labels: dict[str, int], weight: float, image: str = "", project: str = "") -> dict[str, Any]:
    """The custom object; ``model_uri`` is the registry folder (``pvc://claim/path/models/<name>``)."""
    shares = traffic(sorted(versions), labels, weight)
    predictors = []
    for v in sorted(versions):
        graph: dict[str, Any] = {"name": NODE, "type": "MODEL", "modelUri": f"{model_uri.rstrip('/')}/{v}",
                                 "endpoint": {"type": "REST"}, "children": []}
        predictor: dict[str, Any] = {"name": f"v{v}", "replicas": 1, "traffic": shares[v], "graph": graph,
                                     "labels": {"mlflowctl.io/version": str(v)}}
        if image:
            graph["parameters"] = [{"name": "model_dir", "value": "/mnt/models", "type": "STRING"}]
            predictor["componentSpecs"] = [{"spec": {"containers": [{
                "name": NODE, "image": image,
                "env": [{"name": "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "value": "python"}]}]}}]
        else:
            graph["implementation"] = "TENSORFLOW_SERVER"
            graph["parameters"] = [{"name": "signature_name", "value": "serving_default", "type": "STRING"},
                                   {"name": "model_name", "value": model, "type": "STRING"}]
        predictors.append(predictor)
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/managed-by": "mlflowctl", "mlflowctl.io/model": dns(model)}}
    if project:
        meta["labels"]["mlflowctl.io/project"] = dns(project)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SeldonDeployment", "metadata": meta,
            "spec": {"name": model, "protocol": "seldon", "predictors": predictors}}
