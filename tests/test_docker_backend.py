"""The Docker backend against a real Docker engine (no mocks).

Skipped only when the daemon is unreachable and ``CI`` is not set; under CI
(which installs and starts dockerd) an unreachable daemon fails these tests.
Most tests use a tiny build context (``FROM python:3.11-slim`` + one script),
so they take seconds; ``test_full_pipeline_in_docker`` builds the real image
(TensorFlow, from PyPI through the host network: minutes the first time,
cached afterwards) and runs data -> train_model/train_concept -> register.
"""
from __future__ import annotations

import _thread
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import doit_env, make_project
from mlflowctl.backends import StageRun
from mlflowctl.errors import Cancelled, ConfigError, MlflowctlError, StageFailed, UnavailableError
from mlflowctl.pipeline import Pipeline, Stage
from mlflowctl.project import Project

# A project name of this session only: every image and container the tests make carries it as a label.
SESSION = f"dbt{secrets.token_hex(3)}"
DOIT = str(Path(sys.executable).parent / "doit")

DOCKERFILE = """\
FROM python:3.11-slim
WORKDIR /app
COPY *.py ./
"""

SCRIPT = r'''
import os, pathlib, sys, time
mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
if mode == "ok":
    print("greeting", os.environ.get("GREETING"), flush=True)
    for var in sorted(v for v in os.environ if v.endswith("_DIR")):
        print(f"{var}={os.environ[var]}", flush=True)
    if os.environ.get("IN_DIR"):
        print("input says", pathlib.Path(os.environ["IN_DIR"], "input.txt").read_text(), flush=True)
        try:
            pathlib.Path(os.environ["IN_DIR"], "nope.txt").write_text("x")
            print("input is writable", flush=True)
        except OSError:
            print("input is read-only", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    print("home", os.environ.get("HOME"), os.access(os.environ.get("HOME", "/"), os.W_OK), flush=True)
    out = pathlib.Path(os.environ["OUT_DIR"])
    (out / "sub").mkdir()
    (out / "sub" / "result.txt").write_text("written in a container")
elif mode == "fail":
    print("about to fail", flush=True)
    print("the reason: boom", file=sys.stderr, flush=True)
    sys.exit(int(sys.argv[2]))
elif mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(float(sys.argv[2]))
elif mode == "partial":
    sys.stdout.write("no newline at the end")
'''


# -- the engine ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def docker_client(docker_client):
    """conftest's engine, plus a session teardown: nothing of this session may survive."""
    client = docker_client
    yield client
    for container in client.containers.list(all=True, filters={"label": f"mlflowctl.project={SESSION}"},
                                            ignore_removed=True):
        container.remove(force=True)
    for image in client.images.list(filters={"label": f"mlflowctl.project={SESSION}"}):
        try:
            client.images.remove(image.id, force=True)
        except Exception:  # noqa: BLE001 - already gone with a parent
            pass


