"""The artifact-store contract (shipped as ``mlflowctl.testing.store_contract``), run against every store in
contract_fixtures.STORES."""
from __future__ import annotations

import pytest

from contract_fixtures import STORE_FIXTURES, STORES
from mlflowctl.testing.store_contract import *  # noqa: F401,F403 - the suite's tests


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    if request.param in STORE_FIXTURES:
        request.getfixturevalue(STORE_FIXTURES[request.param])
    s = STORES[request.param](tmp_path)
    s.preflight()
    return s
