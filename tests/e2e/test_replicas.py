"""Replicated volumes (replicas: "2") on real parts: two LVs on two storage nodes, an md RAID1 over their iSCSI
disks on the worker, a writer that goes on through a storage node's power cut, and the leg put back and
resynced when the node is back, with nobody acting.

The lab's storage nodes are each in a zone of their own (storage-1 zone-a, storage-2 zone-b) and the workers
in zone-a reach both: the class allows the second leg in zone-b (`replicaZones`)."""

from __future__ import annotations

import re
import time

import grpc
import pytest

from csi import contract, ids
from csi.proto import csi_pb2 as csi
from tests.e2e.arrays import PARAMS, array_line, mdstat, synced
from tests.e2e.cluster import MOUNT, PREFIX, MiB, wait_until

PY = "/usr/bin/python3"

# Appends numbered 4 KiB records, each fsync'ed, and logs "<number> <monotonic time>" once it is; an error is
# logged as "ERROR <text>" and the writer goes on (so a test sees every error, not only the first).
WRITER = r"""
import hashlib, os, struct, sys, time
path, log, stop = sys.argv[1:4]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
i = 0
with open(log, "w") as out:
    while not os.path.exists(stop):
        head, body = struct.pack("<Q", i), os.urandom(4096 - 40)
        try:
            os.write(fd, head + hashlib.sha256(head + body).digest() + body)
            os.fsync(fd)
        except OSError as exc:
            out.write(f"ERROR {exc}\n"); out.flush(); time.sleep(0.5); continue
        out.write(f"{i} {time.monotonic():.3f}\n"); out.flush()
        i += 1
        time.sleep(0.01)
"""


def writer_log(text: str) -> tuple[list[tuple[int, float]], list[str]]:
    """WRITER's log: its (record, time) pairs and its error lines."""
    lines = text.splitlines()
    records = [(int(a), float(b)) for a, b in (line.split() for line in lines if not line.startswith("ERROR"))]
    return records, [line for line in lines if line.startswith("ERROR")]


def _log(w, path) -> tuple[list[tuple[int, float]], list[str]]:
    return writer_log(w.run(["cat", str(path)], timeout=30).stdout)


def _leg_digest(node, vg: str, lv: str, mib: int) -> str:
    """The SHA-256 of `mib` MiB of a leg's data: from 1 MiB in (md's metadata 1.2 and bitmap are before it)."""
    r = node.run(["sh", "-c", f"dd if=/dev/{vg}/{lv} bs=1M skip=1 count={mib} status=none | sha256sum"],
                 timeout=300, check=True)
    return r.stdout.split()[0]


def _write_through_an_outage(cluster, key: str, target, cut, restore, record_property, label: str) -> None:
    """A writer fsyncs numbered records on the staged volume while `cut` takes one storage node away and
    `restore` brings it back: no write error, the array degraded within seconds, the leg re-added and resynced
    with nobody acting, the worst stall between two records under 20 s, every record fsync'ed reads back."""
    w = cluster.w
    # not replica-writer.log: that is the spawned process's own output
    log, stop = w.workdir / "replica-records.log", w.workdir / "replica-writer.stop"
    w.run(["rm", "-f", str(stop), str(log)], timeout=30)
    w.spawn("replica-writer", [PY, "-c", WRITER, f"{target}/records.bin", str(log), str(stop)])
    restored = False
    try:
        wait_until("the writer has fsync'ed 100 records", lambda: len(_log(w, log)[0]) >= 100, timeout=60)
        cut_at = time.monotonic()
        cut()
        wait_until("the array runs degraded on one leg", lambda: array_line(w, key) in ("[2/1] [U_]", "[2/1] [_U]"),
              timeout=60, every=0.5)
        degraded_after = time.monotonic() - cut_at
        before = len(_log(w, log)[0])
        wait_until("the writer goes on with one leg", lambda: len(_log(w, log)[0]) >= before + 100, timeout=60)

        restored = True
        restore()
        back = time.monotonic()
        wait_until("the leg is re-added and resynced", lambda: synced(w, key), timeout=180, every=1.0)
        resynced_after = time.monotonic() - back
        done = len(_log(w, log)[0])
        wait_until("the writer goes on with both legs", lambda: len(_log(w, log)[0]) >= done + 50, timeout=60)
    finally:
        if not restored:
            restore()
        w.run(["touch", str(stop)], timeout=30)
        w.wait_exit("replica-writer", timeout=60)

    records, write_errors = _log(w, log)
    assert write_errors == [], f"the writer saw errors: {write_errors[:5]}"
    stall = max(b[1] - a[1] for a, b in zip(records, records[1:]))
    record_property(f"replica_{label}_worst_write_stall_s", round(stall, 1))
    record_property(f"replica_{label}_degraded_after_s", round(degraded_after, 1))
    record_property(f"replica_{label}_resynced_after_s", round(resynced_after, 1))
    print(f"{label}: worst stall between two fsync'ed records {stall:.1f}s; degraded after {degraded_after:.1f}s; "
          f"resynced {resynced_after:.1f}s after the node was back")
    assert stall < 20, f"a write waited {stall:.1f}s (the bound is 20 s)"
    r = w.run([PY, "-c", PREFIX, f"{target}/records.bin"], timeout=120)
    assert r.rc == 0, r.stderr
    assert int(r.stdout) >= len(records)


