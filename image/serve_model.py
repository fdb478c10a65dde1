"""The served versions of one model: the routing file, loading and unloading versions, and
choosing the version a request goes to (by number, by label, or default/canary split).

Reloads run in a worker thread and end in a swap of a few attributes, so the event-loop
thread always sees a consistent set of versions.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batching import BatchConfig, Batcher
from serve_drift import DriftUnavailable
from serve_engine import Version, _warm_up, load_version
from serve_errors import not_found
from serve_paths import parse_version, shown

log = logging.getLogger("serve")


def scan_versions(base: Path) -> list[int]:
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = ((parse_version(n, canonical=True), n) for n in names)
    return sorted(v for v, n in found if v is not None and (base / n / "saved_model.pb").is_file())


@dataclass
class Routing:
    versions: list[int]
    labels: dict[str, int]
    canary_weight: float
    explicit: bool  # False = no routing file: serve the highest version
    batching: dict[int, bool] = field(default_factory=dict)  # per-version override of the server's default


def read_routing(path: Path | None, base: Path) -> Routing:
    if path is None or not path.exists():
        found = scan_versions(base)
        return Routing(found[-1:], {}, 0.0, False)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"routing file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"routing file {path}: expected a JSON object")
    versions = data.get("versions", [])
    labels = data.get("labels") or {}
    weight = data.get("canary_weight", 0.0)
    if not isinstance(versions, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in versions):
        raise ValueError(f"routing file {path}: 'versions' must be a list of non-negative integers")
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) for k, v in labels.items()
    ):
        raise ValueError(f"routing file {path}: 'labels' must map label names to version numbers")
    missing = sorted({v for v in labels.values() if v not in versions})
    if missing:
        raise ValueError(f"routing file {path}: labels point at versions {missing} that are not in 'versions'")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"routing file {path}: 'canary_weight' must be a number between 0 and 1")
    batching = data.get("batching") or {}
    if not isinstance(batching, dict) or not all(
        isinstance(k, str) and parse_version(k) is not None and isinstance(v, bool) for k, v in batching.items()
    ):
        raise ValueError(f"routing file {path}: 'batching' must map version numbers (as strings) to true or false")
    return Routing(sorted(set(versions)), dict(labels), float(weight), True, {int(k): v for k, v in batching.items()})


@dataclass
class VersionState:
    state: str = "START"
    error_code: str = "OK"
    error_message: str = ""


class Model:
    """The served versions of one model and how requests are routed among them."""

    def __init__(self, name: str, base: Path, routing_path: Path | None, batching: BatchConfig | None = None):
        self.name = name
        self.batching = batching or BatchConfig()
        self.base = base
        self.routing_path = routing_path
        self.versions: dict[int, Version] = {}
        self.states: dict[int, VersionState] = {}
        self.routing = Routing([], {}, 0.0, False)
        self.default: Version | None = None
        self.canary: Version | None = None
        self.canary_weight = 0.0
        self.label_map: dict[str, Version] = {}
        self.reload_lock = threading.Lock()

    def _set_state(self, n: int, st: VersionState) -> None:
        # copy-on-write: the event-loop thread may be iterating the current dict
        self.states = {**self.states, n: st}

    # -- reload (runs in a worker thread; the swap is a few attribute assignments) --
    def reload(self) -> dict[str, Any]:
        with self.reload_lock:
            routing = read_routing(self.routing_path, self.base)
            wanted = set(routing.versions)
            versions = dict(self.versions)
            for n in sorted(wanted - set(versions)):
                self._set_state(n, VersionState("LOADING"))
                t0 = time.monotonic()
                try:
                    versions[n] = load_version(self.base, n)
                except Exception as exc:  # noqa: BLE001 - a broken version must not take the server down
                    if isinstance(exc, DriftUnavailable):
                        code, text = "FAILED_PRECONDITION", str(exc)
                    else:
                        code = "NOT_FOUND" if isinstance(exc, FileNotFoundError) else "UNKNOWN"
                        text = f"{type(exc).__name__}: {exc}"
                    self._set_state(n, VersionState("END", code, text.splitlines()[0][:500]))
                    log.error("version %d of %s could not be loaded: %s", n, self.name, self.states[n].error_message)
                    continue
                v = versions[n]
                sd = v.signatures.get("serving_default")
                log.info("loaded version %d of %s in %.2fs (engine %s%s)", n, self.name, time.monotonic() - t0,
                         sd.engine if sd else "tf",
                         f", concept model on {v.concept.sig.engine}" if v.concept else ", no concept model")
            removed = sorted(set(versions) - wanted)
            for n in removed:
                self._set_state(n, VersionState("UNLOADING"))
                versions.pop(n)
            cfg = self.batching
            for n, v in versions.items():
                if not routing.batching.get(n, cfg.enabled) or v.runner is None:
                    v.batcher = None  # requests already queued still get their answers (the loop holds them)
                elif v.batcher is None:
                    sd = v.signatures["serving_default"]
                    batcher = Batcher(v.runner, cfg.window, cfg.max_batch, cfg.max_queue,
                                      pad=sd.engine == "tflite" or (v.concept is not None and v.concept.sig.engine == "tflite"),
                                      idle_rounds=cfg.idle_rounds, clients=cfg.open_connections)
                    if n not in self.versions:  # not serving yet: build each batch size's interpreters now,
                        _warm_up(v, batcher.buckets())  # not on a client's time (TFLite shapes are static)
                    v.batcher = batcher
            # swap
            label_map = {lab: versions[n] for lab, n in routing.labels.items() if n in versions}
            default = label_map.get("stable") or (versions[max(versions)] if versions else None)
            canary = label_map.get("canary")
            self.versions = versions
            self.routing = routing
            self.label_map = label_map
            self.default = default
            self.canary = canary if canary is not None and canary is not default else None
            self.canary_weight = routing.canary_weight if self.canary is not None else 0.0
            # states last: AVAILABLE only once routable, END only once no longer routed
            self.states = {**self.states, **{n: VersionState("AVAILABLE") for n in versions
                                             if self.states.get(n, VersionState()).state != "AVAILABLE"},
                           **{n: VersionState("END") for n in removed}}
            for n in removed:
                log.info("unloaded version %d of %s", n, self.name)
            for n, st in list(self.states.items()):
                if n not in wanted and st.state != "END":
                    self._set_state(n, VersionState("END"))
            log.info("routing: serving versions %s, labels %s, default %s%s", sorted(versions),
                     {k: v.number for k, v in label_map.items()} or "none",
                     default.number if default else "none",
                     f", canary {self.canary.number} at weight {self.canary_weight:g}" if self.canary else "")
            return self.describe()

    def describe(self) -> dict[str, Any]:
        return {
            "model_name": self.name,
            "versions": [{"version": n, "state": s.state, "error": s.error_message}
                         for n, s in sorted(self.states.items())],
            "labels": {lab: v.number for lab, v in self.label_map.items()},
            "default_version": self.default.number if self.default else None,
            "canary_weight": self.canary_weight,
            "batching": {str(n): v.batcher is not None for n, v in sorted(self.versions.items())},
        }

    # -- request routing --
    def check_name(self, name: str) -> None:
        if name != self.name:
            raise not_found(f"Servable not found for request: model '{name}' is not served here (serving '{self.name}')")

    def select(self, name: str, version: str | None, label: str | None) -> Version:
        if name != self.name:
            self.check_name(name)
        if version is not None:
            number = parse_version(version)
            v = self.versions.get(number) if number is not None else None
            if v is None:
                st = self.states.get(number) if number is not None else None
                why = f" (state {st.state}{': ' + st.error_message if st.error_message else ''})" if st else ""
                raise not_found(f"Servable not found for request: Specific({name}, {shown(version)}){why}") from None
            return v
        if label is not None:
            v = self.label_map.get(label)
            if v is None:
                raise not_found(f"Servable not found for request: no version of '{name}' has the label '{label}'")
            return v
        if self.canary is not None and random.random() < self.canary_weight:
            return self.canary
        if self.default is None:
            raise not_found(f"Servable not found for request: Latest({name}) (no version is loaded)")
        return self.default
