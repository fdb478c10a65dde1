"""A ``tensorflow_model_server`` stand-in: the project's own model server (``serve.py``) started the
way the ``tensorflow/serving`` container starts TF Serving.

The ``tensorflow/serving`` image cannot be pulled here, so the ``tfserving`` serving target's tests
run this script as the ENTRYPOINT of an image derived from the project's stage image. It reads what
TF Serving reads and nothing else:

* ``MODEL_NAME`` (default ``model``) and ``MODEL_BASE_PATH`` (default ``/models``): one model served
  from ``$MODEL_BASE_PATH/$MODEL_NAME``, its highest version (TF Serving's default policy);
* or ``--model_config_file=FILE`` (text protobuf ``ModelServerConfig``: ``model_config_list { config {
  name base_path model_platform model_version_policy version_labels } }``), re-read every
  ``--model_config_file_poll_wait_seconds`` (TF Serving's flag; 0 reads it once);
* ``--port`` (gRPC, 8500) and ``--rest_api_port`` (REST, 8501), on all interfaces like TF Serving.

The config becomes ``serve.py``'s routing file (versions + labels) in a private temporary folder,
which ``serve.py --watch-routing`` re-reads. Other ``tensorflow_model_server`` flags are accepted
and ignored (printed once). Only one model per server (``serve.py`` serves one name): a config with
several is refused at start. The config is parsed with TF Serving's own protobuf
(``tensorflow_serving.config.model_server_config_pb2``, from ``tensorflow-serving-api``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class ConfigProblem(ValueError):
    """The model config file cannot be served; the message says why."""


def _versions_on_disk(base: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())
    except OSError:
        return []


def parse_model_config(text: str) -> dict[str, Any]:
    """``{"name", "base_path", "policy": ("specific", [v..]) | ("latest", n) | ("all", None), "labels"}``."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigProblem(f"not a ModelServerConfig text protobuf: {exc}") from None
    models = list(config.model_config_list.config)
    if len(models) != 1:
        raise ConfigProblem(f"this server serves exactly one model, the config lists {len(models)}")
    m = models[0]
    if m.model_platform not in ("", "tensorflow"):
        raise ConfigProblem(f"model_platform {m.model_platform!r} is not supported (tensorflow only)")
    which = m.model_version_policy.WhichOneof("policy_choice")
    if which == "specific":
        policy: tuple[str, Any] = ("specific", sorted(int(v) for v in m.model_version_policy.specific.versions))
    elif which == "all":
        policy = ("all", None)
    else:
        policy = ("latest", int(m.model_version_policy.latest.num_versions or 1))
    return {"name": m.name, "base_path": m.base_path, "policy": policy,
            "labels": {str(k): int(v) for k, v in m.version_labels.items()}}


def routing_for(model: dict[str, Any]) -> dict[str, Any]:
    """``serve.py``'s routing file for a parsed config (versions per the policy, labels as given)."""
    kind, arg = model["policy"]
    if kind == "specific":
        versions = list(arg)
    else:
        on_disk = _versions_on_disk(Path(model["base_path"]))
        versions = on_disk if kind == "all" else on_disk[-arg:]
    return {"versions": versions, "labels": dict(model["labels"]), "canary_weight": 0.0}


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="tensorflow_model_server (mlflowctl stand-in)", allow_abbrev=False)
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0: off)")
    p.add_argument("--rest_api_port", type=int, default=8501)
    p.add_argument("--model_name", default=os.environ.get("MODEL_NAME", "model"))
    p.add_argument("--model_base_path", default=None)
    p.add_argument("--model_config_file", default="")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, ignored = _args(sys.argv[1:] if argv is None else argv)
    if ignored:
        print(f"tf_serving_entrypoint: ignoring flags this stand-in does not implement: {' '.join(ignored)}",
              flush=True)
    poll = max(0.0, args.model_config_file_poll_wait_seconds)

    def load() -> dict[str, Any]:
        if args.model_config_file:
            return parse_model_config(Path(args.model_config_file).read_text())
        base = args.model_base_path or os.path.join(os.environ.get("MODEL_BASE_PATH", "/models"), args.model_name)
        return {"name": args.model_name, "base_path": base, "policy": ("latest", 1), "labels": {}}

    try:
        model = load()
    except (OSError, ConfigProblem) as exc:
        print(f"tf_serving_entrypoint: cannot read the model config {args.model_config_file}: {exc}", flush=True)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tfserving-"))
    routing_file = workdir / "routing.json"
    current = routing_for(model)
    _write_atomic(routing_file, current)
    cmd = [sys.executable, str(HERE / "serve.py"), "--model-name", model["name"], "--base-path", model["base_path"],
           "--routing", str(routing_file), "--watch-routing", str(poll or 1.0), "--host", "0.0.0.0",
           "--port", str(args.rest_api_port), "--grpc-port", str(args.port), "--grpc-host", "0.0.0.0"]
    print(f"tf_serving_entrypoint: serving {model['name']} from {model['base_path']}: {json.dumps(current)}", flush=True)
    child = subprocess.Popen(cmd, cwd=str(HERE))

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while child.poll() is None:
        time.sleep(poll or 1.0)
        if not poll:
            continue
        try:
            fresh = load()
        except (OSError, ConfigProblem) as exc:  # TF Serving keeps the last good config too
            print(f"tf_serving_entrypoint: keeping the last config, the new one is unusable: {exc}", flush=True)
            continue
        if fresh["name"] != model["name"] or fresh["base_path"] != model["base_path"]:
            print("tf_serving_entrypoint: keeping the last config: a changed model name or base path needs a restart",
                  flush=True)
            continue
        routing = routing_for(fresh)
        if routing != current:
            _write_atomic(routing_file, routing)
            current = routing
            print(f"tf_serving_entrypoint: new config: {json.dumps(current)}", flush=True)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main())
