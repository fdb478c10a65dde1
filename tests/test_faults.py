"""The fault-injection suite (issue 11): what a crash, a signal, a second run or a damaged file leaves behind.

One real project (TensorFlow training in tiny steps, the model server on 127.0.0.1) is trained once
per module. A test plugin (``tests/fault_plugin.py``, installed as a third-party distribution, real
hooks) holds ``doit`` at a chosen hook of a chosen stage; the test then sends ``kill -9`` or SIGTERM.
After every kill and after the re-run that follows, the store must hold

- 0 partial results (every published result verifies against its manifest, sizes and sha256),
- 0 duplicated versions (no two versions with the same files),
- 0 orphan versions (after the re-run, every version is named by a ``register`` result),

and the ``stable`` version keeps answering on the model server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, VENV_BIN, doit_env, make_project

pytestmark = pytest.mark.slow

DOIT = str(VENV_BIN / "doit")
MODEL = "faults"
SMALL = """\
project: faults
model_name: faults
data:
  dataset: fashion-mnist
train_model:
  epochs: 1
  steps: 20
  batch_size: 64
train_concept:
  epochs: 1
  steps: 10
  batch_size: 64
integration_test:
  min_accuracy: 0.05
  samples: 100
  batch_size: 50
monitor:
  max_drift_rate: 1.0
serving:
  target: local
  local:
    port: {port}
    grpc_port: {grpc_port}
"""
SIGNALS = {"kill9": signal.SIGKILL, "sigterm": signal.SIGTERM}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_fault_plugin(site: Path) -> None:
    """tests/fault_plugin.py as a third-party distribution (dist-info + entry point) in ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "mlflowctl_fault_plugin.py").write_text((Path(__file__).parent / "fault_plugin.py").read_text())
    info = site / "mlflowctl_fault_plugin-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlflowctl-fault-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mlflowctl]\nfaults = mlflowctl_fault_plugin\n")
    (info / "RECORD").write_text("")


