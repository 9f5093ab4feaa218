"""Data safety on real parts (issue 12): what the agent, the controller and `cleanup` must never do to data,
checked against real LVM, LIO and open-iscsi in UML. Every test leaves the storage nodes as it found them.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from csi import faults, ids, peers
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.proto import csi_pb2 as csi
from tests.e2e.cluster import (BLOCK, PREFIX, ZONE_KEY, MiB, count_on_device, overlaps, pv_ranges,
                               wait_for_wipes)

pytestmark = pytest.mark.e2e
TARGETS = "/sys/kernel/config/target/iscsi"
PY = sys.executable
# A raw block volume for several writers: the one kind two nodes may hold grants of at once (the late grant of
# the sweep test below is a second node's; a single-node volume refuses it, FAILED_PRECONDITION).
ATTRS = {"accessType": "block", "fsType": "", "accessModes": "MULTI_NODE_MULTI_WRITER", "mutualChap": "false",
         "wipe": "true"}


def acls(node, iqn: str) -> list[str]:
    r = node.run(["ls", f"{TARGETS}/{iqn}/tpgt_1/acls"], timeout=30)
    return sorted(r.stdout.split()) if r.rc == 0 else []


def _short_recovery(cluster) -> None:
    """Queued I/O fails after 5 s instead of open-iscsi's 120 s, so the test need not wait that long."""
    r = cluster.w.run(["sh", "-c", "for s in /sys/class/iscsi_session/session*; do echo 5 > $s/recovery_tmo;"
                                   " done"], timeout=30)
    assert r.rc == 0, r.stderr


# ---------------------------------------------------------------------------------------------- defect 6

def test_delete_of_a_volume_still_in_use_fences_it_first(cluster):
    """DeleteVolume of a volume that is still granted and logged in to (csi-sanity does this; in Kubernetes
    the grant is stale): it succeeds, the grant is revoked first and the agent's log names the node, and
    nothing of it is left on the storage node, no ACL and no session; the worker can no longer reach it."""
    v = cluster.create("delete-in-use", cap=BLOCK, zone="zone-a")
    ref = ids.parse_id(v.volume_id)
    target = cluster.stage_publish(v.volume_id, cluster.publish(v.volume_id, cap=BLOCK), cap=BLOCK)
    assert cluster.w.run(["dd", f"if={target}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                         timeout=30).rc == 0
    assert acls(cluster.s1, ref.iqn) == [cluster.node_id]
    _short_recovery(cluster)
    log = cluster.s1.log_path("agent")
    before = log.read_text(errors="replace")
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    said = log.read_text(errors="replace")[len(before):]
    assert f"deleting {ref.vg}/{ref.lv}, still granted to {cluster.node_id}" in said, said[-2000:]
    assert cluster.storage_state()["storage-1"] == ([], [])
    sessions = cluster.s1.run(["sh", "-c", f"ls {TARGETS}/*/tpgt_1/acls 2>/dev/null; true"], timeout=30)
    assert cluster.node_id not in sessions.stdout
    r = cluster.w.run(["dd", f"if={target}", "of=/dev/null", "bs=4k", "count=1", "skip=100", "iflag=direct"],
                      timeout=90)
    assert r.rc != 0, "the worker could still read a deleted volume"
    staging, _ = cluster.paths(v.volume_id)
    cluster.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=v.volume_id, target_path=str(target)))
    cluster.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=v.volume_id,
                                                                staging_target_path=str(staging)), timeout=120)
    assert cluster.w.run(["iscsiadm", "-m", "session"], timeout=30).rc == 21
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                node_id=cluster.node_id))


# ---------------------------------------------------------------------------------------------- defect 2

class AgentApi:
    """The agent API of one agent, called from the host as the controller calls it (mutual TLS)."""

    def __init__(self, cluster, node, port: int):
        pki = cluster.d.pki.ensure("controller")
        creds = grpc.ssl_channel_credentials(*((pki / n).read_bytes() for n in ("ca.crt", "tls.key", "tls.crt")))
        name = peers.dns_name(peers.AGENT, node.name)
        self._channel = grpc.secure_channel(f"127.0.0.1:{cluster.lab.expose(node.ip, port)}", creds,
                                            options=[("grpc.ssl_target_name_override", name)])
        self.stub = agent_pb2_grpc.AgentStub(self._channel)

    def close(self) -> None:
        self._channel.close()


