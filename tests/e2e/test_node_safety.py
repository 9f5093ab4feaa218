"""The node side of issue 12 (data safety) on real parts: blkid, LIO, open-iscsi and ext4 in UML.

- a partitioned disk is never formatted (defect 1), and a staging path holding another disk is refused
  (defect 9);
- mutual CHAP, read-only access from two workers, upper-case initiator names: what only unit tests covered;
- two releases of the driver on one worker leave each other's sessions alone when one restarts.
"""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest

from csi import ids
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from tests.e2e.cluster import BLOCK, MOUNT, M, MiB

pytestmark = pytest.mark.e2e
LIO = "/sys/kernel/config/target/iscsi"


@pytest.fixture(autouse=True)
def leave_nothing(cluster):
    """After each test, whatever it failed to tear down goes (so one failure does not fail the tests after
    it): mounts under the kubelet directories, sessions and node records on the workers, the node plugins'
    stage records, then every snapshot and volume with its grants."""
    yield
    for worker in (cluster.worker1, cluster.worker2):
        w, kubelet = worker.w, str(worker.kubelet)
        points = {line.split()[4] for line in w.run(["cat", "/proc/self/mountinfo"], timeout=30).stdout.splitlines()}
        for point in sorted((p for p in points if p.startswith(kubelet + "/")), key=len, reverse=True):
            w.run(["umount", "-l", point], timeout=60)
        w.run(["iscsiadm", "-m", "node", "--logoutall=all"], timeout=60)
        w.run(["iscsiadm", "-m", "node", "-o", "delete"], timeout=60)
        for record in worker.kubelet.glob("plugins/*/staged/**/*"):
            if record.is_file():
                record.unlink()
    ctrl = cluster.ctrl
    for entry in ctrl.ListSnapshots(csi.ListSnapshotsRequest(), timeout=60).entries:
        ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=entry.snapshot.snapshot_id), timeout=120)
    for entry in ctrl.ListVolumes(csi.ListVolumesRequest(), timeout=60).entries:
        vid = entry.volume.volume_id
        ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vid), timeout=60)
        ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120)


def mount_cap(mode) -> csi.VolumeCapability:
    return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=M(mode=mode))


def rpc_error(fn, req, timeout=120) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(req, timeout=timeout)
    return e.value


def sessions(node) -> list[str]:
    """Target IQNs of the node's iSCSI sessions."""
    r = node.run(["iscsiadm", "-m", "session"], timeout=30)
    return sorted(line.split()[3] for line in r.stdout.splitlines() if line.strip())


def sha_of_lv(cluster, vid: str, nbytes: int) -> str:
    """SHA-256 of the first MiBs of a volume's LV, read on its storage node (not through iSCSI) with O_DIRECT:
    LIO writes around the storage node's page cache, which may still hold what udev read at lvcreate."""
    ref = ids.parse_id(vid)
    r = cluster.s1.run(["sh", "-c", f"dd if=/dev/{ref.vg}/{ref.lv} bs=1M count={nbytes // MiB} iflag=direct "
                                    "status=none | sha256sum"], timeout=60, check=True)
    return r.stdout.split()[0]


# ---------------------------------------------------------------------------------------------- defect 1

