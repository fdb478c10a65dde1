"""The serving-target contract: every serving target must pass these tests.

Import them into a test module and give them a module-scoped ``serving_kit`` fixture (see
:func:`mlflowctl.testing.make_serving_kit`)::

    from mlflowctl.testing.serving_contract import *  # noqa: F401,F403

The tests share the kit's target (one server for the module) but each sets up the deployment it
checks, so they pass in any order: deploy -> ready -> predict, a second version beside the first,
canary weight, labels, undeploy, errors, idempotent re-deploy, stop and deploy again.
"""
from __future__ import annotations

import pytest

from mlflowctl.errors import MlflowctlError
from mlflowctl.serving import PROTOCOLS, Endpoint, ServingStatus

CANARY_REQUESTS = 8  # requests that must all reach the canary at weight 1 (and the stable one at weight 0)


def _baseline(kit) -> None:
    """Version 1 stable and alone labelled; version 2 deployed without weight, then unlabelled."""
    kit.target.deploy(kit.versions[1], label="stable")
    kit.target.set_label("canary", None)


def test_contract_status_is_typed(serving_kit):
    status = serving_kit.target.status()
    assert isinstance(status, ServingStatus), f"status() returned {type(status).__name__}, not ServingStatus"
    assert status.target == serving_kit.target.name
    assert all(isinstance(v.version, int) for v in status.versions)


def test_contract_deploy_answers_with_its_version(serving_kit):
    kit = serving_kit
    kit.target.preflight()
    ep = kit.target.deploy(kit.versions[1], label="stable")
    assert isinstance(ep, Endpoint) and ep.version == 1 and ep.model_name == kit.project.model_name
    assert ep.protocol in PROTOCOLS
    assert kit.predict(ep) == kit.answers[1]
    assert kit.target.serves(1)
    status = kit.target.status()
    assert status.running and status.available(1) and status.labels.get("stable") == 1


def test_contract_second_version_beside_the_first(serving_kit):
    kit = serving_kit
    _baseline(kit)
    ep2 = kit.target.deploy(kit.versions[2], label="canary")
    assert ep2.version == 2 and kit.predict(ep2) == kit.answers[2]
    assert kit.predict(kit.target.endpoint(version=1)) == kit.answers[1]
    assert kit.predict(kit.target.endpoint(version=2)) == kit.answers[2]
    canary = kit.target.endpoint(label="canary")
    assert canary.version == 2 and kit.predict(canary) == kit.answers[2]
    default = kit.target.endpoint()
    assert default.version == 1 and kit.predict(default) == kit.answers[1]  # weight 0: the canary gets none
    assert kit.target.serves(1) and kit.target.serves(2)


def test_contract_deploy_without_a_label(serving_kit):
    kit = serving_kit
    _baseline(kit)
    ep = kit.target.deploy(kit.versions[2], label=None)
    assert ep.version == 2 and kit.predict(kit.target.endpoint(version=2)) == kit.answers[2]
    assert 2 not in kit.target.status().labels.values()  # served, but no label points at it
    assert kit.predict(kit.target.endpoint()) == kit.answers[1]


def test_contract_canary_weight_routes_unlabelled_traffic(serving_kit):
    kit = serving_kit
    _baseline(kit)
    if not kit.supports_weights:  # its documented answer instead: a traffic share is refused, nothing changes
        with pytest.raises(MlflowctlError):
            kit.target.deploy(kit.versions[2], label="canary", weight=1.0)
        assert "canary" not in kit.target.status().labels
        assert [kit.predict(kit.target.endpoint()) for _ in range(CANARY_REQUESTS)] == [kit.answers[1]] * CANARY_REQUESTS
        return
    kit.target.deploy(kit.versions[2], label="canary", weight=1.0)
    default = kit.target.endpoint()
    assert [kit.predict(default) for _ in range(CANARY_REQUESTS)] == [kit.answers[2]] * CANARY_REQUESTS
    kit.target.set_label("canary", None)  # no canary: all unlabelled traffic is stable's again
    assert [kit.predict(default) for _ in range(CANARY_REQUESTS)] == [kit.answers[1]] * CANARY_REQUESTS


def test_contract_labels_move_and_go(serving_kit):
    kit = serving_kit
    _baseline(kit)
    kit.target.deploy(kit.versions[2], label="canary")
    kit.target.set_label("stable", 2)
    assert kit.target.endpoint().version == 2 and kit.predict(kit.target.endpoint()) == kit.answers[2]
    kit.target.set_label("canary", None)
    kit.target.set_label("canary", None)  # removing an absent label is no error
    assert "canary" not in kit.target.status().labels
    with pytest.raises(MlflowctlError):
        kit.target.endpoint(label="canary")
    kit.target.set_label("stable", 1)
    assert kit.predict(kit.target.endpoint()) == kit.answers[1]
    assert kit.target.status().labels.get("stable") == 1


def test_contract_undeploy_leaves_the_others(serving_kit):
    kit = serving_kit
    _baseline(kit)
    kit.target.deploy(kit.versions[2], label="canary")
    kit.target.undeploy(2)
    assert not kit.target.serves(2)
    assert "canary" not in kit.target.status().labels  # its labels went with it
    with pytest.raises(MlflowctlError):
        kit.target.endpoint(version=2)
    kit.target.undeploy(2)  # not served: no error
    assert kit.predict(kit.target.endpoint()) == kit.answers[1] and kit.target.serves(1)


def test_contract_errors_are_mlflowctl_errors(serving_kit):
    kit = serving_kit
    _baseline(kit)
    with pytest.raises(MlflowctlError):
        kit.target.endpoint(version=99)
    with pytest.raises(MlflowctlError):
        kit.target.endpoint(label="no-such-label")
    with pytest.raises(MlflowctlError):
        kit.target.set_label("stable", 99)
    with pytest.raises(MlflowctlError):  # a version that cannot be served: refused ...
        kit.target.deploy(kit.versions[kit.broken], label="canary")
    assert not kit.target.serves(kit.broken)
    assert kit.predict(kit.target.endpoint()) == kit.answers[1]  # ... and the others keep answering
    assert kit.target.status().labels.get("stable") == 1


def test_contract_redeploy_is_idempotent(serving_kit):
    kit = serving_kit
    _baseline(kit)
    first = kit.target.deploy(kit.versions[1], label="stable")
    again = kit.target.deploy(kit.versions[1], label="stable")
    assert first.version == again.version == 1 and first.predict_url == again.predict_url
    assert [v.version for v in kit.target.status().versions].count(1) == 1
    assert kit.predict(again) == kit.answers[1]


def test_contract_stop_then_deploy_again(serving_kit):
    kit = serving_kit
    if not kit.supports_stop:
        pytest.skip("mlflowctl cannot stop this target (ServingKit.supports_stop=False)")
    _baseline(kit)
    kit.target.stop()
    assert not kit.target.serves(1)
    assert kit.target.status().running is False
    kit.target.stop()  # stopping a stopped target is no error
    ep = kit.target.deploy(kit.versions[1], label="stable")
    assert kit.predict(ep) == kit.answers[1] and kit.target.serves(1)
