"""Stage ``data``: fetch, verify and parse the IDX files into ``train.npz`` / ``t10k.npz``."""
from mlflowctl.doit_glue import stage_task
from mlflowctl.pipeline import Stage

DATA = Stage(
    name="data",
    command=("python", "download.py"),
    code=("download.py", "common.py"),
    output="MNIST_DATA_DIR",
    doc="fetch and verify the dataset, parse it into train.npz / t10k.npz",
)


def task_data():
    return stage_task(DATA)