def test_stage_refuses_a_partitioned_disk_and_leaves_table_and_data_intact(cluster):
    """A raw block volume that its user partitioned, snapshotted, and restored into a Filesystem claim (a
    volume mode change): staging it as ext4 must not format it."""
    w = cluster.w
    raw = cluster.create("parted-raw", zone="zone-a", cap=BLOCK)
    dev = cluster.stage_publish(raw.volume_id, cluster.publish(raw.volume_id, cap=BLOCK), cap=BLOCK)
    w.run(["sh", "-c", f"printf 'label: gpt\\n,32M\\n' | sfdisk -q {dev}"], timeout=60, check=True)
    payload = w.workdir / f"payload-{os.getpid()}.bin"
    payload.write_bytes(os.urandom(4 * MiB))
    # behind the partition table: inside the partition (which starts at 1 MiB), where a user's data would be
    w.run(["dd", f"if={payload}", f"of={dev}", "bs=1M", "seek=1", "oflag=direct", "conv=fsync", "status=none"],
          timeout=60, check=True)
    assert "PTTYPE=gpt" in w.run(["blkid", "-p", "-o", "export", str(dev)], timeout=30).stdout
    before = sha_of_lv(cluster, raw.volume_id, 8 * MiB)
    cluster.worker1.unstage(raw.volume_id)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="parted-snap", source_volume_id=raw.volume_id),
                                       timeout=120).snapshot
    restored = cluster.create("parted-fs", zone="zone-a", cap=MOUNT, source=csi.VolumeContentSource(
        snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
    assert sha_of_lv(cluster, restored.volume_id, 8 * MiB) == before
    ctx = cluster.publish(restored.volume_id)
    staging, _ = cluster.paths(restored.volume_id)
    staging.mkdir(parents=True, exist_ok=True)
    err = rpc_error(cluster.node.NodeStageVolume, csi.NodeStageVolumeRequest(
        volume_id=restored.volume_id, publish_context=ctx, staging_target_path=str(staging), volume_capability=MOUNT))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "gpt" in err.details() and "partition table" in err.details(), err.details()
    # nothing was written, and the failed stage left no session, node record or mount behind
    assert sha_of_lv(cluster, restored.volume_id, 8 * MiB) == before
    assert "PTTYPE=gpt" in cluster.s1.run(["blkid", "-p", "-o", "export",
                                           "/dev/csi-vg/" + ids.parse_id(restored.volume_id).lv], timeout=30).stdout
    assert sessions(w) == [] and w.run(["iscsiadm", "-m", "node"], timeout=30).rc == 21
    assert str(staging) not in w.run(["cat", "/proc/self/mountinfo"], timeout=30).stdout
    cluster.teardown(restored.volume_id)
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120)
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=raw.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=raw.volume_id), timeout=120)


# ---------------------------------------------------------------------------------------------- defect 9

def test_stage_refuses_a_staging_path_that_holds_another_volume(cluster):
    a = cluster.create("staged-a", zone="zone-a")
    b = cluster.create("staged-b", zone="zone-a")
    ta = cluster.stage_publish(a.volume_id, cluster.publish(a.volume_id))
    digest = cluster.write(ta, mib=1)
    staging_a, _ = cluster.paths(a.volume_id)
    ctx_b = cluster.publish(b.volume_id)
    err = rpc_error(cluster.node.NodeStageVolume, csi.NodeStageVolumeRequest(
        volume_id=b.volume_id, publish_context=ctx_b, staging_target_path=str(staging_a), volume_capability=MOUNT))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert sessions(cluster.w) == [ids.parse_id(a.volume_id).iqn]    # b was not logged in
    assert cluster.read(ta) == digest                                 # a is still there, untouched
    # the same call for a's own volume is the idempotent repeat it always was
    cluster.node.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=a.volume_id, publish_context=cluster.publish(a.volume_id), staging_target_path=str(staging_a),
        volume_capability=MOUNT), timeout=120)
    cluster.teardown(a.volume_id)
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=b.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=b.volume_id), timeout=120)


# ---------------------------------------------------------------------------------------------- mutual CHAP

def raw_login(node, ctx: dict, target_secret: str) -> int:
    """A login by hand with ctx's CHAP credentials both ways, the target's secret as given: its exit code."""
    base = ["iscsiadm", "-m", "node", "-T", ctx["targetIqn"], "-p", ctx["portals"].split(",")[0]]
    node.run(base + ["-o", "new"], timeout=30, check=True)
    try:
        for k, v in (("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", ctx["chapUser"]),
                     ("node.session.auth.password", ctx["chapSecret"]),
                     ("node.session.auth.username_in", ctx["mutualChapUser"]),
                     ("node.session.auth.password_in", target_secret),
                     ("node.session.initial_login_retry_max", "1"), ("node.conn[0].timeo.login_timeout", "5")):
            node.run(base + ["-o", "update", "-n", k, "-v", v], timeout=30, check=True)
        return node.run(base + ["--login"], timeout=60).rc
    finally:
        node.run(base + ["--logout"], timeout=30)
        node.run(base + ["-o", "delete"], timeout=30)


