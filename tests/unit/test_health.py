"""CSI v1.13 volume and storage health: what the controller and the node plugin report, and why.

The controller's side runs the real ControllerService over the fake agents of test_controller.py; the node's
side the real NodeService over recorded `iscsiadm -m session` output, a fake sysfs, and real TCP sockets for
the portals and agents it probes (one listening, one refusing).
"""

from __future__ import annotations

import json
import socket

import pytest

from csi import errors, ids
from csi.controller import health as controller_health
from csi.node import health as node_health
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_controller import code_of, create, svc  # noqa: F401  (svc: the fixture)
from tests.unit.test_node_resilience import node, session_line, sysfs  # noqa: F401  (fixtures)

CCap = csi.ControllerServiceCapability.RPC.Type
NCap = csi.NodeServiceCapability.RPC.Type


# ---------------------------------------------------------------------------------------------- controller

def _health(svc, volume_id):
    return svc.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=volume_id), None
                                         ).volume_health


def _agent_volume(svc, volume_id) -> apb.Volume:
    ref = ids.parse_id(volume_id)
    return svc.agents.get(ref.node).volumes[ref.lv]


def test_controller_advertises_the_health_rpcs_and_no_volume_condition(svc):
    got = {c.rpc.type for c in svc.ControllerGetCapabilities(csi.ControllerGetCapabilitiesRequest(), None)
           .capabilities}
    assert {CCap.GET_VOLUME_HEALTH, CCap.LIST_VOLUME_HEALTH} <= got
    assert 11 not in got   # VOLUME_CONDITION, removed in v1.13


def test_a_healthy_volume_has_no_entry(svc):
    v = create(svc, "pvc-ok")
    h = _health(svc, v.volume_id)
    assert h.volume_id == v.volume_id and list(h.health_statuses) == []


@pytest.mark.parametrize("reason, condition, advice", [
    ("LogicalVolumeMissing", "logical volume vg/x is missing", "removed outside the driver"),
    ("LogicalVolumeInactive", "logical volume vg/x is not active", "restarting the agent on {node}"),
    ("TargetNotExported", "iSCSI target iqn.x is not exported", "exports it again"),
    ("CopyNotFinished", "copy not finished", "finishes it when retried"),
])
def test_what_the_agent_reports_is_inaccessible_with_its_reason(svc, reason, condition, advice):
    v = create(svc, "pvc-bad")
    node = ids.parse_id(v.volume_id).node
    vol = _agent_volume(svc, v.volume_id)
    vol.healthy, vol.condition, vol.condition_reason = False, condition, reason
    (entry,) = _health(svc, v.volume_id).health_statuses
    assert entry.status == csi.INACCESSIBLE and entry.reason == reason
    assert condition in entry.message and f"storage node {node}" in entry.message
    assert advice.format(node=node) in entry.message


def test_an_agent_from_before_condition_reason_still_says_why(svc):
    v = create(svc, "pvc-old")
    vol = _agent_volume(svc, v.volume_id)
    vol.healthy, vol.condition = False, "iSCSI target iqn.x is not exported"
    (entry,) = _health(svc, v.volume_id).health_statuses
    assert entry.status == csi.INACCESSIBLE and entry.reason == "StorageNodeReportsUnhealthy"
    assert "iSCSI target iqn.x is not exported" in entry.message


def test_an_agent_that_does_not_answer_makes_the_volume_inaccessible_not_an_error(svc):
    v = create(svc, "pvc-down")
    node = ids.parse_id(v.volume_id).node
    svc.agents.get(node).down = True
    (entry,) = _health(svc, v.volume_id).health_statuses
    assert entry.status == csi.INACCESSIBLE and entry.reason == "StorageNodeUnreachable"
    assert f"agent of storage node {node} does not answer" in entry.message


