"""Snapshots, restores, clones and online expansion on real kernels (issue 3), on the shared lab cluster.

Data is checked by SHA-256: a restore holds exactly what was fsync'ed before the snapshot, not what was
written after it; a snapshot outlives its source; restores and clones work across storage nodes (the data
is copied agent to agent over mutual TLS); mounted ext4 and xfs volumes grow while a writer runs.
"""

from __future__ import annotations

import grpc
import pytest

from csi import ids
from csi.proto import csi_pb2 as csi
from tests.e2e.cluster import BLOCK, MOUNT, GiB, M, MiB

pytestmark = pytest.mark.e2e

XFS = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="xfs"),
                           access_mode=M(mode=M.SINGLE_NODE_WRITER))


def snapshot(cluster, name: str, vid: str) -> csi.Snapshot:
    return cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name=name, source_volume_id=vid),
                                       timeout=120).snapshot


def restore(cluster, name: str, size: int, zone: str | None = None, snapshot_id: str = "", volume_id: str = "",
            cap=MOUNT):
    req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                  volume_capabilities=[cap])
    if snapshot_id:
        req.volume_content_source.snapshot.snapshot_id = snapshot_id
    else:
        req.volume_content_source.volume.volume_id = volume_id
    if zone:
        req.accessibility_requirements.requisite.add(segments={"topology.lvm-iscsi.csi.dev/zone": zone})
    return cluster.ctrl.CreateVolume(req, timeout=600).volume


def use(cluster, vid: str, cap=MOUNT):
    return cluster.stage_publish(vid, cluster.publish(vid, cap=cap), cap=cap)


def test_snapshot_restore_holds_exactly_the_data_before_it(cluster):
    src = cluster.create("snap-src", size=128 * MiB, zone="zone-a")
    target = use(cluster, src.volume_id)
    before = cluster.write(target)
    snap = snapshot(cluster, "snap-1", src.volume_id)
    assert snap.ready_to_use and snap.source_volume_id == src.volume_id and snap.size_bytes == src.capacity_bytes
    assert snapshot(cluster, "snap-1", src.volume_id).snapshot_id == snap.snapshot_id      # idempotent
    after = cluster.write(target)
    assert after != before
    listed = cluster.ctrl.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=src.volume_id)).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]

    r1 = restore(cluster, "restore-1", 192 * MiB, zone="zone-a", snapshot_id=snap.snapshot_id)
    assert r1.content_source.snapshot.snapshot_id == snap.snapshot_id and r1.capacity_bytes == 192 * MiB
    t1 = use(cluster, r1.volume_id)
    assert cluster.read(t1) == before
    df = cluster.w.run(["df", "--output=size", "-B1", str(t1)], timeout=30).stdout.split()[-1]
    assert int(df) > 150 * MiB, f"the filesystem was not grown to the restored size: {df}"
    cluster.teardown(r1.volume_id)

    # the snapshot outlives its source
    cluster.teardown(src.volume_id)
    r2 = restore(cluster, "restore-2", 128 * MiB, zone="zone-a", snapshot_id=snap.snapshot_id)
    t2 = use(cluster, r2.volume_id)
    assert cluster.read(t2) == before
    cluster.teardown(r2.volume_id)

    # across storage nodes: the agent of storage-2 copies from storage-1 and verifies
    r3 = restore(cluster, "restore-remote", 128 * MiB, zone="zone-b", snapshot_id=snap.snapshot_id)
    assert r3.volume_id.startswith("v1:storage-2:")
    assert restore(cluster, "restore-remote", 128 * MiB, zone="zone-b",
                   snapshot_id=snap.snapshot_id).volume_id == r3.volume_id
    t3 = use(cluster, r3.volume_id)
    assert cluster.read(t3) == before
    cluster.teardown(r3.volume_id)

    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def test_clone_of_a_volume_in_use_same_node_and_across(cluster):
    src = cluster.create("clone-src", size=64 * MiB, zone="zone-a")
    target = use(cluster, src.volume_id)
    digest = cluster.write(target)
    near = restore(cluster, "clone-near", 64 * MiB, zone="zone-a", volume_id=src.volume_id)
    far = restore(cluster, "clone-far", 64 * MiB, zone="zone-b", volume_id=src.volume_id)
    assert near.volume_id.startswith("v1:storage-1:") and far.volume_id.startswith("v1:storage-2:")
    assert far.content_source.volume.volume_id == src.volume_id
    cluster.teardown(src.volume_id)
    for v in (near, far):
        t = use(cluster, v.volume_id)
        assert cluster.read(t) == digest
        cluster.teardown(v.volume_id)
    # the point-in-time snapshot made for the copy across nodes is gone too
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