class Project:
    """The trained project of this module and what the tests do with it."""

    def __init__(self, root: Path, port: int, site: Path) -> None:
        self.root, self.port, self.site = root, port, site
        self.logs = root.parent / "logs"
        self.logs.mkdir(exist_ok=True)
        self.runs = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = doit_env()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site), env.get("PYTHONPATH", "")) if p)
        env.pop("MLFLOWCTL_FAULT", None)
        return {**env, **extra}

    def log_path(self) -> Path:
        self.runs += 1
        return self.logs / f"run-{self.runs:03d}.log"

    def doit(self, *args: str, check: bool = True, **env: str) -> tuple[int, str]:
        log = self.log_path()
        with open(log, "w") as out:
            proc = subprocess.run([DOIT, *args], cwd=self.root, env=self.env(**env), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=900)
        text = log.read_text()
        if check and proc.returncode != 0:
            raise AssertionError(f"doit {' '.join(args)} exited {proc.returncode} (log {log}):\n{text[-4000:]}")
        return proc.returncode, text

    def start(self, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
        log = self.log_path()
        out = open(log, "w")
        proc = subprocess.Popen([DOIT, *args], cwd=self.root, env=self.env(**env), stdout=out,
                                stderr=subprocess.STDOUT)
        out.close()
        return proc, log

    def doit_killed_at(self, point: str, how: str, *args: str) -> tuple[bool, int, str]:
        """Run ``doit args``, send ``how`` when it reaches ``point`` (``hook:stage``): (reached, exit code, log)."""
        mark = self.logs / f"mark-{self.runs + 1}"
        proc, log = self.start(*args, MLFLOWCTL_FAULT=point, MLFLOWCTL_FAULT_MARK=str(mark))
        try:
            deadline = time.monotonic() + 900
            while not mark.exists():
                if proc.poll() is not None:
                    return False, proc.returncode, log.read_text()
                assert time.monotonic() < deadline, f"{point} not reached in 900 s (log {log})"
                time.sleep(0.05)
            proc.send_signal(SIGNALS[how])
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return True, proc.returncode, log.read_text()

    # -- what the store holds -----------------------------------------------------------------------
    @property
    def store(self) -> Path:
        return self.root / ".mlflowctl" / "store"

    def versions(self) -> list[int]:
        folder = self.store / "models" / MODEL
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []

    def labels(self) -> dict[str, int]:
        path = self.store / "models" / MODEL / "labels.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def registered(self) -> set[int]:
        """Versions named by a ``register`` result (any key)."""
        folder = self.store / "results" / "register"
        return {json.loads((r / "version.json").read_text())["version"] for r in folder.iterdir()} \
            if folder.is_dir() else set()

    def stable_answers(self) -> int:
        """Predict through the stable label; returns the stable version the server reports."""
        import requests

        image = [[0.0] * 784]
        base = f"http://127.0.0.1:{self.port}/v1/models/{MODEL}"
        # test traffic: the monitor must not score the suite's probes as live drift
        r = requests.post(f"{base}:predict", json={"instances": image}, timeout=30,
                          headers={"X-Mlflowctl-Traffic": "test"})
        assert r.status_code == 200, r.text
        probs = r.json()["predictions"][0]
        assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-3
        status = requests.get(f"{base}/labels/stable", timeout=30).json()
        return int(status["model_version_status"][0]["version"])

    def check_invariants(self, where: str, after_rerun: bool = False) -> None:
        from mlflowctl.model_registry import content_digest
        from mlflowctl_plugins.local_store import damaged_folder

        for stage_dir in sorted((self.store / "results").iterdir()):
            for result in sorted(stage_dir.iterdir()):
                problem = damaged_folder(result, deep=True)
                assert problem is None, f"{where}: partial result {stage_dir.name}/{result.name}: {problem}"
        digests = {}
        for number in self.versions():
            folder = self.store / "models" / MODEL / str(number)
            assert damaged_folder(folder, deep=True) is None, f"{where}: version {number} is damaged"
            digest = content_digest(json.loads((folder / "_manifest.json").read_text()))
            assert digest not in digests, f"{where}: version {number} duplicates version {digests[digest]}"
            digests[digest] = number
        stable = self.labels().get("stable")
        assert stable is not None and self.stable_answers() == stable, f"{where}: stable {stable} does not answer"
        if after_rerun:
            orphans = set(self.versions()) - self.registered()
            assert not orphans, f"{where}: orphan versions {sorted(orphans)} (no register result names them)"
            staging = self.store / ".staging"
            assert not staging.exists() or not [p for p in staging.iterdir() if not p.name.startswith(".")], \
                f"{where}: staging leftovers {os.listdir(staging)}"


def ran(log: str) -> list[str]:
    return [line[3:].strip() for line in log.splitlines() if line.startswith(".  ")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    port = free_port()
    root = make_project(base / "proj", SMALL.format(port=port, grpc_port=free_port()))
    install_fault_plugin(base / "site")
    project = Project(root, port, base / "site")
    _, log = project.doit()
    project.order = ran(log)
    assert sorted(project.order) == sorted(["data", "train_model", "train_concept", "register", "deploy",
                                            "integration_test", "promote", "monitor"]), log
    assert project.versions() == [1] and project.labels().get("stable") == 1
    project.check_invariants("after the first run", after_rerun=True)
    yield project
    subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(root), "serve", "stop"], env=doit_env(),
                   capture_output=True, timeout=120)