# An LV of `cluster` that no record explains (a CreateVolume never retried), exported by hand: an orphan.
EXPORT = """
import sys
from rtslib_fb import BlockStorageObject, FabricModule, LUN, NodeACL, Target, TPG
iqn, name, dev = sys.argv[1:4]
tpg = TPG(Target(FabricModule("iscsi"), iqn), 1)
LUN(tpg, 0, storage_object=BlockStorageObject(name, dev=dev))
"""
GRANT = """
import sys
from rtslib_fb import FabricModule, NodeACL, Target, TPG
NodeACL(TPG(Target(FabricModule("iscsi"), sys.argv[1], mode="lookup"), 1, mode="lookup"), sys.argv[2])
"""
INTRUDER = "iqn.2026-11.test.intruder:x"
LATE = "iqn.2026-11.test.late:granted-during-the-sweep"
CLUSTERS = {"prod": 7611, "prod-eu": 7612}


def _everything(node) -> dict[str, list[str]]:
    """Every LV and every target (with its ACLs) on a storage node."""
    lvs = node.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=30).stdout.split()
    out = {"lvs": sorted(x for x in lvs if x != "thinpool")}
    for t in node.run(["ls", TARGETS], timeout=30).stdout.split():
        if t.startswith("iqn."):
            out[t] = acls(node, t)
    return out


@contextlib.contextmanager
def two_clusters(cluster):
    """Agents of clusters `prod` and `prod-eu` beside the e2e agent on storage-2: one VG, one LIO, two
    state directories. Each gets a volume granted to the worker, an intruder ACL on that volume's target and
    an exported LV of its own that no record explains."""
    node, d = cluster.s2, cluster.d
    apis, made = {}, {}
    try:
        for cid, port in CLUSTERS.items():
            shutil.rmtree(d.agent_state(node, f"agent-{cid}"), ignore_errors=True)
            d.start_agent(node, name=f"agent-{cid}", cluster_id=cid, port=port)
            api = apis[cid] = AgentApi(cluster, node, port)
            vol = api.stub.CreateVolume(apb.CreateVolumeRequest(name="vol", pool="thin", size_bytes=32 * MiB,
                                                                attributes=ATTRS), timeout=120)
            api.stub.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=cluster.node_id),
                                 timeout=60)
            node.run([PY, "-c", GRANT, vol.target_iqn, INTRUDER], timeout=60, check=True)
            orphan = f"{cid}-orphan-0123456789"
            node.run(["lvcreate", "-q", "-V", "8m", "-T", "csi-vg/thinpool", "-n", orphan, "--addtag",
                      f"dev.csi.lvm-iscsi/cluster={cid}", "--addtag", "dev.csi.lvm-iscsi/kind=volume"],
                     timeout=120, check=True)
            node.run([PY, "-c", EXPORT, ids.target_iqn("csi-vg", orphan), orphan, f"/dev/csi-vg/{orphan}"],
                     timeout=60, check=True)
            made[cid] = (vol, orphan)
        yield apis, made
    finally:
        for cid, (vol, orphan) in made.items():
            apis[cid].stub.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), timeout=120)
            apis[cid].stub.DeleteVolume(apb.DeleteVolumeRequest(vg="csi-vg", lv=orphan), timeout=120)
        for cid in CLUSTERS:
            if cid in apis:
                apis[cid].close()
            d.stop_agent(node, f"agent-{cid}")
            shutil.rmtree(d.agent_state(node, f"agent-{cid}"), ignore_errors=True)


