"""Attaching a block volume to the bench's worker the way kubelet would, and filling it: shared by the
benches (bench.py's throughput, snapshots.py's source volume)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import grpc

from csi.lab import Lab, LabNode
from csi.lab.deploy import PYTHON, Deployment
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc

MiB, GiB = 1 << 20, 1 << 30
GUEST = Path(__file__).resolve().parent / "guest.py"
HOOK = Path(__file__).resolve().parent / "hook"
M = csi.VolumeCapability.AccessMode
BLOCK = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=M(mode=M.SINGLE_NODE_WRITER))
MOUNT = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                             access_mode=M(mode=M.SINGLE_NODE_WRITER))
THIN_POOL = "thinpool"   # the lab storage node's thin pool (csi/lab/node.py)


@contextlib.contextmanager
def storage_and_worker(workdir: Path, name: str, subnet: str, disk_gib: int, boot_timeout: float):
    """A lab of one storage node and one worker with the driver started on them: (deployment, storage, worker).
    The controller is stopped on the way out, the lab closed."""
    with Lab(workdir, name=name, subnet=subnet) as lab:
        s = lab.add_node("storage-1", role="storage", disk_bytes=disk_gib * GiB, mem="1G")
        w = lab.add_node("worker-1", role="worker")
        lab.boot_all(timeout=boot_timeout)
        d = Deployment(lab, cluster_id="bench")
        d.start_all([s], [w])
        try:
            yield d, s, w
        finally:
            d.stop_controller()


@contextlib.contextmanager
def storage_and_worker_profiled(workdir: Path, name: str, subnet: str, disk_gib: int,
                                boot_timeout: float):
    """storage_and_worker, with the worker's node plugin logging each command it runs (bench/hook): the
    profile of the stage benches."""
    with storage_and_worker(workdir, name, subnet, disk_gib, boot_timeout) as (d, s, w):
        d.start_node_plugin(w, env={"PYTHONPATH": str(HOOK)})
        yield d, s, w


def lvm_env(d: Deployment, node: LabNode) -> dict[str, str]:
    """The environment that gives LVM, run by hand on a lab storage node, the agent's lvm.conf."""
    return {"LVM_SYSTEM_DIR": str(d.agent_state(node) / "lvm-system")}


class Clients:
    """The bench's CSI clients: the controller, and the node plugin of its worker, as the sidecars reach them."""

    def __init__(self, d: Deployment, worker: LabNode):
        self._cch = grpc.insecure_channel(d.controller_target)
        self._nch = grpc.insecure_channel(d.node_target(worker))
        self.ctrl = csi_pb2_grpc.ControllerStub(self._cch)
        self.node = csi_pb2_grpc.NodeStub(self._nch)

    def close(self) -> None:
        self._cch.close()
        self._nch.close()


def paths(d: Deployment, worker: LabNode, vid: str, leaf: str) -> tuple[Path, Path]:
    h = hashlib.sha256(vid.encode()).hexdigest()[:16]
    kubelet = d.kubelet_dir(worker)
    return (kubelet / "plugins/kubernetes.io/csi/lvm-iscsi.csi.dev" / h / "globalmount",
            kubelet / "pods" / h / "volumeDevices" / leaf)


def attach(ctrl, node, d: Deployment, worker: LabNode, vid: str, leaf: str, cap=BLOCK) -> Path:
    """ControllerPublish + NodeStage + NodePublish on the worker: the device path there of a block volume (or
    the mounted directory, for a mount capability)."""
    ctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=vid, node_id=worker.initiator_iqn, volume_capability=cap), timeout=300).publish_context)
    staging, target = paths(d, worker, vid, leaf)
    staging.mkdir(parents=True, exist_ok=True)
    node.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=vid, publish_context=ctx, staging_target_path=str(staging), volume_capability=cap), timeout=300)
    node.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=vid, publish_context=ctx, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap), timeout=300)
    return target


def detach(ctrl, node, d: Deployment, worker: LabNode, vid: str, leaf: str) -> None:
    staging, target = paths(d, worker, vid, leaf)
    node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)), timeout=300)
    node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
                           timeout=300)
    ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=worker.initiator_iqn),
                                   timeout=300)


def fill_random(worker: LabNode, target: Path, size: int) -> None:
    """`size` bytes of random data written to the device, synced: thin blocks never written would read back
    at no cost, and a copy could skip them."""
    src = worker.workdir / f"fill-{target.name}.bin"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    try:
        worker.run(["dd", f"if={src}", f"of={target}", "bs=1M", "oflag=direct", "conv=fsync", "status=none"],
                   timeout=3600, check=True)
    finally:
        src.unlink()


def process_memory(node: LabNode, name: str) -> tuple[str, str, int, int]:
    """(daemon, where, VmRSS KiB, VmHWM KiB) of a daemon the lab started on a guest, now."""
    pid = node.status(name)["pid"]
    return (name, f"guest {node.name}", *_rss(node.run(["cat", f"/proc/{pid}/status"], timeout=30, check=True).stdout))


def daemon_memory(d: Deployment, storage: LabNode, worker: LabNode) -> list[tuple[str, str, int, int]]:
    """(daemon, where, VmRSS KiB, VmHWM KiB) of the agent, the node plugin and the controller, now."""
    return [process_memory(storage, "agent"), process_memory(worker, "node-plugin"),
            ("controller", "host", *_rss(Path(f"/proc/{d.controller.pid}/status").read_text()))]


def memory_table(memory: list[tuple[str, str, int, int]]) -> list[str]:
    """The lines of a "Resident memory after the run" table of daemon_memory's (or process_memory's) rows."""
    return ["### Resident memory after the run", "", "| daemon | runs on | RSS (MiB) | peak RSS (MiB) |",
            "|---|---|---:|---:|", *(f"| {name} | {where} | {rss / 1024:.1f} | {hwm / 1024:.1f} |"
                                       for name, where, rss, hwm in memory)]


def _rss(status: str) -> tuple[int, int]:
    values = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    return int(values["VmRSS"]), int(values["VmHWM"])


def guest(node: LabNode, *argv: str, env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    """A bench/guest.py sub-command run in a lab node: the JSON line it answers."""
    r = node.run([PYTHON, str(GUEST), *argv], env=env, timeout=timeout, check=True)
    return json.loads(r.stdout.splitlines()[-1])