def _legs_hold_the_same_bytes(cluster, key: str, legs, mib: int) -> None:
    """Each leg alone holds the same bytes: the array's data, 1 MiB into each LV (the volume is unstaged)."""
    assert not any(" : active" in line for line in mdstat(cluster.w).splitlines()), mdstat(cluster.w)
    nodes = {"storage-1": cluster.s1, "storage-2": cluster.s2}
    digests = {leg.storage_node: _leg_digest(nodes[leg.storage_node], leg.vg, key, mib) for leg in legs}
    assert len(set(digests.values())) == 1, digests


# The replacement timeout of every session to the given targets, as the kernel holds it.
LEG_TIMEOUTS = """import glob, sys
for s in sorted(glob.glob('/sys/class/iscsi_session/session*')):
    if open(s + '/targetname').read().strip() in sys.argv[1:]:
        print(open(s + '/recovery_tmo').read().strip())
"""


def test_a_writer_goes_on_through_a_storage_node_power_cut_and_the_leg_resyncs_by_itself(cluster, record_property):
    s1, s2, w = cluster.s1, cluster.s2, cluster.w
    v = cluster.create("replicated-power-cut", size=128 * MiB, zone="zone-a", params=PARAMS)
    assert v.volume_id.startswith("r1:")
    key = ids.parse_replicated_id(v.volume_id)
    ctx = cluster.publish(v.volume_id)
    legs = contract.parse_replicated(ctx, key)
    assert sorted(leg.storage_node for leg in legs) == ["storage-1", "storage-2"]
    target = cluster.stage_publish(v.volume_id, ctx)
    assert wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    # Each leg's session fails its I/O 5 s after its storage node stops answering (LEG_SETTINGS, written into
    # the node record by the plugin): the kernel's own figure.
    iqns = sorted({leg.attachment.iqn for leg in legs})
    timeouts = w.run([PY, "-c", LEG_TIMEOUTS, *iqns], timeout=30, check=True).stdout.split()
    assert timeouts == ["5", "5"], timeouts

    # Nothing but the node plugin assembles the array: udev on the storage nodes, told about the legs again,
    # leaves them alone (Debian's incremental assembly rule is installed in the lab: mdadm is a driver package).
    for node in (s1, s2):
        # The worker wrote the superblock through LIO, below the storage node's page cache: drop what that cache
        # holds of the LV (zeros read at its creation), as a reboot would, so blkid and udev see the superblock.
        node.run(["blockdev", "--flushbufs", f"/dev/csi-vg/{key}"], timeout=60, check=True)
        node.run(["udevadm", "trigger", "--subsystem-match=block", "--action=change"], timeout=60, check=True)
        node.run(["udevadm", "settle", "--timeout=30"], timeout=60)
        found = node.run(["blkid", "-p", "-o", "value", "-s", "TYPE", f"/dev/csi-vg/{key}"], timeout=30).stdout
        assert found.strip() == "linux_raid_member"
        assert "md" not in "".join(line for line in mdstat(node).splitlines() if " : active" in line), \
            f"{node.name} assembled a replica leg by itself: {mdstat(node)}"

    # storage-2 loses its power: its leg's I/O stops without an answer.
    def restore():
        s2.boot(timeout=180)
        cluster.d.start_agent(s2)
    _write_through_an_outage(cluster, key, target, s2.kill, restore, record_property, "power_cut")

    # Online expansion: both legs grow, then the array (md moves its superblock to the new end), then ext4.
    grown = cluster.ctrl.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=csi.CapacityRange(required_bytes=192 * MiB)), timeout=120)
    assert grown.capacity_bytes >= 192 * MiB and grown.node_expansion_required
    staging, _ = cluster.worker1.paths(v.volume_id)
    resp = cluster.node.NodeExpandVolume(csi.NodeExpandVolumeRequest(
        volume_id=v.volume_id, volume_path=str(target), staging_target_path=str(staging),
        capacity_range=csi.CapacityRange(required_bytes=192 * MiB)), timeout=120)
    assert resp.capacity_bytes >= 192 * MiB
    df = w.run(["df", "-B1", "--output=size", str(target)], timeout=30, check=True).stdout.split()[-1]
    assert int(df) > 170 * MiB, f"the filesystem did not grow: {df} bytes"
    wait_until("the grown array is in sync", lambda: synced(w, key), timeout=120)   # md resyncs the new region
    assert w.run([PY, "-c", PREFIX, f"{target}/records.bin"], timeout=120).rc == 0

    cluster.worker1.unstage(v.volume_id)
    _legs_hold_the_same_bytes(cluster, key, legs, 120)

    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