def test_cleanup_of_one_cluster_never_touches_another_sharing_the_node(cluster):
    """Clusters `prod` and `prod-eu` on one storage node: `prod` is a prefix of `prod-eu` (IQNs
    <vg>.prod-... and <vg>.prod-eu-...). Each cleanup lists and deletes its own orphans and nothing else."""
    node, d = cluster.s2, cluster.d
    with two_clusters(cluster) as (apis, made):
        before = _everything(node)
        (prod_vol, prod_orphan), (eu_vol, eu_orphan) = made["prod"], made["prod-eu"]
        dry = d.operator("cleanup", [node], "--min-age", "0", cluster_id="prod", port=CLUSTERS["prod"])
        assert dry.returncode == 0, dry.stdout + dry.stderr
        for needle in (f"csi-vg/{prod_orphan}", ids.target_iqn("csi-vg", prod_orphan),
                       f"{prod_vol.target_iqn} {INTRUDER}", "dry run"):
            assert needle in dry.stdout, dry.stdout
        assert "prod-eu" not in dry.stdout, dry.stdout
        assert _everything(node) == before                      # a dry run removes nothing

        done = d.operator("cleanup", [node], "--min-age", "0", "--delete", cluster_id="prod",
                          port=CLUSTERS["prod"])
        assert done.returncode == 0 and "prod-eu" not in done.stdout, done.stdout + done.stderr
        after = _everything(node)
        expected = {k: v for k, v in before.items() if k != ids.target_iqn("csi-vg", prod_orphan)}
        expected["lvs"] = [lv for lv in before["lvs"] if lv != prod_orphan]
        expected[prod_vol.target_iqn] = [cluster.node_id]
        assert after == expected, "cleanup of prod touched what is not prod's"

        eu = d.operator("cleanup", [node], "--min-age", "0", "--delete", cluster_id="prod-eu",
                        port=CLUSTERS["prod-eu"])
        assert eu.returncode == 0, eu.stdout + eu.stderr
        assert f"csi-vg/{eu_orphan}" in eu.stdout and f"{eu_vol.target_iqn} {INTRUDER}" in eu.stdout
        assert _everything(node) == {"lvs": sorted([prod_vol.lv, eu_vol.lv]), prod_vol.target_iqn: [cluster.node_id],
                                     eu_vol.target_iqn: [cluster.node_id]}


def test_a_grant_made_while_cleanup_runs_survives_it(cluster):
    """The sweep pauses after it has read the records and listed the targets (a fault-injection pause, so
    the interleaving is certain); a GrantAccess made then is not taken for an orphan ACL."""
    node, d = cluster.s2, cluster.d
    pause_dir = node.workdir / "pause"
    shutil.rmtree(pause_dir, ignore_errors=True)
    point = "orphans.listed"
    with two_clusters(cluster) as (apis, made):
        vol, orphan = made["prod"]
        port = CLUSTERS["prod"]
        d.start_agent(node, name="agent-prod", cluster_id="prod", port=port,
                      env={faults.PAUSE_ENV: point, faults.PAUSE_DIR_ENV: str(pause_dir)})
        sweep = subprocess.Popen(d.operator_argv("cleanup", [node], "--min-age", "0", "--delete", cluster_id="prod",
                                                 port=port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        try:
            deadline = time.monotonic() + 120
            while not (pause_dir / f"{point}.paused").exists():
                assert sweep.poll() is None, sweep.stdout.read()
                assert time.monotonic() < deadline, "the sweep never reached its pause"
                time.sleep(0.2)
            api = AgentApi(cluster, node, port)
            api.stub.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=LATE), timeout=60)
            api.close()
            assert LATE in acls(node, vol.target_iqn)
        finally:
            (pause_dir / f"{point}.go").write_text("")
            out, _ = sweep.communicate(timeout=180)
        assert sweep.returncode == 0, out
        assert f"csi-vg/{orphan}" in out and "[removed]" in out, out              # the sweep did sweep
        assert acls(node, vol.target_iqn) == sorted([cluster.node_id, LATE]), out
        d.start_agent(node, name="agent-prod", cluster_id="prod", port=port)


# ---------------------------------------------------------------------------------------------- defect 3

PATTERN = b"LVM-ISCSI-CSI-WIPE-TEST-PATTERN!"     # 32 bytes, no zero byte among them
# Fills a device with PATTERN (with O_DIRECT, so it is on the disk) and flushes it.
FILL = r"""
import mmap, os, sys
dev, pattern = sys.argv[1], bytes.fromhex(sys.argv[2])
buf = mmap.mmap(-1, 1 << 20)
buf[:] = pattern * ((1 << 20) // len(pattern))
fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
for off in range(0, size, 1 << 20):
    os.pwritev(fd, [memoryview(buf)[:min(1 << 20, size - off)]], off)
os.fsync(fd)
"""


def fill_with_pattern(node, lv: str) -> None:
    node.run([PY, "-c", FILL, f"/dev/csi-vg/{lv}", PATTERN.hex()], timeout=300, check=True)


