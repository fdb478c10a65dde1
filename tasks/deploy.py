"""Stage ``deploy``: the serving target serves the new version as ``canary`` beside ``stable``."""
from mlflowctl.stages import deploy_stage

DEPLOY = deploy_stage(register="register")
