"""The docker backend's one container specification: run and render use the same spec; --mount is structured.

Against the real Docker engine and the real ``docker`` CLI (issue 11: "the rendered docker script builds
--mount by string (a comma in a path injects options)").
"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from mlflowctl.backends import StageRun
from test_docker_backend import containers_of, docker_client, docker_project, no_leftover_containers  # noqa: F401


def comma_run(project, tmp_path: Path, stage: str) -> StageRun:
    """An input whose path holds a comma and what would be a mount option: ``a,readonly=false,target=/etc``."""
    inp = tmp_path / "in,readonly=false,target=/tmp" / "x"
    out = tmp_path / "out,ro"
    inp.mkdir(parents=True)
    out.mkdir()
    (inp / "input.txt").write_text("hello through a comma")
    return StageRun(stage=stage, command=["python", "stage.py"], workdir=project.stage_code_dir,
                    env={"GREETING": "comma"}, inputs={"IN_DIR": inp}, outputs={"OUT_DIR": out},
                    log_path=tmp_path / "logs" / f"{stage}.log", key="k1")


def test_run_and_render_share_one_spec(tmp_path, docker_client):
    project = docker_project(tmp_path / "proj")
    backend = project.backend
    run = comma_run(project, tmp_path, "spec")
    spec = backend.container_spec(run, name="fixed")
    args = spec.cli_args()
    assert backend.docker_run_args(run, name="fixed") == args
    mounts = [args[i + 1] for i, a in enumerate(args) if a == "--mount"]
    assert [m.source for m in spec.mounts[:2]] == [str(run.inputs["IN_DIR"]), str(run.outputs["OUT_DIR"])]
    # each path is one quoted CSV field: its comma cannot start an option
    assert mounts[0] == f'type=bind,"source={run.inputs["IN_DIR"]}",target=/mnt/inputs/IN_DIR,readonly'
    kwargs = spec.sdk_kwargs()
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in kwargs["mounts"]] == \
        [(m.source, m.target, m.read_only) for m in spec.mounts]
    assert kwargs["environment"] == spec.environment and kwargs["labels"] == spec.labels


@pytest.mark.parametrize("how", ["rendered script", "backend run"])
def test_a_comma_in_a_path_stays_part_of_the_path(tmp_path, docker_client, how):
    project = docker_project(tmp_path / "proj")
    stage = f"comma-{'render' if how == 'rendered script' else 'run'}"
    run = comma_run(project, tmp_path, stage)
    project.backend.ensure_image()
    if how == "rendered script":
        script = project.backend.render(run, tmp_path / "rendered")[-1]
        assert "--mount " + shlex.quote(f'type=bind,"source={run.inputs["IN_DIR"]}",target=/mnt/inputs/IN_DIR,'
                                        f'readonly') in script.read_text()
        proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        output = proc.stdout
    else:
        lines: list[str] = []
        run.echo = lines.append
        assert project.backend.run(run).ok
        output = "\n".join(lines)
    assert "input says hello through a comma" in output and "input is read-only" in output, output
    assert (run.outputs["OUT_DIR"] / "sub" / "result.txt").read_text() == "written in a container"
    assert not containers_of(docker_client, stage)
