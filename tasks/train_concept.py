"""Stage ``train_concept``: the drift-detecting autoencoder and its threshold."""
from mlflowctl.doit_glue import stage_task
from mlflowctl.pipeline import Stage

TRAIN_CONCEPT = Stage(
    name="train_concept",
    command=("python", "train_concept.py"),
    code=("train_concept.py", "common.py"),
    inputs=(("MNIST_DATA_DIR", "data"),),
    output="MNIST_MODELS_DIR",
    doc="train the autoencoder that flags out-of-distribution inputs",
)


def task_train_concept():
    return stage_task(TRAIN_CONCEPT)
