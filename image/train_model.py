"""Stage ``train_model``: train the Fashion-MNIST classifier and export a SavedModel.

Env: MNIST_DATA_DIR (train.npz/t10k.npz), MNIST_MODELS_DIR (output), LEARNING_RATE
(0.001), EPOCHS (5), STEPS (0 = full epochs, >0 = steps per epoch), BATCH_SIZE (128), SEED (42),
TF_CONFIG (optional: when it names more than one task, this process is one replica of a
tf.distribute.MultiWorkerMirroredStrategy job; BATCH_SIZE is then the global batch; only the chief,
type ``chief`` or else ``worker`` 0, writes MNIST_MODELS_DIR, the others a throwaway folder).

Outputs in MNIST_MODELS_DIR:
  saved_model/   signature ``serving_default``: images float32 [-1, 784] -> probabilities float32 [-1, 10]
  metrics.json   accuracy/loss on t10k + training settings
  logs/          TensorBoard
"""
from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import (  # noqa: E402
    as_features,
    load_split,
    log,
    main,
    make_dir,
    SettingError,
    write_json_atomic,
)
from training import export_savedmodel, fit, steps_per_execution, training_settings  # noqa: E402

STAGE = "train_model"


def settings() -> dict:
    # Read (and validate) everything before importing TensorFlow: a bad value fails in milliseconds.
    return training_settings()


def replica() -> tuple[int, bool]:
    """(number of tasks named by TF_CONFIG, is this process the chief?); (1, True) without TF_CONFIG."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 1, True
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config.get("cluster") or {}, tf_config.get("task") or {}
        tasks = sum(len(addresses) for kind, addresses in cluster.items() if kind in ("chief", "worker"))
        kind, index = task.get("type", "worker"), int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError):
        raise SettingError(f"TF_CONFIG is not JSON of the form {{\"cluster\": ..., \"task\": ...}}: {raw[:80]!r}") from None
    chief = kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))
    return max(tasks, 1), chief


def fit_distributed(tf, keras, cfg: dict, x_train, y_train, logs_dir: str, chief: bool):
    """Train under MultiWorkerMirroredStrategy with a custom loop (Keras 3's ``fit`` does not take
    multi-worker distributed batches); return a plain (undistributed) copy of the trained model.

    BATCH_SIZE is the global batch, split across the replicas; every replica must run the same
    number of steps, which it does: the step count comes from the settings, not from the data.
    """
    import math

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    log(STAGE, f"{replicas} replicas in sync ({'chief' if chief else 'worker'})")
    batch = cfg["batch_size"]
    steps = cfg["steps"] or math.ceil(len(x_train) / batch)
    with strategy.scope():
        model = build_model(keras, cfg["learning_rate"])
        optimizer = model.optimizer
    dataset = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
               .shuffle(len(x_train), seed=cfg["seed"], reshuffle_each_iteration=True)
               .repeat().batch(batch, drop_remainder=True))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = iter(strategy.experimental_distribute_dataset(dataset.with_options(options)))

    def step(images, labels):
        with tf.GradientTape() as tape:
            probs = model(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, probs)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.cast(labels, tf.int64), tf.argmax(probs, axis=1)), tf.float32))
        return loss, correct

    @tf.function
    def train_step(iterator):
        loss, correct = strategy.run(step, args=next(iterator))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    writer = tf.summary.create_file_writer(os.path.join(logs_dir, "train")) if chief else None
    for epoch in range(cfg["epochs"]):
        began, loss_sum, correct_sum = time.perf_counter(), 0.0, 0.0
        for _ in range(steps):
            loss, correct = train_step(batches)
            loss_sum += float(loss)
            correct_sum += float(correct)
        epoch_loss, epoch_accuracy = loss_sum / steps, correct_sum / (steps * batch)
        log(STAGE, f"epoch {epoch + 1}/{cfg['epochs']}: accuracy {epoch_accuracy:.4f}, loss {epoch_loss:.4f} "
                   f"({time.perf_counter() - began:.1f}s, {steps * batch / (time.perf_counter() - began):.0f} samples/s)")
        if writer is not None:
            with writer.as_default():
                tf.summary.scalar("epoch_loss", epoch_loss, step=epoch)
                tf.summary.scalar("epoch_accuracy", epoch_accuracy, step=epoch)
    if writer is not None:
        writer.close()
    plain = build_model(keras, cfg["learning_rate"])  # outside the strategy: evaluated and exported as usual
    plain.set_weights(model.get_weights())
    plain.optimizer.iterations.assign(int(optimizer.iterations.numpy()))
    return plain


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
    workers, chief = replica()
    x_train, y_train = load_split(cfg["data_dir"], "train")
    x_test, y_test = load_split(cfg["data_dir"], "t10k")
    if chief:
        make_dir("MNIST_MODELS_DIR", cfg["models_dir"])

    import tensorflow as tf
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    x_train, x_test = as_features(x_train), as_features(x_test)
    log(
        STAGE,
        f"training on {len(x_train)} images: epochs={cfg['epochs']} steps={cfg['steps'] or 'full'} "
        f"batch_size={cfg['batch_size']} learning_rate={cfg['learning_rate']} seed={cfg['seed']} workers={workers}",
    )
    logs_dir = os.path.join(cfg["models_dir"], "logs")
    started = time.perf_counter()
    if workers > 1:
        model = fit_distributed(tf, keras, cfg, x_train, y_train, logs_dir, chief)
        if not chief:  # the chief's model is the result; this replica's work is done
            log(STAGE, f"replica done in {time.perf_counter() - started:.1f}s; the chief writes the model")
            return
    else:
        model = build_model(keras, cfg["learning_rate"], cfg["steps"])
        fit(keras, model, x_train, y_train, cfg, STAGE, logs_dir)
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
            "workers": workers,
            "train_seconds": round(train_seconds, 3),
            "optimizer_steps": int(model.optimizer.iterations.numpy()),
            "train_count": int(len(x_train)),
            "test_count": int(len(x_test)),
        },
    )
    log(STAGE, "wrote metrics.json")


if __name__ == "__main__":
    main(STAGE, run)
