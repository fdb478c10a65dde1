"""Stage ``train_concept``: train the drift-detecting autoencoder and export a SavedModel.

Env: MNIST_DATA_DIR (train.npz/t10k.npz), MNIST_MODELS_DIR (output), LEARNING_RATE
(0.001), EPOCHS (5), STEPS (0 = full epochs), BATCH_SIZE (128), THRESHOLD_QUANTILE
(0.99, in (0, 1)), SEED (42).

An image whose reconstruction error (mean squared error over its 784 pixels)
is above ``threshold`` -- the THRESHOLD_QUANTILE of the training errors -- is
unlike the training data.

Outputs in MNIST_MODELS_DIR:
  saved_model/    signature ``serving_default``: images float32 [-1, 784] -> reconstruction_error float32 [-1]
  threshold.json  {"threshold", "quantile", "histogram": {"edges", "counts"}} (training errors, 50 bins)
  metrics.json    threshold, train/test error means, fraction of t10k above threshold, settings
  logs/           TensorBoard
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import (  # noqa: E402
    as_features,
    env_float,
    load_split,
    log,
    main,
    make_dir,
    write_json_atomic,
)
from training import export_savedmodel, fit, steps_per_execution, training_settings  # noqa: E402

STAGE = "train_concept"
HISTOGRAM_BINS = 50


def settings() -> dict:
    return {**training_settings(), "quantile": env_float("THRESHOLD_QUANTILE", 0.99, low=0.0, high=1.0)}


def build_model(keras, learning_rate: float, steps: int = 0):
    model = keras.Sequential(
        [
            keras.Input(shape=(784,), name="images"),
            keras.layers.Dense(256, activation="relu", name="encoder1"),
            keras.layers.Dense(128, activation="relu", name="code"),
            keras.layers.Dense(256, activation="relu", name="decoder1"),
            keras.layers.Dense(784, activation="sigmoid", name="reconstruction"),
        ],
        name="concept_autoencoder",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="mse",
        steps_per_execution=steps_per_execution(steps),
    )
    return model


def reconstruction_errors(model, x, batch_size: int = 2048):
    """Per-image MSE, float32 [N] (numpy, computed the same way as the served signature)."""
    import numpy as np

    recon = model.predict(x, batch_size=batch_size, verbose=0)
    return np.mean(np.square(recon - x), axis=1, dtype=np.float32)


def run() -> None:
    cfg = settings()
    x_train, _ = load_split(cfg["data_dir"], "train")
    x_test, _ = load_split(cfg["data_dir"], "t10k")
    make_dir("MNIST_MODELS_DIR", cfg["models_dir"])

    import numpy as np
    import tensorflow as tf
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    x_train, x_test = as_features(x_train), as_features(x_test)
    model = build_model(keras, cfg["learning_rate"], cfg["steps"])
    log(
        STAGE,
        f"training autoencoder on {len(x_train)} images: epochs={cfg['epochs']} steps={cfg['steps'] or 'full'} "
        f"batch_size={cfg['batch_size']} learning_rate={cfg['learning_rate']} seed={cfg['seed']}",
    )
    started = time.perf_counter()
    fit(keras, model, x_train, x_train, cfg, STAGE, os.path.join(cfg["models_dir"], "logs"))
    train_seconds = time.perf_counter() - started

    train_err = reconstruction_errors(model, x_train)
    test_err = reconstruction_errors(model, x_test)
    threshold = float(np.quantile(train_err, cfg["quantile"]))
    counts, edges = np.histogram(train_err, bins=HISTOGRAM_BINS)
    above = float(np.mean(test_err > threshold))
    log(
        STAGE,
        f"reconstruction error: train mean {train_err.mean():.5f}, t10k mean {test_err.mean():.5f}; "
        f"threshold (q={cfg['quantile']}) {threshold:.5f}; t10k above threshold {above:.2%}",
    )

    def serve(images):
        recon = tf.cast(model(images, training=False), tf.float32)
        return {"reconstruction_error": tf.reduce_mean(tf.square(recon - images), axis=1)}

    path = export_savedmodel(tf, keras, model, serve, cfg["models_dir"])
    log(STAGE, f"exported SavedModel to {path}")

    write_json_atomic(
        os.path.join(cfg["models_dir"], "threshold.json"),
        {
            "threshold": threshold,
            "quantile": cfg["quantile"],
            "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
        },
    )
    write_json_atomic(
        os.path.join(cfg["models_dir"], "metrics.json"),
        {
            "threshold": threshold,
            "quantile": cfg["quantile"],
            "train_error_mean": float(train_err.mean()),
            "test_error_mean": float(test_err.mean()),
            "test_above_threshold": above,
            "epochs": cfg["epochs"],
            "steps": cfg["steps"],
            "batch_size": cfg["batch_size"],
            "learning_rate": cfg["learning_rate"],
            "seed": cfg["seed"],
            "train_seconds": round(train_seconds, 3),
            "optimizer_steps": int(model.optimizer.iterations.numpy()),
            "train_count": int(len(x_train)),
            "test_count": int(len(x_test)),
        },
    )
    log(STAGE, "wrote threshold.json, metrics.json")


if __name__ == "__main__":
    main(STAGE, run)
