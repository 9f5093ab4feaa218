"""Crash at every step (issue 6): the process is SIGKILLed at a named side-effecting step (csi/faults.py),
restarted without the fault, and the same call retried as the sidecars would; then exactly the objects that
should exist do (LV, target, ACL, record, node record, session, mount), nothing else, and data is intact.
"""

from __future__ import annotations

import sys

import grpc
import pytest

from csi import faults, ids
from csi.controller.journal import FileJournal
from csi.proto import csi_pb2 as csi
from tests.e2e.cluster import MOUNT, MiB, count_on_device, pv_ranges, wait_for_wipes
from tests.e2e.crash import ENV, TRIED, crash_agent_during, crash_controller_during, crash_node_during, \
    crash_node_in_unstage

pytestmark = pytest.mark.e2e
# The whole campaign (every kill point) runs with scripts/fault-campaign; scripts/test (CI) runs the steps
# below that are not marked `campaign`: one or more per operation, so CI stays well inside its time.
campaign = pytest.mark.campaign



def inventory(cluster) -> dict:
    """What of this driver exists on storage-1 and the worker: LVs, targets with their ACLs, agent records,
    iSCSI node records and sessions, mounts under the kubelet dir."""
    s1, w = cluster.s1, cluster.w
    lvs = wait_for_wipes(s1)
    base = "/sys/kernel/config/target/iscsi"
    targets = {}
    for t in s1.run(["ls", base], timeout=30).stdout.split():
        if t.startswith("iqn."):
            acls = s1.run(["ls", f"{base}/{t}/tpgt_1/acls"], timeout=30).stdout.split()
            targets[t] = sorted(acls)
    records = sorted(p.stem for p in (cluster.d.agent_state(s1) / "volumes").glob("*/*.json"))
    sessions = w.run(["iscsiadm", "-m", "session"], timeout=30).stdout.split("\n")
    node_records = w.run(["iscsiadm", "-m", "node"], timeout=30).stdout.split("\n")
    mounts = [line.split()[4] for line in w.run(["cat", "/proc/self/mountinfo"], timeout=30).stdout.splitlines()
              if str(cluster.kubelet) in line.split()[4]]
    journal = sorted(e.key for e in FileJournal(cluster.d.journal_dir).entries())
    return {"lvs": sorted(x for x in lvs if x != "thinpool"), "targets": targets, "records": records,
            "sessions": sorted(x for x in sessions if x), "node_records": sorted(x for x in node_records if x),
            "mounts": sorted(mounts), "journal": journal}


def empty(cluster) -> dict:
    return {"lvs": [], "targets": {}, "records": [], "sessions": [], "node_records": [], "mounts": [],
            "journal": []}


def create_req(name: str) -> csi.CreateVolumeRequest:
    req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=32 * MiB),
                                  volume_capabilities=[MOUNT])
    req.accessibility_requirements.requisite.add(segments={"topology.lvm-iscsi.csi.dev/zone": "zone-a"})
    return req


@pytest.mark.parametrize("step", [pytest.param("create.lv", marks=campaign), "create.record",
                                  pytest.param("create.export", marks=campaign)])
def test_agent_crash_in_create(cluster, step):
    name = f"crash-{step.replace('.', '-')}"
    vol = crash_agent_during(cluster, step, lambda: cluster.ctrl.CreateVolume(create_req(name), timeout=120)).volume
    ref = ids.parse_id(vol.volume_id)
    inv = inventory(cluster)
    assert inv["lvs"] == [ref.lv] and inv["records"] == [ref.lv] and inv["targets"] == {ref.iqn: []}
    assert inv["journal"] == [ref.lv]
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)


@pytest.mark.parametrize("step", [pytest.param("delete.marked", marks=campaign), "delete.unexported",
                                  pytest.param("delete.lv", marks=campaign)])
def test_agent_crash_in_delete(cluster, step):
    vol = cluster.ctrl.CreateVolume(create_req(f"crash-{step.replace('.', '-')}"), timeout=120).volume
    req = csi.DeleteVolumeRequest(volume_id=vol.volume_id)
    crash_agent_during(cluster, step, lambda: cluster.ctrl.DeleteVolume(req, timeout=120))
    assert inventory(cluster) == empty(cluster)


