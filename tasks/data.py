"""Stage ``data``: fetch, verify and parse the IDX files into ``train.npz`` / ``t10k.npz``."""
from mlflowctl.config import Setting
from mlflowctl.pipeline import Stage

DATA = Stage(
    name="data",
    command=("python", "download.py"),
    code=("download.py", "common.py"),
    output="MNIST_DATA_DIR",
    pass_env=("DATA_CACHE_DIR",),  # a download cache: where files are kept, not what they hold (hash-checked)
    settings={
        "dataset": Setting(str, "fashion-mnist", "dataset to fetch", choices=("fashion-mnist", "mnist")),
        "sources": Setting(list, [], "ordered base URLs/paths tried for the IDX files (empty: the dataset's "
                                     "defaults)", env="DATA_SOURCES"),
        "download_timeout": Setting(float, 30.0, "seconds per download attempt", min=0.001, max=86400),
    },
    doc="fetch and verify the dataset, parse it into train.npz / t10k.npz",
)