def test_get_volume_health_errors(svc):
    get = svc.ControllerGetVolumeHealth
    assert code_of(get, csi.ControllerGetVolumeHealthRequest()) == errors.Code.INVALID_ARGUMENT
    assert code_of(get, csi.ControllerGetVolumeHealthRequest(volume_id="not-ours")) == errors.Code.NOT_FOUND
    assert code_of(get, csi.ControllerGetVolumeHealthRequest(volume_id="v1:s9:vg:lv-x")) == errors.Code.NOT_FOUND
    assert code_of(get, csi.ControllerGetVolumeHealthRequest(volume_id="v1:s1:vg:lv-gone")) == errors.Code.NOT_FOUND


def test_list_volume_health_names_only_the_unhealthy_ones_page_by_page(svc):
    made = [create(svc, f"pvc-{i}").volume_id for i in range(6)]
    bad = sorted(made[i] for i in (0, 3, 5))
    for vid in bad:
        vol = _agent_volume(svc, vid)
        vol.healthy, vol.condition, vol.condition_reason = False, "iSCSI target x is not exported", "TargetNotExported"
    seen, token = [], ""
    while True:
        r = svc.ControllerListVolumeHealth(csi.ControllerListVolumeHealthRequest(max_entries=2,
                                                                                 starting_token=token), None)
        assert len(r.entries) <= 2
        for e in r.entries:
            assert [s.reason for s in e.health_statuses] == ["TargetNotExported"]
        seen += [e.volume_id for e in r.entries]
        token = r.next_token
        if not token:
            break
    assert sorted(seen) == bad
    assert code_of(svc.ControllerListVolumeHealth,
                   csi.ControllerListVolumeHealthRequest(starting_token="garbage")) == errors.Code.ABORTED


def test_list_volume_health_with_an_agent_down_is_unavailable_never_a_partial_list(svc):
    create(svc, "pvc-a")
    svc.agents.get("s1").down = True
    svc.agents.poll_once()
    assert code_of(svc.ControllerListVolumeHealth, csi.ControllerListVolumeHealthRequest()) == \
        errors.Code.UNAVAILABLE


def test_of_volume_for_a_healthy_volume_is_empty():
    assert controller_health.of_volume("s1", apb.Volume(healthy=True, condition_reason="")) == []


# ---------------------------------------------------------------------------------------------- node

VID = "v1:storage-1:csi-vg:e2e-vol-0123456789"
VID2 = "v1:storage-2:csi-vg:e2e-two-0123456789"
REF, REF2 = ids.parse_id(VID), ids.parse_id(VID2)


@pytest.fixture
def listening():
    """host:port of a socket that accepts connections."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def refusing():
    """host:port where nothing listens (connection refused at once)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()
    return address


def _stage(node, vid, portal, agent):
    path = node._record_path(vid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"volume_id": vid, "iqn": ids.parse_id(vid).iqn, "portals": [portal], "lun": 0,
                                "staging": "/nonexistent", "block": False, "agent": agent}))


def _storage(node):
    return list(node.NodeGetStorageHealth(csi.NodeGetStorageHealthRequest(), None).backend_health)


def test_node_advertises_the_health_rpcs_and_no_volume_condition(node):
    got = {c.rpc.type for c in node.NodeGetCapabilities(csi.NodeGetCapabilitiesRequest(), None).capabilities}
    assert {NCap.GET_VOLUME_HEALTH, NCap.GET_STORAGE_HEALTH} <= got
    assert 4 not in got   # VOLUME_CONDITION, removed in v1.13


def test_nothing_staged_means_no_storage_to_report(fake_run, node):
    assert _storage(node) == []
    assert fake_run.calls == []   # not even iscsiadm: nothing to look at


def test_storage_all_answering_is_empty(fake_run, sysfs, node, listening):
    _stage(node, VID, listening, listening)
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn))
    sysfs(1, "LOGGED_IN")
    assert _storage(node) == []