@campaign
def test_agent_crash_while_deleting_a_volume_still_granted(cluster):
    """DeleteVolume revokes the grants it finds first (issue 12, defect 6): killed right after, the retry
    finishes the deletion, and no ACL, target or LV is left."""
    vol = cluster.ctrl.CreateVolume(create_req("crash-delete-revoked"), timeout=120).volume
    cluster.publish(vol.volume_id)
    req = csi.DeleteVolumeRequest(volume_id=vol.volume_id)
    crash_agent_during(cluster, "delete.revoked", lambda: cluster.ctrl.DeleteVolume(req, timeout=120))
    assert inventory(cluster) == empty(cluster)


def _agent_log(cluster, node=None) -> str:
    return (node or cluster.s1).log_path("agent").read_text(errors="replace")


@campaign   # the wipe itself (a thick volume's data never reaching the next) runs in CI: test_data_safety.py
def test_agent_crash_in_a_thick_delete_and_in_the_middle_of_its_wipe(cluster):
    """A thick volume is renamed out of the volume namespace, then zeroed in 256 MiB steps in the background
    (csi/storage/wipe.py). Killed right after the rename, the retried DeleteVolume succeeds and the wipe is
    found again at start; killed after the first step of the wipe, the restarted agent resumes at the second
    and completes: the LV is gone and its old extents on the PV are zeros."""
    s1 = cluster.s1
    req = create_req("crash-wipe-renamed")
    req.parameters["type"] = "thick"
    vol = cluster.ctrl.CreateVolume(req, timeout=120).volume
    crash_agent_during(cluster, "wipe.renamed", lambda: cluster.ctrl.DeleteVolume(
        csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120))
    assert inventory(cluster) == empty(cluster)

    req = create_req("crash-wipe-chunk")
    req.parameters["type"] = "thick"
    req.capacity_range.required_bytes = 512 * MiB
    vol = cluster.ctrl.CreateVolume(req, timeout=120).volume
    ref = ids.parse_id(vol.volume_id)
    s1.run([sys.executable, "-c", "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); "
            "[os.pwrite(fd, bytes([165]) * (1 << 20), o << 20) for o in range(512)]; os.fsync(fd)",
            f"/dev/csi-vg/{ref.lv}"], timeout=300, check=True)
    extents = pv_ranges(s1, ref.lv)
    step = "wipe.chunk"
    cluster.d.start_agent(s1, env={ENV: step})
    try:
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    except grpc.RpcError:
        pass   # the wipe runs after the answer; if the kill came first, the answer is lost: both are fine
    assert s1.wait_exit("agent", timeout=120) == -9, f"the agent did not die at {step}"
    left = [lv for lv in s1.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=30).stdout.split()
            if "+wipe+" in lv]
    assert len(left) == 1, left
    before = len(_agent_log(cluster))
    cluster.d.start_agent(s1)
    TRIED.append(f"agent:{step}")
    wait_for_wipes(s1)
    said = _agent_log(cluster)[before:]
    assert f"resuming the zeroing of csi-vg/{left[0]} at {256 * MiB} of {512 * MiB} bytes" in said, said[-3000:]
    assert count_on_device(s1, extents[0][0], [(st, n) for _, st, n in extents], bytes([165]) * 32)[0] == 0
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)   # idempotent
    assert inventory(cluster) == empty(cluster)