@pytest.mark.campaign   # the power cut above runs in CI; this variant in scripts/fault-campaign (CI's 60 minutes)
def test_a_writer_goes_on_while_the_other_storage_node_is_cut_off_by_the_network(cluster, record_property):
    """The same with storage-1, the leg of the volume's own zone, and a network cut instead of a power cut: the
    node runs on with its agent and target, unreachable; its iSCSI session comes back by itself when the cable
    is back, and the node plugin re-adds the leg."""
    s1, w = cluster.s1, cluster.w
    v = cluster.create("replicated-network-cut", size=64 * MiB, zone="zone-a", params=PARAMS)
    key = ids.parse_replicated_id(v.volume_id)
    ctx = cluster.publish(v.volume_id)
    legs = contract.parse_replicated(ctx, key)
    target = cluster.stage_publish(v.volume_id, ctx)
    assert wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    _write_through_an_outage(cluster, key, target, s1.unplug, s1.plug, record_property, "network_cut")
    cluster.worker1.unstage(v.volume_id)
    _legs_hold_the_same_bytes(cluster, key, legs, 60)
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def _stage(cluster, vid: str, ctx: dict) -> None:
    staging, _ = cluster.worker1.paths(vid)
    staging.mkdir(parents=True, exist_ok=True)
    cluster.node.NodeStageVolume(csi.NodeStageVolumeRequest(volume_id=vid, publish_context=ctx,
                                                            staging_target_path=str(staging),
                                                            volume_capability=MOUNT), timeout=120)


