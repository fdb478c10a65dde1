"""The ``local`` serving target in its docker runtime, against a real Docker engine (no mocks).

The model server runs in a container of the project's real image (``mlflowctl/<project>:<digest>``,
built by the docker backend -- cached, or a few minutes the first time) on the host network, so it
answers on 127.0.0.1 like the process runtime. Skipped only when the daemon is unreachable and
``CI`` is not set; under CI an unreachable daemon fails these tests.

``test_pipeline_with_server_in_container`` (slow) runs the whole pipeline with ``backend=docker``
and checks the server it leaves behind is a container, and that ``mlflowctl serve stop`` removes it.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

import serving_fixtures as fx
from conftest import VENV_BIN, doit_env, make_project
from mlflowctl.errors import UnavailableError
from mlflowctl.project import Project

NAME = "mnist"  # the repo's mlflowctl.yaml: project and model name (so the image is the cached one)
BLANK = [0.0] * 784
ROLE = "mlflowctl.role=serve"


def serve_containers(client, serve_dir: Path) -> list:
    """This project folder's model server containers (other sessions may run theirs on the same engine)."""
    return [c for c in client.containers.list(all=True, filters={"label": ROLE}, ignore_removed=True)
            if c.labels.get("mlflowctl.serve-dir") == str(serve_dir)]


def grpc_predict(target: str, version: int) -> int:
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    req = predict_pb2.PredictRequest()
    req.model_spec.name = NAME
    req.model_spec.version.value = version
    req.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 784), np.float32)))
    with grpc.insecure_channel(target) as channel:
        resp = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=30)
    return int(tf.make_ndarray(resp.outputs["probabilities"]).argmax())


def predict(url: str) -> int:
    r = requests.post(url, json={"instances": [BLANK]}, timeout=30)
    assert r.status_code == 200, r.text
    probs = r.json()["predictions"][0]
    return max(range(len(probs)), key=probs.__getitem__)


@pytest.fixture(scope="module")
def project(tmp_path_factory, docker_client):
    """A project copy (the real image/) whose registry holds two tiny versions (1 answers 1, 2 answers 2)."""
    root = make_project(tmp_path_factory.mktemp("serve-docker") / "proj")
    fx.build_registry(root / ".mlflowctl" / "store" / "models" / NAME)
    port = fx.free_port()
    proj = Project(root, {"backend": "docker", "serving.local.port": str(port),
                          "serving.local.grpc_port": str(fx.free_port())})
    started = time.monotonic()
    proj.backend.ensure_image()  # build (or find) the image outside the start timeout
    (proj.state_dir / "serve").mkdir(parents=True, exist_ok=True)
    print(f"image {proj.backend.build_info['tag']} in {time.monotonic() - started:.1f} s")
    yield proj, port
    proj.serving.stop()


def test_lifecycle_in_a_container(project, docker_client):
    proj, port = project
    target = proj.serving
    assert target.name == "local" and target.runtime_name == "docker"
    serve_dir = target.dir.absolute()
    V = SimpleNamespace  # noqa: N806 - a ModelVersion look-alike
    fx.write_routing(target.routing_file, [1], {"stable": 1})
    try:
        started = time.monotonic()
        ep = target.start()
        print(f"container ready in {time.monotonic() - started:.1f} s")
        assert ep is not None and ep.version == 1 and ep.url == f"http://127.0.0.1:{port}"
        info = json.loads(target.info_file.read_text())
        assert info["runtime"] == "docker" and info["container_name"] == f"mlflowctl-mnist-serve-{port}"
        assert not target.pid_file.exists()
        (container,) = serve_containers(docker_client, serve_dir)
        assert container.id == info["container"] and container.status == "running"
        assert container.labels["mlflowctl.project"] == "mnist"
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert container.attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
        assert container.image.id == proj.backend.ensure_image().id
        assert predict(ep.predict_url) == 1
        assert grpc_predict(ep.grpc, 1) == 1  # the image has the gRPC API (tensorflow-serving-api, grpcio)

        # a second version beside the first; labels route; the same container reloads
        ep2 = target.deploy(V(name=NAME, number=2, path=f"models/{NAME}/2", metadata={}), label="canary")
        assert ep2.version == 2 and predict(ep2.predict_url) == 2
        assert predict(target.endpoint(label="canary").predict_url) == 2
        assert predict(target.endpoint(label="stable").predict_url) == 1
        target.set_label("stable", 2)
        target.set_label("canary", None)
        assert predict(target.endpoint().predict_url) == 2

        st = target.status()
        assert st["running"] is True and st["runtime"] == "docker" and st["pid"] is None
        assert st["container"] == info["container_name"]
        assert st["versions"] == [{"version": 1, "state": "AVAILABLE", "error": ""},
                                  {"version": 2, "state": "AVAILABLE", "error": ""}]
        assert st["labels"] == {"stable": 2}

        target.undeploy(1)
        r = requests.get(f"{ep.url}/v1/models/{NAME}/versions/1", timeout=10)
        assert r.json()["model_version_status"][0]["state"] == "END"

        # start() while running reuses the container (a reload, not a restart)
        assert target.start().version == 2
        assert json.loads(target.info_file.read_text())["container"] == container.id
        container.reload()
        assert container.status == "running" and container.attrs["RestartCount"] == 0
        assert [c.id for c in serve_containers(docker_client, serve_dir)] == [container.id]
        # ... also from another command without backend=docker: the recorded runtime is used
        other = Project(proj.root, {"serving.local.port": str(port)}).serving
        assert other.runtime_name == "process" and other.status()["container"] == info["container_name"]
    finally:
        target.stop()
    assert serve_containers(docker_client, serve_dir) == []
    assert not target.info_file.exists()
    assert target.status()["running"] is False
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2)
    log = target.log_file.read_text()
    assert f"starting container mlflowctl-mnist-serve-{port}" in log and "serve:" in log
    target.stop()  # idempotent


