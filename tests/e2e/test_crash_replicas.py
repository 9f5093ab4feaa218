"""Crash at every step of replicated volumes (issue 15): the controller killed between placing a volume's two
legs and making them, and between deleting them; the node plugin killed after assembling the array, after
stopping it, after putting a leg that came back into it, and after its record named a leg that replaced one. Restarted without the fault, the call retried:
exactly the objects that should exist do, on both storage nodes and on the worker, and then nothing."""

from __future__ import annotations

import grpc
import pytest

from csi import faults, ids
from csi.controller.journal import FileJournal
from csi.proto import csi_pb2 as csi
from tests.e2e.arrays import PARAMS, array_line, synced
from tests.e2e.cluster import MOUNT, MiB, wait_for_wipes, wait_until
from tests.e2e.crash import ENV, TRIED, crash_controller_during, crash_node_during, \
    crash_node_in_unstage

pytestmark = pytest.mark.e2e
campaign = pytest.mark.campaign


def inventory(cluster) -> dict:
    """What of this driver exists: per storage node its LVs, targets with their ACLs and agent records; on the
    worker its iSCSI sessions and node records, mounts under the kubelet dir and running arrays; the journal."""
    out = {}
    base = "/sys/kernel/config/target/iscsi"
    for n in (cluster.s1, cluster.s2):
        targets = {t: sorted(n.run(["ls", f"{base}/{t}/tpgt_1/acls"], timeout=30).stdout.split())
                   for t in n.run(["ls", base], timeout=30).stdout.split() if t.startswith("iqn.")}
        records = sorted(p.stem for p in (cluster.d.agent_state(n) / "volumes").glob("*/*.json"))
        out[n.name] = {"lvs": sorted(x for x in wait_for_wipes(n) if x != "thinpool"), "targets": targets,
                       "records": records}
    w = cluster.w
    out["sessions"] = sorted(x for x in w.run(["iscsiadm", "-m", "session"], timeout=30).stdout.split("\n") if x)
    out["node_records"] = sorted(x for x in w.run(["iscsiadm", "-m", "node"], timeout=30).stdout.split("\n") if x)
    out["mounts"] = sorted(line.split()[4] for line in w.run(["cat", "/proc/self/mountinfo"], timeout=30).stdout
                           .splitlines() if str(cluster.kubelet) in line.split()[4])
    out["arrays"] = sorted(line.split()[0] for line in w.run(["cat", "/proc/mdstat"], timeout=30).stdout
                           .splitlines() if " : active" in line)
    out["journal"] = sorted(e.key for e in FileJournal(cluster.d.journal_dir).entries())
    return out


def empty() -> dict:
    nothing = {"lvs": [], "targets": {}, "records": []}
    return {"storage-1": nothing, "storage-2": nothing, "sessions": [], "node_records": [], "mounts": [],
            "arrays": [], "journal": []}


def create_req(name: str) -> csi.CreateVolumeRequest:
    req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=32 * MiB),
                                  volume_capabilities=[MOUNT], parameters=PARAMS)
    req.accessibility_requirements.requisite.add(segments={"topology.lvm-iscsi.csi.dev/zone": "zone-a"})
    return req


def _both_legs_only(cluster, key: str) -> None:
    inv = inventory(cluster)
    for node in ("storage-1", "storage-2"):
        assert inv[node]["lvs"] == [key] and inv[node]["records"] == [key], (node, inv[node])
        assert list(inv[node]["targets"].values()) == [[]], (node, inv[node]["targets"])
    assert inv["journal"] == [key], inv["journal"]


@pytest.mark.parametrize("step", [pytest.param("replicas.placed", marks=campaign), "replicas.leg0-made",
                                  pytest.param("replicas.leg1-made", marks=campaign)])
def test_controller_crash_in_a_replicated_create(cluster, step):
    """Killed after recording where the legs go, or after making one or both: the retry makes the missing leg
    where the journal says, and exactly one LV, record and target exist on each storage node."""
    req = create_req(f"crash-r-{step.replace('.', '-')}")
    vol = crash_controller_during(cluster, step,
                                  lambda **kw: cluster.ctrl.CreateVolume(req, timeout=120, **kw)).volume
    key = ids.parse_replicated_id(vol.volume_id)
    _both_legs_only(cluster, key)
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
    assert inventory(cluster) == empty()


