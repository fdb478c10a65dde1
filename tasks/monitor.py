"""Stage ``monitor``: drift of live traffic against the training distribution, with a plot."""
from mlflowctl.doit_glue import stage_task
from mlflowctl.pipeline import Stage

MONITOR = Stage(
    name="monitor",
    command=("python", "monitor.py"),
    code=("monitor.py", "endpoint_client.py", "common.py"),
    inputs=(("ENDPOINT_DIR", "promote"), ("CONCEPT_DIR", "train_concept")),
    output="OUTPUT_DIR",
    doc="report drift of the stable version's live traffic (markdown + PNG); fail above monitor.max_drift_rate",
)


def task_monitor():
    return stage_task(MONITOR)
