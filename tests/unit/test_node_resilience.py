"""The node plugin after a fault: a session whose target is gone, and the start-up clean-up after a reboot
(found by tests/e2e/test_resilience.py; these would have caught both)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csi import errors, ids
from csi.config import NodeConfig
from csi.node import mount
from csi.node.iscsi import Iscsiadm, Session
from csi.node.service import NodeService
from csi.proto import csi_pb2 as csi
from tests.unit.conftest import recorded_failure

VID = "v1:storage-1:csi-vg:e2e-vol-0123456789"
REF = ids.parse_id(VID)
PORTAL = "10.213.1.11:3260"


def session_line(sid: int, iqn: str) -> str:
    return f"tcp: [{sid}] {PORTAL},1 {iqn} (non-flash)\n"


@pytest.fixture
def sysfs(iscsi_sysfs):
    return iscsi_sysfs.set_state


@pytest.fixture
def node(tmp_path):
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    initiator = tmp_path / "initiatorname.iscsi"
    initiator.write_text("InitiatorName=iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1\n")
    return NodeService(NodeConfig(ids.DRIVER_NAME, "worker-1", kubelet.resolve(), initiator, "zone-a", 16,
                                  kubelet / "plugins" / ids.DRIVER_NAME / "staged"))


def test_session_state_comes_from_sysfs(sysfs):
    sysfs(3, "FAILED")
    assert Iscsiadm().session_state(Session(3, PORTAL, REF.iqn)) == "FAILED"
    assert Iscsiadm().session_state(Session(4, PORTAL, REF.iqn)) == ""   # no such session in sysfs


def _health(node: NodeService) -> list:
    return list(node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(volume_id=VID), None)
                .volume_health.health_statuses)


@pytest.mark.parametrize("state, abnormal", [("LOGGED_IN", False), ("FAILED", True), ("FREE", True)])
def test_a_session_that_lost_its_target_is_abnormal(fake_run, sysfs, node, state, abnormal):
    """The target deleted under a staged volume: iscsiadm still lists the session (the initiator tries to log
    in again), only its kernel state says it carries no I/O."""
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(7, REF.iqn))
    sysfs(7, state)
    entries = _health(node)
    if abnormal:
        (entry,) = entries
        assert entry.status == csi.INACCESSIBLE and entry.reason == "IscsiSessionNotLoggedIn"
        assert REF.iqn in entry.message and state in entry.message
    else:
        assert entries == []


def test_no_session_is_abnormal(fake_run, sysfs, node):
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(2, REF.iqn.replace("e2e-vol", "e2e-other")))
    sysfs(2, "LOGGED_IN")
    (entry,) = _health(node)
    assert entry.status == csi.INACCESSIBLE and entry.reason == "NoIscsiSession"
    assert "no iSCSI session" in entry.message


def _stage_record(node: NodeService, vid: str, staging, block: bool) -> Path:
    path = node._record_path(vid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"volume_id": vid, "iqn": ids.parse_id(vid).iqn, "portals": [PORTAL], "lun": 0,
                                "staging": str(staging), "block": block}))
    return path


def test_start_forgets_stages_that_did_not_survive_a_reboot(fake_run, sysfs, node, tmp_path):
    """After a worker reboot the stage records are still on the kubelet's disk, the mounts and sessions are not,
    and the node records are (on the worker's disk): the records must not keep those node records alive."""
    gone = "v1:storage-1:csi-vg:e2e-gone-0123456789"          # a filesystem stage whose mount went away
    block = "v1:storage-1:csi-vg:e2e-block-0123456789"        # a raw block stage, its session still there
    mounted = "v1:storage-2:csi-vg:e2e-mounted-0123456789"    # a filesystem stage still mounted ("/proc" is)
    rec_gone = _stage_record(node, gone, tmp_path / "kubelet" / "gone" / "globalmount", block=False)
    rec_block = _stage_record(node, block, tmp_path / "kubelet" / "block", block=True)
    rec_mounted = _stage_record(node, mounted, "/proc", block=False)
    iqn = {v: ids.parse_id(v).iqn for v in (gone, block, mounted)}
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, iqn[block]) + session_line(2, iqn[mounted]))
    fake_run.on("iscsiadm", "-m", "node", stdout="".join(f"{PORTAL},1 {i}\n" for i in iqn.values()))
    assert node.clean_stale() == [iqn[gone]]
    assert fake_run.calls[-2:] == [["iscsiadm", "-m", "node", "-T", iqn[gone], "--logout"],
                                   ["iscsiadm", "-m", "node", "-T", iqn[gone], "-o", "delete"]]
    assert not rec_gone.exists() and rec_block.exists() and rec_mounted.exists()