def test_exit_at_start_is_one_line_and_leaves_nothing(project, docker_client):
    proj, _ = project
    target = proj.serving
    target.routing_file.write_text('{"versions": "all of them"}')
    try:
        with pytest.raises(UnavailableError, match="exited at start") as ei:
            target.start()
        assert "'versions' must be a list" in str(ei.value) and "\n" not in str(ei.value)
        assert not target.info_file.exists()
        assert serve_containers(docker_client, target.dir.absolute()) == []
    finally:
        target.routing_file.unlink()
        target.stop()


def test_port_in_use_and_stale_records(project, docker_client):
    import socket

    proj, port = project
    target = proj.serving
    fx.write_routing(target.routing_file, [1], {"stable": 1})
    # something else listens on the port: refused before a container starts
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(UnavailableError, match="already in use") as ei:
            target.start()
        assert "serving.local.port" in str(ei.value) and "\n" not in str(ei.value)
    assert serve_containers(docker_client, target.dir.absolute()) == []

    # a server.json whose container is gone: not running, and the record is removed
    target.info_file.write_text(json.dumps({"runtime": "docker", "container": "0" * 64, "url": target.url,
                                            "container_name": "gone", "model_name": NAME}))
    assert target.status()["running"] is False
    assert not target.info_file.exists()
    target.stop()

    # server.json lost while its container runs: the next start replaces it, stop removes it
    target.start()
    target.info_file.unlink()
    assert len(serve_containers(docker_client, target.dir.absolute())) == 1
    target.stop()
    assert serve_containers(docker_client, target.dir.absolute()) == []
    target.start()
    target.info_file.unlink()
    target.start()
    (survivor,) = serve_containers(docker_client, target.dir.absolute())
    assert survivor.id == json.loads(target.info_file.read_text())["container"]
    target.stop()
    assert serve_containers(docker_client, target.dir.absolute()) == []
    target.routing_file.unlink()


# -- the whole pipeline ------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_with_server_in_container(tmp_path, docker_client):
    """doit backend=docker: deploy -> integration_test -> promote -> monitor against a server in a container."""
    root = make_project(tmp_path / "proj")
    port = fx.free_port()
    args = [str(VENV_BIN / "doit"), "backend=docker", "train_model.epochs=1", "train_model.steps=30",
            "train_concept.epochs=1", "train_concept.steps=30", "integration_test.min_accuracy=0.3",
            f"serving.local.port={port}", f"serving.local.grpc_port={fx.free_port()}", "integration_test.transport=grpc"]
    serve_dir = (root / ".mlflowctl" / "serve").absolute()
    try:
        started = time.monotonic()
        proc = subprocess.run(args, cwd=root, env=doit_env(), capture_output=True, text=True, timeout=3000)
        print(f"pipeline in {time.monotonic() - started:.1f} s")
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-5000:]
        for stage in ("deploy", "integration_test", "promote", "monitor"):
            assert f".  {stage}" in proc.stdout, proc.stdout

        info = json.loads((serve_dir / "server.json").read_text())
        assert info["runtime"] == "docker"
        (container,) = serve_containers(docker_client, serve_dir)
        assert container.id == info["container"] and container.status == "running"
        r = requests.post(f"http://127.0.0.1:{port}/v1/models/{NAME}:predict", json={"instances": [BLANK]},
                          timeout=30)
        assert r.status_code == 200 and len(r.json()["predictions"][0]) == 10, r.text
        stable = requests.get(f"http://127.0.0.1:{port}/v1/models/{NAME}/labels/stable", timeout=10).json()
        assert [s["version"] for s in stable["model_version_status"]] == ["1"]
        (report,) = (root / ".mlflowctl" / "store" / "results" / "integration_test").glob("*/report.json")
        assert json.loads(report.read_text())["transport"] == "grpc"  # the stage talked gRPC to the container
    finally:
        stop = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), "serve", "stop"], env=doit_env(),
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert serve_containers(docker_client, serve_dir) == []
    assert not docker_client.containers.list(all=True, filters={"name": f"mlflowctl-mnist-serve-{port}"},
                                             ignore_removed=True)
