"""linefit's pipeline, for doit (the same three lines as any mlflowctl project)."""
from pathlib import Path

from mlflowctl import doit_glue

ROOT = Path(__file__).resolve().parent
DOIT_CONFIG = doit_glue.doit_config(ROOT)
PIPELINE = doit_glue.load(ROOT)
