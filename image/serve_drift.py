"""Drift scoring's bookkeeping: the concept model's threshold, each version's window of live
reconstruction errors, and the JSON the monitor reads (``GET /monitor/v1/models/{m}/drift``).

No TensorFlow here: serve_engine.py loads the concept SavedModel and computes the errors;
this module reads ``concept/threshold.json``, keeps the statistics and reports them.
"""
from __future__ import annotations

import json
import logging
import math
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve_errors import bad, not_found
from serve_paths import MAX_VERSION_DIGITS, parse_version

RING_SIZE = 10_000
RECENT_CAP = 5_000

log = logging.getLogger("serve")


@dataclass
class Concept:
    sig: Any                      # serve_engine.Signature of the concept model's serving_default
    threshold: float
    quantile: float | None
    edges: np.ndarray | None
    train_counts: list[int] | None


@dataclass
class Threshold:
    """What ``concept/threshold.json`` says (the concept model itself is loaded by serve_engine)."""
    threshold: float
    quantile: float | None
    edges: np.ndarray | None
    train_counts: list[int] | None


class DriftUnavailable(ValueError):
    """A version ships a concept model that cannot score drift: it is refused, never served with drift
    silently off (state END, error code FAILED_PRECONDITION, this message)."""


def read_threshold(cdir: Path) -> Threshold:
    """``<cdir>/threshold.json``, checked: raises DriftUnavailable when it is missing or absurd.

    Absurd: not valid JSON, no number ``threshold``, not finite, not above 0 (errors are squared
    distances), or outside the training histogram it comes with (the threshold is a quantile of those
    same training errors); a ``quantile`` that is not in (0, 1]."""
    where = f"{cdir.parent.name}/{cdir.name}/threshold.json"
    try:
        raw = (cdir / "threshold.json").read_bytes()
    except FileNotFoundError:
        raise DriftUnavailable(f"{where} is missing: drift scoring cannot run (re-run the concept stage "
                               f"and register the version again)") from None
    except OSError as exc:
        raise DriftUnavailable(f"{where} cannot be read ({exc.strerror or exc}): drift scoring cannot run") from None
    try:
        info = json.loads(raw[:1_000_000]) if len(raw) <= 1_000_000 else None
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise DriftUnavailable(f"{where} is not a JSON object of at most 1 MB: drift scoring cannot run")
    value = info.get("threshold")
    try:
        threshold = math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:  # an integer beyond float range
        threshold = math.inf
    if not math.isfinite(threshold) or threshold <= 0:
        raise DriftUnavailable(f"{where}: 'threshold' is {str(value)[:40]!r}, not a finite number above 0: "
                               f"drift scoring cannot run")
    edges = counts = None
    hist = info.get("histogram")
    hist = hist if isinstance(hist, dict) else {}
    try:
        e = np.asarray(hist.get("edges", []), dtype=np.float64)
        c = [int(x) for x in hist.get("counts", [])]
        if e.ndim == 1 and e.size >= 2 and len(c) == e.size - 1 and np.all(np.diff(e) > 0):
            edges, counts = e, c
    except (TypeError, ValueError, OverflowError):
        pass
    if edges is not None and not edges[0] <= threshold <= edges[-1]:
        raise DriftUnavailable(f"{where}: 'threshold' {threshold:g} lies outside its own training histogram "
                               f"[{edges[0]:g}, {edges[-1]:g}]: drift scoring cannot run")
    q = info.get("quantile")
    if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1):
        raise DriftUnavailable(f"{where}: 'quantile' is {str(q)[:40]!r}, not a number in (0, 1]: "
                               f"drift scoring cannot run")
    return Threshold(threshold, float(q) if q is not None else None, edges, counts)


