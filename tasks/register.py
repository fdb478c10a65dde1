"""Stage ``register``: the trained classifier (with its concept model) becomes version N."""
from mlflowctl.doit_glue import stage_task
from mlflowctl.model_registry import drop_superseded_version, register_trained_model
from mlflowctl.pipeline import Stage

REGISTER = Stage(
    name="register",
    action=register_trained_model,
    inputs=(("MODEL_DIR", "train_model"), ("CONCEPT_DIR", "train_concept")),
    keys=("model_name",),
    superseded=drop_superseded_version,
    doc="register the trained model as the next version under models/<name>/<N>/",
)


def task_register():
    return stage_task(REGISTER)
