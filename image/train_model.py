"""Stage ``train_model``: train the Fashion-MNIST classifier and export a SavedModel.

Env: MNIST_DATA_DIR (train.npz/t10k.npz), MNIST_MODELS_DIR (output), LEARNING_RATE
(0.001), EPOCHS (5), STEPS (0 = full epochs, >0 = steps per epoch), BATCH_SIZE (128), SEED (42).

Outputs in MNIST_MODELS_DIR:
  saved_model/   signature ``serving_default``: images float32 [-1, 784] -> probabilities float32 [-1, 10]
  metrics.json   accuracy/loss on t10k + training settings
  logs/          TensorBoard
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import (  # noqa: E402
    as_features,
    env_dir,
    env_float,
    env_int,
    epoch_logger,
    export_savedmodel,
    load_split,
    log,
    main,
    make_dir,
    steps_per_execution,
    write_json_atomic,
)

STAGE = "train_model"


def settings() -> dict:
    # Read (and validate) everything before importing TensorFlow: a bad value fails in milliseconds.
    return {
        "data_dir": env_dir("MNIST_DATA_DIR"),
        "models_dir": env_dir("MNIST_MODELS_DIR", must_exist=False),
        "learning_rate": env_float("LEARNING_RATE", 0.001, low=0.0),
        "epochs": env_int("EPOCHS", 5, minimum=1),
        "steps": env_int("STEPS", 0, minimum=0),
        "batch_size": env_int("BATCH_SIZE", 128, minimum=1),
        "seed": env_int("SEED", 42),
    }


def build_model(keras, learning_rate: float, steps: int = 0):
    model = keras.Sequential(
        [
            keras.Input(shape=(784,), name="images"),
            keras.layers.Dense(256, activation="relu", name="hidden1"),
            keras.layers.Dense(64, activation="relu", name="hidden2"),
            keras.layers.Dense(10, activation="softmax", name="probabilities"),
        ],
        name="classifier",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution(steps),
    )
    return model


def export(tf, keras, model, out_dir: str) -> str:
    """Write the serving SavedModel atomically to ``out_dir/saved_model``."""

    def serve(images):
        return {"probabilities": tf.cast(model(images, training=False), tf.float32)}

    return export_savedmodel(tf, keras, model, serve, out_dir)


def run() -> None:
    cfg = settings()
    x_train, y_train = load_split(cfg["data_dir"], "train")
    x_test, y_test = load_split(cfg["data_dir"], "t10k")
    make_dir("MNIST_MODELS_DIR", cfg["models_dir"])

    import tensorflow as tf
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    x_train, x_test = as_features(x_train), as_features(x_test)
    model = build_model(keras, cfg["learning_rate"], cfg["steps"])
    steps = cfg["steps"] or None
    log(
        STAGE,
        f"training on {len(x_train)} images: epochs={cfg['epochs']} steps={cfg['steps'] or 'full'} "
        f"batch_size={cfg['batch_size']} learning_rate={cfg['learning_rate']} seed={cfg['seed']}",
    )
    logs_dir = os.path.join(cfg["models_dir"], "logs")
    started = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        steps_per_epoch=steps,
        shuffle=True,
        verbose=0,
        callbacks=[
            epoch_logger(keras, STAGE, cfg["epochs"]),
            keras.callbacks.TensorBoard(log_dir=logs_dir, write_graph=False, profile_batch=0),
        ],
    )
    train_seconds = time.perf_counter() - started
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
    log(STAGE, f"t10k: loss {loss:.4f}, accuracy {accuracy:.4f} (trained in {train_seconds:.1f}s)")

    path = export(tf, keras, model, cfg["models_dir"])
    log(STAGE, f"exported SavedModel to {path}")
    write_json_atomic(
        os.path.join(cfg["models_dir"], "metrics.json"),
        {
            "accuracy": float(accuracy),
            "loss": float(loss),
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
    log(STAGE, "wrote metrics.json")


if __name__ == "__main__":
    main(STAGE, run)