def _written_alone_on_storage_1_then_lost(cluster, name: str):
    """The worker writes on storage-1's leg alone (storage-2 cut off) and stops; storage-1 goes down and
    storage-2 comes back. Returns (volume, key, the data before, the data only storage-1's leg holds)."""
    s1, s2, w = cluster.s1, cluster.s2, cluster.w
    v = cluster.create(name, size=64 * MiB, zone="zone-a", params=PARAMS)
    key = ids.parse_replicated_id(v.volume_id)
    target = cluster.stage_publish(v.volume_id, cluster.publish(v.volume_id))
    wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    older = cluster.write(target, mib=4)
    s2.kill()
    wait_until("the array runs on storage-1's leg alone", lambda: "_" in array_line(w, key), timeout=60, every=0.5)
    newest = cluster.write(target, mib=4)       # held by storage-1's leg only
    # The record that storage-2's leg is outdated, outside it: storage-1's superblock shows it missing once md
    # acknowledged those writes (raid1 completes no write the failed leg missed before it wrote that).
    s1.run(["blockdev", "--flushbufs", f"/dev/csi-vg/{key}"], timeout=60, check=True)
    examined = s1.run(["mdadm", "--examine", f"/dev/csi-vg/{key}"], timeout=60, check=True).stdout
    state = re.search(r"Array State : (\S+)", examined).group(1)
    assert sorted(state) == [".", "A"], examined
    cluster.worker1.unstage(v.volume_id)
    s1.kill()
    s2.boot(timeout=180)
    cluster.d.start_agent(s2)
    return v, key, older, newest


def _refused(cluster, vid: str, key: str) -> None:
    """The stage refuses: storage-1 does not answer and nothing proves storage-2's leg current."""
    ctx = cluster.publish(vid)          # storage-1 does not answer: its leg is named, not granted
    legs = contract.parse_replicated(ctx, key)
    assert [(leg.storage_node, leg.attachment is None) for leg in legs
            if leg.storage_node == "storage-1"] == [("storage-1", True)]
    with pytest.raises(grpc.RpcError) as e:
        _stage(cluster, vid, ctx)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "storage-1" in e.value.details(), e.value.details()
    w = cluster.w
    assert not any(" : active" in line for line in mdstat(w).splitlines()), mdstat(w)
    sessions = w.run(["iscsiadm", "-m", "session"], timeout=30).stdout
    assert key.lower() not in sessions.lower(), f"the refused stage left a session: {sessions}"
    # Nor is a snapshot taken of that leg: the controller reads the same proof in its superblock.
    with pytest.raises(grpc.RpcError) as e:
        cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name=f"{key}-snap", source_volume_id=vid), timeout=120)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "storage-1" in e.value.details(), e.value.details()


def _both_back(cluster) -> None:
    for node in (cluster.s1, cluster.s2):
        if not node.running:
            node.boot(timeout=180)
            cluster.d.start_agent(node)


def test_a_leg_left_behind_is_never_served_as_current(cluster):
    """The sequence md's event counts cannot cover alone: the worker writes on storage-1's leg alone (storage-2
    cut off), stops; storage-1 goes down and storage-2 comes back. The leg that is left can show nothing stale
    in itself, and its superblock shows both legs in sync: the stage refuses. Once storage-1 is back, a stage on
    the other worker assembles from its leg (the newest) and resyncs storage-2's."""
    try:
        v, key, _, newest = _written_alone_on_storage_1_then_lost(cluster, "replicated-left-behind")
        _refused(cluster, v.volume_id, key)
    finally:
        _both_back(cluster)     # storage-1 comes back here

    # storage-1 back, and the volume moves to worker-2 (worker-1 fenced on both legs): both legs are there, md
    # assembles from the newer and resyncs the other. (The controller may be granting storage-1's leg to worker-1
    # right now, the leg its publish left out: ABORTED meanwhile, as the attacher retries.)
    cluster.unpublish(v.volume_id)
    w2 = cluster.worker2
    target = w2.stage_publish(v.volume_id, cluster.publish(v.volume_id, node_id=w2.node_id))
    assert cluster.read(target, on=w2.w) == newest
    wait_until("storage-2's leg is resynced", lambda: synced(w2.w, key), timeout=120)
    w2.unstage(v.volume_id)
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=v.volume_id, node_id=w2.node_id), timeout=60)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