def test_a_deleted_thick_volumes_data_never_reaches_another_volume(cluster):
    """A known pattern on a thick volume; the volume deleted; thick volumes made in the same space until one
    lands on its extents: none of them reads back a byte of the pattern, and the old extents on the PV hold
    zeros once the background wipe is done. DeleteVolume returns before the wipe, and the name is free."""
    s1 = cluster.s1
    thick = {"type": "thick"}
    size = 128 * MiB
    v = cluster.create("wipe-pattern", size=size, zone="zone-a", params=thick)
    ref = ids.parse_id(v.volume_id)
    fill_with_pattern(s1, ref.lv)
    old = pv_ranges(s1, ref.lv)
    device = old[0][0]
    assert count_on_device(s1, device, [(st, n) for _, st, n in old], PATTERN) == (size, size // len(PATTERN))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    made, landed = [], None
    try:
        for i in range(12):
            try:
                nv = cluster.create(f"wipe-next-{i}", size=size, zone="zone-a", params=thick)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                wait_for_wipes(s1)   # the deleted volume's space comes back once it is zero
                continue
            made.append(nv)
            lv = ids.parse_id(nv.volume_id).lv
            nonzero, found = count_on_device(s1, f"/dev/csi-vg/{lv}", [(0, size)], PATTERN)
            assert (nonzero, found) == (0, 0), f"volume {i} reads back {nonzero} byte(s) of an old volume"
            if overlaps(pv_ranges(s1, lv), old):
                landed = i
                break
            if i == 0:
                wait_for_wipes(s1)   # the next one may take the space of the deleted volume
        assert landed is not None, "no new volume was given the deleted volume's space"
    finally:
        for nv in made:
            cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=nv.volume_id), timeout=120)
    wait_for_wipes(s1)
    assert count_on_device(s1, device, [(st, n) for _, st, n in old], PATTERN) == (0, 0)
    assert cluster.storage_state()["storage-1"] == ([], [])


# ---------------------------------------------------------------------------------------------- defect 4

# Appends numbered 4 KiB records to a file, each fsync'ed before the next (and logged once it is), until the
# stop file appears. A record: its number (8 bytes), a SHA-256 of the number and the body (32), the body.
APPENDER = r"""
import hashlib, os, struct, sys, time
path, log, stop = sys.argv[1:4]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
i = 0
with open(log, "w") as out:
    while not os.path.exists(stop):
        head, body = struct.pack("<Q", i), os.urandom(4096 - 40)
        os.write(fd, head + hashlib.sha256(head + body).digest() + body)
        os.fsync(fd)
        out.write(f"{i}\n")
        out.flush()
        i += 1
        time.sleep(0.005)
"""


def _records_written(w, log) -> int:
    r = w.run(["sh", "-c", f"wc -l < {log}"], timeout=30)
    return int(r.stdout.strip() or 0)


def _clone(cluster, name: str, source_id: str, zone: str, size: int):
    req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                  volume_capabilities=[BLOCK], parameters={"type": "thick"})
    req.volume_content_source.volume.volume_id = source_id
    req.accessibility_requirements.requisite.add(segments={ZONE_KEY: zone})
    return cluster.ctrl.CreateVolume(req, timeout=600).volume


def test_a_clone_of_a_thick_volume_in_use_is_a_point_in_time(cluster):
    """A writer appends fsync'ed records to a file on a thick volume while the volume is cloned, in its own
    thick pool and onto the other storage node: each clone's filesystem is clean under fsck once its journal
    has replayed, and its file holds a consistent prefix of the records, at least all those fsync'ed before
    CreateVolume was called. (Before: the first copied the live LV, the second was refused.)"""
    w = cluster.w
    size = 256 * MiB
    src = cluster.create("clone-writer-src", size=size, zone="zone-a", params={"type": "thick"})
    target = cluster.stage_publish(src.volume_id, cluster.publish(src.volume_id))
    log, stop = w.workdir / "appender.log", w.workdir / "appender.stop"
    stop.unlink(missing_ok=True)
    w.spawn("appender", [PY, "-c", APPENDER, f"{target}/records.bin", str(log), str(stop)])
    clones = []
    try:
        deadline = time.monotonic() + 120
        while _records_written(w, log) < 300:
            assert w.status("appender")["running"] and time.monotonic() < deadline, "the writer does not write"
            time.sleep(0.5)
        for name, zone in (("clone-writer-near", "zone-a"), ("clone-writer-far", "zone-b")):
            before = _records_written(w, log)
            clone = _clone(cluster, name, src.volume_id, zone, size)
            clones.append((clone, before))
        assert w.status("appender")["running"], "the writer stopped during the clones"
    finally:
        stop.write_text("")
        assert w.wait_exit("appender", timeout=60) == 0
    assert clones[0][0].volume_id.startswith("v1:storage-1:") and clones[1][0].volume_id.startswith("v1:storage-2:")
    mnt = w.workdir / "clone-check"
    w.run(["mkdir", "-p", str(mnt)], timeout=30, check=True)
    for clone, before in clones:
        dev = cluster.stage_publish(clone.volume_id, cluster.publish(clone.volume_id, cap=BLOCK), cap=BLOCK)
        replay = w.run(["e2fsck", "-E", "journal_only", "-y", str(dev)], timeout=300)
        assert replay.rc in (0, 1), replay.stdout + replay.stderr
        check = w.run(["e2fsck", "-f", "-n", str(dev)], timeout=300)
        assert check.rc == 0, f"{clone.volume_id}: fsck after journal replay:\n{check.stdout}{check.stderr}"
        w.run(["mount", "-o", "ro,noload", str(dev), str(mnt)], timeout=60, check=True)
        try:
            r = w.run([PY, "-c", PREFIX, f"{mnt}/records.bin"], timeout=120)
        finally:
            w.run(["umount", str(mnt)], timeout=60, check=True)
        assert r.rc == 0, f"{clone.volume_id}: {r.stderr}"
        assert int(r.stdout) >= before, f"{clone.volume_id}: {r.stdout.strip()} records, {before} were fsync'ed before"
        cluster.teardown(clone.volume_id)
    cluster.teardown(src.volume_id)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}   # no snapshot left


