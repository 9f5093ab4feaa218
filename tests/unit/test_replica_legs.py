"""The agent's look at a replicated volume's leg (csi/storage/replica_legs.py): the LV's buffers dropped, then
mdadm's own reading of the superblock (recorded output); plain volumes and unknown LVs refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from csi import capabilities as caps
from csi import errors
from csi.proto import agent_pb2 as pb
from csi.storage import replica_legs
from csi.storage.records import VolumeRecord
from tests.unit.conftest import recorded

LEG = {caps.ATTR_REPLICAS: "2", caps.ATTR_LEG: "1"}


def service(attributes=None, deleting=False):
    records = {} if attributes is None else {("csi-vg", "c1-pvc"): VolumeRecord(
        "pvc", "thin", "csi-vg", "c1-pvc", 1 << 30, attributes, "iqn.x", deleting=deleting)}
    return SimpleNamespace(records=SimpleNamespace(load=lambda vg, lv: records.get((vg, lv))),
                           config=SimpleNamespace(node_name="storage-2"))


def test_a_leg_is_read_past_the_page_cache(fake_run):
    fake_run.on("blockdev", "--flushbufs")
    fake_run.on("mdadm", "--examine", "--export", rc=0, stdout=recorded("mdadm_examine_export_both.stdout"))
    fake_run.on("mdadm", "--examine", "/dev/csi-vg/c1-pvc", rc=0, stdout=recorded("mdadm_examine_alone.stdout"))
    sb = replica_legs.examine(service(LEG), pb.ExamineLegRequest(vg="csi-vg", lv="c1-pvc"))
    assert sb.present and sb.array_state == "A." and sb.name == "lvmiscsi:0123456789abcdef" and not sb.recovering
    assert fake_run.calls[0] == ["blockdev", "--flushbufs", "/dev/csi-vg/c1-pvc"]


def test_a_leg_no_array_was_made_on_has_no_superblock(fake_run):
    fake_run.on("blockdev", "--flushbufs")
    fake_run.on("mdadm", "--examine", "--export", rc=1, stdout="",
                stderr="mdadm: No md superblock detected on /dev/csi-vg/c1-pvc.\n")
    assert replica_legs.examine(service(LEG), pb.ExamineLegRequest(vg="csi-vg", lv="c1-pvc")) == \
        pb.LegSuperblock(present=False)


@pytest.mark.parametrize("attributes, deleting, code", [
    (None, False, errors.Code.NOT_FOUND), (LEG, True, errors.Code.NOT_FOUND),
    ({}, False, errors.Code.INVALID_ARGUMENT)])
def test_only_a_leg_here_is_examined(fake_run, attributes, deleting, code):
    with pytest.raises(errors.CsiError) as e:
        replica_legs.examine(service(attributes, deleting), pb.ExamineLegRequest(vg="csi-vg", lv="c1-pvc"))
    assert e.value.code == code and fake_run.calls == []
