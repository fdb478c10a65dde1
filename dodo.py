"""The pipeline, for doit: ``doit``, ``doit -n 2``, ``doit backend=docker``, ``doit train_model.epochs=3``.

The stages are declared in ``tasks/`` (``STAGES``); every ``key=value`` on doit's command line overrides
that key of mlflowctl.yaml.
"""
from pathlib import Path

from mlflowctl import doit_glue

ROOT = Path(__file__).resolve().parent
DOIT_CONFIG = doit_glue.doit_config(ROOT)
PIPELINE = doit_glue.load(ROOT)  # doit finds its create_doit_tasks: one task per stage