def test_mutual_chap_logs_in_and_a_wrong_target_secret_is_refused(cluster):
    v = cluster.create("mutual-chap", zone="zone-a", params={"mutualChap": "true"})
    published = cluster.publish(v.volume_id)
    ctx = {**published, **cluster.chap(v.volume_id)}   # the secrets from the agent's record: not in the context
    assert ctx["mutualChapUser"] and len(ctx["mutualChapSecret"]) >= 12
    ref = ids.parse_id(v.volume_id)
    auth = f"{LIO}/{ref.iqn}/tpgt_1/acls/{cluster.node_id}/auth"
    assert cluster.s1.run(["cat", f"{auth}/authenticate_target"], timeout=30).stdout.strip() == "1"
    assert cluster.s1.run(["cat", f"{auth}/userid_mutual"], timeout=30).stdout.strip() == ctx["mutualChapUser"]
    # The initiator checks the target's answer: with a secret the target does not hold, it refuses to go on.
    assert raw_login(cluster.w, ctx, "not-the-target-secret") != 0
    assert sessions(cluster.w) == []
    assert raw_login(cluster.w, ctx, ctx["mutualChapSecret"]) == 0
    # through the node plugin: login, mkfs, mount, data
    target = cluster.stage_publish(v.volume_id, published)
    digest = cluster.write(target, mib=2)
    assert cluster.read(target) == digest
    cluster.teardown(v.volume_id)
    assert sessions(cluster.w) == []


# ---------------------------------------------------------------------------------------------- read-only

def _ext4_needs_recovery(cluster, vid: str) -> bool:
    ref = ids.parse_id(vid)
    out = cluster.s1.run(["dumpe2fs", "-h", f"/dev/{ref.vg}/{ref.lv}"], timeout=60, check=True).stdout
    return "needs_recovery" in next(line for line in out.splitlines() if line.startswith("Filesystem features"))


@pytest.mark.parametrize("mode", [M.SINGLE_NODE_READER_ONLY,
                                  pytest.param(M.MULTI_NODE_READER_ONLY, marks=pytest.mark.campaign)],
                         ids=["single-node-reader", "multi-node-reader"])
def test_read_only_access_from_a_snapshot_of_a_volume_in_use(cluster, mode):
    """A read-only restore of a snapshot taken while its source was mounted: its ext4 journal needs recovery,
    which a write-protected LUN cannot take. It mounts without the replay, reads, refuses writes, and with
    MULTI_NODE_READER_ONLY two workers read it at once."""
    name = M.Mode.Name(mode).lower().replace("_", "-")
    src = cluster.create(f"ro-src-{name}", zone="zone-a")
    t_src = cluster.stage_publish(src.volume_id, cluster.publish(src.volume_id))
    digest = cluster.write(t_src, mib=2)
    cluster.w.run(["sync"], timeout=60, check=True)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name=f"ro-snap-{name}",
                                                                 source_volume_id=src.volume_id), timeout=120).snapshot
    ro_cap = mount_cap(mode)
    ro = cluster.create(f"ro-{name}", zone="zone-a", cap=ro_cap, source=csi.VolumeContentSource(
        snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)))
    assert _ext4_needs_recovery(cluster, ro.volume_id)
    ref = ids.parse_id(ro.volume_id)
    workers = [cluster.worker1, cluster.worker2]
    ctx1 = cluster.publish(ro.volume_id, cap=ro_cap, node_id=workers[0].node_id)
    if mode == M.SINGLE_NODE_READER_ONLY:
        err = rpc_error(cluster.ctrl.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
            volume_id=ro.volume_id, node_id=workers[1].node_id, volume_capability=ro_cap), timeout=60)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        readers = workers[:1]
        ctxs = [ctx1]
    else:
        readers = workers
        ctxs = [ctx1, cluster.publish(ro.volume_id, cap=ro_cap, node_id=workers[1].node_id)]
    for worker, ctx in zip(readers, ctxs):
        # the LUN is mapped write-protected for this initiator
        wp = f"{LIO}/{ref.iqn}/tpgt_1/acls/{worker.node_id}/lun_0/write_protect"
        assert cluster.s1.run(["cat", wp], timeout=30).stdout.strip() == "1"
        target = worker.stage_publish(ro.volume_id, ctx, cap=ro_cap)
        staging, _ = worker.paths(ro.volume_id)
        line = next(x for x in worker.w.run(["cat", "/proc/self/mountinfo"], timeout=30).stdout.splitlines()
                    if x.split()[4] == str(staging))
        assert line.split()[5].split(",")[0] == "ro" and "norecovery" in line.split(" - ")[1], line
        assert cluster.read(target, on=worker.w) == digest
        write = worker.w.run(["sh", "-c", f"echo x > {target}/new-file"], timeout=30)
        assert write.rc != 0 and "Read-only file system" in write.stderr, write
        dev = line.split(" - ")[1].split()[1]
        assert worker.w.run(["blockdev", "--getro", dev], timeout=30).stdout.strip() == "1"
        raw = worker.w.run(["dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=1", "oflag=direct"], timeout=60)
        assert raw.rc != 0, "a write-protected LUN took a write"
    for worker in readers:
        worker.unstage(ro.volume_id)
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=ro.volume_id,
                                                                                    node_id=worker.node_id))
    assert _ext4_needs_recovery(cluster, ro.volume_id)   # not replayed: nothing was written
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=ro.volume_id), timeout=120)
    cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=120)
    cluster.teardown(src.volume_id)


