"""The s3:// store beyond the shared contract, on a real S3 server (moto's, on 127.0.0.1).

An upload killed by SIGKILL in the middle, the sha256 check on fetch, the
read cache (counted in real requests: botocore's own event hooks observe
the client, nothing is mocked), secrets kept out of everything written,
and bad input ending in one line with exit 3 or 5 and nothing written.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import VENV_BIN, doit_env, make_project
from contract_fixtures import S3_BUCKET, s3_store
from mlflowctl.errors import ConfigError, UnavailableError
from mlflowctl.stores import MANIFEST


@pytest.fixture
def store(s3_server, tmp_path):
    return s3_store(tmp_path)


def count_calls(store) -> dict[str, int]:
    """Counts of the S3 operations the store's client sends from now on (by botocore's event hooks)."""
    counts: dict[str, int] = {}

    def seen(event_name: str, **_kw):
        op = event_name.split(".")[-1]
        counts[op] = counts.get(op, 0) + 1

    store.tree.client.meta.events.register("before-call.s3", seen)
    return counts


def publish(store, path: str, files: dict[str, bytes], manifest=None) -> bool:
    with store.staging() as out:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        return store.publish(out, path, manifest=manifest)


def keys(server, prefix: str) -> list[str]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_objects_go_under_the_final_path_and_the_marker_comes_last(store, s3_server):
    assert publish(store, "results/s/k", {"a.bin": b"a" * 10, "sub/b.txt": b"b"}, manifest={"stage": "s"})
    prefix = store.tree.key("results/s/k") + "/"
    found = keys(s3_server, prefix)
    marker = json.loads(s3_server.client().get_object(Bucket=S3_BUCKET, Key=prefix + MANIFEST)["Body"].read())
    upload = marker["upload"]
    assert sorted(found) == sorted([prefix + MANIFEST, f"{prefix}_files/{upload}/a.bin",
                                    f"{prefix}_files/{upload}/sub/b.txt"])
    assert marker["stage"] == "s" and set(marker["files"]) == {"a.bin", "sub/b.txt"}


def test_an_upload_killed_mid_way_is_never_a_result_and_the_next_publish_cleans_it(store, s3_server, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 << 20))  # 24 MB: multipart, parts of 5 MB
    script = textwrap.dedent(f"""
        import shutil, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from contract_fixtures import s3_store
        store = s3_store(Path({str(tmp_path)!r}))
        store.tree._transfer_args.update(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=1)
        def part_done(**kw):
            print("part", flush=True)
            time.sleep(30)  # hold the upload mid-way until the test kills us
        store.tree.client.meta.events.register("after-call.s3.UploadPart", part_done)
        with store.staging("big") as out:
            shutil.copyfile({str(big)!r}, out / "big.bin")
            (out / "small.txt").write_text("x")
            store.publish(out, "results/s/k")
        print("finished", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "part"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    client = s3_server.client()
    files = store.tree.key("results/s/k/_files") + "/"
    pending = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=files).get("Uploads", [])
    assert pending or keys(s3_server, files), "the killed publisher left nothing behind: the test proved nothing"

    reader = s3_store(tmp_path)
    assert not reader.exists("results/s/k") and reader.list("results/s") == [] and reader.list("results") == []
    with pytest.raises(FileNotFoundError):
        reader.fetch("results/s/k")

    assert publish(reader, "results/s/k", {"big.bin": b"second try"})
    upload = reader.tree.marker("results/s/k")["upload"]
    assert all(k.startswith(f"{files}{upload}/") for k in keys(s3_server, files))
    assert client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=files).get("Uploads", []) == []
    assert (reader.fetch("results/s/k") / "big.bin").read_bytes() == b"second try"


def test_sweep_removes_old_uploads_that_no_marker_names(store, s3_server, tmp_path):
    import time

    assert publish(store, "results/s/live", {"f": b"kept"})
    dead = f"{time.time_ns() - 2 * 3600 * 10**9:x}-0123456789ab"  # started two hours ago, never marked
    src = tmp_path / "dead"
    src.mkdir()
    (src / "f").write_bytes(b"half")
    store.tree._upload_files(src, {"f": {}}, f"results/s/dead/_files/{dead}")
    assert keys(s3_server, store.tree.key("results/s/dead/"))
    assert store.tree.sweep(older_than=3 * 3600) == []  # younger than that: perhaps still running
    assert store.tree.sweep(older_than=3600) == [f"results/s/dead/_files/{dead}"]
    assert keys(s3_server, store.tree.key("results/s/dead/")) == []
    other = s3_store(tmp_path / "machine2")  # its own cache ...
    other.tree.prefix = store.tree.prefix    # ... on the same store
    assert (other.fetch("results/s/live") / "f").read_bytes() == b"kept"


