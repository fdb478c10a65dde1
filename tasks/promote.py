"""Stage ``promote``: the tested version becomes ``stable`` if it passed; else it is withdrawn."""
from mlflowctl.pipeline import Stage
from mlflowctl.promotion import promote_version

PROMOTE = Stage(
    name="promote",
    action=promote_version,
    inputs=(("REPORT_DIR", "integration_test"), ("ENDPOINT_DIR", "deploy")),
    params="integration_test",
    doc="promote the version to stable if it passed the integration test, else roll it back",
)
