"""Stage ``deploy``: the serving target serves the new version as ``canary`` beside ``stable``."""
from mlflowctl.pipeline import Stage
from mlflowctl.promotion import deploy_version, deployment_holds

DEPLOY = Stage(
    name="deploy",
    action=deploy_version,
    still_valid=deployment_holds,
    inputs=(("VERSION_DIR", "register"),),
    params="serving",
    doc="serve the registered version (as canary) on the configured serving target",
)