@pytest.mark.campaign   # scripts/fault-campaign (CI's 60 minutes); the refusal itself runs in CI above
def test_an_operator_outdates_the_lost_leg_and_the_volume_is_served_from_the_other(cluster):
    """The way out of that refusal while storage-1 stays away: an operator records its leg outdated
    (mark-replica-leg), giving up the writes only it holds. The next publish carries the mark, the stage serves
    storage-2's leg alone (the data from before those writes), and once storage-1 is back its leg is cleared and
    copied over in full, never taken for the newest although its event count is higher; then the mark is taken
    back without anyone acting."""
    s1, s2 = cluster.s1, cluster.s2
    try:
        v, key, older, newest = _written_alone_on_storage_1_then_lost(cluster, "replicated-outdated")
        _refused(cluster, v.volume_id, key)
        mark = ["mark-replica-leg", [s1, s2], v.volume_id, "storage-1"]
        r = cluster.d.operator(*mark, "outdated")
        assert r.returncode == 0 and "dry run" in r.stdout, r.stdout + r.stderr
        r = cluster.d.operator(*mark, "outdated", "--yes")
        assert r.returncode == 0 and "recorded" in r.stdout, r.stdout + r.stderr
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
        ctx = cluster.publish(v.volume_id)
        assert [leg.outdated for leg in contract.parse_replicated(ctx, key) if leg.storage_node == "storage-1"] \
            == [True]
        target = cluster.stage_publish(v.volume_id, ctx)
        assert cluster.read(target) == older != newest
    finally:
        _both_back(cluster)
    # storage-1 back: the next publish grants its leg again, and the stage puts it back in full.
    cluster.worker1.unstage(v.volume_id)
    cluster.unpublish(v.volume_id)
    target = cluster.stage_publish(v.volume_id, cluster.publish(v.volume_id))
    wait_until("storage-1's leg is copied over in full", lambda: synced(cluster.w, key), timeout=180)
    assert cluster.read(target) == older
    # The legs' superblocks show it rebuilt: the controller takes the mark back by itself (at a health check or a
    # publish; two legs read while md writes its superblocks show two event counts: the next look takes it back).
    wait_until("the controller takes the outdated mark back", lambda: not list(cluster.ctrl.ControllerGetVolumeHealth(
        csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id), timeout=60).volume_health.health_statuses),
        timeout=60, every=2.0)
    assert not any(leg.outdated for leg in contract.parse_replicated(cluster.publish(v.volume_id), key))
    cluster.teardown(v.volume_id)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def _md_uuid(node, key: str) -> str:
    out = node.run(["mdadm", "--detail", "--export", f"/dev/md/csi-{ids.md_name(key).split(':')[1]}"],
                   timeout=60, check=True).stdout
    return re.search(r"^MD_UUID=(\S+)", out, re.M).group(1)