def test_the_fault_plugin_is_loaded_through_its_entry_point(trained):
    out = subprocess.run([str(VENV_BIN / "mlflowctl"), "-C", str(trained.root), "plugins"], env=trained.env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "faults" in out.stdout, out.stdout + out.stderr
    assert "mlflowctl_before_publish" in out.stdout or "before_publish" in out.stdout, out.stdout


def walk(project: Project, overrides: tuple[str, ...], plan: list[tuple[str, str, str]]) -> list[str]:
    """Kill ``doit overrides`` at each (hook, stage, signal) of ``plan`` in turn (each run is the previous
    one's re-run), checking the store after each kill; then one clean re-run. Returns the points reached."""
    reached = []
    for hook, stage, how in plan:
        point = f"{hook}:{stage}"
        hit, code, log = project.doit_killed_at(point, how, *overrides)
        assert hit, f"{point} was not reached (exit {code}):\n{log[-3000:]}"
        reached.append(f"{point}/{how}")
        assert "Traceback" not in log, f"{point}/{how}:\n{log[-3000:]}"
        if how == "kill9":
            assert code == -signal.SIGKILL
        else:
            assert code != 0, f"{point}/{how}: doit exited 0 after SIGTERM:\n{log[-3000:]}"
        project.check_invariants(f"after {how} at {point}")
    _, log = project.doit(*overrides)
    project.check_invariants(f"after the re-run of {overrides}", after_rerun=True)
    _, again = project.doit(*overrides)
    assert ran(again) == [], f"a second re-run still had work to do:\n{again[-3000:]}"
    return reached


def plan_for(order: list[str], first_signal: str) -> list[tuple[str, str, str]]:
    """Every boundary of every stage, in the order doit runs them; each point with both signals when the
    stage is still to run afterwards (before it starts, before its publish); its end with one of them."""
    other = {"kill9": "sigterm", "sigterm": "kill9"}
    plan = []
    for i, stage in enumerate(order):
        one = first_signal if i % 2 == 0 else other[first_signal]
        plan += [("before_stage", stage, one), ("before_stage", stage, other[one])]
        if stage == "register":  # inside register: the version is published, the register result is not
            plan += [("model_registered", stage, one), ("model_registered", stage, other[one])]
        plan += [("before_publish", stage, one), ("before_publish", stage, other[one])]
        plan += [("after_stage", stage, one)]
    return plan


def test_kill_at_every_stage_boundary_then_rerun(trained):
    """Every stage re-runs (new data timeout, new seeds); doit is killed at every boundary of each."""
    overrides = ("data.download_timeout=31", "train_model.seed=7", "train_concept.seed=7")
    before = trained.versions()
    reached = walk(trained, overrides, plan_for(trained.order, "kill9"))
    assert len(reached) == len(plan_for(trained.order, "kill9"))
    # exactly one new version, registered once however often register was killed, and it is stable
    assert trained.versions() == before + [before[-1] + 1]
    assert trained.labels()["stable"] == before[-1] + 1 == trained.stable_answers()


def test_two_concurrent_runs_register_one_version(trained):
    overrides = ("train_model.seed=8",)
    before = trained.versions()
    first, first_log = trained.start(*overrides)
    time.sleep(1.0)
    second, second_log = trained.start(*overrides)
    assert first.wait(timeout=900) == 0, first_log.read_text()[-3000:]
    assert second.wait(timeout=900) == 0, second_log.read_text()[-3000:]
    logs = first_log.read_text() + second_log.read_text()
    assert "waiting for another doit run" in logs
    assert trained.versions() == before + [before[-1] + 1]
    trained.check_invariants("after two concurrent runs", after_rerun=True)
    _, again = trained.doit(*overrides)
    assert ran(again) == []


KEY_SCRIPT = """
import sys
from mlflowctl import doit_glue
p = doit_glue.load(".", dict(a.split("=", 1) for a in sys.argv[2:])).pipeline  # what dodo.py builds for doit
print(p.resolve(p.stages[sys.argv[1]]).path)
"""


def current_result(project: Project, stage: str, *overrides: str) -> Path:
    """The folder of the stage's result for the current key (with ``overrides``), as doit computes it."""
    out = subprocess.run([str(VENV_BIN / "python"), "-c", KEY_SCRIPT, stage, *overrides], cwd=project.root,
                         env=project.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return project.store / out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("damage", ["truncate", "delete_file", "garbage_manifest", "truncate_manifest",
                                    "delete_manifest"])
def test_a_damaged_result_is_recomputed_and_stable_keeps_answering(trained, damage):
    """Damage the current monitor result (a file, or its manifest): the next doit finds it (sizes) and
    recomputes it; nothing else changes."""
    trained.doit()
    result = current_result(trained, "monitor")
    assert result.is_dir()
    victim, manifest = result / "drift.json", result / "_manifest.json"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:3])
    elif damage == "delete_file":
        victim.unlink()
    elif damage == "garbage_manifest":
        manifest.write_bytes(os.urandom(200))
    elif damage == "truncate_manifest":
        manifest.write_text(manifest.read_text()[:40])
    else:
        manifest.unlink()
    stable, versions = trained.labels()["stable"], trained.versions()
    code, log = trained.doit(check=False)
    assert code == 0 and "Traceback" not in log, log[-3000:]
    assert ran(log) == ["monitor"], log[-3000:]
    assert f"stage monitor: result {result.name} is damaged" in log, log[-3000:]
    trained.check_invariants(f"after a {damage} result", after_rerun=True)
    assert trained.labels()["stable"] == stable and trained.versions() == versions