# ---------------------------------------------------------------------------------------------- initiator names

def _set_initiator_name(node, iqn: str) -> None:
    """Rewrites the worker's initiator name and restarts iscsid, which reads it only when it starts."""
    node.run(["sh", "-c", f"echo InitiatorName={iqn} > /etc/iscsi/initiatorname.iscsi"], timeout=30, check=True)
    pid = node.run(["cat", "/run/iscsid.pid"], timeout=30, check=True).stdout.strip()
    node.run(["iscsiadm", "-k", "0"], timeout=30)
    node.run(["sh", "-c", f"while kill -0 {pid} 2>/dev/null; do sleep 0.1; done"], timeout=30, check=True)
    node.run(["iscsid"], timeout=30, check=True)


def test_an_upper_case_initiator_name_is_lower_cased_and_stages(cluster):
    worker = cluster.worker2
    w2 = worker.w
    assert sessions(w2) == []
    original = w2.initiator_iqn
    upper = original.replace("lab:worker-2", "lab:Worker-2-UPPER")
    try:
        _set_initiator_name(w2, upper)
        # the controller's node directory (in a cluster: the CSINode kubelet writes) names the node by it too
        w2.initiator_iqn = upper
        cluster.d.start_controller([cluster.s1, cluster.s2])
        node_id = worker.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=30).node_id
        assert node_id == upper.lower()
        v = cluster.create("upper-iqn", zone="zone-a")
        ctx = cluster.publish(v.volume_id, node_id=node_id)
        # a CO that kept the name as the node once reported it gets the same grant
        assert cluster.publish(v.volume_id, node_id=upper) == ctx
        ref = ids.parse_id(v.volume_id)
        assert cluster.s1.run(["ls", f"{LIO}/{ref.iqn}/tpgt_1/acls"], timeout=30).stdout.split() == [upper.lower()]
        target = worker.stage_publish(v.volume_id, ctx)
        digest = cluster.write(target, mib=1, on=w2)
        assert cluster.read(target, on=w2) == digest
        worker.unstage(v.volume_id)
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                    node_id=upper), timeout=60)
        assert cluster.s1.run(["ls", f"{LIO}/{ref.iqn}/tpgt_1/acls"], timeout=30).stdout.split() == []
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    finally:
        _set_initiator_name(w2, original)
        w2.initiator_iqn = original
        cluster.d.start_controller([cluster.s1, cluster.s2])
    assert worker.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=30).node_id == original


# ---------------------------------------------------------------------------------------------- two releases

