"""Stage ``train_model``: the classifier, exported as a SavedModel with its metrics."""
from mlflowctl.config import Setting
from mlflowctl.pipeline import Stage

TRAIN_MODEL = Stage(
    name="train_model",
    command=("python", "train_model.py"),
    code=("train_model.py", "training.py", "common.py"),
    inputs=(("MNIST_DATA_DIR", "data"),),
    output="MNIST_MODELS_DIR",
    settings={
        "learning_rate": Setting(float, 0.001, "Adam learning rate", min=1e-12, max=10),
        "epochs": Setting(int, 5, "training epochs", min=1, max=100_000),
        "steps": Setting(int, 0, "steps per epoch (0: the whole training set)", min=0),
        "batch_size": Setting(int, 128, "batch size", min=1, max=1_000_000),
        "seed": Setting(int, 42, "random seed", min=0, max=2**32 - 1),
        "workers": Setting(int, 1, "training processes working as one (tf.distribute.MultiWorkerMirroredStrategy); "
                                   ">1: the backend runs that many replicas with a TF_CONFIG naming them all", min=1),
    },
    replicas="workers",
    doc="train the 256-64 DNN classifier and export it as a SavedModel",
)
