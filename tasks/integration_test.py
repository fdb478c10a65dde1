"""Stage ``integration_test``: held-out images (clean, noisy, random) against the live endpoint."""
from mlflowctl.doit_glue import stage_task
from mlflowctl.pipeline import Stage

INTEGRATION_TEST = Stage(
    name="integration_test",
    command=("python", "integration_test.py"),
    code=("integration_test.py", "endpoint_client.py", "common.py"),
    inputs=(("MNIST_DATA_DIR", "data"), ("ENDPOINT_DIR", "deploy")),
    output="OUTPUT_DIR",
    doc="test the live endpoint: accuracy on clean images, drift flagged on noisy ones",
)


def task_integration_test():
    return stage_task(INTEGRATION_TEST)