@campaign
def test_agent_crash_after_a_copy_before_its_record_says_ready(cluster):
    """A finished copy loses its content=copy tag (so a lost state directory rebuilds it as a volume), then
    its record says ready. Killed between the two, the retry copies again and the data is intact."""
    vol = cluster.ctrl.CreateVolume(create_req("crash-untag-src"), timeout=120).volume
    target = cluster.stage_publish(vol.volume_id, cluster.publish(vol.volume_id))
    digest = cluster.write(target, mib=2)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="crash-untag-snap",
                                                                 source_volume_id=vol.volume_id)).snapshot
    req = csi.CreateVolumeRequest(name="crash-untag-dst", capacity_range=csi.CapacityRange(required_bytes=32 * MiB),
                                  volume_capabilities=[MOUNT])
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    req.accessibility_requirements.requisite.add(segments={"topology.lvm-iscsi.csi.dev/zone": "zone-b"})
    dst = crash_agent_during(cluster, "copy.untagged", lambda: cluster.ctrl.CreateVolume(req, timeout=300),
                             node=cluster.s2).volume
    tags = cluster.s2.run(["lvs", "--noheadings", "-o", "lv_tags", f"csi-vg/{ids.parse_id(dst.volume_id).lv}"],
                          timeout=30, check=True).stdout
    assert "content=copy" not in tags and "attrs=" in tags, tags
    cluster.teardown(vol.volume_id)
    t2 = cluster.stage_publish(dst.volume_id, cluster.publish(dst.volume_id))
    assert cluster.read(t2) == digest
    cluster.teardown(dst.volume_id)
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert inventory(cluster) == empty(cluster)
    assert cluster.storage_state()["storage-2"] == ([], [])


@campaign
def test_agent_crash_while_dropping_the_point_in_time_snapshot_of_a_thick_clone(cluster):
    """The clone of a thick volume copies a transient COW snapshot of it; dropping it splits its COW space
    off the origin (snapshot.split), then wipes it. Killed after the split, the retried CreateVolume returns
    the clone, and the split-off COW space is wiped: only the two volumes are left."""
    req = create_req("crash-split-src")
    req.parameters["type"] = "thick"
    src = cluster.ctrl.CreateVolume(req, timeout=120).volume
    clone = create_req("crash-split-clone")
    clone.parameters["type"] = "thick"
    clone.volume_content_source.volume.volume_id = src.volume_id
    dst = crash_agent_during(cluster, "snapshot.split", lambda: cluster.ctrl.CreateVolume(clone, timeout=300)).volume
    assert dst.content_source.volume.volume_id == src.volume_id
    assert inventory(cluster)["lvs"] == sorted(ids.parse_id(v.volume_id).lv for v in (src, dst))
    for v in (dst, src):
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)


@pytest.mark.parametrize("step", ["grant.record", pytest.param("grant.acl", marks=campaign)])
def test_agent_crash_in_publish(cluster, step):
    vol = cluster.ctrl.CreateVolume(create_req(f"crash-{step.replace('.', '-')}"), timeout=120).volume
    ctx = crash_agent_during(cluster, step, lambda: cluster.ctrl.ControllerPublishVolume(
        csi.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=cluster.node_id,
                                           volume_capability=MOUNT), timeout=60)).publish_context
    ref = ids.parse_id(vol.volume_id)
    assert inventory(cluster)["targets"] == {ref.iqn: [cluster.node_id]}
    assert cluster.publish(vol.volume_id) == dict(ctx)       # the same secret as the retried call got
    target = cluster.stage_publish(vol.volume_id, dict(ctx))   # and it logs in with it
    cluster.teardown(vol.volume_id)
    assert inventory(cluster) == empty(cluster)
    assert target


def test_agent_crash_in_unpublish_does_not_bring_the_acl_back(cluster):
    vol = cluster.ctrl.CreateVolume(create_req("crash-revoke"), timeout=120).volume
    cluster.publish(vol.volume_id)
    req = csi.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=cluster.node_id)
    crash_agent_during(cluster, "revoke.record", lambda: cluster.ctrl.ControllerUnpublishVolume(req, timeout=60))
    ref = ids.parse_id(vol.volume_id)
    assert inventory(cluster)["targets"] == {ref.iqn: []}
    cluster.d.start_agent(cluster.s1)   # a restart rebuilds from the records: the ACL stays gone
    assert inventory(cluster)["targets"] == {ref.iqn: []}
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)