@campaign
@pytest.mark.parametrize("step", ["replicas.leg0-deleted", "replicas.leg1-deleted"])
def test_controller_crash_in_a_replicated_delete(cluster, step):
    vol = cluster.ctrl.CreateVolume(create_req(f"crash-r-{step.replace('.', '-')}"), timeout=120).volume
    req = csi.DeleteVolumeRequest(volume_id=vol.volume_id)
    crash_controller_during(cluster, step, lambda **kw: cluster.ctrl.DeleteVolume(req, timeout=120, **kw))
    assert inventory(cluster) == empty()


@campaign
@pytest.mark.parametrize("step", ["stage.assemble", "unstage.stop"])
def test_node_crash_in_a_replicated_stage_and_unstage(cluster, step):
    vol = cluster.ctrl.CreateVolume(create_req(f"crash-r-{step.replace('.', '-')}"), timeout=120).volume
    ctx = cluster.publish(vol.volume_id)
    staging, target = cluster.paths(vol.volume_id)
    staging.mkdir(parents=True, exist_ok=True)
    if step == "stage.assemble":
        req = csi.NodeStageVolumeRequest(volume_id=vol.volume_id, publish_context=ctx,
                                         staging_target_path=str(staging), volume_capability=MOUNT)
        crash_node_during(cluster, step, lambda: cluster.node.NodeStageVolume(req, timeout=120))
        inv = inventory(cluster)
        assert inv["mounts"] == [str(staging)] and len(inv["arrays"]) == 1 and len(inv["sessions"]) == 2, inv
        target = cluster.stage_publish(vol.volume_id, ctx)
        digest = cluster.write(target, mib=2)
        assert cluster.read(target) == digest
    else:
        crash_node_in_unstage(cluster, vol.volume_id, ctx, step)
        inv = inventory(cluster)
        assert (inv["mounts"], inv["arrays"], inv["sessions"], inv["node_records"]) == ([], [], [], []), inv
    cluster.teardown(vol.volume_id)
    assert inventory(cluster) == empty()


def _staged(cluster, stage) -> bool:
    try:
        cluster.node.NodeStageVolume(stage, timeout=120)
        return True
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ABORTED:
            raise
        return False


@campaign
def test_node_crash_right_after_making_a_restored_volumes_array_from_its_seed(cluster):
    """Killed once the restore's array exists on its seed leg alone: the retried stage finds it running, the
    restarted plugin's reconciler adds the new leg, and the volume reads its snapshot's data."""
    src = cluster.ctrl.CreateVolume(create_req("crash-r-seed-source"), timeout=120).volume
    digest = cluster.write(cluster.stage_publish(src.volume_id, cluster.publish(src.volume_id)), mib=2)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="crash-r-seed-snap",
                                                                 source_volume_id=src.volume_id), timeout=120).snapshot
    cluster.teardown(src.volume_id)
    req = create_req("crash-r-seed")
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    vol = cluster.ctrl.CreateVolume(req, timeout=120).volume
    key = ids.parse_replicated_id(vol.volume_id)
    ctx = cluster.publish(vol.volume_id)
    staging, _ = cluster.paths(vol.volume_id)
    staging.mkdir(parents=True, exist_ok=True)
    stage = csi.NodeStageVolumeRequest(volume_id=vol.volume_id, publish_context=ctx,
                                       staging_target_path=str(staging), volume_capability=MOUNT)
    cluster.d.start_node_plugin(cluster.w, env={ENV: "stage.seed-array"})
    with pytest.raises(grpc.RpcError):
        cluster.node.NodeStageVolume(stage, timeout=120)
    assert cluster.w.wait_exit("node-plugin", timeout=60) == -9, "the node plugin did not die at stage.seed-array"
    TRIED.append("node:stage.seed-array")
    cluster.d.start_node_plugin(cluster.w)
    cluster.node_ready()
    # The restarted plugin's reconciler may be adding the new leg right now (ABORTED meanwhile, as the CO retries).
    wait_until("the retried stage is done", lambda: _staged(cluster, stage), timeout=120, every=1.0)
    target = cluster.stage_publish(vol.volume_id, ctx)
    assert cluster.read(target) == digest
    wait_until("the new leg holds the seed's copy", lambda: synced(cluster.w, key), timeout=180)
    cluster.teardown(vol.volume_id)
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120)
    assert inventory(cluster) == empty()


