"""The driver deployed in a lab of four UML nodes, as the e2e tests use it (one per test session): storage-1
(zone-a), storage-2 (zone-b), worker-1 and worker-2 (both zone-a, so both can reach storage-1's volumes), every
daemon at debug level (requests and commands logged, secrets redacted: the logs are grepped for secrets)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import grpc
import pytest

from csi import ids
from csi.lab import Lab, preflight
from csi.lab.deploy import Deployment
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc

GiB, MiB = 1 << 30, 1 << 20
M = csi.VolumeCapability.AccessMode
ZONE_KEY = "topology.lvm-iscsi.csi.dev/zone"
MOUNT = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                             access_mode=M(mode=M.SINGLE_NODE_WRITER))
BLOCK = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=M(mode=M.SINGLE_NODE_WRITER))


class Worker:
    """A worker of the cluster and the client of its node plugin: stage, publish, write, read, tear down."""

    def __init__(self, cluster: "Cluster", node, target: str):
        self.cluster, self.w = cluster, node
        self._nch = grpc.insecure_channel(target)
        self.node = csi_pb2_grpc.NodeStub(self._nch)
        self.node_id = self.node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
        self.kubelet = cluster.d.kubelet_dir(node)

    def paths(self, vid: str) -> tuple[Path, Path]:
        h = hashlib.sha256(vid.encode()).hexdigest()[:16]
        return (self.kubelet / "plugins/kubernetes.io/csi/lvm-iscsi.csi.dev" / h / "globalmount",
                self.kubelet / "pods" / h / "volumes/mount")

    def stage_publish(self, vid: str, ctx: dict, cap=MOUNT) -> Path:
        staging, target = self.paths(vid)
        staging.mkdir(parents=True, exist_ok=True)
        self.node.NodeStageVolume(csi.NodeStageVolumeRequest(volume_id=vid, publish_context=ctx,
                                                             staging_target_path=str(staging),
                                                             volume_capability=cap), timeout=120)
        self.node.NodePublishVolume(csi.NodePublishVolumeRequest(volume_id=vid, publish_context=ctx,
                                                                 staging_target_path=str(staging),
                                                                 target_path=str(target), volume_capability=cap),
                                    timeout=60)
        return target

    def unstage(self, vid: str) -> None:
        """NodeUnpublishVolume + NodeUnstageVolume."""
        staging, target = self.paths(vid)
        self.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
                                      timeout=60)
        self.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
                                    timeout=60)

    def close(self) -> None:
        self._nch.close()


class Cluster:
    def __init__(self, lab: Lab, d: Deployment):
        self.lab, self.d = lab, d
        self.s1, self.s2, self.w = lab.node("storage-1"), lab.node("storage-2"), lab.node("worker-1")
        self.s3 = lab.node("storage-3")   # zone-c: for the availability tests; nothing else places there
        self._cch = grpc.insecure_channel(d.controller_target)
        self.ctrl = csi_pb2_grpc.ControllerStub(self._cch)
        self.worker1 = Worker(self, self.w, d.node_target(self.w))
        self.worker2 = Worker(self, lab.node("worker-2"), d.node_target(lab.node("worker-2")))
        # worker-1 is the default worker of every helper below
        self.node, self.node_id, self.kubelet = self.worker1.node, self.worker1.node_id, self.worker1.kubelet

    def node_ready(self, timeout: float = 60) -> None:
        """After the worker or its node plugin came back: waits until the plugin answers on the channel. The
        channel may still hold a connection to the plugin that is gone (the first call on it fails with
        UNAVAILABLE), or be backing off after failed reconnects."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=max(1.0, deadline - time.monotonic()),
                                      wait_for_ready=True)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def create(self, name: str, size: int = 64 * MiB, zone: str | None = None, cap=MOUNT, params=None,
               source: csi.VolumeContentSource | None = None):
        """CreateVolume; `cap` is one capability or a list of them."""
        req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                      volume_capabilities=cap if isinstance(cap, list) else [cap],
                                      parameters=params or {}, volume_content_source=source)
        if zone:
            req.accessibility_requirements.requisite.add(segments={ZONE_KEY: zone})
        return self.ctrl.CreateVolume(req, timeout=120).volume

    def publish(self, vid: str, cap=MOUNT, node_id: str | None = None) -> dict:
        return dict(self.ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node_id or self.node_id, volume_capability=cap), timeout=60).publish_context)

    def unpublish(self, vid: str, node_id: str | None = None, timeout: float = 60) -> None:
        """ControllerUnpublishVolume as external-attacher calls it: again after ABORTED (another operation on the
        volume holds its lock: the late grant of a leg whose node is back, say), until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
                    volume_id=vid, node_id=node_id or self.node_id), timeout=60)
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def chap(self, vid: str, node_id: str | None = None) -> dict:
        """A grant's CHAP credentials as the agent's record holds them (publish_context has none any more):
        for tests that log in by hand or look for the secrets elsewhere."""
        ref = ids.parse_id(vid)
        record = self.d.agent_state(self.lab.node(ref.node)) / "volumes" / ref.vg / f"{ref.lv}.json"
        g = json.loads(record.read_text())["grants"][node_id or self.node_id]
        return {"chapUser": g["chap_user"], "chapSecret": g["chap_secret"], "mutualChapUser": g["mutual_user"],
                "mutualChapSecret": g["mutual_secret"]}

    def paths(self, vid: str) -> tuple[Path, Path]:
        return self.worker1.paths(vid)

    def stage_publish(self, vid: str, ctx: dict, cap=MOUNT) -> Path:
        return self.worker1.stage_publish(vid, ctx, cap)

    def teardown(self, vid: str) -> None:
        self.worker1.unstage(vid)
        self.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vid,
                                                                                 node_id=self.node_id), timeout=60)
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120)

    def storage_state(self) -> dict[str, tuple]:
        """LVs of the driver and LIO targets on each storage node: for 'nothing changed' checks. Waits first
        for the background wipes of deleted thick volumes to end (they are not leaks, but they are LVs)."""
        out = {}
        for n in (self.s1, self.s2):
            lvs = wait_for_wipes(n)
            out[n.name] = (sorted(x for x in lvs if x != "thinpool"), sorted(lio_targets(n)))
        return out

    def write(self, target: Path, mib: int = 8, on=None) -> str:
        node = on or self.w
        data = os.urandom(mib * MiB)
        src = node.workdir / f"src-{os.getpid()}.bin"
        src.write_bytes(data)
        node.run(["dd", f"if={src}", f"of={target}/data.bin", "bs=1M", "conv=fsync", "status=none"],
                 timeout=120, check=True)
        return hashlib.sha256(data).hexdigest()

    def read(self, target: Path, on=None) -> str:
        node = on or self.w
        back = node.workdir / f"back-{os.getpid()}.bin"
        node.run(["dd", f"if={target}/data.bin", f"of={back}", "bs=1M", "iflag=direct", "status=none"],
                 timeout=120, check=True)
        return hashlib.sha256(back.read_bytes()).hexdigest()

    def close(self):
        self._cch.close()
        self.worker1.close()
        self.worker2.close()


@contextlib.contextmanager
def driver_lab(workdir: Path, name: str, subnet: str, cluster_id: str, storage: dict[str, str],
               workers: dict[str, str], boot_timeout: float, log_level: str = "info"):
    """A booted lab (storage: node name -> zone, each with a 4 GiB disk; workers: node name -> zone) with the
    driver deployed on it: agents, node plugins, the controller on the host. Yields (lab, deployment)."""
    problem = preflight()
    if problem:
        pytest.fail(f"e2e tests need User-Mode Linux: {problem}", pytrace=False)
    with Lab(workdir, name=name, subnet=subnet) as lab:
        storage_nodes = [lab.add_node(n, role="storage", disk_bytes=4 * GiB) for n in storage]
        worker_nodes = [lab.add_node(n, role="worker") for n in workers]
        lab.boot_all(timeout=boot_timeout)
        d = Deployment(lab, cluster_id=cluster_id, zones={**storage, **workers}, log_level=log_level)
        d.start_all(storage_nodes, worker_nodes)
        try:
            yield lab, d
        finally:
            d.stop_controller()


def make_cluster(tmp_path_factory):
    with driver_lab(tmp_path_factory.mktemp("driver"), f"drv{os.getpid() % 100000}", "10.213.1", "e2e",
                    {"storage-1": "zone-a", "storage-2": "zone-b", "storage-3": "zone-c"},
                    {"worker-1": "zone-a", "worker-2": "zone-a"}, boot_timeout=240, log_level="debug") as (lab, d):
        c = Cluster(lab, d)
        try:
            yield c
        finally:
            c.close()




# Run in a node with `python3 -c PREFIX <file>`: how many whole, valid, consecutive 4 KiB records from 0 the file
# holds (a record: its number, 8 bytes; a SHA-256 of the number and the body, 32; the body), as the tests'
# writers append them; fails on anything else.
PREFIX = r"""
import hashlib, struct, sys
data = open(sys.argv[1], "rb").read()
if len(data) % 4096:
    sys.exit(f"torn: {len(data)} bytes")