@pytest.mark.parametrize("cap,fs", [(MOUNT, "ext4"), (XFS, "xfs")])
def test_online_expansion_while_a_writer_runs(cluster, cap, fs):
    v = cluster.create(f"grow-{fs}", size=320 * MiB, zone="zone-a", cap=cap)
    target = use(cluster, v.volume_id, cap=cap)
    digest = cluster.write(target)
    w = cluster.w
    w.spawn(f"writer-{fs}", ["dd", "if=/dev/zero", f"of={target}/stream.bin", "bs=1M", "count=150",
                             "oflag=direct"])
    grown = cluster.ctrl.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=csi.CapacityRange(required_bytes=GiB)), timeout=120)
    assert grown.capacity_bytes == GiB and grown.node_expansion_required
    staging, _ = cluster.paths(v.volume_id)
    r = cluster.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=v.volume_id, volume_path=str(target), staging_target_path=str(staging), volume_capability=cap,
        capacity_range=csi.CapacityRange(required_bytes=GiB)), timeout=120)
    assert r.capacity_bytes == GiB
    assert w.wait_exit(f"writer-{fs}", timeout=300) == 0
    size = int(w.run(["df", "--output=size", "-B1", str(target)], timeout=30).stdout.split()[-1])
    assert size > 900 * MiB, f"df shows {size} bytes after growing to 1 GiB"
    assert cluster.read(target) == digest
    cluster.teardown(v.volume_id)


def test_block_expansion_needs_only_the_rescan(cluster):
    v = cluster.create("grow-block", size=64 * MiB, zone="zone-a", cap=BLOCK)
    target = use(cluster, v.volume_id, cap=BLOCK)
    cluster.ctrl.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=csi.CapacityRange(required_bytes=128 * MiB)), timeout=120)
    staging, _ = cluster.paths(v.volume_id)
    r = cluster.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=v.volume_id, volume_path=str(target), staging_target_path=str(staging), volume_capability=BLOCK,
        capacity_range=csi.CapacityRange(required_bytes=128 * MiB)), timeout=120)
    assert r.capacity_bytes == 128 * MiB
    size = cluster.w.run(["blockdev", "--getsize64", str(target)], timeout=30).stdout.strip()
    assert int(size) == 128 * MiB
    cluster.teardown(v.volume_id)


def test_bad_snapshot_and_expansion_requests_change_nothing(cluster):
    thick = cluster.create("thick-src", size=16 * MiB, zone="zone-a", params={"type": "thick"})
    v = cluster.create("bad-ref", size=64 * MiB, zone="zone-a")
    snap = snapshot(cluster, "bad-ref-snap", v.volume_id)
    state = cluster.storage_state()
    gone_vol = "v1:storage-1:csi-vg:" + ids.lv_name("e2e", "never-made")
    gone_snap = "s1:storage-1:csi-vg:" + ids.lv_name("e2e", "never-made", kind="snapshot")
    ctrl = cluster.ctrl
    cases = [
        (ctrl.CreateSnapshot, csi.CreateSnapshotRequest(name="x", source_volume_id=gone_vol),
         grpc.StatusCode.NOT_FOUND),
        (ctrl.CreateSnapshot, csi.CreateSnapshotRequest(source_volume_id=v.volume_id),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateSnapshot, csi.CreateSnapshotRequest(name="bad-ref-snap", source_volume_id=thick.volume_id),
         grpc.StatusCode.ALREADY_EXISTS),
        (ctrl.CreateSnapshot, csi.CreateSnapshotRequest(name="thick-snap", source_volume_id=thick.volume_id),
         grpc.StatusCode.FAILED_PRECONDITION),
        (ctrl.CreateVolume, _restore_req("r-missing", 64 * MiB, gone_snap), grpc.StatusCode.NOT_FOUND),
        (ctrl.CreateVolume, _restore_req("r-small", 32 * MiB, snap.snapshot_id), grpc.StatusCode.OUT_OF_RANGE),
        (ctrl.ControllerExpandVolume, csi.ControllerExpandVolumeRequest(
            volume_id=v.volume_id, capacity_range=csi.CapacityRange(required_bytes=1 << 45)),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ctrl.ControllerExpandVolume, csi.ControllerExpandVolumeRequest(
            volume_id=v.volume_id, capacity_range=csi.CapacityRange(required_bytes=16 * MiB)),
         grpc.StatusCode.OUT_OF_RANGE),
        (ctrl.ControllerExpandVolume, csi.ControllerExpandVolumeRequest(
            volume_id=gone_vol, capacity_range=csi.CapacityRange(required_bytes=GiB)), grpc.StatusCode.NOT_FOUND),
    ]
    failures = []
    for fn, req, want in cases:
        try:
            fn(req, timeout=120)
            failures.append(f"{type(req).__name__} {str(req)[:90]!r}: succeeded, want {want.name}")
        except grpc.RpcError as exc:
            if exc.code() != want:
                failures.append(f"{type(req).__name__} {str(req)[:90]!r}: {exc.code().name} ({exc.details()})")
    assert not failures, "\n".join(failures)
    assert cluster.storage_state() == state
    sizes = cluster.ctrl.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert sizes.volume.capacity_bytes == 64 * MiB
    ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for x in (v, thick):
        ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=x.volume_id))
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def _restore_req(name: str, size: int, snapshot_id: str) -> csi.CreateVolumeRequest:
    req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                  volume_capabilities=[MOUNT])
    req.volume_content_source.snapshot.snapshot_id = snapshot_id
    return req