def test_flipped_bytes_in_an_input_are_found_by_the_run_that_uses_it(trained):
    """Same size, other bytes: the cheap check cannot see it; the stage that reads the result as an input
    checks every sha256, the run fails with one line, the damaged result is removed and recomputed."""
    trained.doit()
    result = current_result(trained, "promote")
    assert result.name != "None", "promote's key: an input has no result"
    victim = result / "promotion.json"
    data = bytearray(victim.read_bytes())
    data[1] ^= 0x01
    victim.write_bytes(bytes(data))
    versions = trained.versions()
    code, log = trained.doit("monitor.max_drift_rate=0.99", check=False)  # monitor runs, reading promote's result
    assert "Traceback" not in log, log[-3000:]
    assert f"stage promote: result {result.name} is damaged (promotion.json does not match its sha256)" in log, \
        log[-3000:]
    if code != 0:  # the run that found it fails; the next one recomputes it
        code, log = trained.doit("monitor.max_drift_rate=0.99", check=False)
    assert code == 0, log[-3000:]
    assert ran(log)[-2:] == ["promote", "monitor"], log[-3000:]
    trained.check_invariants("after flipped bytes", after_rerun=True)
    # promote ran again for the same tested version: that version is stable, no version was added
    promoted = json.loads((current_result(trained, "promote") / "promotion.json").read_text())["version"]
    assert trained.labels()["stable"] == promoted and trained.versions() == versions


def test_a_truncated_registry_file_stops_doit_with_one_line(trained):
    labels = trained.store / "models" / MODEL / "labels.json"
    good = labels.read_text()
    labels.write_text(good[:5])
    try:
        code, log = trained.doit("train_model.seed=9", check=False)
    finally:
        labels.write_text(good)
    assert code != 0 and "Traceback" not in log, log[-3000:]
    assert f"models/{MODEL}/labels.json is damaged (not valid JSON" in log, log[-3000:]
    trained.check_invariants("after a truncated labels.json")


