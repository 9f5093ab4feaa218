"""The driver deployed in a lab of three UML nodes, as the e2e tests use it (one per test session)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest

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


class Cluster:
    def __init__(self, lab: Lab, d: Deployment):
        self.lab, self.d = lab, d
        self.s1, self.s2, self.w = lab.node("storage-1"), lab.node("storage-2"), lab.node("worker-1")
        self._cch = grpc.insecure_channel(d.controller_target)
        self._nch = grpc.insecure_channel(d.node_target(self.w))
        self.ctrl = csi_pb2_grpc.ControllerStub(self._cch)
        self.node = csi_pb2_grpc.NodeStub(self._nch)
        self.node_id = self.node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
        self.kubelet = d.kubelet_dir(self.w)

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

    def create(self, name: str, size: int = 64 * MiB, zone: str | None = None, cap=MOUNT, params=None):
        req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                      volume_capabilities=[cap], parameters=params or {})
        if zone:
            req.accessibility_requirements.requisite.add(segments={ZONE_KEY: zone})
        return self.ctrl.CreateVolume(req, timeout=120).volume

    def publish(self, vid: str, cap=MOUNT, node_id: str | None = None) -> dict:
        return dict(self.ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node_id or self.node_id, volume_capability=cap), timeout=60).publish_context)

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

    def teardown(self, vid: str) -> None:
        staging, target = self.paths(vid)
        self.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
                                      timeout=60)
        self.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
                                    timeout=60)
        self.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vid,
                                                                                 node_id=self.node_id), timeout=60)
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120)

    def storage_state(self) -> dict[str, tuple]:
        """LVs of the driver and LIO targets on each storage node: for 'nothing changed' checks."""
        out = {}
        for n in (self.s1, self.s2):
            lvs = n.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=30).stdout.split()
            tg = n.run(["ls", "/sys/kernel/config/target/iscsi"], timeout=30).stdout.split()
            out[n.name] = (sorted(x for x in lvs if x != "thinpool"), sorted(t for t in tg if t.startswith("iqn")))
        return out

    def write(self, target: Path, mib: int = 8) -> str:
        data = os.urandom(mib * MiB)
        src = self.w.workdir / f"src-{os.getpid()}.bin"
        src.write_bytes(data)
        self.w.run(["dd", f"if={src}", f"of={target}/data.bin", "bs=1M", "conv=fsync", "status=none"],
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
        self._nch.close()


@contextlib.contextmanager
def driver_lab(workdir: Path, name: str, subnet: str, cluster_id: str, storage: dict[str, str],
               workers: dict[str, str], boot_timeout: float):
    """A booted lab (storage: node name -> zone, each with a 4 GiB disk; workers: node name -> zone) with the
    driver deployed on it: agents, node plugins, the controller on the host. Yields (lab, deployment)."""
    problem = preflight()
    if problem:
        pytest.fail(f"e2e tests need User-Mode Linux: {problem}", pytrace=False)
    with Lab(workdir, name=name, subnet=subnet) as lab:
        storage_nodes = [lab.add_node(n, role="storage", disk_bytes=4 * GiB) for n in storage]
        worker_nodes = [lab.add_node(n, role="worker") for n in workers]
        lab.boot_all(timeout=boot_timeout)
        d = Deployment(lab, cluster_id=cluster_id, zones={**storage, **workers})
        d.start_all(storage_nodes, worker_nodes)
        try:
            yield lab, d
        finally:
            d.stop_controller()


def make_cluster(tmp_path_factory):
    with driver_lab(tmp_path_factory.mktemp("driver"), f"drv{os.getpid() % 100000}", "10.213.1", "e2e",
                    {"storage-1": "zone-a", "storage-2": "zone-b"}, {"worker-1": "zone-a"},
                    boot_timeout=180) as (lab, d):
        c = Cluster(lab, d)
        try:
            yield c
        finally:
            c.close()


