"""The example project's pipeline, declared once: ``STAGES`` (dodo.py hands it to doit; mlflowctl reads it).

Each stage is one declaration in its own module: command, code, inputs, output and its settings.
"""
from .data import DATA
from .deploy import DEPLOY
from .integration_test import INTEGRATION_TEST
from .monitor import MONITOR
from .promote import PROMOTE
from .register import REGISTER
from .train_concept import TRAIN_CONCEPT
from .train_model import TRAIN_MODEL

STAGES = (DATA, TRAIN_MODEL, TRAIN_CONCEPT, REGISTER, DEPLOY, INTEGRATION_TEST, PROMOTE, MONITOR)