def test_setup_scripts_use_no_fixed_tmp_names():
    """Scripts run as root must not write to guessable /tmp names (a planted symlink redirects them)."""
    import re

    offenders = []
    for path in [*sorted((REPO / "scripts").glob("*.sh")), REPO / "Makefile"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if path.suffix == ".sh" else line
            if re.search(r"(?<![\w$\"])/tmp/[\w.-]", code):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# -- the pvc:// store: sizes and sha256 of what it reads and writes (on the test cluster) -----------
@pytest.fixture
def pvc(kube_cluster, tmp_path):
    """A ``pvc://`` store with a path of its own, and that path's folder on the claim's hostPath volume."""
    import secrets

    import contract_fixtures
    import kube_fixtures

    root = tmp_path / f"pvc-{secrets.token_hex(4)}"
    root.mkdir()
    store = contract_fixtures.pvc_store(root)
    volume = kube_fixtures.VOLUMES / f"{contract_fixtures._session_claim()}-store" / root.name
    return store, volume


def publish_sample(store, path: str) -> None:
    with store.staging("sample") as src:
        (src / "weights.bin").write_bytes(bytes(range(256)) * 8)
        (src / "sub").mkdir()
        (src / "sub" / "threshold.json").write_text('{"threshold": 0.25}\n')
        assert store.publish(src, path, manifest={"stage": "sample"})


def test_pvc_store_checks_sizes_and_sha256_of_what_it_reads(pvc):
    from mlflowctl.errors import UnavailableError

    store, volume = pvc
    publish_sample(store, "results/sample/k1")
    publish_sample(store, "results/sample/k2")
    assert store.damaged("results/sample/k1") is None and store.damaged("results/sample/k1", deep=True) is None
    # flipped bytes (same size) on the volume: the cheap check passes, the deep one and every download catch it
    weights = volume / "results" / "sample" / "k1" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert store.damaged("results/sample/k1") is None
    assert store.damaged("results/sample/k1", deep=True) == "weights.bin does not match its sha256"
    with pytest.raises(UnavailableError, match=r"results/sample/k1 does not match its manifest \(weights.bin does "
                                               r"not match its sha256\)"):
        store.fetch("results/sample/k1")
    assert not [p for p in store._cache_dir.iterdir() if p.is_dir()]  # nothing damaged was cached
    # a truncated file: the cheap check (sizes) finds it
    threshold = volume / "results" / "sample" / "k2" / "sub" / "threshold.json"
    threshold.write_text('{"thr')
    assert store.damaged("results/sample/k2") == "sub/threshold.json has 5 bytes, not 20"
    (volume / "results" / "sample" / "k2" / "_manifest.json").write_text("{")
    assert store.damaged("results/sample/k2") == "_manifest.json is unreadable"
    # an intact one downloads and verifies
    publish_sample(store, "results/sample/k3")
    assert (store.fetch("results/sample/k3") / "sub" / "threshold.json").read_text() == '{"threshold": 0.25}\n'


@pytest.mark.parametrize("python", ["with the data filter", "without it (3.11.2, the runner image)"])
def test_pvc_store_extracts_files_and_folders_inside_the_result_only(tmp_path, monkeypatch, python):
    """What the store's server streams back is extracted with tarfile's ``data`` filter where Python has it,
    and with the same checks by hand where it has not (mlflowctl export argo's runner: Debian's 3.11.2)."""
    import contextlib
    import io
    import tarfile

    from mlflowctl.errors import MlflowctlError
    from mlflowctl_plugins.pvc_store import _untar

    if python.startswith("without"):
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

    def archive(*members: tuple[str, bytes | None, str]) -> io.BytesIO:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data, link in members:
                info = tarfile.TarInfo(name)
                if link:
                    info.type, info.linkname = tarfile.SYMTYPE, link
                    tf.addfile(info)
                elif data is None:
                    info.type = tarfile.DIRTYPE
                    tf.addfile(info)
                else:
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        buf.seek(0)
        return buf

    good = tmp_path / "good"
    good.mkdir()
    _untar(archive(("concept", None, ""), ("concept/threshold.json", b"{}", "")), good)
    assert (good / "concept" / "threshold.json").read_bytes() == b"{}"
    for i, bad in enumerate([("../escaped", b"x", ""), ("link", None, "/etc/passwd")]):
        dest = tmp_path / f"bad{i}"
        dest.mkdir()
        with pytest.raises((MlflowctlError, tarfile.TarError)):
            _untar(archive(bad), dest)
        assert not (tmp_path / "escaped").exists() and not (dest / "link").is_symlink()
    # an absolute name: refused by hand, or made relative by the filter; never written where it points
    dest = tmp_path / "abs"
    dest.mkdir()
    with contextlib.suppress(MlflowctlError, tarfile.TarError):
        _untar(archive((f"{tmp_path}/outside", b"x", "")), dest)
    assert not (tmp_path / "outside").exists()


def test_pvc_store_refuses_writes_that_do_not_arrive_intact(pvc):
    import hashlib

    from mlflowctl.errors import MlflowctlError

    store, volume = pvc
    store.write_json("models/m/labels.json", {"stable": 1})
    body = b'{"stable": 2}\n'
    with pytest.raises(MlflowctlError, match="HTTP 400: body does not match its sha256"):
        store._request("PUT", "v1/file", params={"path": store._check("models/m/labels.json")}, data=body,
                       headers={"X-Content-SHA256": hashlib.sha256(b"something else").hexdigest()})
    assert store.read_json("models/m/labels.json") == {"stable": 1}
    # a folder whose files are not the ones the client sent is not published
    staging = store._new_staging("upload")
    store._request("PUT", "v1/file", params={"path": store._check(f"{staging}/weights.bin")}, data=b"abc")
    expect = {"weights.bin": {"bytes": 4, "sha256": hashlib.sha256(b"abcd").hexdigest()}}
    with pytest.raises(MlflowctlError, match="HTTP 400: upload damaged: weights.bin differs from what was sent"):
        store.publish_staged(staging, "results/sample/k9", {"_expect": expect})
    assert not store.exists("results/sample/k9")
    store.delete(staging)
    # the same check passes for an honest upload (publish() sends what it tarred)
    publish_sample(store, "results/sample/k10")
    assert store.damaged("results/sample/k10", deep=True) is None


# -- file modes: registry JSON like every other artifact, as the umask says --------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_store_files_follow_the_umask_registry_json_like_the_rest(tmp_path, mask):
    import stat

    from contract_fixtures import local_store
    from mlflowctl.model_registry import ModelRegistry

    old = os.umask(mask)
    try:
        store = local_store(tmp_path)
        registry = ModelRegistry(store, "m")
        with store.staging("version") as src:
            (src / "saved_model.pb").write_bytes(b"weights")
            (src / "concept").mkdir()
            (src / "concept" / "threshold.json").write_text("{}")
            registry.register(src, {"metrics": {}})
        registry.set_label("stable", 1)
        registry.set_verdict(1, "promoted", "test")
        with store.staging("result") as src:
            (src / "report.json").write_text("{}")
            assert store.publish(src, "results/integration_test/k1")
    finally:
        os.umask(old)
    files, folders = {}, {}
    for p in [*(store.root / "models").rglob("*"), *(store.root / "results").rglob("*")]:
        (files if p.is_file() else folders)[str(p.relative_to(store.root))] = stat.S_IMODE(p.stat().st_mode)
    assert {"models/m/labels.json", "models/m/status/1.json", "models/m/1/metadata.json",
            "models/m/1/_manifest.json", "models/m/1/saved_model.pb"} <= set(files)
    assert {name: oct(mode) for name, mode in files.items() if mode != 0o666 & ~mask} == {}
    assert {name: oct(mode) for name, mode in folders.items() if mode != 0o777 & ~mask} == {}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_serving_target_state_files_follow_the_umask(tmp_path, mask):
    """A target's state (TargetState, the local server's routing and info files) is written like every other
    file: the umask's mode, not mkstemp's 0600."""
    import stat

    from mlflowctl.target_state import TargetState

    old = os.umask(mask)
    try:
        state = TargetState(tmp_path / "target")
        with state.locked():
            state.write({"versions": {"1": {"path": "models/m/1"}}})
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / "target" / "state.json").stat().st_mode)) == oct(0o666 & ~mask)


