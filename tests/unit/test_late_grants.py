"""Legs a publish left out because their storage node did not answer, granted once it answers
(csi/controller/late_grants.py), against the fake agents of the controller's tests: the record keeps them
durably, the grant names the node, the other leg's agent learns where the leg is, and an unpublish ends it."""

from __future__ import annotations

import pytest

from csi import errors, ids
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_controller import WORKER
from tests.unit.test_replicas import agent, create, key_of, publish, svc  # noqa: F401 - svc is a fixture


def ungranted(svc, v):
    return svc.placement.journal.get(key_of(v)).ungranted


def test_a_leg_left_out_of_a_publish_is_granted_once_its_node_answers(svc):
    v = create(svc)
    agent(svc, "s2").down = True                                    # leg 0's agent
    publish(svc, v)
    assert ungranted(svc, v) == [{"leg": 0, "initiator": WORKER, "node": "worker-1", "read_only": False}]
    assert svc.replicas.late.run_once() == 0                        # still down: kept
    assert len(ungranted(svc, v)) == 1
    agent(svc, "s2").down = False
    assert svc.replicas.late.run_once() == 1
    assert [(i.iqn, i.node) for i in agent(svc, "s2").volumes[key_of(v)].initiators] == [(WORKER, "worker-1")]
    peer = agent(svc, "s1").peer_legs[key_of(v)]
    assert (peer.index, peer.storage_node, peer.agent, peer.target_iqn) == (
        0, "s2", "10.0.0.12:7600", ids.target_iqn("vg", key_of(v)))
    assert ungranted(svc, v) == [] and svc.replicas.late.run_once() == 0
    publish(svc, v)                                                 # a repeated publish: nothing to record
    assert ungranted(svc, v) == []


def test_an_unpublished_volume_gets_no_late_grant(svc):
    v = create(svc)
    agent(svc, "s2").down = True
    publish(svc, v)
    unpublish = csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER)
    with pytest.raises(errors.CsiError):      # s2 cannot confirm its revoke; s1's is done
        svc.ControllerUnpublishVolume(unpublish, None)
    agent(svc, "s2").down = False
    assert svc.replicas.late.run_once() == 0  # s1 no longer holds it for the worker: nothing to grant
    assert list(agent(svc, "s2").volumes[key_of(v)].initiators) == [] and ungranted(svc, v) == []
    agent(svc, "s2").down = True
    publish(svc, v)
    agent(svc, "s2").down = False
    svc.ControllerUnpublishVolume(unpublish, None)
    assert ungranted(svc, v) == []            # the unpublish forgets them


def test_a_node_no_longer_granted_the_other_leg_is_not_granted_this_one(svc):
    """The record's item outlived its publish (an unpublish that could not clear it): the other leg's grants
    say the node no longer holds the volume, so nothing is granted and the item goes."""
    v = create(svc)
    agent(svc, "s2").down = True
    publish(svc, v)
    agent(svc, "s1").call("RevokeAccess", apb.RevokeAccessRequest(vg="vg", lv=key_of(v), initiator_iqn=WORKER))
    agent(svc, "s2").down = False
    assert svc.replicas.late.run_once() == 0
    assert ungranted(svc, v) == [] and list(agent(svc, "s2").volumes[key_of(v)].initiators) == []


def test_a_controller_that_takes_over_finds_the_items_in_the_journal(svc):
    from csi.controller.late_grants import LateGrants
    from csi.controller.replicas import legs_of
    v = create(svc)
    agent(svc, "s2").down = True
    publish(svc, v)
    agent(svc, "s2").down = False
    assert LateGrants(svc, legs_of).run_once() == 1                 # a new controller: no note, one scan
    assert ungranted(svc, v) == []


def test_the_legs_outdated_mark_goes_with_its_late_grant(svc):
    v = create(svc)
    agent(svc, "s2").down = True
    publish(svc, v)
    svc.replicas.set_leg_state(key_of(v), "s2", "outdated")
    agent(svc, "s2").down = False
    assert svc.replicas.late.run_once() == 1
    peer = agent(svc, "s1").peer_legs[key_of(v)]
    assert (peer.storage_node, peer.outdated, list(peer.replaces)) == ("s2", True, [])


def test_a_node_unpublished_by_another_controller_during_the_grant_is_revoked_again(svc):
    """The loop runs in every controller replica and the volume's lock is per process: an unpublish by the
    other replica may land between the look at the grants and the grant. The grants are read again after."""
    v = create(svc)
    agent(svc, "s2").down = True
    publish(svc, v)
    agent(svc, "s2").down = False
    s2 = agent(svc, "s2")
    real = s2.call

    def unpublished_meanwhile(method, request, timeout=None, reconnect=True):
        if method == "GrantAccess":
            agent(svc, "s1").call("RevokeAccess", apb.RevokeAccessRequest(vg="vg", lv=key_of(v),
                                                                          initiator_iqn=WORKER))
        return real(method, request, timeout, reconnect)
    s2.call = unpublished_meanwhile
    assert svc.replicas.late.run_once() == 0
    assert list(s2.volumes[key_of(v)].initiators) == [] and ungranted(svc, v) == []
    assert key_of(v) not in agent(svc, "s1").peer_legs
