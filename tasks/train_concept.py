"""Stage ``train_concept``: the drift-detecting autoencoder and its threshold."""
from mlflowctl.config import Setting
from mlflowctl.pipeline import Stage

TRAIN_CONCEPT = Stage(
    name="train_concept",
    command=("python", "train_concept.py"),
    code=("train_concept.py", "training.py", "common.py"),
    inputs=(("MNIST_DATA_DIR", "data"),),
    output="MNIST_MODELS_DIR",
    settings={
        "learning_rate": Setting(float, 0.001, "Adam learning rate of the autoencoder", min=1e-12, max=10),
        "epochs": Setting(int, 5, "training epochs", min=1, max=100_000),
        "steps": Setting(int, 0, "steps per epoch (0: the whole training set)", min=0),
        "batch_size": Setting(int, 128, "batch size", min=1, max=1_000_000),
        "threshold_quantile": Setting(float, 0.99, "quantile of training reconstruction errors used as drift "
                                                   "threshold", min=0, max=1),
        "seed": Setting(int, 42, "random seed", min=0, max=2**32 - 1),
    },
    doc="train the autoencoder that flags out-of-distribution inputs",
)