@campaign
def test_agent_crash_in_snapshot_and_expand(cluster):
    vol = cluster.ctrl.CreateVolume(create_req("crash-snap-src"), timeout=120).volume
    snap = crash_agent_during(cluster, "snapshot.lv", lambda: cluster.ctrl.CreateSnapshot(
        csi.CreateSnapshotRequest(name="crash-snap", source_volume_id=vol.volume_id), timeout=120)).snapshot
    assert len(inventory(cluster)["lvs"]) == 2
    grown = crash_agent_during(cluster, "expand.lv", lambda: cluster.ctrl.ControllerExpandVolume(
        csi.ControllerExpandVolumeRequest(volume_id=vol.volume_id,
                                          capacity_range=csi.CapacityRange(required_bytes=64 * MiB)), timeout=120))
    assert grown.capacity_bytes == 64 * MiB
    got = cluster.ctrl.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 64 * MiB
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)


@pytest.mark.parametrize("step", [pytest.param("stage.record", marks=campaign), "stage.login",
                                  pytest.param("stage.mkfs", marks=campaign), pytest.param("stage.mount",
                                                                                           marks=campaign)])
def test_node_crash_in_stage(cluster, step):
    vol = cluster.ctrl.CreateVolume(create_req(f"crash-{step.replace('.', '-')}"), timeout=120).volume
    ctx = cluster.publish(vol.volume_id)
    staging, _ = cluster.paths(vol.volume_id)
    staging.mkdir(parents=True, exist_ok=True)
    req = csi.NodeStageVolumeRequest(volume_id=vol.volume_id, publish_context=ctx, staging_target_path=str(staging),
                                     volume_capability=MOUNT)
    crash_node_during(cluster, step, lambda: cluster.node.NodeStageVolume(req, timeout=120))
    inv = inventory(cluster)
    assert inv["mounts"] == [str(staging)] and len(inv["sessions"]) == 1 and len(inv["node_records"]) == 1
    target = cluster.stage_publish(vol.volume_id, ctx)
    digest = cluster.write(target, mib=2)
    assert cluster.read(target) == digest
    cluster.teardown(vol.volume_id)
    assert inventory(cluster) == empty(cluster)


@pytest.mark.parametrize("step", [pytest.param("unstage.umount", marks=campaign), "unstage.logout",
                                  pytest.param("publish.mount", marks=campaign)])
def test_node_crash_in_unstage_and_publish(cluster, step):
    vol = cluster.ctrl.CreateVolume(create_req(f"crash-{step.replace('.', '-')}"), timeout=120).volume
    ctx = cluster.publish(vol.volume_id)
    staging, target = cluster.paths(vol.volume_id)
    if step == "publish.mount":
        staging.mkdir(parents=True, exist_ok=True)
        cluster.node.NodeStageVolume(csi.NodeStageVolumeRequest(
            volume_id=vol.volume_id, publish_context=ctx, staging_target_path=str(staging),
            volume_capability=MOUNT), timeout=120)
        req = csi.NodePublishVolumeRequest(volume_id=vol.volume_id, publish_context=ctx,
                                           staging_target_path=str(staging), target_path=str(target),
                                           volume_capability=MOUNT)
        crash_node_during(cluster, step, lambda: cluster.node.NodePublishVolume(req, timeout=60))
        assert inventory(cluster)["mounts"] == sorted([str(staging), str(target)])
    else:
        crash_node_in_unstage(cluster, vol.volume_id, ctx, step)
        inv = inventory(cluster)
        assert inv["mounts"] == [] and inv["sessions"] == [] and inv["node_records"] == []
    cluster.teardown(vol.volume_id)
    assert inventory(cluster) == empty(cluster)