def test_unstage_logs_out_when_the_flush_fails_because_the_target_is_gone(fake_run, sysfs, node, monkeypatch,
                                                                          tmp_path):
    """The target deleted under a staged volume: after the replacement timeout the unmount finishes and the disk
    is offline, so the flush fails (ENXIO). That must not keep the session and node record forever."""
    staging = node.config.kubelet_dir / "plugins" / "x" / "globalmount"
    staging.mkdir(parents=True)
    device = tmp_path / "sda"
    device.touch()
    mounted = [mount.Mount(str(device), str(staging), "ext4", ("rw",))]
    monkeypatch.setattr(mount, "mount_at", lambda p: mounted[0] if mounted else None)
    monkeypatch.setattr(mount, "umount", lambda p: mounted.clear())
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(5, REF.iqn))
    fake_run.on("iscsiadm", "-m", "node")
    fake_run.on("blockdev", "--flushbufs", rc=1, stderr=f"blockdev: cannot open {device}: No such device or address")
    _stage_record(node, VID, staging, block=False)
    sysfs(5, "LOGGED_IN")   # a live session: a failed flush keeps it (still mounted data could be lost)
    mounted.append(mount.Mount(str(device), str(staging), "ext4", ("rw",)))
    with pytest.raises(errors.CsiError) as e:
        node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path=str(staging)), None)
    assert e.value.code == errors.Code.INTERNAL and "flush" in e.value.message
    assert not any("--logout" in c for c in fake_run.calls)
    sysfs(5, "FAILED")      # the target is gone: log out anyway
    mounted.append(mount.Mount(str(device), str(staging), "ext4", ("rw",)))
    node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path=str(staging)), None)
    assert fake_run.calls[-2:] == [["iscsiadm", "-m", "node", "-T", REF.iqn, "--logout"],
                                   ["iscsiadm", "-m", "node", "-T", REF.iqn, "-o", "delete"]]
    assert not node._record_path(VID).exists()


def _ledger_entry(node: NodeService, iqn: str) -> Path:
    """What the node plugin writes before it logs in to a target (csi/node/ledger.py)."""
    path = node.config.state_dir / "logins" / iqn
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "iqn": iqn}))
    return path


def test_start_logs_out_only_what_this_plugin_logged_in(fake_run, sysfs, node):
    """Two releases of the driver on one worker (other driver names, other state directories): each one's
    start-up clean-up must leave the other's sessions alone, though their targets look alike (issue 12)."""
    ours = ids.parse_id("v1:storage-1:csi-vg:e2e-ours-0123456789").iqn        # logged in by us, stage lost
    theirs = ids.parse_id("v1:storage-1:csi-vg:e2e-theirs-0123456789").iqn    # another release's, staged there
    entry = _ledger_entry(node, ours)
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, ours) + session_line(2, theirs))
    fake_run.on("iscsiadm", "-m", "node", stdout=f"{PORTAL},1 {ours}\n{PORTAL},1 {theirs}\n")
    assert node.clean_stale() == [ours]
    assert [c for c in fake_run.calls if "--logout" in c or "delete" in c] == [
        ["iscsiadm", "-m", "node", "-T", ours, "--logout"], ["iscsiadm", "-m", "node", "-T", ours, "-o", "delete"]]
    assert not entry.exists()


def test_start_forgets_a_ledger_entry_whose_target_is_gone(fake_run, sysfs, node):
    """A crash after the logout, before the entry was removed: nothing to log out, the entry goes."""
    iqn = ids.parse_id("v1:storage-1:csi-vg:e2e-done-0123456789").iqn
    entry = _ledger_entry(node, iqn)
    rc, _, err = recorded_failure("session_none")
    fake_run.on("iscsiadm", "-m", "session", rc=rc, stderr=err)
    rc, _, err = recorded_failure("node_none")
    fake_run.on("iscsiadm", "-m", "node", rc=rc, stderr=err)
    assert node.clean_stale() == []
    assert not entry.exists() and not any("--logout" in c for c in fake_run.calls)
