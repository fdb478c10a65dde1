"""A synthetic store for ``mlflowctl ui`` tests and ``bench/bench_ui.py``: runs, versions, monitor reports.

Everything is written the way the pipeline writes it -- through the
project's Store API (``staging`` + ``publish``, ``ModelRegistry.register``,
``set_verdict``, ``set_label``) and the pipeline's last-run records -- but
with tiny files instead of trained models, so a store with 100 versions and
1,000 stage runs takes seconds to make.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def _drift(rate: float, version: int, when: float, max_rate: float = 0.5, window: int = 200) -> dict[str, Any]:
    return {"rate": rate, "max_rate": max_rate, "passed": rate <= max_rate, "note": None, "model_name": "m",
            "version": version, "scored": window, "outliers": int(rate * window),
            "window": {"size": window, "outliers": int(rate * window), "capacity": 1000},
            "threshold": 0.12, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))}


def _histogram(rng: random.Random) -> dict[str, Any]:
    edges = [i * 0.005 for i in range(51)]
    counts = [int(1000 * (i + 1) * 2.718 ** (-i / 6)) + rng.randint(0, 20) for i in range(50)]
    return {"threshold": 0.13, "quantile": 0.99, "histogram": {"edges": edges, "counts": counts}}


def synthesize(pipeline: Any, versions: int = 3, runs: int = 0, reports: int = 2, seed: int = 0) -> dict[str, Any]:
    """Fill the pipeline's store: ``runs`` old stage results, a current result for every stage,
    ``versions`` model versions (the last passing one stable, every third rejected) and
    ``reports`` older monitor reports. Returns what was made (keys, stable version)."""
    rng = random.Random(seed)
    project, store = pipeline.project, pipeline.project.store
    now = time.time()
    names = list(pipeline.stages)
    for i in range(runs):  # history: results of earlier keys, as old runs leave them
        stage = names[i % len(names)]
        with store.staging(stage) as out:
            (out / "_logs").mkdir()
            (out / "_logs" / f"{stage}.log").write_text(f"old run {i} of {stage}\n")
            if stage == "monitor":
                (out / "drift.json").write_text(json.dumps(_drift(rng.random() * 0.4, 1, now - (runs - i) * 60)))
            store.publish(out, f"results/{stage}/old{i:016d}",
                          manifest={"stage": stage, "key": f"old{i:016d}", "duration": 1.0 + i % 7,
                                    "finished_at": now - (runs - i) * 60})
    for i in range(reports):
        with store.staging("monitor") as out:
            (out / "drift.json").write_text(json.dumps(_drift(0.05 * (i + 1), 1, now - (reports - i) * 600)))
            store.publish(out, f"results/monitor/report{i:014d}",
                          manifest={"stage": "monitor", "duration": 2.0, "finished_at": now - (reports - i) * 600})
    keys = {}
    for name in _topological(pipeline):
        info = pipeline.resolve(pipeline.stages[name])
        with store.staging(name) as out:
            (out / "_logs").mkdir()
            (out / "_logs" / f"{name}.log").write_text(f"log of {name} with key {info.key}\n")
            (out / "result.txt").write_text(name)
            if name == "monitor":
                (out / "drift.json").write_text(json.dumps(_drift(0.3, max(versions, 1), now - 5)))
            store.publish(out, info.path, manifest={"stage": name, "key": info.key, "components": info.components,
                                                    "duration": 3.5, "finished_at": now - 5})
        record = pipeline.last_run_path(name)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"key": info.key, "components": info.components}))
        keys[name] = info.key
    registry = project.models
    stable = None
    for n in range(1, versions + 1):
        with store.staging("version") as src:
            (src / "saved_model.pb").write_bytes(b"")
            (src / "concept").mkdir()
            (src / "concept" / "threshold.json").write_text(json.dumps(_histogram(rng)))
            accuracy = 0.5 if n % 3 == 0 else 0.8 + rng.random() * 0.1
            version = registry.register(src, {"metrics": {"accuracy": accuracy, "loss": 0.4},
                                              "params": {"learning_rate": 0.001 * n, "epochs": 2, "steps": 60}})
        report = {"accuracy": accuracy, "min_accuracy": 0.6, "ood_rate": {"clean": 0.03, "noisy": 0.4, "random": 1.0}}
        if accuracy < 0.6:
            registry.set_verdict(version.number, "rejected",
                                 f"accuracy {accuracy:.4f} below the floor 0.6000", report=report)
        else:
            if stable is not None:
                registry.set_verdict(stable, "superseded", f"version {version.number} promoted")
            registry.set_verdict(version.number, "promoted", f"accuracy {accuracy:.4f} >= floor 0.6000",
                                 report=report)
            stable = version.number
    if stable is not None:
        registry.set_label("stable", stable)
    return {"keys": keys, "stable": stable}


def _topological(pipeline: Any) -> list[str]:
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for up in pipeline.stages[name].upstream:
            visit(up)
        done.append(name)

    for name in pipeline.stages:
        visit(name)
    return done


def make_state(root: Path, **kw: Any) -> dict[str, Any]:
    """Synthesize into the project at ``root`` (a copy made by ``conftest.make_project``)."""
    from mlflowctl.cli import load_pipeline

    return synthesize(load_pipeline(root, {}), **kw)


class Ui:
    """``mlflowctl ui --port 0`` as a user starts it; stopped with Ctrl-C."""

    def __init__(self, root: Path, *overrides: str) -> None:
        from conftest import VENV_BIN, doit_env

        self.proc = subprocess.Popen([str(VENV_BIN / "mlflowctl"), "-C", str(root), "ui", "--port", "0", *overrides],
                                     env=doit_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        match = re.match(r"mlflowctl ui: (http://127\.0\.0\.1:\d+/) ", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no URL from mlflowctl ui: {line!r} {self.proc.communicate()[1]}")
        self.url = match.group(1)

    def stop(self) -> str:
        """Ctrl-C; asserts a clean exit (0, no traceback) and returns its stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0 and "Traceback" not in err, err
        return err