def test_fetch_checks_every_file_against_the_manifest(store, s3_server, tmp_path):
    assert publish(store, "results/s/k", {"model.bin": b"the real bytes"})
    upload = store.tree.marker("results/s/k")["upload"]
    s3_server.client().put_object(Bucket=S3_BUCKET, Key=store.tree.key(f"results/s/k/_files/{upload}/model.bin"),
                                  Body=b"tampered bytes")
    other = s3_store(tmp_path)
    other.project.state_dir = tmp_path / "elsewhere" / ".mlflowctl"  # a machine without the cache
    other._tree = None
    with pytest.raises(UnavailableError, match="does not match its manifest"):
        other.fetch("results/s/k")
    assert not list((tmp_path / "elsewhere").rglob("model.bin"))


def test_an_unchanged_input_is_downloaded_once(store, s3_server, tmp_path):
    shared, changed = os.urandom(2 << 20), os.urandom(1000)
    assert publish(store, "results/s/one", {"shared.bin": shared, "c.bin": changed})

    elsewhere = tmp_path / "machine2" / ".mlflowctl"
    elsewhere.mkdir(parents=True)

    def fresh():
        s = s3_store(tmp_path)
        s.project.state_dir = elsewhere
        s._tree = None
        return s

    first = fresh()
    calls = count_calls(first)
    assert (first.fetch("results/s/one") / "shared.bin").read_bytes() == shared
    downloads = calls.get("GetObject", 0) - 1  # minus the marker
    assert downloads == 2

    again = fresh()  # a new process on that machine
    again.tree.remember = False
    calls = count_calls(again)
    again.fetch("results/s/one")
    assert calls == {"GetObject": 1}  # the marker only
    calls = count_calls(remembering := fresh())
    remembering.fetch("results/s/one")
    assert calls == {}  # the marker it has seen before: not even that

    assert publish(store, "results/s/two", {"shared.bin": shared, "c.bin": b"new"})
    third = fresh()
    calls = count_calls(third)
    out = third.fetch("results/s/two")
    assert (out / "c.bin").read_bytes() == b"new" and (out / "shared.bin").read_bytes() == shared
    assert calls.get("GetObject", 0) == 1 + 1  # the marker and the one new file


def test_what_a_machine_publishes_it_never_downloads(store):
    calls = count_calls(store)
    assert publish(store, "results/s/k", {"m.bin": b"m" * 1000})
    again = s3_store(Path(store.project.root))  # a new process, same machine
    again.tree.remember = False
    calls = count_calls(again)
    assert (again.fetch("results/s/k") / "m.bin").read_bytes() == b"m" * 1000
    assert calls == {"GetObject": 1}  # the marker; the files came from the publish


def test_a_published_result_costs_one_request_to_check(store):
    assert publish(store, "results/s/k", {"m.bin": b"1"}, manifest={"stage": "s"})
    reader = s3_store(Path(store.project.root))
    reader.tree.remember = False
    calls = count_calls(reader)
    assert reader.exists("results/s/k")
    assert reader.read_json(f"results/s/k/{MANIFEST}")["stage"] == "s"
    assert calls == {"GetObject": 1}
    remembering = s3_store(Path(store.project.root))  # remember_results: true, the default
    calls = count_calls(remembering)
    assert remembering.exists("results/s/k") and calls == {}
    remembering.delete("results/s/k")
    assert not s3_store(Path(store.project.root)).exists("results/s/k")


def test_a_folder_of_versions_is_fetched_as_a_mirror(store):
    for n in (1, 2):
        assert publish(store, f"models/m/{n}", {"saved_model.pb": str(n).encode()})
    store.write_json("models/m/labels.json", {"stable": 1})
    mirror = store.fetch("models/m")
    assert sorted(p.name for p in mirror.iterdir()) == ["1", "2"]
    assert (mirror / "2" / "saved_model.pb").read_bytes() == b"2"
    assert publish(store, "models/m/3", {"saved_model.pb": b"3"})
    assert store.fetch("models/m") == mirror and (mirror / "3" / "saved_model.pb").read_bytes() == b"3"


def test_an_endpoint_without_conditional_writes_is_refused_unless_told(s3_server, tmp_path):
    store = s3_store(tmp_path)
    store.tree._conditional_ok = False  # what the probe finds on an endpoint that ignores If-None-Match
    with store.staging() as out:
        (out / "f").write_text("x")
        with pytest.raises(UnavailableError, match="ignores If-None-Match"):
            store.publish(out, "results/s/k")
        assert (out / "f").read_text() == "x"
    assert not store.exists("results/s/k") and store.tree.supports_conditional_writes() is False
    off = s3_store(tmp_path)
    off.tree.conditional_writes, off.tree._conditional_ok = "off", False
    assert publish(off, "results/s/k", {"f": b"1"}) and not publish(off, "results/s/k", {"f": b"2"})


def test_the_moto_server_honours_if_none_match(store):
    assert store.tree.supports_conditional_writes() is True