@pytest.fixture(autouse=True)
def no_leftover_containers(request):
    """After each test of this module: no container of this session is left (unless a test keeps one on purpose)."""
    yield
    if "docker_client" not in request.fixturenames:
        return
    client = request.getfixturevalue("docker_client")
    left = client.containers.list(all=True, filters={"label": f"mlflowctl.project={SESSION}"},
                                  ignore_removed=True)
    for container in left:
        container.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def write_context(folder: Path, dockerfile: str = DOCKERFILE, script: str = SCRIPT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(dockerfile)
    (folder / "stage.py").write_text(script)
    return folder


def docker_project(root: Path, code: Path | None = None, **settings: str) -> Project:
    """A real project (dodo.py, tasks/, mlflowctl.yaml) whose image/ is the tiny context, on the docker backend."""
    code = code or write_context(root.parent / f"{root.name}-ctx")
    make_project(root, stage_code=code)
    overrides = {"project": SESSION, "backend": "docker"}
    overrides.update({f"backends.docker.{k}": v for k, v in settings.items()})
    return Project(root, overrides)


@pytest.fixture
def project(tmp_path, docker_client):
    return docker_project(tmp_path / "proj")


def stage_run(project: Project, tmp_path: Path, *args: str, stage: str | None = None, **kw) -> StageRun:
    inp, out = tmp_path / "in", tmp_path / f"out-{secrets.token_hex(2)}"
    inp.mkdir(exist_ok=True)
    out.mkdir()
    (inp / "input.txt").write_text("hello from the host")
    lines = kw.pop("lines", None)
    run = StageRun(stage=stage or f"st_{secrets.token_hex(3)}", command=["python", "stage.py", *args],
                   workdir=project.stage_code_dir, env={"GREETING": "hi there", **kw.pop("env", {})},
                   inputs={"IN_DIR": inp}, outputs={"OUT_DIR": out},
                   log_path=tmp_path / "logs" / f"{secrets.token_hex(2)}.log", key="k123", **kw)
    if lines is not None:
        run.echo = lines.append
    return run


def containers_of(client, stage: str) -> list:
    """The containers of ``stage`` (one removed between docker's list and its inspect is not one: docker-py's
    ``ignore_removed``; without it such a race failed a test, and the same in the backend's own listings)."""
    return client.containers.list(all=True, filters={"label": f"mlflowctl.stage={stage}"}, ignore_removed=True)


# -- the backend contract ------------------------------------------------------------------------
def test_env_inputs_outputs_and_live_prefixed_logs(project, tmp_path, docker_client, capsys):
    run = stage_run(project, tmp_path)
    result = project.backend.run(run)
    assert result.ok and result.exit_code == 0
    out = capsys.readouterr().out
    stage = run.stage
    assert f"[{stage}] greeting hi there" in out                          # env, streamed with the stage prefix
    assert f"[{stage}] input says hello from the host" in out            # inputs are visible
    assert f"[{stage}] IN_DIR=/mnt/inputs/IN_DIR" in out
    assert f"[{stage}] OUT_DIR=/mnt/outputs/OUT_DIR" in out
    assert f"[{stage}] input is read-only" in out                        # inputs are mounted read-only
    assert f"[{stage}] to stderr" in out                                 # stderr too
    assert f"[{stage}] home /tmp True" in out                            # a writable HOME for libraries
    log = run.log_path.read_text()
    assert "greeting hi there" in log and "to stderr" in log            # and saved to log_path
    result_file = run.outputs["OUT_DIR"] / "sub" / "result.txt"
    assert result_file.read_text() == "written in a container"
    for path in (result_file, result_file.parent):
        assert path.stat().st_uid == os.getuid() and path.stat().st_gid == os.getgid()
    assert result.detail["container"].startswith(f"mlflowctl-{SESSION}-st-")
    assert not containers_of(docker_client, stage)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can hand a directory to another uid")
def test_user_setting_decides_who_owns_the_outputs(tmp_path, docker_client):
    # Running as root the default user is 0:0, so check the mapping with another uid.
    project = docker_project(tmp_path / "proj", user="4321:4321")
    run = stage_run(project, tmp_path)
    run.outputs["OUT_DIR"].chmod(0o777)
    assert project.backend.run(run).ok
    written = run.outputs["OUT_DIR"] / "sub" / "result.txt"
    assert (written.stat().st_uid, written.stat().st_gid) == (4321, 4321)


def test_exit_code_propagates_and_log_is_kept(project, tmp_path, docker_client):
    lines: list[str] = []
    run = stage_run(project, tmp_path, "fail", "7", lines=lines)
    result = project.backend.run(run)
    assert not result.ok and result.exit_code == 7
    assert "about to fail" in lines and "the reason: boom" in lines
    assert "the reason: boom" in run.log_path.read_text()
    assert not containers_of(docker_client, run.stage)


def test_last_line_without_newline_is_not_lost(project, tmp_path):
    lines: list[str] = []
    assert project.backend.run(stage_run(project, tmp_path, "partial", lines=lines)).ok
    assert lines == ["no newline at the end"]


def test_failing_stage_in_the_pipeline_surfaces_exit_code_and_log_tail(project):
    fail = Stage(name="explode", command=("python", "stage.py", "fail", "3"), code=("stage.py",))
    with pytest.raises(StageFailed) as info:
        Pipeline(project, [fail]).run("explode")
    message = str(info.value)
    assert "exit code 3" in message and "the reason: boom" in message
    assert "\n" not in info.value.message


def test_pipeline_stages_pass_results_through_the_store(project, docker_client):
    producer = Stage(name="produce", command=("python", "stage.py"), code=("stage.py",), output="OUT_DIR")
    consumer = Stage(name="consume", command=("python", "stage.py"), code=("stage.py",),
                     inputs=(("UP_DIR", "produce"),), output="OUT_DIR")
    pipeline = Pipeline(project, [producer, consumer])
    pipeline.run("produce")
    pipeline.run("consume")
    assert pipeline.is_complete(producer) and pipeline.is_complete(consumer)
    log = (project.state_dir / "logs" / "consume.log").read_text()
    assert "UP_DIR=/mnt/inputs/UP_DIR" in log
    key = pipeline.resolve(producer).components["backend"]
    # the image's environment, and no backend name: a k8s Job of the same image shares the result
    assert key == {"image_environment": project.backend.context_info().environment_digest[:20]}
    assert not docker_client.containers.list(all=True, filters={"label": f"mlflowctl.project={SESSION}"},
                                             ignore_removed=True)


def _assert_prompt_cancel(project, run, docker_client, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(Cancelled, match=match):
        project.backend.run(run)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"cancel took {elapsed:.1f} s"
    assert not containers_of(docker_client, run.stage), "the cancelled stage left its container"
    assert "sleeping" in run.log_path.read_text()


def test_cancel_stops_promptly_and_leaves_no_container(project, tmp_path, docker_client):
    project.backend.ensure_image()  # build outside the timed part
    run = stage_run(project, tmp_path, "sleep", "60")
    timer = threading.Timer(1.0, run.cancelled.set)
    timer.start()
    try:
        _assert_prompt_cancel(project, run, docker_client, "cancelled")
    finally:
        timer.cancel()


def test_timeout_stops_promptly_and_leaves_no_container(project, tmp_path, docker_client):
    project.backend.ensure_image()
    run = stage_run(project, tmp_path, "sleep", "60", timeout=1.5)
    _assert_prompt_cancel(project, run, docker_client, "timed out after 1.5 s")


def test_ctrl_c_removes_the_container_and_cancels(project, tmp_path, docker_client):
    project.backend.ensure_image()
    run = stage_run(project, tmp_path, "sleep", "60")
    timer = threading.Timer(1.0, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled, match="interrupted"):
            project.backend.run(run)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 10
    assert not containers_of(docker_client, run.stage)


def test_keep_containers_keeps_it_and_prune_containers_removes_it(tmp_path, docker_client, capsys):
    project = docker_project(tmp_path / "proj", keep_containers="true")
    run = stage_run(project, tmp_path)
    result = project.backend.run(run)
    kept = containers_of(docker_client, run.stage)
    assert [c.name for c in kept] == [result.detail["container"]]
    assert f"kept container {result.detail['container']}" in capsys.readouterr().out
    expected = {"mlflowctl.project": SESSION, "mlflowctl.stage": run.stage, "mlflowctl.key": "k123"}
    assert expected.items() <= kept[0].labels.items()
    assert project.backend.prune_containers() == [result.detail["container"]]
    assert not containers_of(docker_client, run.stage)


def test_resource_limits_reach_the_container(tmp_path, docker_client):
    project = docker_project(tmp_path / "proj", cpus="0.5", memory="256m", keep_containers="true")
    run = stage_run(project, tmp_path)
    result = project.backend.run(run)
    container = docker_client.containers.get(result.detail["container"])
    try:
        host = container.attrs["HostConfig"]
        assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 256 * 1024 ** 2
        assert host["NetworkMode"] == "host" and host["Init"] is True
        assert container.attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
    finally:
        container.remove(force=True)


# -- the shared backend contract suite (tests/test_backend_contract.py), run against this backend --------
@pytest.fixture
def backend(tmp_path, docker_client):
    """The contract suite's ``backend`` fixture for these tests: a docker backend on a tiny image."""
    import types

    from mlflowctl_plugins.docker_backend import DockerBackend

    code = tmp_path / "image"
    code.mkdir(exist_ok=True)
    (code / "Dockerfile").write_text(DOCKERFILE)  # the suite writes stage.py itself before running
    state = tmp_path / ".mlflowctl"
    state.mkdir(exist_ok=True)
    project = types.SimpleNamespace(root=tmp_path, name=SESSION, model_name="m", state_dir=state,
                                    stage_code_dir=code, config={})
    b = DockerBackend({}, project)
    b.preflight()
    return b


try:
    import test_backend_contract as _contract
except ImportError:  # pragma: no cover - the suite moved; these tests stand on their own
    _contract = None
else:
    for _name in dir(_contract):
        if _name.startswith("test_"):
            globals()[f"test_contract_{_name[5:]}"] = getattr(_contract, _name)


# -- the image: build once, cache by content ---------------------------------------------------------
def test_second_instance_reuses_the_image_without_building(project):
    first = project.backend.ensure_image().id
    again = Project(project.root, {"project": SESSION, "backend": "docker"}).backend
    assert again.ensure_image().id == first
    assert again.build_info["built"] is False and again.build_info["tag"] == project.backend.build_info["tag"]
    assert again.build_info["tag"].startswith(f"mlflowctl/{SESSION}:")


def test_concurrent_profiles_build_once(tmp_path, docker_client, capsys):
    ctx = write_context(tmp_path / "ctx", script=SCRIPT + f"\n# {secrets.token_hex(8)}\n")
    backend = docker_project(tmp_path / "proj", ctx).backend
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(backend.ensure_image().id)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert capsys.readouterr().out.count("Successfully tagged") == 1


def test_script_change_gives_a_new_tag_and_rebuilds_only_the_top_layer(tmp_path, docker_client):
    slow = 6
    # A nonce makes the slow layer new to this engine, so the first build really runs it.
    dockerfile = (f"FROM python:3.11-slim\nRUN echo {secrets.token_hex(8)} > /nonce && sleep {slow}\n"
                  "WORKDIR /app\nCOPY *.py ./\n")
    ctx = write_context(tmp_path / "ctx", dockerfile=dockerfile)
    first = docker_project(tmp_path / "p1", ctx).backend
    first.ensure_image()
    assert first.build_info["built"] and first.build_info["seconds"] >= slow

    (ctx / "stage.py").write_text(SCRIPT + "\n# changed\n")
    second = docker_project(tmp_path / "p2", ctx).backend
    second.ensure_image()
    # a stage script is keyed by the stages that run it, not by every stage: the environment is unchanged
    assert second.profile() == first.profile()
    info = second.build_info
    assert info["built"] and info["tag"] != first.build_info["tag"]
    assert info["id"] != first.build_info["id"]
    text = "\n".join(info["lines"])
    run_step = text.index("RUN echo")
    assert "Using cache" in text[run_step:text.index("WORKDIR")], text
    assert info["seconds"] < slow, f"the slow layer was rebuilt ({info['seconds']:.1f} s)"

    # the same content again (a fresh copy elsewhere): the same tag, no build
    ctx2 = tmp_path / "ctx-copy"
    shutil.copytree(ctx, ctx2)
    third = docker_project(tmp_path / "p3", ctx2).backend
    assert third.ensure_image().id == second.ensure_image().id and third.build_info["built"] is False
    # the environment (Dockerfile, requirements) changes: every stage's key changes
    (ctx2 / "requirements.txt").write_text("# pinned differently\n")
    assert docker_project(tmp_path / "p4", ctx2).backend.profile() != second.profile()


def test_dockerignore_and_python_caches_do_not_change_the_digest(tmp_path, docker_client):
    ctx = write_context(tmp_path / "ctx")
    backend = docker_project(tmp_path / "proj", ctx).backend
    before = backend.context_info().digest
    (ctx / "__pycache__").mkdir()
    (ctx / "__pycache__" / "stage.cpython-311.pyc").write_bytes(b"\0junk")
    (ctx / ".dockerignore").write_text("# scratch files\nscratch*\n")
    (ctx / "scratch.txt").write_text("not part of the image")
    after = docker_project(tmp_path / "proj2", ctx).backend.context_info()
    assert "scratch.txt" not in after.files and ".dockerignore" in after.files
    assert not any("__pycache__" in f for f in after.files)
    (ctx / ".dockerignore").unlink()
    assert docker_project(tmp_path / "proj3", ctx).backend.context_info().digest != before  # scratch.txt counts now
    (ctx / "scratch.txt").unlink()
    assert docker_project(tmp_path / "proj4", ctx).backend.context_info().digest == before


def test_failed_build_is_one_line_with_the_last_build_lines(tmp_path, docker_client):
    ctx = write_context(tmp_path / "ctx", dockerfile="FROM python:3.11-slim\nRUN echo the-last-words && exit 42\n")
    backend = docker_project(tmp_path / "proj", ctx).backend
    with pytest.raises(MlflowctlError) as info:
        backend.ensure_image()
    message = info.value.message
    assert "docker build of" in message and "the-last-words" in message and "\n" not in message
    assert "docker-build.log" in info.value.hint


def test_prune_keeps_the_newest_and_the_current_image(tmp_path, docker_client):
    ctx = write_context(tmp_path / "ctx")
    tags = []
    for i in range(3):
        (ctx / "stage.py").write_text(SCRIPT + f"\n# version {i} {secrets.token_hex(4)}\n")
        backend = docker_project(tmp_path / f"p{i}", ctx).backend
        backend.ensure_image()
        tags.append(backend.build_info["tag"])
        time.sleep(1.1)  # distinct creation times
    removed = backend.prune(keep=1)
    assert set(tags[:2]) <= set(removed) and tags[2] not in removed
    docker_client.images.get(tags[2])


def test_render_writes_dockerfile_and_an_equivalent_docker_run(project, tmp_path, docker_client):
    run = stage_run(project, tmp_path, stage="rendered")
    files = project.backend.render(run, tmp_path / "rendered")
    assert sorted(f.name for f in files) == ["Dockerfile", "rendered.sh"]
    assert (tmp_path / "rendered" / "Dockerfile").read_text() == DOCKERFILE
    script = (tmp_path / "rendered" / "rendered.sh").read_text()
    assert "docker run" in script and "--mount type=bind" in script
    project.backend.ensure_image()
    proc = subprocess.run(["sh", str(tmp_path / "rendered" / "rendered.sh")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "greeting hi there" in proc.stdout and "input is read-only" in proc.stdout
    assert (run.outputs["OUT_DIR"] / "sub" / "result.txt").read_text() == "written in a container"
    assert not containers_of(docker_client, "rendered")


@pytest.mark.parametrize("jobs", [0, 2])
def test_ctrl_c_on_doit_removes_the_stage_container(tmp_path, docker_client, jobs):
    """SIGINT to ``doit backend=docker`` while a stage runs in a container: doit ends, the container is gone."""
    ctx = write_context(tmp_path / "ctx")
    (ctx / "download.py").write_text("import time\nprint('downloading slowly', flush=True)\ntime.sleep(120)\n")
    (ctx / "common.py").write_text("")
    root = make_project(tmp_path / "proj", stage_code=ctx)
    proc = subprocess.Popen([DOIT, "-n", str(jobs), "backend=docker", f"project={SESSION}", "data"], cwd=root,
                            env=doit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not containers_of(docker_client, "data"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "downloading slowly" in output
    assert proc.returncode != 0
    assert "Traceback" not in output, output
    assert "stage data cancelled" in output, output
    assert not containers_of(docker_client, "data")


# -- errors a user can fix ------------------------------------------------------------------------------
def test_preflight_unreachable_daemon_is_one_line(tmp_path):
    project = docker_project(tmp_path / "proj", base_url="tcp://127.0.0.1:1")
    with pytest.raises(UnavailableError) as info:
        project.backend.preflight()
    assert info.value.exit_code == 5
    assert info.value.message.startswith("cannot reach the Docker daemon at tcp://127.0.0.1:1: ")
    assert "\n" not in str(info.value) and "backends.docker.base_url" in info.value.hint


def test_doit_with_unreachable_daemon_exits_5_without_traceback(tmp_path):
    root = make_project(tmp_path / "proj")
    proc = subprocess.run([DOIT, "backend=docker", "backends.docker.base_url=tcp://127.0.0.1:1", "data"],
                          cwd=root, env=doit_env(), capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 5, output
    assert "cannot reach the Docker daemon at tcp://127.0.0.1:1" in output
    assert "Traceback" not in output


def test_missing_context_or_dockerfile_is_a_config_error(tmp_path, docker_client):
    project = docker_project(tmp_path / "proj", context="no-such-folder")
    with pytest.raises(ConfigError, match="no-such-folder"):
        project.backend.preflight()
    project = docker_project(tmp_path / "proj2", dockerfile="Containerfile")
    with pytest.raises(ConfigError, match="Containerfile"):
        project.backend.preflight()


def test_docker_is_imported_lazily(tmp_path):
    code = ("import sys; from mlflowctl.plugin_manager import build_plugin_manager; "
            "pm = build_plugin_manager(); assert 'docker' in pm.registry.backends; "
            "assert 'docker' not in sys.modules, 'docker imported at plugin load'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)


# -- the real thing ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_pipeline_in_docker(tmp_path, docker_client):
    """data -> train_model || train_concept -> register, every command stage in a container of the real image."""
    root = tmp_path / "proj"
    make_project(root)
    args = [DOIT, "backend=docker", "train_model.epochs=1", "train_model.steps=20",
            "train_concept.epochs=1", "train_concept.steps=20"]
    stages = ["data", "train_model", "train_concept", "register"]
    proc = subprocess.run(args + stages, cwd=root, env=doit_env(), capture_output=True, text=True, timeout=3000)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "[train_model]" in output and "[data]" in output

    versions = root / ".mlflowctl" / "store" / "models" / "mnist"
    numbers = sorted(int(p.name) for p in versions.iterdir() if p.name.isdigit())
    assert numbers == [1]
    version = versions / "1"
    assert (version / "saved_model.pb").is_file() and (version / "concept" / "saved_model.pb").is_file()
    metadata = json.loads((version / "metadata.json").read_text())
    backend = metadata["backend"]
    assert backend["backend"] == "docker" and backend["image"].startswith("sha256:") and backend["image_environment"]

    for path in (root / ".mlflowctl" / "store").rglob("*"):
        assert path.lstat().st_uid == os.getuid(), f"{path} is owned by uid {path.lstat().st_uid}"
    assert not docker_client.containers.list(all=True, filters={"label": "mlflowctl.project=mnist"},
                                             ignore_removed=True)

    again = subprocess.run(args + stages, cwd=root, env=doit_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    for stage in stages:
        assert f"-- {stage}" in again.stdout, again.stdout
    assert not re.search(r"^\. ", again.stdout, re.M), again.stdout  # nothing ran
