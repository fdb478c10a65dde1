"""Stage ``promote``: the tested version becomes ``stable`` if it passed; else it is withdrawn."""
from mlflowctl.stages import promote_stage

PROMOTE = promote_stage(gate="integration_test",
                        doc="promote the version to stable if it passed the integration test, else roll it back")
