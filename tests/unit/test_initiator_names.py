"""Initiator names with upper-case letters (issue 12): iSCSI names compare case-insensitively (RFC 3720
3.2.6.1) and LIO lower-cases the name an initiator logs in with, so the driver accepts any case and works
with the lower-case form everywhere: NodeGetInfo's node_id, the controller, the agent's grants and ACLs."""

from __future__ import annotations

import pytest

from csi import errors, ids
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_agent_cost import agent  # noqa: F401 - fixture
from tests.unit.test_controller import cap, create, svc  # noqa: F401 - fixture
from tests.unit.test_hostile import FakeLio
from tests.unit.test_node_stage import node  # noqa: F401 - fixture

LOWER = "iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1"
UPPER = "iqn.2026-11.dev.csi.lvm-iscsi.lab:Worker-1"


@pytest.mark.parametrize("value, normal", [(LOWER, LOWER), (UPPER, LOWER), ("IQN.1993-08.ORG.DEBIAN:01:ABCDEF",
                                                                             "iqn.1993-08.org.debian:01:abcdef"),
                                           ("iqn.2026-11.x:\u212a", None),   # KELVIN SIGN lower-cases to "k"
                                           ("iqn.2026-11.x:-a;reboot", None), ("", None)])
def test_normalize_iqn(value, normal):
    assert ids.normalize_iqn(value) == normal
    assert ids.is_iqn(value) is (normal is not None)


def test_node_get_info_reports_the_lower_case_name(node):
    node.config.initiator_name_file.write_text(f"## written by hand\nInitiatorName={UPPER}\n")
    assert node.NodeGetInfo(csi.NodeGetInfoRequest(), None).node_id == LOWER


def test_controller_grants_and_revokes_the_lower_case_name(svc):  # noqa: F811
    v = create(svc)
    agent = svc.agents.get(ids.parse_id(v.volume_id).node)
    lv = ids.parse_id(v.volume_id).lv

    def publish(node_id):
        return svc.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=v.volume_id, node_id=node_id, volume_capability=cap()), None).publish_context
    ctx = publish(UPPER)
    assert [i.iqn for i in agent.volumes[lv].initiators] == [LOWER]
    # the same node in the other case is the same node: not a second one (SINGLE_NODE_WRITER)
    assert publish(LOWER) == ctx
    svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=UPPER), None)
    assert not agent.volumes[lv].initiators


def test_agent_keeps_grants_and_acls_in_lower_case(agent):  # noqa: F811
    a, _, _ = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-upper", pool="thin", size_bytes=64 << 20,
                                                 attributes={"accessType": "mount"}), None)
    a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=UPPER), None)
    first = a.records.load(vol.vg, vol.lv).grants[LOWER].chap_secret
    a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=LOWER), None)
    assert a.records.load(vol.vg, vol.lv).grants[LOWER].chap_secret == first   # one grant, one secret
    lio: FakeLio = a.lio
    assert [acl.initiator for acl in lio.acls(vol.target_iqn)] == [LOWER]
    assert list(a.records.load(vol.vg, vol.lv).grants) == [LOWER]
    a.RevokeAccess(apb.RevokeAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=UPPER), None)
    assert lio.acls(vol.target_iqn) == [] and not a.records.load(vol.vg, vol.lv).grants
    with pytest.raises(errors.CsiError) as e:
        a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn="iqn.2026-11.x:\u212a"), None)
    assert e.value.code == errors.Code.INVALID_ARGUMENT