@campaign
def test_crash_in_a_copy_across_nodes_and_in_node_expansion(cluster):
    vol = cluster.ctrl.CreateVolume(create_req("crash-copy-src"), timeout=120).volume
    target = cluster.stage_publish(vol.volume_id, cluster.publish(vol.volume_id))
    digest = cluster.write(target, mib=4)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="crash-copy-snap",
                                                                 source_volume_id=vol.volume_id)).snapshot
    req = csi.CreateVolumeRequest(name="crash-copy-dst", capacity_range=csi.CapacityRange(required_bytes=32 * MiB),
                                  volume_capabilities=[MOUNT])
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    req.accessibility_requirements.requisite.add(segments={"topology.lvm-iscsi.csi.dev/zone": "zone-b"})
    # the destination agent (storage-2) dies after writing the first chunk; the retry copies again, verified
    dst = crash_agent_during(cluster, "copy.chunk", lambda: cluster.ctrl.CreateVolume(req, timeout=300),
                             node=cluster.s2).volume
    assert dst.volume_id.startswith("v1:storage-2:")
    # node expansion: the node plugin dies after the rescan; the retry grows the filesystem
    cluster.ctrl.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi.CapacityRange(required_bytes=64 * MiB)), timeout=120)
    staging, _ = cluster.paths(vol.volume_id)
    grow = csi.NodeExpandVolumeRequest(volume_id=vol.volume_id, volume_path=str(target),
                                       staging_target_path=str(staging), volume_capability=MOUNT,
                                       capacity_range=csi.CapacityRange(required_bytes=64 * MiB))
    assert crash_node_during(cluster, "expand.rescan",
                             lambda: cluster.node.NodeExpandVolume(grow, timeout=120)).capacity_bytes == 64 * MiB
    cluster.teardown(vol.volume_id)
    t2 = cluster.stage_publish(dst.volume_id, cluster.publish(dst.volume_id))
    assert cluster.read(t2) == digest
    cluster.teardown(dst.volume_id)
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert inventory(cluster) == empty(cluster)
    assert cluster.storage_state()["storage-2"] == ([], [])


def test_controller_crash_after_the_transfer_snapshot_of_a_clone_across_nodes(cluster):
    """A clone of a volume onto another storage node copies a transient snapshot of it; the controller dies
    right after making that snapshot. The retried CreateVolume finds the same snapshot (its name comes from
    the request's), copies it, and deletes it: the clone holds the data and no snapshot is left anywhere."""
    src = cluster.ctrl.CreateVolume(create_req("crash-clone-src"), timeout=120).volume
    target = cluster.stage_publish(src.volume_id, cluster.publish(src.volume_id))
    digest = cluster.write(target, mib=4)
    req = csi.CreateVolumeRequest(name="crash-clone-dst", capacity_range=csi.CapacityRange(required_bytes=32 * MiB),
                                  volume_capabilities=[MOUNT])
    req.volume_content_source.volume.volume_id = src.volume_id
    req.accessibility_requirements.requisite.add(segments={"topology.lvm-iscsi.csi.dev/zone": "zone-b"})
    storage = [cluster.s1, cluster.s2, cluster.s3]
    step = "clone.transfer-snapshot"
    try:
        cluster.d.start_controller(storage, env={ENV: step})
        with pytest.raises(grpc.RpcError):
            cluster.ctrl.CreateVolume(req, timeout=300)
        assert cluster.d.controller.wait(60) == -9, f"the controller did not die at {step}"
    finally:
        cluster.d.start_controller(storage)
    TRIED.append(f"controller:{step}")
    src_lv = ids.parse_id(src.volume_id).lv
    left = inventory(cluster)["lvs"]
    assert len(left) == 2 and src_lv in left            # the transfer snapshot, on the source's node
    assert cluster.storage_state()["storage-2"] == ([], [])
    dst = cluster.ctrl.CreateVolume(req, timeout=300, wait_for_ready=True).volume
    assert dst.volume_id.startswith("v1:storage-2:") and dst.content_source.volume.volume_id == src.volume_id
    assert inventory(cluster)["lvs"] == [src_lv]         # the transfer snapshot is gone
    dst_lv = ids.parse_id(dst.volume_id).lv
    assert cluster.storage_state()["storage-2"] == ([dst_lv], [ids.parse_id(dst.volume_id).iqn])
    assert cluster.ctrl.CreateVolume(req, timeout=300).volume.volume_id == dst.volume_id   # idempotent still
    cluster.teardown(src.volume_id)
    t2 = cluster.stage_publish(dst.volume_id, cluster.publish(dst.volume_id))
    assert cluster.read(t2) == digest
    cluster.teardown(dst.volume_id)
    assert inventory(cluster) == empty(cluster)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