def test_a_replicated_volume_is_snapshotted_restored_and_cloned_into_new_replicated_volumes(cluster):
    """A snapshot of a replicated volume is taken of a leg its superblock proves current (either, with both in
    sync); its size is the claim's; a restore from it and a clone of the volume are new replicated volumes:
    each gets an array of its own (another UUID) made from its seed leg at its first stage, md copies the seed
    to the new leg, and each reads what its source held at that moment. Plain volumes are made from them too
    (the leg's data copied past md's superblock and bitmap), on the snapshot's node and across nodes."""
    w = cluster.w
    v = cluster.create("replicated-source", size=64 * MiB, zone="zone-a", params=PARAMS)
    key = ids.parse_replicated_id(v.volume_id)
    target = cluster.stage_publish(v.volume_id, cluster.publish(v.volume_id))
    wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    at_snapshot = cluster.write(target, mib=4)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="replicated-snap", source_volume_id=v.volume_id),
                                       timeout=120).snapshot
    assert snap.source_volume_id == v.volume_id and snap.ready_to_use and snap.size_bytes == 64 * MiB, snap
    # Both legs are in sync: either is current (the one whose superblock was written last is taken).
    snap_node = ids.parse_id(snap.snapshot_id, kind="snapshot").node
    listed = cluster.ctrl.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=v.volume_id), timeout=60).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]
    at_clone = cluster.write(target, mib=4)
    from_snap = csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id))
    # Plain volumes from them: the leg's data, past md's superblock and bitmap, copied; from the snapshot on its
    # own node, and from the volume (its current leg, at this moment) onto the other storage node.
    zone_of = {"storage-1": "zone-a", "storage-2": "zone-b"}
    other_zone = zone_of["storage-2" if snap_node == "storage-1" else "storage-1"]
    plain_restored = cluster.create("plain-from-replicated", size=64 * MiB, zone=zone_of[snap_node],
                                    source=from_snap)
    plain_clone = cluster.create("plain-clone-of-replicated", size=64 * MiB, zone=other_zone,
                                 source=csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(
                                     volume_id=v.volume_id)))
    for vol, expected in ((plain_restored, at_snapshot), (plain_clone, at_clone)):
        assert vol.capacity_bytes >= 64 * MiB and vol.volume_id.startswith("v1:"), vol
        assert cluster.read(cluster.stage_publish(vol.volume_id, cluster.publish(vol.volume_id))) == expected
        cluster.teardown(vol.volume_id)

    restored = cluster.create("replicated-restored", size=64 * MiB, zone="zone-a", params=PARAMS, source=from_snap)
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    clone = cluster.create("replicated-clone", size=64 * MiB, zone="zone-a", params=PARAMS,
                           source=csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(
                               volume_id=v.volume_id)))
    made = []
    for vol, expected in ((restored, at_snapshot), (clone, at_clone)):
        new_key = ids.parse_replicated_id(vol.volume_id)
        ctx = cluster.publish(vol.volume_id)
        seeds = {leg.storage_node for leg in contract.parse_replicated(ctx, new_key) if leg.seed}
        assert len(seeds) == 1 and (vol is clone or seeds == {snap_node}), (seeds, snap_node)
        new_target = cluster.stage_publish(vol.volume_id, ctx)
        assert cluster.read(new_target) == expected
        assert _md_uuid(w, new_key) != _md_uuid(w, key)
        wait_until("the seed is copied to the new leg", lambda: synced(w, new_key), timeout=180)
        made.append((vol, new_target))
    written = cluster.write(made[0][1], mib=2)
    assert cluster.read(made[0][1]) == written and cluster.read(target) == at_clone
    for vol in (clone, restored, v):
        cluster.teardown(vol.volume_id)
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