@campaign
def test_node_crash_right_after_putting_a_leg_back(cluster):
    """storage-2 is cut off while the volume is written: md drops its leg. The node plugin's reconciler puts
    the leg back once its session is back and is killed right then; the restarted plugin finds the array
    whole (or resyncing), finishes, and the volume is torn down to nothing."""
    w, s2 = cluster.w, cluster.s2
    vol = cluster.ctrl.CreateVolume(create_req("crash-r-reconcile-readd"), timeout=120).volume
    key = ids.parse_replicated_id(vol.volume_id)
    target = cluster.stage_publish(vol.volume_id, cluster.publish(vol.volume_id))
    wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    try:
        s2.unplug()
        cluster.write(target, mib=2)      # md fails the leg only on I/O
        wait_until("md dropped storage-2's leg", lambda: "_" in array_line(w, key), timeout=60, every=0.5)
        cluster.d.start_node_plugin(w, env={ENV: "reconcile.readd"})
    finally:
        s2.plug()
    assert w.wait_exit("node-plugin", timeout=120) == -9, "the node plugin did not die at reconcile.readd"
    TRIED.append("node:reconcile.readd")
    cluster.d.start_node_plugin(w)
    cluster.node_ready()
    wait_until("the leg is back in sync", lambda: synced(w, key), timeout=120)
    digest = cluster.write(target, mib=2)
    assert cluster.read(target) == digest
    cluster.teardown(vol.volume_id)
    assert inventory(cluster) == empty()


@campaign
def test_node_crash_right_after_a_replaced_leg_is_recorded(cluster):
    """storage-2 is lost for good while the volume is staged: replace-replica-leg puts its leg on storage-3, and
    the node plugin is killed right after its stage record names the new leg (before the old one left the
    array). The restarted plugin logs out of storage-2's leg, adds storage-3's and copies storage-1's to it;
    torn down once storage-2 is back, nothing is left anywhere."""
    w, s1, s2, s3 = cluster.w, cluster.s1, cluster.s2, cluster.s3
    vol = cluster.ctrl.CreateVolume(create_req("crash-r-reconcile-join"), timeout=120).volume
    key = ids.parse_replicated_id(vol.volume_id)
    target = cluster.stage_publish(vol.volume_id, cluster.publish(vol.volume_id))
    wait_until("the array runs with both legs in sync", lambda: synced(w, key), timeout=60)
    try:
        s2.kill()
        cluster.write(target, mib=2)      # md fails the leg only on I/O
        wait_until("md dropped storage-2's leg", lambda: "_" in array_line(w, key), timeout=60, every=0.5)
        cluster.d.start_node_plugin(w, env={ENV: "reconcile.join"})
        r = cluster.d.operator("replace-replica-leg", [s1, s2, s3], vol.volume_id, "storage-2", "--to", "storage-3",
                               "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert w.wait_exit("node-plugin", timeout=120) == -9, "the node plugin did not die at reconcile.join"
        TRIED.append("node:reconcile.join")
        cluster.d.start_node_plugin(w)
        cluster.node_ready()
        wait_until("storage-1's leg is copied to storage-3's", lambda: synced(w, key), timeout=180)
        def sessions():
            return w.run(["iscsiadm", "-m", "session"], timeout=30).stdout
        wait_until("storage-2's session is logged out of", lambda: f"{s2.ip}:3260" not in sessions(), timeout=30)
        assert f"{s3.ip}:3260" in sessions(), sessions()
        digest = cluster.write(target, mib=2)
        assert cluster.read(target) == digest
    finally:
        if not s2.running:
            s2.boot(timeout=180)
            cluster.d.start_agent(s2)
    cluster.teardown(vol.volume_id)
    assert key not in s3.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=60).stdout
    assert inventory(cluster) == empty()


@campaign
def test_kill_points_cover_every_replica_step():
    """Runs last in this module: every replicated-volume step of csi/faults.py was tried by a test above."""
    untried = [s for s in faults.REPLICA_STEPS if f"controller:{s}" not in TRIED] + \
              [s for s in faults.REPLICA_NODE_STEPS if f"node:{s}" not in TRIED]
    assert not untried, f"steps never killed at: {untried}"