# -- the publish boundary, in process (fast) -------------------------------------------------------------
def test_before_publish_sees_a_complete_output_and_a_veto_publishes_nothing(tmp_path):
    import mlflowctl
    from mlflowctl.errors import MlflowctlError
    from mlflowctl.pipeline import Pipeline, Stage
    from mlflowctl.project import Project as MlProject

    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "make.py").write_text(
        "import os, pathlib; pathlib.Path(os.environ['OUT'], 'value.txt').write_text('v')\n")
    (tmp_path / "mlflowctl.yaml").write_text("model_name: m\n")
    seen: list = []

    class Veto:
        __name__ = "veto"

        @mlflowctl.hookimpl
        def mlflowctl_before_publish(self, stage, run, path):
            seen.append((stage, path, sorted(p.name for p in run.outputs["OUT"].iterdir())))
            raise MlflowctlError("vetoed by the test")

        @mlflowctl.hookimpl
        def mlflowctl_on_stage_error(self, stage, run, error):
            seen.append(("error", str(error)))

    p = Pipeline(MlProject(tmp_path, {}, extra_plugins=(Veto(),)),
                 [Stage("produce", command=("python", "make.py"), code=("make.py",), output="OUT")])
    with pytest.raises(MlflowctlError, match="vetoed by the test"):
        p.run("produce")
    path = p.resolve(p.stages["produce"]).path
    assert seen == [("produce", path, ["value.txt"]), ("error", "vetoed by the test")]
    assert not p.project.store.exists(path)
    assert json.loads(p.run_state_path("produce").read_text())["state"] == "failed"
    assert not list((tmp_path / ".mlflowctl" / "store" / ".staging").iterdir())


