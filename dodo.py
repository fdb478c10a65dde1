"""The pipeline, for doit: ``doit``, ``doit -n 2``, ``doit backend=docker``, ``doit train_model.epochs=3``.

Every ``key=value`` on doit's command line overrides that key of mlflowctl.yaml.
"""
from pathlib import Path

from mlflowctl import doit_glue

ROOT = Path(__file__).resolve().parent
DOIT_CONFIG = doit_glue.doit_config(ROOT)
doit_glue.load(ROOT)

from tasks.data import task_data  # noqa: E402,F401
from tasks.register import task_register  # noqa: E402,F401
from tasks.train_concept import task_train_concept  # noqa: E402,F401
from tasks.train_model import task_train_model  # noqa: E402,F401
from tasks.deploy import task_deploy  # noqa: E402,F401
from tasks.integration_test import task_integration_test  # noqa: E402,F401
from tasks.monitor import task_monitor  # noqa: E402,F401
from tasks.promote import task_promote  # noqa: E402,F401
