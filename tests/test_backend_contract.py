"""The execution-backend contract (shipped as ``mlflowctl.testing.backend_contract``), run against every
backend in contract_fixtures.BACKENDS."""
from __future__ import annotations

import pytest

from contract_fixtures import BACKENDS
from mlflowctl.testing.backend_contract import *  # noqa: F401,F403 - the suite's tests


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    b = BACKENDS[request.param](tmp_path)
    b.preflight()
    return b
