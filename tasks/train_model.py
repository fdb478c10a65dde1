"""Stage ``train_model``: the classifier, exported as a SavedModel with its metrics."""
from mlflowctl.doit_glue import stage_task
from mlflowctl.pipeline import Stage

TRAIN_MODEL = Stage(
    name="train_model",
    command=("python", "train_model.py"),
    code=("train_model.py", "common.py"),
    inputs=(("MNIST_DATA_DIR", "data"),),
    output="MNIST_MODELS_DIR",
    replicas="workers",
    doc="train the 256-64 DNN classifier and export it as a SavedModel",
)


def task_train_model():
    return stage_task(TRAIN_MODEL)
