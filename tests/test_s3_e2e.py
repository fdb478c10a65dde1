"""Two checkouts of the project on this machine share one bucket on a real S3 server (moto, 127.0.0.1).

The first ``doit`` trains (tiny settings) and registers version 1; the second
checkout's ``doit`` skips every stage, registers nothing, and ``mlflowctl
models`` agrees in both. Credentials come as ``{"$env": ...}`` secrets and
appear nowhere: not in the bucket, not in the state folders, not in the output.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import VENV_BIN, doit_env, make_project

pytestmark = pytest.mark.slow

STAGES = ["data", "train_model", "train_concept", "register"]
SECRET_ID, SECRET_KEY = "AKIAE2ESHAREDBUCKET7", "s3cr3t-e2e-never-written-anywhere"

YAML = """\
project: s3e2e
model_name: fmnist
store: s3://shared-e2e/team/mnist
data:
  dataset: fashion-mnist
train_model:
  epochs: 1
  steps: 5
train_concept:
  epochs: 1
  steps: 5
stores:
  s3:
    endpoint_url: {endpoint}
    region: us-east-1
    access_key_id: {{"$env": E2E_S3_ID}}
    secret_access_key: {{"$env": E2E_S3_KEY}}
"""

COUNT = """
import json, sys
from pathlib import Path
from mlflowctl.cli import load_pipeline
pipeline = load_pipeline(Path(sys.argv[1]), dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a))
calls = []
pipeline.project.store.tree.client.meta.events.register("before-call.s3", lambda event_name, **kw: calls.append(event_name))
fresh = {name: pipeline.is_complete(pipeline.stages[name]) for name in sys.argv[2:] if "=" not in name}
print(json.dumps({"fresh": fresh, "requests": len(calls)}))
"""


def env() -> dict[str, str]:
    e = doit_env()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        e.pop(var, None)
    return {**e, "E2E_S3_ID": SECRET_ID, "E2E_S3_KEY": SECRET_KEY}


def doit(root, *args):
    proc = subprocess.run([str(VENV_BIN / "doit"), *args], cwd=root, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"doit exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def mlflowctl(root, *args):
    proc = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), *args], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def ran(proc) -> list[str]:
    return [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")]


def test_two_checkouts_share_one_bucket(s3_server, tmp_path):
    s3_server.client().create_bucket(Bucket="shared-e2e")
    yaml = YAML.format(endpoint=s3_server.url)
    first, second = make_project(tmp_path / "a", yaml), make_project(tmp_path / "b", yaml)

    one = doit(first, *STAGES)
    assert set(ran(one)) == set(STAGES), one.stdout
    two = doit(second, *STAGES)
    assert ran(two) == [], two.stdout
    assert "registered" not in two.stdout

    models_a, models_b = mlflowctl(first, "models").stdout, mlflowctl(second, "models").stdout
    assert models_a == models_b and "model fmnist in s3://shared-e2e/team/mnist" in models_a, models_a
    assert [line.split()[0] for line in models_a.splitlines()[1:]] == ["1"], models_a

    # the up-to-date check of a fresh process: at most one request per stage; none for results already seen
    for extra, most in ((["stores.s3.remember_results=false"], len(STAGES)), ([], 0)):
        proc = subprocess.run([sys.executable, "-c", COUNT, str(second), *STAGES, *extra], env=env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        counted = json.loads(proc.stdout.strip().splitlines()[-1])
        assert counted["fresh"] == dict.fromkeys(STAGES, True) and counted["requests"] <= most, (extra, counted)

    # the secrets are nowhere: bucket objects, both state folders, the output
    client = s3_server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="shared-e2e")
            for o in page.get("Contents", [])]
    assert any(k.endswith("models/fmnist/1/_manifest.json") for k in keys)
    small = [k for k in keys if not k.endswith((".pb", ".data-00000-of-00001", ".index", ".bin"))]
    blobs = [client.get_object(Bucket="shared-e2e", Key=k)["Body"].read() for k in small]
    local = [p.read_bytes() for root in (first, second) for p in (root / ".mlflowctl").rglob("*") if p.is_file()]
    for data in blobs + local + [(one.stdout + one.stderr + two.stdout + two.stderr).encode()]:
        assert SECRET_KEY.encode() not in data and SECRET_ID.encode() not in data