def test_an_action_cancelled_while_it_runs_publishes_nothing(tmp_path):
    import mlflowctl
    from mlflowctl.errors import Cancelled
    from mlflowctl.pipeline import Pipeline, Stage
    from mlflowctl.project import Project as MlProject

    (tmp_path / "mlflowctl.yaml").write_text("model_name: m\n")
    (tmp_path / "image").mkdir()
    runs: list = []

    def action(project, ctx):
        (ctx.output / "value.txt").write_text("v")
        runs[0].cancelled.set()  # what the first Ctrl-C/SIGTERM does while an in-process action runs

    class Capture:
        __name__ = "capture"

        @mlflowctl.hookimpl
        def mlflowctl_before_stage(self, stage, run):
            runs.append(run)

    p = Pipeline(MlProject(tmp_path, {}, extra_plugins=(Capture(),)), [Stage("act", action=action)])
    with pytest.raises(Cancelled, match="stage act cancelled"):
        p.run("act")
    assert not p.project.store.exists(p.resolve(p.stages["act"]).path)


def test_sigterm_to_a_doit_waiting_for_the_run_lock_is_one_line(tmp_path):
    """Interrupted outside any stage (doit's up-to-date check, waiting for the lock): one line, no traceback."""
    from test_doit_cli import slow_stage_code

    root = make_project(tmp_path / "proj", stage_code=slow_stage_code(tmp_path))
    env = {**doit_env(), "PID_FILE": str(tmp_path / "first.pid")}
    pass_pid = "backends.local.pass_env=PID_FILE"  # stages see only what they are given
    first = subprocess.Popen([DOIT, "data", pass_pid], cwd=root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "first.pid").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.Popen([DOIT, "data", pass_pid], cwd=root, env={**env, "PID_FILE": str(tmp_path / "second.pid")},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (root / ".mlflowctl" / "run.lock").exists() or second.poll() is not None:
                assert second.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(2.0)  # waiting for the lock by now (it polls every 0.2 s)
            second.send_signal(signal.SIGTERM)
            output = second.communicate(timeout=60)[0]
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
    finally:
        first.kill()
        first.wait()
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[0].startswith("mlflowctl: waiting for another doit run"), output
    assert lines[-1] == ("mlflowctl: SIGTERM: stopped (results are published whole or not at all; a re-run "
                         "continues from there)"), output
    assert second.returncode != 0 and not (tmp_path / "second.pid").exists()