def test_two_releases_on_one_worker_leave_each_others_sessions_alone(cluster):
    """Release b (another driver name, so another state directory) beside the cluster's release on worker-1:
    each node plugin's start-up clean-up logs out only what it logged in itself."""
    d, w = cluster.d, cluster.w
    driver_b = "b.lvm-iscsi.csi.dev"
    ch = grpc.insecure_channel(d.start_node_plugin(w, name="node-plugin-b", port=7701,
                                                   extra=["--driver-name", driver_b]))
    try:
        node_b = csi_pb2_grpc.NodeStub(ch)
        va = cluster.create("release-a", zone="zone-a")
        vb = cluster.create("release-b", zone="zone-a")
        ta = cluster.stage_publish(va.volume_id, cluster.publish(va.volume_id))
        digest_a = cluster.write(ta, mib=1)
        h = hashlib.sha256(vb.volume_id.encode()).hexdigest()[:16]
        staging_b = cluster.kubelet / f"plugins/kubernetes.io/csi/{driver_b}" / h / "globalmount"
        tb = cluster.kubelet / "pods" / h / "volumes" / "mount-b"
        staging_b.mkdir(parents=True, exist_ok=True)
        ctx_b = cluster.publish(vb.volume_id)
        node_b.NodeStageVolume(csi.NodeStageVolumeRequest(volume_id=vb.volume_id, publish_context=ctx_b,
                                                          staging_target_path=str(staging_b),
                                                          volume_capability=MOUNT), timeout=120)
        node_b.NodePublishVolume(csi.NodePublishVolumeRequest(volume_id=vb.volume_id, publish_context=ctx_b,
                                                              staging_target_path=str(staging_b),
                                                              target_path=str(tb), volume_capability=MOUNT),
                                 timeout=60)
        digest_b = cluster.write(tb, mib=1)
        both = sorted(ids.parse_id(v.volume_id).iqn for v in (va, vb))
        assert sessions(w) == both

        d.start_node_plugin(w)                                  # release a restarts
        cluster.node_ready()
        assert sessions(w) == both, "release a's start-up logged out release b's session"
        d.start_node_plugin(w, name="node-plugin-b", port=7701, extra=["--driver-name", driver_b])
        node_b.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=60, wait_for_ready=True)
        assert sessions(w) == both, "release b's start-up logged out release a's session"
        assert cluster.read(ta) == digest_a and cluster.read(tb) == digest_b

        node_b.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vb.volume_id, target_path=str(tb)),
                                   timeout=60)
        node_b.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vb.volume_id,
                                                              staging_target_path=str(staging_b)), timeout=60)
        cluster.teardown(va.volume_id)
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vb.volume_id,
                                                                                    node_id=cluster.node_id))
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vb.volume_id), timeout=120)
        assert sessions(w) == [] and w.run(["iscsiadm", "-m", "node"], timeout=30).rc == 21
    finally:
        ch.close()
        d.stop_node_plugin(w, name="node-plugin-b")


# ---------------------------------------------------------------------------------------------- host iscsiadm

def test_host_iscsiadm_mode_logs_in_through_nsenter(cluster):
    """--iscsiadm host (the chart's node.iscsiadm: host) on worker-2: every iscsiadm runs through nsenter in
    PID 1's mount namespace. In the lab the plugin runs on the node itself, so that is its own namespace (the
    Kubernetes tier shows the pod's view of the host): here the real nsenter and iscsiadm carry a whole stage,
    write, read and unstage, and the start-up check names the tool it runs."""
    d, w2 = cluster.d, cluster.worker2
    log = w2.w.log_path("node-plugin")
    start = log.stat().st_size if log.exists() else 0          # the plugin's log is appended to
    d.start_node_plugin(w2.w, extra=["--iscsiadm", "host"])
    try:
        w2.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=60, wait_for_ready=True)
        v = cluster.create("iscsiadm-host", zone="zone-a")
        target = w2.stage_publish(v.volume_id, cluster.publish(v.volume_id, node_id=w2.node_id))
        digest = cluster.write(target, mib=1, on=w2.w)
        assert cluster.read(target, on=w2.w) == digest
        w2.unstage(v.volume_id)
        text = log.read_bytes()[start:].decode(errors="replace")
        summary = "iscsiadm: the host's (through nsenter), version"
        assert summary in text, text[-2000:]
        # from the start-up check on (the plugin before it may still have run a command while it stopped)
        ran = [line for line in text[text.index(summary):].splitlines() if "ran " in line and "iscsiadm" in line]
        logins = [line for line in ran if "--login" in line]
        assert logins and all("nsenter" in line for line in ran), ran[-5:]
        assert w2.w.run(["iscsiadm", "-m", "session"], timeout=30).rc == 21
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=v.volume_id, node_id=w2.node_id), timeout=60)
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    finally:
        d.start_node_plugin(w2.w)
        w2.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=60, wait_for_ready=True)
