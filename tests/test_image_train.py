"""The training stage scripts (image/train_model.py, image/train_concept.py), run for real.

Each script runs as a subprocess with EPOCHS=1 STEPS=5 on the real Fashion-MNIST;
the exported SavedModels are loaded back with TensorFlow in ANOTHER subprocess
(this test process never imports TensorFlow).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

IMAGE_DIR = Path(__file__).resolve().parents[1] / "image"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {DEBIAN_DIR} (apt-get install dataset-fashion-mnist)",
)

STAGE_VARS = (
    "MNIST_DATA_DIR MNIST_MODELS_DIR LEARNING_RATE EPOCHS STEPS BATCH_SIZE SEED THRESHOLD_QUANTILE "
    "DATASET DATA_SOURCES DATA_CACHE_DIR"
).split()


def stage_env(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in STAGE_VARS}
    full.update(PYTHONDONTWRITEBYTECODE="1", **{k: str(v) for k, v in env.items()})
    return full


def run_script(script: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script], cwd=IMAGE_DIR, env=stage_env(**env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    proc = run_script("download.py", timeout=120, MNIST_DATA_DIR=out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> dict:
    """Train both models at once (two subprocesses in parallel); return their output dirs and logs."""
    root = tmp_path_factory.mktemp("models")
    procs = {}
    for script in ("train_model.py", "train_concept.py"):
        models = root / script.removesuffix(".py")
        out = open(root / f"{script}.out", "w+")
        err = open(root / f"{script}.err", "w+")
        env = stage_env(MNIST_DATA_DIR=data_dir, MNIST_MODELS_DIR=models, EPOCHS=1, STEPS=5, BATCH_SIZE=64)
        procs[script] = (subprocess.Popen([sys.executable, script], cwd=IMAGE_DIR, env=env, stdout=out, stderr=err),
                         models, out, err)
    result = {}
    for script, (proc, models, out, err) in procs.items():
        rc = proc.wait(timeout=300)
        out.seek(0), err.seek(0)
        result[script] = {"dir": models, "rc": rc, "stdout": out.read(), "stderr": err.read()}
        out.close(), err.close()
    return result


INSPECT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf

    data_dir, *model_dirs = sys.argv[1:]
    with np.load(os.path.join(data_dir, "t10k.npz")) as npz:
        x = npz["x"][:16].reshape(16, 784).astype("float32") / 255.0
    spec = lambda t: {"shape": t.shape.as_list(), "dtype": t.dtype.name}
    report = {}
    for d in model_dirs:
        loaded = tf.saved_model.load(os.path.join(d, "saved_model"))
        sig = loaded.signatures["serving_default"]
        args, kwargs = sig.structured_input_signature
        report[d] = {
            "signatures": sorted(loaded.signatures.keys()),
            "positional_inputs": len(args),
            "inputs": {k: spec(v) for k, v in kwargs.items()},
            "outputs": {k: spec(v) for k, v in sig.structured_outputs.items()},
            "result": {k: v.numpy().tolist() for k, v in sig(images=tf.constant(x)).items()},
        }
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def inspected(trained, data_dir) -> dict:
    dirs = [str(trained[s]["dir"]) for s in ("train_model.py", "train_concept.py")]
    for s in ("train_model.py", "train_concept.py"):
        assert trained[s]["rc"] == 0, trained[s]["stderr"]
    proc = subprocess.run(
        [sys.executable, "-c", INSPECT, str(data_dir), *dirs], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": report[dirs[0]], "concept": report[dirs[1]]}


# ----------------------------------------------------------------- classifier
def test_train_model_runs_and_reports_epochs(trained):
    run = trained["train_model.py"]
    assert run["rc"] == 0, run["stderr"]
    assert "train_model: epoch 1/1: accuracy " in run["stdout"] and " loss " in run["stdout"]
    assert "Traceback" not in run["stderr"]
    names = set(os.listdir(run["dir"]))
    assert {"saved_model", "metrics.json", "logs"} <= names
    assert not any(n.startswith(".") for n in names), names  # no temp leftovers
    assert any(files for _, _, files in os.walk(run["dir"] / "logs"))
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["accuracy"] > 0.3  # 5 steps already beat chance
    assert math.isfinite(metrics["loss"])
    assert (metrics["epochs"], metrics["steps"], metrics["batch_size"]) == (1, 5, 64)
    assert metrics["optimizer_steps"] == 5  # STEPS is honoured exactly
    assert metrics["learning_rate"] == 0.001 and metrics["train_seconds"] >= 0


def test_classifier_signature(inspected):
    model = inspected["model"]
    assert "serving_default" in model["signatures"]
    assert model["positional_inputs"] == 0
    assert model["inputs"] == {"images": {"shape": [None, 784], "dtype": "float32"}}
    assert model["outputs"] == {"probabilities": {"shape": [None, 10], "dtype": "float32"}}
    probs = np.array(model["result"]["probabilities"])
    assert probs.shape == (16, 10)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- autoencoder
def test_train_concept_runs_and_writes_threshold(trained):
    run = trained["train_concept.py"]
    assert run["rc"] == 0, run["stderr"]
    assert "train_concept: epoch 1/1: loss " in run["stdout"]
    names = set(os.listdir(run["dir"]))
    assert {"saved_model", "metrics.json", "threshold.json", "logs"} <= names
    assert not any(n.startswith(".") for n in names), names
    th = json.loads((run["dir"] / "threshold.json").read_text())
    assert th["quantile"] == 0.99
    assert th["threshold"] > 0 and math.isfinite(th["threshold"])
    edges, counts = th["histogram"]["edges"], th["histogram"]["counts"]
    assert len(edges) == len(counts) + 1 and 40 <= len(counts) <= 60
    assert edges == sorted(edges) and edges[0] <= th["threshold"] <= edges[-1]
    assert sum(counts) == 60000
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    assert metrics["threshold"] == th["threshold"] and metrics["epochs"] == 1
    assert metrics["optimizer_steps"] == 5
    assert 0 < metrics["train_error_mean"] < th["threshold"]
    assert 0 < metrics["test_error_mean"] < 1


def test_concept_signature(inspected, trained):
    concept = inspected["concept"]
    assert "serving_default" in concept["signatures"]
    assert concept["positional_inputs"] == 0
    assert concept["inputs"] == {"images": {"shape": [None, 784], "dtype": "float32"}}
    assert concept["outputs"] == {"reconstruction_error": {"shape": [None], "dtype": "float32"}}
    err = np.array(concept["result"]["reconstruction_error"])
    assert err.shape == (16,)
    assert (err > 0).all() and (err < 1).all()
    # served errors are on the same scale as the training errors behind the threshold
    mean = json.loads((trained["train_concept.py"]["dir"] / "metrics.json").read_text())["test_error_mean"]
    assert 0.3 * mean < err.mean() < 3 * mean


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("script", ["train_model.py", "train_concept.py"])
@pytest.mark.parametrize(
    "env, variable",
    [
        ({"EPOCHS": "abc"}, "EPOCHS"),
        ({"EPOCHS": "0"}, "EPOCHS"),
        ({"LEARNING_RATE": "fast"}, "LEARNING_RATE"),
        ({"BATCH_SIZE": "1.5"}, "BATCH_SIZE"),
        ({"MNIST_DATA_DIR": None}, "MNIST_DATA_DIR"),
    ],
)
def test_bad_setting_exits_2_with_one_line(script, env, variable, data_dir, tmp_path):
    settings = {"MNIST_DATA_DIR": data_dir, "MNIST_MODELS_DIR": tmp_path / "models", **env}
    proc = run_script(script, timeout=60, **{k: v for k, v in settings.items() if v is not None})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0], proc.stderr


@pytest.mark.parametrize("quantile", ["1.5", "0", "1", "x"])
def test_bad_threshold_quantile(quantile, data_dir, tmp_path):
    proc = run_script(
        "train_concept.py", timeout=60, MNIST_DATA_DIR=data_dir, MNIST_MODELS_DIR=tmp_path, THRESHOLD_QUANTILE=quantile
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "THRESHOLD_QUANTILE" in lines[0], proc.stderr


@pytest.mark.parametrize("script", ["train_model.py", "train_concept.py"])
def test_missing_input_data_is_one_line(script, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(script, timeout=60, MNIST_DATA_DIR=empty, MNIST_MODELS_DIR=tmp_path / "models")
    assert proc.returncode == 3
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.npz" in lines[0] and "data stage" in lines[0], proc.stderr