def test_portal_unreachable_with_its_sessions_down(fake_run, sysfs, node, listening, refusing):
    _stage(node, VID, refusing, listening)        # storage-1: its portal refuses, its session FAILED
    _stage(node, VID2, listening, listening)      # storage-2: fine
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn) + session_line(2, REF2.iqn))
    sysfs(1, "FAILED")
    sysfs(2, "LOGGED_IN")
    (b,) = _storage(node)
    assert b.status == csi.STORAGE_UNREACHABLE and b.reason == "PortalUnreachable"
    assert "storage node storage-1" in b.message and refusing in b.message and VID in b.message


def test_a_portal_is_not_probed_while_its_sessions_carry_io(fake_run, sysfs, node, listening, monkeypatch):
    """A logged-in session proves the portal answers; LIO would log every probe that does not log in."""
    _stage(node, VID, "10.213.1.11:3260", listening)
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn))
    sysfs(1, "LOGGED_IN")
    probed = []
    real = node_health.connects
    monkeypatch.setattr(node_health, "connects", lambda a, *k: probed.append(a) or real(a))
    got = node_health.storage(node.iscsi, node_health.staged(node.config.state_dir), probe=node_health.connects)
    assert got == [] and probed == [listening]


def test_agent_unreachable_says_what_stops_working(fake_run, sysfs, node, listening, refusing):
    _stage(node, VID, listening, refusing)
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn))
    sysfs(1, "LOGGED_IN")
    (b,) = _storage(node)
    assert b.status == csi.STORAGE_UNREACHABLE and b.reason == "AgentUnreachable"
    assert refusing in b.message and "no volume of that storage node can be staged here" in b.message and "keep their I/O" in b.message


def test_volume_health_needs_a_volume_id_and_checks_the_paths_it_gets(fake_run, sysfs, node):
    with pytest.raises(errors.CsiError) as e:
        node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(), None)
    assert e.value.code == errors.Code.INVALID_ARGUMENT
    with pytest.raises(errors.CsiError) as e:
        node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(volume_id=VID, volume_publish_path="/etc"), None)
    assert e.value.code == errors.Code.INVALID_ARGUMENT
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn))
    sysfs(1, "LOGGED_IN")
    staging = node.config.kubelet_dir / "plugins" / "x" / "globalmount"
    publish = node.config.kubelet_dir / "pods" / "p" / "mount"
    got = node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(
        volume_id=VID, staging_target_path=str(staging), volume_publish_path=str(publish)), None).volume_health
    assert got.volume_id == VID
    assert [(s.status, s.reason) for s in got.health_statuses] == [(csi.INACCESSIBLE, "NotStaged"),
                                                                   (csi.INACCESSIBLE, "NotPublished")]
    assert str(staging) in got.health_statuses[0].message and str(publish) in got.health_statuses[1].message


