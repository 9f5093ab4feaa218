"""replace-replica-leg (csi/legreplace.py) against the fake agents of the controller's tests: what it refuses,
the record naming the new leg before it is made, the old leg deleted once its node answers again."""

from __future__ import annotations

import io

import pytest

from csi import ids
from csi.config import StorageNode
from csi.controller.replicas import IN_SYNC, OUTDATED
from csi.legreplace import replace_with
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_controller import WORKER
from tests.unit.test_replicas import build, create, key_of, publish

GiB = 1 << 30


@pytest.fixture
def svc(tmp_path):
    return build(tmp_path, (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "a"),
                            StorageNode("s3", "10.0.0.13:7600", "a")),
                 {"s1": 10 * GiB, "s2": 20 * GiB, "s3": 5 * GiB})


def run(svc, volume, node, to, yes=True):
    out = io.StringIO()
    rc = replace_with(svc.placement.journal, svc.agents, volume.volume_id, node, to, out, yes)
    return rc, out.getvalue()


def lost(svc, volume, node, survivor_state="A."):
    """`node` is down for good; the other leg's superblock shows what the worker's md wrote there."""
    svc.agents.get(node).down = True
    entry = svc.placement.journal.get(key_of(volume))
    for d in entry.legs:
        if d["node"] != node:
            svc.agents.get(d["node"]).superblocks[key_of(volume)] = apb.LegSuperblock(
                present=True, name=ids.md_name(key_of(volume)), array_state=survivor_state, events=9)


def test_a_lost_leg_is_replaced_by_a_blank_one_and_the_old_deleted_once_its_node_answers(svc):
    v = create(svc, size=GiB)
    assert [d["node"] for d in svc.placement.journal.get(key_of(v)).legs] == ["s2", "s1"]
    lost(svc, v, "s1")
    rc, out = run(svc, v, "s1", "s3", yes=False)
    assert rc == 0 and "dry run" in out and key_of(v) not in svc.agents.get("s3").volumes
    rc, out = run(svc, v, "s1", "s3")
    assert rc == 0 and "replaced" in out, out
    entry = svc.placement.journal.get(key_of(v))
    assert [(d["node"], d["state"]) for d in entry.legs] == [("s2", IN_SYNC), ("s3", IN_SYNC)]
    assert [d["node"] for d in entry.replaced] == ["s1"]
    made = svc.agents.get("s3").volumes[key_of(v)]
    assert made.attributes["replicaLeg"] == "1" and made.size_bytes == entry.legs[0]["size"]
    assert run(svc, v, "s1", "s3")[0] == 0            # again: it finishes, changes nothing
    ctx = publish(svc, v)                             # s1 still down: its old leg stays recorded
    assert "s1" not in ctx.values() and svc.placement.journal.get(key_of(v)).replaced
    svc.agents.get("s1").down = False
    publish(svc, v)
    assert not svc.placement.journal.get(key_of(v)).replaced and key_of(v) not in svc.agents.get("s1").volumes


@pytest.mark.parametrize("case", ["answers", "not proven", "other outdated", "no room", "holds a leg"])
def test_what_replace_refuses(svc, case):
    v = create(svc, size=GiB)
    lost(svc, v, "s1", survivor_state="AA" if case == "not proven" else "A.")
    to = "s2" if case == "holds a leg" else "s3"
    if case == "answers":
        svc.agents.get("s1").down = False
    if case == "other outdated":
        svc.replicas.set_leg_state(key_of(v), "s2", OUTDATED)
    if case == "no room":
        svc.agents.get("s3").available = GiB // 2
    before = svc.placement.journal.get(key_of(v)).legs
    rc, out = run(svc, v, "s1", to)
    assert rc == 1, out
    assert svc.placement.journal.get(key_of(v)).legs == before and key_of(v) not in svc.agents.get("s3").volumes


def test_an_operator_outdated_leg_needs_no_superblock_proof(svc):
    v = create(svc, size=GiB)
    lost(svc, v, "s1", survivor_state="AA")
    svc.replicas.set_leg_state(key_of(v), "s1", OUTDATED)
    assert run(svc, v, "s1", "s3")[0] == 0


def test_deleting_a_volume_waits_for_its_replaced_leg(svc):
    v = create(svc, size=GiB)
    lost(svc, v, "s1")
    assert run(svc, v, "s1", "s3")[0] == 0
    with pytest.raises(Exception) as e:
        svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    assert "s1" in str(e.value)
    svc.agents.get("s1").down = False
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    assert all(key_of(v) not in svc.agents.get(n).volumes for n in ("s1", "s2", "s3"))
    assert svc.placement.journal.get(key_of(v)) is None


def test_the_worker_running_the_volume_is_granted_the_new_leg_and_told_where_it_is(svc):
    """Kubernetes keeps the publish_context it has: the command grants the new leg to the node the other leg
    is granted to and tells the other leg's agent where the new leg is, for that node's plugin (GetPeerLeg)."""
    v = create(svc, size=GiB)
    publish(svc, v)
    lost(svc, v, "s1")
    rc, out = run(svc, v, "s1", "s3")
    assert rc == 0 and "worker-1 add(s) it to the running array" in out, out
    s3 = svc.agents.get("s3").volumes[key_of(v)]
    assert [(i.iqn, i.node, i.read_only) for i in s3.initiators] == [(WORKER, "worker-1", False)]
    peer = svc.agents.get("s2").peer_legs[key_of(v)]
    assert (peer.index, peer.storage_node, peer.vg, peer.agent, peer.target_iqn, list(peer.portals), peer.lun,
            list(peer.replaces), peer.outdated) == (
        1, "s3", "vg", "10.0.0.13:7600", ids.target_iqn("vg", key_of(v)), ["10.0.0.1:3260"], 0, ["s1"], False)


def test_a_node_unpublished_while_the_command_grants_the_new_leg_is_revoked_from_it(svc):
    v = create(svc, size=GiB)
    publish(svc, v)
    lost(svc, v, "s1")
    s2 = svc.agents.get("s2")
    real = s2.call

    def unpublished_meanwhile(method, request, timeout=None, reconnect=True):
        if method == "SetPeerLeg":    # the unpublish revoked s2 (and s3, before the command's grant there)
            real("RevokeAccess", apb.RevokeAccessRequest(vg="vg", lv=key_of(v), initiator_iqn=WORKER))
        return real(method, request, timeout, reconnect)
    s2.call = unpublished_meanwhile
    rc, out = run(svc, v, "s1", "s3")
    assert rc == 0 and "No node has the volume now" in out, out
    assert list(svc.agents.get("s3").volumes[key_of(v)].initiators) == []


def test_no_node_has_the_volume_no_grant_no_peer(svc):
    v = create(svc, size=GiB)
    lost(svc, v, "s1")
    rc, out = run(svc, v, "s1", "s3")
    assert rc == 0 and "the next to stage it" in out, out
    assert svc.agents.get("s2").peer_legs == {} and list(svc.agents.get("s3").volumes[key_of(v)].initiators) == []
