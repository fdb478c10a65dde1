"""The artifact-store contract: every store must pass these tests.

Use it from your own tests: import the tests and give them a ``store`` fixture (an instance of
your :class:`~mlflowctl.stores.Store`, preflighted)::

    from mlflowctl.testing.store_contract import *  # noqa: F401,F403

    @pytest.fixture
    def store(tmp_path):
        s = MyStore("my://bucket/prefix", {}, fake_project(tmp_path))
        s.preflight()
        return s
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mlflowctl.stores import MANIFEST


def filled(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_small_files_roundtrip_and_replace(store):
    assert not store.exists("a/b.json")
    store.write_json("a/b.json", {"x": 1})
    assert store.exists("a/b.json") and store.read_json("a/b.json") == {"x": 1}
    with store.open("a/b.json", "w") as fh:
        fh.write('{"x": 2}')
    assert store.read_json("a/b.json") == {"x": 2}
    assert store.list("a") == ["b.json"]
    assert store.read_json("missing.json", default="d") == "d"


def test_a_failed_write_leaves_the_old_content(store):
    store.write_json("k.json", {"v": "old"})
    with pytest.raises(RuntimeError):
        with store.open("k.json", "w") as fh:
            fh.write('{"v": "half')
            raise RuntimeError("killed mid-write")
    assert store.read_json("k.json") == {"v": "old"}
    assert store.list("") == ["k.json"]


def test_put_get_delete(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    store.put(src, "blobs/one.bin")
    out = store.get("blobs/one.bin", tmp_path / "out" / "one.bin")
    assert out.read_bytes() == src.read_bytes()
    store.delete("blobs/one.bin")
    assert not store.exists("blobs/one.bin")
    store.delete("blobs/never-there")  # not an error


def test_publish_is_all_or_nothing_with_a_manifest(store):
    with store.staging("t") as out:
        filled(out, {"model/saved_model.pb": b"pb", "metrics.json": b'{"a": 1}'})
        assert not store.exists("results/s/k1")
        assert store.publish(out, "results/s/k1", manifest={"stage": "s"})
    assert store.exists("results/s/k1")
    local = store.fetch("results/s/k1")
    assert (local / "model" / "saved_model.pb").read_bytes() == b"pb"
    manifest = json.loads((local / MANIFEST).read_text())
    assert manifest["stage"] == "s" and set(manifest["files"]) == {"model/saved_model.pb", "metrics.json"}
    assert len(manifest["digest"]) == 64
    assert store.list("results/s") == ["k1"]


def test_publish_refuses_an_existing_path_and_keeps_the_first(store):
    with store.staging() as first:
        filled(first, {"f": b"first"})
        assert store.publish(first, "results/s/k")
    with store.staging() as second:
        filled(second, {"f": b"second"})
        assert store.publish(second, "results/s/k") is False
        assert (second / "f").read_bytes() == b"second"  # src left in place
    assert (store.fetch("results/s/k") / "f").read_bytes() == b"first"


def test_same_content_gives_the_same_digest(store):
    digests = []
    for key in ("a", "b"):
        with store.staging() as out:
            filled(out, {"x/y": b"same", "z": b"content"})
            store.publish(out, f"r/{key}")
        digests.append(store.read_json(f"r/{key}/{MANIFEST}")["digest"])
    assert digests[0] == digests[1]


def test_staging_is_removed_when_not_published(store):
    with store.staging() as out:
        filled(out, {"partial": b"x"})
        kept = out
    assert not kept.exists()
    with pytest.raises(ValueError):
        with store.staging() as out:
            filled(out, {"partial": b"x"})
            raise ValueError("stage crashed")
    assert not out.exists()


def test_concurrent_publishers_have_exactly_one_winner(store):
    results, barrier = [], threading.Barrier(8)

    def publisher(i: int) -> None:
        with store.staging(f"p{i}") as out:
            filled(out, {"who": str(i).encode()})
            barrier.wait(timeout=10)
            results.append((i, store.publish(out, "results/race/key")))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for i, ok in results if ok]
    assert len(results) == 8 and len(winners) == 1
    assert (store.fetch("results/race/key") / "who").read_text() == str(winners[0])


def test_paths_cannot_leave_the_store(store):
    with pytest.raises(ValueError):
        store.exists("../outside")
