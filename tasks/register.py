"""Stage ``register``: the trained classifier (with its concept model) becomes version N."""
from mlflowctl.model_registry import drop_superseded_version, register_model
from mlflowctl.pipeline import Registration, Stage

REGISTER = Stage(
    name="register",
    action=register_model,
    inputs=(("MODEL_DIR", "train_model"), ("CONCEPT_DIR", "train_concept")),
    registers=Registration(
        servable=("MODEL_DIR", "saved_model"),
        concept=("CONCEPT_DIR", "saved_model"),
        files=(("CONCEPT_DIR", "threshold.json", "concept/threshold.json"),),
        metrics={"metrics": ("MODEL_DIR", "metrics.json"), "concept_metrics": ("CONCEPT_DIR", "metrics.json")},
    ),
    keys=("model_name",),
    superseded=drop_superseded_version,
    doc="register the trained model as the next version under models/<name>/<N>/",
)