@pytest.mark.campaign   # scripts/fault-campaign (CI's 60 minutes); unit-tested in tests/unit/test_legreplace.py
def test_a_leg_lost_for_good_is_replaced_on_another_storage_node(cluster):
    """storage-2 is lost while the volume is written: the writes go on on storage-1's leg. replace-replica-leg
    (as an operator runs it) puts a new leg on storage-3, and the worker running the volume adds it to its array
    by itself (Kubernetes keeps the old publish_context: the node plugin learns it from storage-1's agent) and
    copies storage-1's leg to it in full while the pod keeps writing; storage-2's session is gone from the
    worker. The next stage (a publish_context naming storage-3) reads the newest data; storage-2's old LV is
    deleted once that node is back."""
    s1, s2, s3, w = cluster.s1, cluster.s2, cluster.s3, cluster.w
    v = cluster.create("replicated-replaced", size=64 * MiB, zone="zone-a", params=PARAMS)
    key = ids.parse_replicated_id(v.volume_id)
    target = cluster.stage_publish(v.volume_id, cluster.publish(v.volume_id))
    wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    replace = ["replace-replica-leg", [s1, s2, s3], v.volume_id, "storage-2", "--to", "storage-3"]

    def portals():
        return w.run(["iscsiadm", "-m", "session"], timeout=30).stdout
    try:
        s2.kill()
        cluster.write(target, mib=4)
        wait_until("the array runs on storage-1's leg alone", lambda: "_" in array_line(w, key), timeout=60,
                   every=0.5)
        r = cluster.d.operator(*replace)
        assert r.returncode == 0 and "dry run" in r.stdout, r.stdout + r.stderr
        r = cluster.d.operator(*replace, "--yes")
        assert r.returncode == 0 and "add(s) it to the running array" in r.stdout, r.stdout + r.stderr
        started = time.monotonic()
        wait_until("storage-3's leg joins the running array", lambda: f"{s3.ip}:3260" in portals(), timeout=60)
        joined = time.monotonic() - started
        newest = cluster.write(target, mib=4)      # the pod goes on while the new leg fills
        wait_until("storage-1's leg is copied to storage-3's in full", lambda: synced(w, key), timeout=180)
        print(f"storage-3's leg was logged in {joined:.1f} s after replace-replica-leg; in sync "
              f"{time.monotonic() - started:.1f} s after it")
        assert cluster.read(target) == newest
        # the lost leg's session goes once the new leg is in the array (the reconciler's next round)
        wait_until("storage-2's session is logged out of", lambda: f"{s2.ip}:3260" not in portals(), timeout=30)
        cluster.worker1.unstage(v.volume_id)
        assert key.lower() not in portals().lower(), portals()
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
        ctx = cluster.publish(v.volume_id)
        assert sorted(leg.storage_node for leg in contract.parse_replicated(ctx, key)) == ["storage-1", "storage-3"]
        target = cluster.stage_publish(v.volume_id, ctx)
        assert cluster.read(target) == newest
        # the new leg holds everything: nothing to copy again
        wait_until("the array runs in sync at once", lambda: synced(w, key), timeout=10)
    finally:
        _both_back(cluster)
    cluster.worker1.unstage(v.volume_id)
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
    cluster.publish(v.volume_id)                  # storage-2 answers again: its old leg goes
    lvs = s2.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=60).stdout
    assert key not in lvs, lvs
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert key not in s3.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=60).stdout
    assert not list((cluster.d.agent_state(s1) / "peer-legs").glob("*/*.json"))   # gone with the volume
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def test_a_volume_detached_cleanly_stages_from_one_leg_once_the_other_is_lost(cluster):
    """The common loss: the pod had stopped (the volume unstaged and detached with both legs in sync), then
    storage-2 went down. Its leg's superblock cannot show that, but the controller stamped md's event count at
    the detach and storage-1's leg still shows it (nothing written since): the next publish records storage-2's
    leg outdated by itself and the stage serves storage-1's with the data. Once storage-2 is back, the controller
    grants its leg (left out of the publish) by itself, the running worker copies storage-1's leg to it in full,
    and the mark is taken back."""
    s2, w = cluster.s2, cluster.w
    v = cluster.create("replicated-clean-detach", size=64 * MiB, zone="zone-a", params=PARAMS)
    key = ids.parse_replicated_id(v.volume_id)
    target = cluster.stage_publish(v.volume_id, cluster.publish(v.volume_id))
    wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    data = cluster.write(target, mib=4)
    unpublish = csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=cluster.node_id)
    cluster.worker1.unstage(v.volume_id)
    cluster.ctrl.ControllerUnpublishVolume(unpublish, timeout=60)
    try:
        s2.kill()
        ctx = cluster.publish(v.volume_id)
        assert [(leg.storage_node, leg.outdated) for leg in contract.parse_replicated(ctx, key)] == [
            ("storage-1", False), ("storage-2", True)]
        target = cluster.stage_publish(v.volume_id, ctx)
        assert cluster.read(target) == data
        more = cluster.write(target, mib=2)
    finally:
        _both_back(cluster)
    # The pod runs on: the controller grants storage-2's leg, left out of the publish, once its agent answers
    # (late_grants.py), and the worker's node plugin logs in and copies storage-1's leg to it in full (outdated).
    wait_until("storage-2's leg is granted late and copied over in full", lambda: synced(w, key), timeout=180)
    assert cluster.read(target) == more
    wait_until("the controller takes the outdated mark back", lambda: not list(cluster.ctrl.ControllerGetVolumeHealth(
        csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id), timeout=60).volume_health.health_statuses),
        timeout=60, every=2.0)
    cluster.teardown(v.volume_id)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}