@pytest.mark.parametrize("step", ["create.placed", pytest.param("create.made", marks=campaign)])
def test_controller_crash_around_the_journal_in_create(cluster, step):
    """The placement recorded, then the controller dies before (or after) the agent made the volume: the retry
    goes to the recorded node, and exactly one LV, record, target and journal record exist; then none."""
    req = create_req(f"crash-ctl-{step.replace('.', '-')}")
    vol = crash_controller_during(cluster, step, lambda **kw: cluster.ctrl.CreateVolume(req, timeout=120, **kw)).volume
    ref = ids.parse_id(vol.volume_id)
    inv = inventory(cluster)
    assert (inv["lvs"], inv["records"], inv["targets"], inv["journal"]) == ([ref.lv], [ref.lv], {ref.iqn: []},
                                                                            [ref.lv])
    assert cluster.storage_state()["storage-2"] == ([], [])
    assert FileJournal(cluster.d.journal_dir).get(ref.lv).state == "ready"
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)


def test_controller_crash_around_the_journal_in_delete_and_snapshot(cluster):
    vol = cluster.ctrl.CreateVolume(create_req("crash-ctl-snap"), timeout=120).volume
    snap_req = csi.CreateSnapshotRequest(name="crash-ctl-snapshot", source_volume_id=vol.volume_id)
    snap = crash_controller_during(cluster, "snapshot.placed",
                                   lambda **kw: cluster.ctrl.CreateSnapshot(snap_req, timeout=120, **kw)).snapshot
    sref, ref = ids.parse_id(snap.snapshot_id, "snapshot"), ids.parse_id(vol.volume_id)
    inv = inventory(cluster)
    assert inv["lvs"] == sorted([ref.lv, sref.lv]) and inv["journal"] == sorted([ref.lv, sref.lv])
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120)
    req = csi.DeleteVolumeRequest(volume_id=vol.volume_id)
    crash_controller_during(cluster, "delete.removed", lambda **kw: cluster.ctrl.DeleteVolume(req, timeout=120, **kw))
    assert inventory(cluster) == empty(cluster)


@campaign
def test_kill_points_cover_every_step():
    """Runs last in this module: every step of csi/faults.py was tried by a test above."""
    tried = {t.split(":", 1)[1] for t in TRIED}
    untried = [s for s in faults.AGENT_STEPS + faults.NODE_STEPS + faults.CONTROLLER_STEPS if s not in tried]
    print(f"kill points tried: {len(TRIED)}: {', '.join(TRIED)}")
    assert not untried, f"steps never killed at: {untried}"


ORPHAN_TARGET = """
from rtslib_fb import BlockStorageObject, FabricModule, LUN, Target, TPG, NodeACL
import sys
tpg = TPG(Target(FabricModule("iscsi"), sys.argv[1]), 1)
if len(sys.argv) > 3:
    LUN(tpg, 0, storage_object=BlockStorageObject(sys.argv[2], dev=sys.argv[3]))
elif len(sys.argv) > 2:
    NodeACL(tpg, sys.argv[2])
"""
REMOVE_TARGET = """
from rtslib_fb import FabricModule, Target
import sys
Target(FabricModule("iscsi"), sys.argv[1], mode="lookup").delete()
"""


