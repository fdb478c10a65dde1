"""What both training stages share: their common settings, Keras ``fit`` as they run it, and the export.

Listed in the code of ``train_model`` and ``train_concept`` only (tasks/), so a change here re-trains and
touches no other stage's cache key.
"""
from __future__ import annotations

import os
import time

from common import env_dir, env_float, env_int, log


def epoch_logger(keras, stage: str, epochs: int):
    """A callback printing one flushed line per epoch: loss and the other metrics."""
    state = {}

    def begin(epoch, logs=None):
        state["t"] = time.perf_counter()

    def end(epoch, logs=None):
        parts = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted((logs or {}).items()))
        log(stage, f"epoch {epoch + 1}/{epochs}: {parts} ({time.perf_counter() - state['t']:.1f}s)")

    return keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)


def training_settings() -> dict:
    """The settings both training stages read (the declared defaults are in tasks/; these are the fallbacks of a
    run by hand, held equal to them by tests/test_core_declarations.py)."""
    return {
        "data_dir": env_dir("MNIST_DATA_DIR"),
        "models_dir": env_dir("MNIST_MODELS_DIR", must_exist=False),
        "learning_rate": env_float("LEARNING_RATE", 0.001, low=0.0),
        "epochs": env_int("EPOCHS", 5, minimum=1),
        "steps": env_int("STEPS", 0, minimum=0),
        "batch_size": env_int("BATCH_SIZE", 128, minimum=1),
        "seed": env_int("SEED", 42),
    }


def fit(keras, model, x, y, cfg: dict, stage: str, logs_dir: str) -> None:
    """Keras ``fit`` as both training stages run it: the settings' epochs, steps and batch, shuffled, one log
    line per epoch, TensorBoard logs in ``logs_dir``."""
    model.fit(
        x,
        y,
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        steps_per_epoch=cfg["steps"] or None,
        shuffle=True,
        verbose=0,
        callbacks=[
            epoch_logger(keras, stage, cfg["epochs"]),
            keras.callbacks.TensorBoard(log_dir=logs_dir, write_graph=False, profile_batch=0),
        ],
    )


def steps_per_execution(steps: int, most: int = 32) -> int:
    """Batches per compiled call (fewer Python round-trips: ~30% faster here).

    With a fixed STEPS per epoch it must divide STEPS, or Keras runs past it.
    """
    if steps <= 0:
        return most
    return max(d for d in range(1, min(steps, most) + 1) if steps % d == 0)


def export_savedmodel(tf, keras, model, serve, out_dir: str, name: str = "saved_model") -> str:
    """Export ``serve`` (images float32 [-1, 784] -> dict of outputs) as the
    ``serving_default`` signature of a SavedModel at ``out_dir/name``.

    Written to a temp dir and renamed into place, so a failed export never
    leaves a half-written model behind.
    """
    import shutil

    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            name="serving_default",
            fn=serve,
            input_signature=[tf.TensorSpec([None, 784], tf.float32, name="images")],
        )
        archive.write_out(tmp, verbose=False)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
