"""Version allocation: atomic, unique under concurrency, nothing left by a killed registration -- on every store."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contract_fixtures import STORE_FIXTURES, STORES
from mlflowctl.model_registry import ModelRegistry


@pytest.fixture(params=sorted(STORES))
def make_store(request):
    """The store factory (root -> store) of each store kind, its server running."""
    if request.param in STORE_FIXTURES:
        request.getfixturevalue(STORE_FIXTURES[request.param])
    return request.param


def _register_many(kind: str, root: str, count: int, queue) -> None:
    store = STORES[kind](Path(root))
    registry = ModelRegistry(store, "m")
    for _ in range(count):
        with store.staging("v") as src:
            (src / "saved_model.pb").write_bytes(os.urandom(64))
            queue.put(registry.register(src, {"who": os.getpid()}).number)


def test_versions_are_sequential_with_metadata(make_store, tmp_path):
    store = STORES[make_store](tmp_path)
    registry = ModelRegistry(store, "m")
    for i in range(3):
        with store.staging() as src:
            (src / "saved_model.pb").write_text(str(i))
            v = registry.register(src, {"metrics": {"accuracy": 0.5 + i / 10}})
        assert v.number == i + 1
    assert registry.numbers() == [1, 2, 3]
    assert registry.get(2).metadata["metrics"]["accuracy"] == 0.6
    assert registry.get(3).metadata["version"] == 3 and "registered_at" in registry.get(3).metadata
    fresh = ModelRegistry(STORES[make_store](tmp_path), "m")  # another process's view: nothing remembered
    assert fresh.get(2).metadata["metrics"]["accuracy"] == 0.6


def test_concurrent_registrations_never_share_a_number(make_store, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_register_many, args=(make_store, str(tmp_path), 5, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    numbers = sorted(queue.get(timeout=120) for _ in range(20))
    for p in procs:
        p.join(timeout=60)
    assert numbers == list(range(1, 21))
    registry = ModelRegistry(STORES[make_store](tmp_path), "m")
    assert registry.numbers() == list(range(1, 21))
    owners = {registry.get(n).metadata["who"] for n in numbers}
    assert len(owners) == 4


def test_a_killed_registration_leaves_no_version(make_store, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from contract_fixtures import STORES
        store = STORES[{make_store!r}](Path({str(tmp_path)!r}))
        with store.staging("v") as src:
            (src / "saved_model.pb").write_bytes(b"x" * 1000)
            print("copying", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "copying"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    registry = ModelRegistry(STORES[make_store](tmp_path), "m")
    assert registry.numbers() == []
    with STORES[make_store](tmp_path).staging() as src:
        (src / "saved_model.pb").write_text("ok")
        assert registry.register(src, {}).number == 1


def test_labels_and_verdicts(make_store, tmp_path):
    registry = ModelRegistry(STORES[make_store](tmp_path), "m")
    registry.set_label("stable", 2)
    registry.set_label("canary", 3)
    registry.set_label("canary", None)
    assert registry.labels() == {"stable": 2}
    registry.set_verdict(3, "rejected", "accuracy 0.41 < 0.8")
    registry.set_verdict(3, "rolled-back", "manual")
    verdict = registry.verdict(3)
    assert verdict["state"] == "rolled-back" and [h["state"] for h in verdict["history"]] == ["rejected", "rolled-back"]