def test_orphans_are_listed_then_removed_only_on_request(cluster):
    """Ownership by exact fields (issue 12, defect 2): an LV is this cluster's by its cluster tag, a target by
    the LV behind its LUN. A target whose name merely starts like this cluster's is nobody's to remove."""
    s1 = cluster.s1
    real = cluster.ctrl.CreateVolume(create_req("orphan-real"), timeout=120).volume
    ref = ids.parse_id(real.volume_id)
    tags = ["--addtag", "dev.csi.lvm-iscsi/kind=volume"]
    s1.run(["lvcreate", "-q", "-V", "8m", "-T", "csi-vg/thinpool", "-n", "e2e-orphan-lv",
            "--addtag", "dev.csi.lvm-iscsi/cluster=e2e", *tags], timeout=120, check=True)
    s1.run(["lvcreate", "-q", "-V", "8m", "-T", "csi-vg/thinpool", "-n", "other-cluster-lv",
            "--addtag", "dev.csi.lvm-iscsi/cluster=other", *tags], timeout=120, check=True)
    py = sys.executable
    orphan_iqn = ids.target_iqn("csi-vg", "e2e-orphan-lv")
    other_iqn = ids.target_iqn("csi-vg", "other-cluster-lv")
    unknown_iqn = ids.IQN_PREFIX + "csi-vg.e2e-orphan-target"      # looks like ours, backed by nothing
    s1.run([py, "-c", ORPHAN_TARGET, orphan_iqn, "e2e-orphan-lv", "/dev/csi-vg/e2e-orphan-lv"], timeout=60,
           check=True)
    s1.run([py, "-c", ORPHAN_TARGET, other_iqn, "other-cluster-lv", "/dev/csi-vg/other-cluster-lv"], timeout=60,
           check=True)
    s1.run([py, "-c", ORPHAN_TARGET, unknown_iqn], timeout=60, check=True)
    s1.run([py, "-c", ORPHAN_TARGET, ref.iqn, "iqn.2026-11.test.intruder:x"], timeout=60, check=True)

    dry = cluster.d.operator("cleanup", [cluster.s1, cluster.s2], "--min-age", "0")
    assert dry.returncode == 0, dry.stderr
    for needle in ("csi-vg/e2e-orphan-lv", orphan_iqn, "iqn.2026-11.test.intruder:x", "dry run"):
        assert needle in dry.stdout, dry.stdout
    for absent in ("other-cluster-lv", unknown_iqn, f"csi-vg/{ref.lv}"):
        assert absent not in dry.stdout, dry.stdout
    assert "e2e-orphan-lv" in inventory(cluster)["lvs"]          # a dry run removes nothing

    done = cluster.d.operator("cleanup", [cluster.s1, cluster.s2], "--min-age", "0", "--delete")
    assert done.returncode == 0 and done.stdout.count("[removed]") == 3, done.stdout
    inv = inventory(cluster)
    assert inv["lvs"] == sorted([ref.lv, "other-cluster-lv"])
    assert inv["targets"] == {ref.iqn: [], other_iqn: [], unknown_iqn: []}
    for iqn in (other_iqn, unknown_iqn):
        s1.run([py, "-c", REMOVE_TARGET, iqn], timeout=60, check=True)
    s1.run([py, "-c", "from rtslib_fb import BlockStorageObject as B; B('other-cluster-lv').delete()"], timeout=60,
           check=True)
    s1.run(["lvremove", "-q", "-y", "csi-vg/other-cluster-lv"], timeout=120, check=True)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=real.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)


def test_node_plugin_start_cleans_stale_sessions_and_node_records(cluster):
    """What a worker reboot or a lost unstage leaves: a node record (and a session) of this driver's target
    that no staged volume uses. The node plugin logs out and deletes it when it starts."""
    vol = cluster.ctrl.CreateVolume(create_req("stale-session"), timeout=120).volume
    ctx = cluster.publish(vol.volume_id)
    staging, _ = cluster.paths(vol.volume_id)
    staging.mkdir(parents=True, exist_ok=True)
    cluster.node.NodeStageVolume(csi.NodeStageVolumeRequest(volume_id=vol.volume_id, publish_context=ctx,
                                                            staging_target_path=str(staging),
                                                            volume_capability=MOUNT), timeout=120)
    cluster.w.run(["umount", str(staging)], timeout=60, check=True)
    for record in (cluster.d.kubelet_dir(cluster.w) / "plugins/lvm-iscsi.csi.dev/staged").glob("*.json"):
        record.unlink()   # as if the stage had been lost: the session and node record stay behind
    assert len(inventory(cluster)["sessions"]) == 1
    cluster.d.start_node_plugin(cluster.w)
    inv = inventory(cluster)
    assert inv["sessions"] == [] and inv["node_records"] == [] and inv["mounts"] == []
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert inventory(cluster) == empty(cluster)