def test_store_urls_that_s3_refuses_are_config_errors(tmp_path):
    from mlflowctl_plugins.s3_store import parse_url

    assert parse_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    for bad, why in (("s3:///x", "names no bucket"), ("s3://bucket/../x", "may not contain '..'"),
                     ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
                     ("s3://key:secret@bucket/x", "credentials and ports do not belong")):
        with pytest.raises(ConfigError, match=why) as info:
            parse_url(bad)
        assert "key:secret" not in str(info.value)


# -------------------------------------------------------------------- through doit, as a user sees it
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_doit(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "doit"), *args], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**doit_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_DEFAULT_REGION": "us-east-1", **(env or {})})


def buckets(server) -> list[str]:
    return sorted(b["Name"] for b in server.client().list_buckets().get("Buckets", []))


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "dotdot prefix", "empty bucket"])
def test_bad_input_is_one_line_and_writes_nothing(case, s3_server, tmp_path):
    root = make_project(tmp_path / "proj")
    endpoint = s3_server.url
    store, code, says = {
        "missing bucket": ("s3://no-such-bucket/p", 5, "bucket 'no-such-bucket' does not exist"),
        "unreachable endpoint": ("s3://contract/p", 5, "cannot reach the S3 endpoint"),
        "dotdot prefix": ("s3://contract/a/../b", 3, "may not contain '..'"),
        "empty bucket": ("s3:///p", 3, "names no bucket"),
    }[case]
    if case == "unreachable endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"
    s3_server.client().create_bucket(Bucket=S3_BUCKET) if S3_BUCKET not in buckets(s3_server) else None
    before = (buckets(s3_server), keys(s3_server, ""))
    proc = run_doit(root, "data", f"store={store}", f"stores.s3.endpoint_url={endpoint}")
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflowctl: ") and says in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (buckets(s3_server), keys(s3_server, "")) == before
    assert not (root / ".mlflowctl" / "s3-cache" / "blobs").exists()


def test_wrong_credentials_are_a_config_error(tmp_path):
    """A second moto server that checks credentials (moto's IAM: after 4 free actions, keys must exist)."""
    import s3_server as server

    srv = server.start(serial=True, env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        import boto3

        srv.client().create_bucket(Bucket="authed")
        iam = boto3.client("iam", endpoint_url=srv.url, region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")
        iam.create_user(UserName="ci")
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.put_user_policy(UserName="ci", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        root = make_project(tmp_path / "proj")
        args = ("data", "store=s3://authed/p", f"stores.s3.endpoint_url={srv.url}")
        bad = run_doit(root, *args, env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "nope"})
        assert bad.returncode == 3, bad.stdout + bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "refused the credentials" in lines[0] and "nope" not in bad.stderr, bad.stderr
        good = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests');"
             "from mlflowctl_plugins.s3_store import make_client;"
             f"print(make_client(endpoint_url={srv.url!r}, access_key_id={key['AccessKeyId']!r},"
             f"secret_access_key={key['SecretAccessKey']!r}, region='us-east-1').list_objects_v2(Bucket='authed')"
             "['KeyCount'])"], capture_output=True, text=True, timeout=60)
        assert good.stdout.strip() == "0", good.stderr  # the same server takes the right keys: it is the keys
    finally:
        srv.stop()


def test_preflight_names_a_missing_bucket(s3_server, tmp_path):
    from mlflowctl_plugins.s3_store import S3Store

    store = S3Store("s3://not-created-here/p", {"endpoint_url": s3_server.url, "access_key_id": "testing",
                                                "secret_access_key": "testing"}, s3_store(tmp_path).project)
    with pytest.raises(UnavailableError, match="bucket 'not-created-here' does not exist"):
        store.preflight()
    assert "not-created-here" not in buckets(s3_server)


def test_the_same_code_runs_outside_a_project(store, s3_server, tmp_path):
    """``python -m mlflowctl_plugins.s3_store``: what a pod runs to push an output and pull an input."""
    out = tmp_path / "pod-out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"w" * 5000)
    url = f"s3://{S3_BUCKET}/{store.tree.prefix}/results/train/k1"
    env = {**doit_env(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": s3_server.url,
           "MLFLOWCTL_S3_CACHE": str(tmp_path / "pod-cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlflowctl_plugins.s3_store", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    late = tmp_path / "pod-late"
    late.mkdir()
    (late / "other.bin").write_bytes(b"late")
    first, again = cli("publish", str(out), url), cli("publish", str(late), url)
    assert (first.returncode, first.stdout.strip()) == (0, "published"), first.stderr
    assert (again.returncode, again.stdout.strip()) == (0, "already published"), again.stderr
    assert not out.exists() and (late / "other.bin").is_file()  # the winner's folder is consumed, the loser's kept
    assert (store.fetch("results/train/k1") / "model" / "weights.bin").read_bytes() == b"w" * 5000
    pulled = cli("fetch", url, str(tmp_path / "pod-in"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pod-in" / "model" / "weights.bin").read_bytes() == b"w" * 5000
    missing = cli("fetch", url.replace("k1", "nope"), str(tmp_path / "x"))
    assert missing.returncode != 0 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
