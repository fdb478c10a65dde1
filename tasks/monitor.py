"""Stage ``monitor``: drift of live traffic against the training distribution, with a plot."""
from mlflowctl.config import Setting
from mlflowctl.pipeline import Stage

MONITOR = Stage(
    name="monitor",
    command=("python", "monitor.py"),
    code=("monitor.py", "endpoint_client.py", "common.py"),
    inputs=(("ENDPOINT_DIR", "promote"),),  # its endpoint.json and concept/: the stable version's own
    output="OUTPUT_DIR",
    settings={
        "max_drift_rate": Setting(float, 0.5, "share of out-of-distribution requests above which monitor fails",
                                  min=0, max=1),
    },
    doc="report drift of the stable version's live traffic (markdown + PNG); fail above monitor.max_drift_rate",
)
