"""`lvm-iscsi-csi demo`: the whole volume lifecycle through the CSI API on a throw-away storage node.

One User-Mode Linux node with a VG on a loop device runs the agent (LVM + LIO) and the node plugin (open-iscsi,
mkfs, mount); the controller runs on the host in the lab's network namespace and reaches the agent over
mutual TLS. Each CSI call is made as the Kubernetes sidecars would make it; the table says what each step did
and how long it took. Everything is torn down at the end.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import grpc

from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc

GiB = 1 << 30
M = csi.VolumeCapability.AccessMode


class Steps:
    def __init__(self, out=sys.stdout):
        self.rows: list[tuple[str, float, str]] = []
        self.out = out

    def run(self, name: str, fn: Callable[[], str]) -> str:
        started = time.monotonic()
        result = fn()
        took = time.monotonic() - started
        self.rows.append((name, took, result))
        self.out.write(f"  {name:<28} {took:7.2f}s  {result}\n")
        self.out.flush()
        return result

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'step':<{w}}  {'seconds':>8}  result", f"{'-' * w}  {'-' * 8}  {'-' * 40}"]
        lines += [f"{n:<{w}}  {t:8.2f}  {r}" for n, t, r in self.rows]
        return "\n".join(lines)


def demo(workdir: Path, keep: bool = False, out=sys.stdout) -> int:
    from csi.lab import Lab, preflight
    from csi.lab.deploy import Deployment

    problem = preflight()
    if problem:
        out.write(f"demo cannot run: {problem}\n")
        return 2
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    steps = Steps(out)
    out.write("lvm-iscsi-csi demo: one throw-away storage node (UML, VG on a loop device), the whole lifecycle\n")
    try:
        with Lab(workdir / "lab", name="demo", subnet="10.213.9") as lab:
            node = lab.add_node("storage-1", role="storage", disk_bytes=4 * GiB)
            steps.run("boot storage node (UML)", lambda: (lab.boot_all(timeout=180), f"{node.name} at {node.ip}")[1])
            d = Deployment(lab, cluster_id="demo", zones={node.name: "zone-a"})
            steps.run("start agent", lambda: (d.start_agent(node), "LVM VG csi-vg, LIO portal "
                                              f"{node.ip}:3260, mTLS on :7600")[1])
            steps.run("start node plugin", lambda: d.start_node_plugin(node))
            steps.run("start controller", lambda: d.start_controller([node]))
            with grpc.insecure_channel(d.controller_target) as cch, \
                    grpc.insecure_channel(d.node_target(node)) as nch:
                lifecycle(steps, csi_pb2_grpc.ControllerStub(cch), csi_pb2_grpc.NodeStub(nch), node,
                          d.kubelet_dir(node))
            st = d.status([node])
            out.write("\n`lvm-iscsi-csi status` after the lifecycle:\n" + st.stdout + st.stderr)
            d.stop_controller()
    except Exception as exc:  # noqa: BLE001 - the demo reports, then fails
        out.write(f"\ndemo FAILED: {type(exc).__name__}: {exc}\n(logs under {workdir})\n")
        return 1
    finally:
        if steps.rows:
            out.write("\n" + steps.table() + "\n")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    out.write("\ndemo OK: every step succeeded and nothing was left behind\n")
    return 0


def lifecycle(steps: Steps, ctrl, nodesvc, node, kubelet: Path) -> None:
    cap = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                               access_mode=M(mode=M.SINGLE_NODE_WRITER))
    info = nodesvc.NodeGetInfo(csi.NodeGetInfoRequest())
    steps.run("NodeGetInfo", lambda: f"node_id {info.node_id}, zone "
                                     f"{dict(info.accessible_topology.segments) or '-'}")
    vol = {}

    def create():
        r = ctrl.CreateVolume(csi.CreateVolumeRequest(
            name="pvc-demo-0001", capacity_range=csi.CapacityRange(required_bytes=GiB), volume_capabilities=[cap],
            parameters={"csi.storage.k8s.io/fstype": "ext4"},
            accessibility_requirements=csi.TopologyRequirement(requisite=[info.accessible_topology])))
        vol["id"] = r.volume.volume_id
        return f"{r.volume.volume_id} ({r.volume.capacity_bytes >> 20} MiB, thin)"

    steps.run("CreateVolume", create)
    ctx = {}

    def publish():
        r = ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vol["id"], node_id=info.node_id, volume_capability=cap))
        ctx.update(r.publish_context)
        return (f"ACL for {info.node_id.rsplit(':', 1)[-1]}; publish_context: {', '.join(sorted(ctx))} "
                "(no secret: CHAP comes from the agent)")

    steps.run("ControllerPublishVolume", publish)
    staging = kubelet / "plugins/kubernetes.io/csi/lvm-iscsi.csi.dev/demo/globalmount"
    target = kubelet / "pods/demo-pod/volumes/kubernetes.io~csi/pvc-demo/mount"
    staging.mkdir(parents=True, exist_ok=True)
    steps.run("NodeStageVolume", lambda: (nodesvc.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=vol["id"], publish_context=ctx, staging_target_path=str(staging), volume_capability=cap)),
        "iSCSI login, mkfs.ext4, mounted at .../globalmount")[1])
    steps.run("NodePublishVolume", lambda: (nodesvc.NodePublishVolume(csi.NodePublishVolumeRequest(
        volume_id=vol["id"], publish_context=ctx, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap)), "bind-mounted into the pod's directory")[1])
    data = hashlib.sha256(b"demo").digest() * (16 * 1024 * 1024 // 32)
    written = hashlib.sha256(data).hexdigest()
    src = node.workdir / "demo-data.bin"
    src.write_bytes(data)

    def write():
        node.run(["dd", f"if={src}", f"of={target}/data.bin", "bs=1M", "conv=fsync", "status=none"],
                 timeout=120, check=True)
        return f"16 MiB written and fsync'ed, sha256 {written[:16]}..."

    def read():
        r = node.run(["dd", f"if={target}/data.bin", "bs=1M", "iflag=direct", "status=none", f"of={src}.back"],
                     timeout=120, check=True)
        back = hashlib.sha256(Path(f"{src}.back").read_bytes()).hexdigest()
        if back != written:
            raise RuntimeError(f"read back {back}, wrote {written}")
        return f"16 MiB read with O_DIRECT over iSCSI, sha256 matches ({r.rc})"

    steps.run("write", write)
    steps.run("read back", read)
    df = node.run(["df", "-h", "--output=size,used,target", str(target)], timeout=30).stdout.splitlines()[-1]
    steps.run("NodeGetVolumeStats", lambda: _stats(nodesvc, vol["id"], target, df))
    steps.run("NodeUnpublishVolume", lambda: (nodesvc.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(
        volume_id=vol["id"], target_path=str(target))), "unmounted from the pod")[1])
    steps.run("NodeUnstageVolume", lambda: (nodesvc.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=vol["id"], staging_target_path=str(staging))), "umount, flush, iSCSI logout, record deleted")[1])
    steps.run("ControllerUnpublishVolume", lambda: (ctrl.ControllerUnpublishVolume(
        csi.ControllerUnpublishVolumeRequest(volume_id=vol["id"], node_id=info.node_id)), "ACL removed")[1])
    steps.run("DeleteVolume", lambda: (ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol["id"])),
                                       "target, backstore and LV removed")[1])
    steps.run("check nothing is left", lambda: _leftovers(node))


def _stats(nodesvc, volume_id: str, target: Path, df: str) -> str:
    r = nodesvc.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target)))
    h = nodesvc.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(volume_id=volume_id,
                                                                   volume_publish_path=str(target)))
    b = r.usage[0]
    problems = "; ".join(e.reason for e in h.volume_health.health_statuses)
    return f"{b.used >> 20} MiB used of {b.total >> 20} MiB, health {problems or 'ok'} " \
           f"(df: {' '.join(df.split())})"


def _leftovers(node) -> str:
    lvs = node.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=30).stdout.split()
    ours = [lv for lv in lvs if lv != "thinpool"]
    targets = node.run(["ls", "/sys/kernel/config/target/iscsi"], timeout=30).stdout.split()
    targets = [t for t in targets if t.startswith("iqn.")]
    sessions = node.run(["iscsiadm", "-m", "session"], timeout=30)
    records = node.run(["iscsiadm", "-m", "node"], timeout=30)
    left = []
    if ours:
        left.append(f"LVs {ours}")
    if targets:
        left.append(f"targets {targets}")
    if sessions.rc == 0:
        left.append(f"sessions {sessions.stdout.strip()}")
    if records.rc == 0:
        left.append(f"node records {records.stdout.strip()}")
    if left:
        raise RuntimeError("left behind: " + "; ".join(left))
    return "no LV, target, session or node record left"