def test_a_filesystem_the_kernel_made_read_only_is_degraded_with_how_to_recover(fake_run, sysfs, node,
                                                                                  monkeypatch):
    """ext4 aborted by I/O errors (a storage outage past the replacement timeout) keeps its mounts' own "rw"
    and shows "ro" in the filesystem's options (mountinfo's last field): that, and only that, is reported."""
    from csi.node import mount
    staging = node.config.kubelet_dir / "plugins" / "x" / "globalmount"
    publish = node.config.kubelet_dir / "pods" / "p" / "mount"
    lines = {"forced": f"36 35 8:16 / {staging} rw,relatime shared:1 - ext4 /dev/sdb ro,relatime\n"
                       f"37 35 8:16 / {publish} rw,relatime shared:1 - ext4 /dev/sdb ro,relatime\n",
             "healthy": f"36 35 8:16 / {staging} rw,relatime shared:1 - ext4 /dev/sdb rw,relatime\n"
                        f"37 35 8:16 / {publish} rw,relatime shared:1 - ext4 /dev/sdb rw,relatime\n",
             "asked": f"36 35 8:16 / {staging} ro,relatime shared:1 - ext4 /dev/sdb ro,relatime\n"
                      f"37 35 8:16 / {publish} ro,relatime shared:1 - ext4 /dev/sdb ro,relatime\n",
             # an aborted journal as Linux 6.1 shows it (the lab's kernel, recorded there)
             "aborted": f"35 21 7:0 / {staging} rw,relatime - ext4 /dev/sdb rw,abort\n"
                        f"36 21 7:0 / {publish} rw,relatime - ext4 /dev/sdb rw,abort\n"}
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn))
    sysfs(1, "LOGGED_IN")
    seen = {}
    for case, text in lines.items():
        monkeypatch.setattr(mount, "mounts", lambda text=text: mount.parse_mountinfo(text))
        monkeypatch.setattr(mount.os.path, "realpath", lambda p: str(p))
        monkeypatch.setattr(mount, "ext4_errors", lambda device: 0)
        got = node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(
            volume_id=VID, staging_target_path=str(staging), volume_publish_path=str(publish)), None)
        seen[case] = [(s.status, s.reason) for s in got.volume_health.health_statuses]
        if case == "forced":
            message = got.volume_health.health_statuses[0].message
            assert "read-only" in message and "restarting the pod" in message and "e2fsck" in message
    assert seen == {"forced": [(csi.DEGRADED, "FileSystemReadOnly")], "healthy": [], "asked": [],
                    "aborted": [(csi.DEGRADED, "FileSystemReadOnly")]}
    # errors recorded, the filesystem still read-write (Linux 6.6 to 6.14 show no flag when ext4 shuts down)
    monkeypatch.setattr(mount, "mounts", lambda: mount.parse_mountinfo(lines["healthy"]))
    monkeypatch.setattr(mount, "ext4_errors", lambda device: 3 if device == "/dev/sdb" else 0)
    got = node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(
        volume_id=VID, staging_target_path=str(staging), volume_publish_path=str(publish)), None)
    (entry,) = got.volume_health.health_statuses
    assert (entry.status, entry.reason) == (csi.DEGRADED, "FileSystemErrors") and "3 error(s)" in entry.message


def test_a_filesystem_that_shut_down_is_inaccessible_and_only_looked_at_through_a_live_session(
        fake_run, sysfs, node, monkeypatch, tmp_path):
    """xfs shut down by I/O errors shows nothing in mountinfo or sysfs; every open of it fails with EIO, so the
    node lists the mount's root (the e2e tier shuts a real xfs down: test_resilience.py). Through a session
    that is down the listing could wait for the storage: then it is not done at all."""
    import errno
    import os
    from csi.node import mount
    staging = node.config.kubelet_dir / "plugins" / "x" / "globalmount"
    monkeypatch.setattr(mount, "mounts", lambda: mount.parse_mountinfo(
        f"36 35 8:16 / {staging} rw,relatime shared:1 - xfs /dev/sdb rw,attr2,inode64\n"))
    listed = []
    real_scandir = os.scandir

    def scandir(path):
        listed.append(str(path))
        if str(path) == str(staging):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_scandir(path)
    monkeypatch.setattr(mount.os, "scandir", scandir)
    fake_run.on("iscsiadm", "-m", "session", stdout=session_line(1, REF.iqn))
    request = csi.NodeGetVolumeHealthRequest(volume_id=VID, staging_target_path=str(staging))
    sysfs(1, "LOGGED_IN")
    (entry,) = node.NodeGetVolumeHealth(request, None).volume_health.health_statuses
    assert (entry.status, entry.reason) == (csi.INACCESSIBLE, "FileSystemShutDown"), entry
    assert "Input/output error" in entry.message and "restarting the pod" in entry.message
    assert listed == [str(staging)]
    sysfs(1, "FAILED")
    (entry,) = node.NodeGetVolumeHealth(request, None).volume_health.health_statuses
    assert entry.reason == "IscsiSessionNotLoggedIn" and listed == [str(staging)]   # not listed again
    # a readable directory and a missing one are no I/O error
    assert mount.root_io_error(str(tmp_path)) == "" and mount.root_io_error(str(tmp_path / "gone")) == ""