for i in range(len(data) // 4096):
    rec = data[i * 4096:(i + 1) * 4096]
    if struct.unpack("<Q", rec[:8])[0] != i or hashlib.sha256(rec[:8] + rec[40:]).digest() != rec[8:40]:
        sys.exit(f"record {i} is not record {i}")
print(len(data) // 4096)
"""

WIPE_MARK = "+wipe+"   # in the name of a deleted thick LV being zeroed (csi/ids.py)


def lio_targets(node) -> set[str]:
    """The IQNs of the iSCSI targets in the node's LIO (configfs)."""
    names = node.run(["ls", "/sys/kernel/config/target/iscsi"], timeout=30).stdout.split()
    return {t for t in names if t.startswith("iqn")}


def wait_for_wipes(node, timeout: float = 300) -> list[str]:
    """Waits until no LV of the node is being wiped (csi/storage/wipe.py); returns the LV names of csi-vg."""
    deadline = time.monotonic() + timeout
    while True:
        lvs = node.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=30).stdout.split()
        if not any(WIPE_MARK in lv for lv in lvs):
            return lvs
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: wipes not done after {timeout:.0f}s: {lvs}")
        time.sleep(1)


def pv_ranges(node, lv: str, vg: str = "csi-vg") -> list[tuple[str, int, int]]:
    """Where an LV's extents are on its PV(s): (device, first byte, length) per segment."""
    extent = int(node.run(["vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg],
                          timeout=30, check=True).stdout.strip())
    out = []
    for rng in node.run(["lvs", "--segments", "--noheadings", "-o", "seg_pe_ranges", f"{vg}/{lv}"], timeout=30,
                        check=True).stdout.split():
        device, _, pes = rng.rpartition(":")
        first, _, last = pes.partition("-")
        pe_start = int(node.run(["pvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "pe_start", device],
                                timeout=30, check=True).stdout.strip())
        out.append((device, pe_start + int(first) * extent, (int(last) - int(first) + 1) * extent))
    return out


def overlaps(a: list[tuple[str, int, int]], b: list[tuple[str, int, int]]) -> bool:
    return any(da == db and sa < sb + lb and sb < sa + la for da, sa, la in a for db, sb, lb in b)


# Reads byte ranges of a device with O_DIRECT (what the disk holds, not a page cache) and prints how many
# bytes in them are not zero and how many times the pattern (argv[2], hex) occurs.
COUNT = r"""
import mmap, os, sys
dev, pattern = sys.argv[1], bytes.fromhex(sys.argv[2])
buf = mmap.mmap(-1, 1 << 20)
nonzero = found = 0
fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
for rng in sys.argv[3:]:
    start, length = (int(x) for x in rng.split(":"))
    for off in range(start, start + length, 1 << 20):
        n = os.preadv(fd, [memoryview(buf)[:min(1 << 20, start + length - off)]], off)
        data = buf[:n]
        nonzero += n - data.count(0)
        found += data.count(pattern)
print(nonzero, found)
"""


def count_on_device(node, device: str, ranges: list[tuple[int, int]], pattern: bytes) -> tuple[int, int]:
    """(bytes that are not zero, occurrences of pattern) in byte ranges of a device of the node."""
    r = node.run([sys.executable, "-c", COUNT, device, pattern.hex(), *(f"{s}:{n}" for s, n in ranges)],
                 timeout=300, check=True)
    nonzero, found = r.stdout.split()
    return int(nonzero), int(found)


def wait_until(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(every)