@dataclass
class DriftWindow:
    """A version's live reconstruction errors (a ring buffer) and its outlier counts."""
    ring: np.ndarray = field(default_factory=lambda: np.zeros(RING_SIZE, np.float32))
    ring_pos: int = 0
    ring_len: int = 0
    scored: int = 0
    outliers: int = 0
    test_scored: int = 0            # traffic marked "X-Mlflowctl-Traffic: test" (the integration test):
    test_outliers: int = 0          # counted apart, never in the live statistics the monitor reads

    def record(self, errors: np.ndarray, threshold: float, test: bool = False) -> int:
        """Add reconstruction errors to the ring buffer (live traffic only); returns how many are outliers."""
        n = errors.shape[0]
        if test:
            bad_count = n - int(np.count_nonzero(errors <= threshold))
            self.test_scored += n
            self.test_outliers += bad_count
            return bad_count
        if n == 1:
            self.ring[self.ring_pos] = errors[0]
            self.ring_pos = (self.ring_pos + 1) % RING_SIZE
            if self.ring_len < RING_SIZE:
                self.ring_len += 1
        elif n >= RING_SIZE:
            self.ring[:] = errors[-RING_SIZE:]
            self.ring_pos, self.ring_len = 0, RING_SIZE
        else:
            end = self.ring_pos + n
            if end <= RING_SIZE:
                self.ring[self.ring_pos:end] = errors
            else:
                k = RING_SIZE - self.ring_pos
                self.ring[self.ring_pos:] = errors[:k]
                self.ring[: n - k] = errors[k:]
            self.ring_pos = end % RING_SIZE
            self.ring_len = min(RING_SIZE, self.ring_len + n)
        bad_count = n - int(np.count_nonzero(errors <= threshold))  # NaN counts as an outlier
        self.scored += n
        self.outliers += bad_count
        return bad_count

    def recent(self) -> np.ndarray:
        if self.ring_len < RING_SIZE:
            return self.ring[: self.ring_len].copy()
        return np.concatenate([self.ring[self.ring_pos:], self.ring[: self.ring_pos]])


def report(model: Any, path: str, query: bytes) -> tuple[int, Any]:
    """``GET /monitor/v1/models/{m}/drift[?version=N|label=L]``: the monitor's view of a version."""
    parts = path[len("/monitor/v1/models/"):].split("/")
    if len(parts) != 2 or parts[1] != "drift":
        raise not_found(f"no such endpoint: GET {path} (use /monitor/v1/models/<name>/drift)")
    name = parts[0]
    params = dict(urllib.parse.parse_qsl(query.decode("latin-1")))
    version = params.get("version")
    label = params.get("label")
    if version is not None and parse_version(version) is None:
        raise bad(f"'version' must be a version number (ASCII digits, at most {MAX_VERSION_DIGITS})")
    v = model.select(name, version, label) if (version or label) else (model.check_name(name) or model.default)
    per_version = {
        x.label: {"scored": x.drift.scored, "outliers": x.drift.outliers,
                  "outlier_rate": (x.drift.outliers / x.drift.scored) if x.drift.scored else 0.0,
                  "test": {"scored": x.drift.test_scored, "outliers": x.drift.test_outliers},
                  "threshold": x.concept.threshold if x.concept else None,
                  "predictions": x.predictions,
                  "batching": x.batcher.stats() if x.batcher is not None else None}
        for x in model.versions.values()
    }
    if v is None:
        return 200, {"model_name": name, "version": None, "drift_scoring": False, "versions": per_version}
    w = v.drift
    out: dict[str, Any] = {"model_name": name, "version": v.label, "drift_scoring": v.concept is not None,
                           "scored": w.scored, "outliers": w.outliers,
                           "outlier_rate": (w.outliers / w.scored) if w.scored else 0.0,
                           "test": {"scored": w.test_scored, "outliers": w.test_outliers},
                           "versions": per_version}
    if v.concept is None:
        return 200, out
    c = v.concept
    recent = w.recent()
    window_out = int(np.count_nonzero(~(recent <= c.threshold)))
    out.update({
        "threshold": c.threshold, "quantile": c.quantile,
        "window": {"size": int(recent.size), "outliers": window_out,
                   "outlier_rate": window_out / recent.size if recent.size else 0.0,
                   "capacity": RING_SIZE},
        "training_histogram": {"edges": c.edges, "counts": c.train_counts} if c.edges is not None else None,
        "recent_errors": recent[-RECENT_CAP:],
    })
    if c.edges is not None:
        finite = recent[np.isfinite(recent)]
        counts, _ = np.histogram(finite, bins=c.edges)
        out["live_histogram"] = {"edges": c.edges, "counts": counts,
                                 "underflow": int(np.count_nonzero(finite < c.edges[0])),
                                 "overflow": int(np.count_nonzero(finite > c.edges[-1])) + int(recent.size - finite.size)}
    else:
        out["live_histogram"] = None
    return 200, out