# ---------------------------------------------------------------------------------------------- state lost

def test_a_lost_state_directory_is_rebuilt_and_no_volume_is_lost(cluster):
    """The agent's state directory is gone (a disk replaced, a wrong host path) while a volume is attached
    and written: at its next start the agent rebuilds the records from the LV tags and the grant (with its
    CHAP secret) from LIO; the volume, a thick one and a snapshot are all there, the session never noticed,
    and cleanup finds no orphan."""
    s1, d = cluster.s1, cluster.d
    v = cluster.create("state-lost", zone="zone-a")
    thick = cluster.create("state-lost-thick", size=32 * MiB, zone="zone-a", params={"type": "thick"})
    ctx = cluster.publish(v.volume_id)
    target = cluster.stage_publish(v.volume_id, ctx)
    digest = cluster.write(target, mib=2)
    snap = cluster.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="state-lost-snap",
                                                                 source_volume_id=v.volume_id), timeout=120).snapshot
    snap_tags = s1.run(["lvs", "--noheadings", "-o", "lv_tags", f"csi-vg/{ids.parse_id(snap.snapshot_id, 'snapshot').lv}"],
                       timeout=30, check=True).stdout
    # LVM gives a thin snapshot only the tags it is created with, none of its origin's: one kind, one name
    assert snap_tags.count("/kind=") == 1 and "/attrs=" not in snap_tags, snap_tags
    state = d.agent_state(s1)
    lost = state.with_name("agent-state-lost")
    shutil.rmtree(lost, ignore_errors=True)
    d.stop_agent(s1)
    state.rename(lost)
    try:
        d.start_agent(s1)
        said = s1.log_path("agent").read_text(errors="replace")
        assert "rebuilt 2 volume record(s) from LV tags (1 grant(s) read back from LIO" in said, said[-3000:]
        for vol in (v, thick):
            got = cluster.ctrl.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=vol.volume_id))
            health = cluster.ctrl.ControllerGetVolumeHealth(
                csi.ControllerGetVolumeHealthRequest(volume_id=vol.volume_id)).volume_health
            assert not health.health_statuses, health
            assert got.volume.capacity_bytes == vol.capacity_bytes
        got = cluster.ctrl.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=v.volume_id))
        assert list(got.status.published_node_ids) == [cluster.node_id]
        listed = cluster.ctrl.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=v.volume_id)).entries
        assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]
        assert cluster.publish(v.volume_id) == ctx           # the same secret: the grant came back from LIO
        assert cluster.read(target) == digest
        orphans = d.operator("cleanup", [cluster.s1, cluster.s2], "--min-age", "0")
        assert orphans.returncode == 0 and "no orphans" in orphans.stdout, orphans.stdout
        cluster.teardown(v.volume_id)
        cluster.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=thick.volume_id))
        assert cluster.storage_state()["storage-1"] == ([], [])
    finally:
        shutil.rmtree(lost, ignore_errors=True)
