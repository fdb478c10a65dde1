"""Stage ``register``: the trained classifier (with its concept model) becomes version N."""
from mlflowctl.pipeline import Registration
from mlflowctl.stages import register_stage

REGISTER = register_stage(
    Registration(
        servable=("MODEL_DIR", "saved_model"),
        concept=("CONCEPT_DIR", "saved_model"),
        files=(("CONCEPT_DIR", "threshold.json", "concept/threshold.json"),),
        metrics={"metrics": ("MODEL_DIR", "metrics.json"), "concept_metrics": ("CONCEPT_DIR", "metrics.json")},
    ),
    inputs=(("MODEL_DIR", "train_model"), ("CONCEPT_DIR", "train_concept")),
)
