"""`bench/run --parts snapshots`: what a snapshot and a restore cost, on the same storage node and across two.

Its own lab: two storage nodes (zone-a, zone-b) and one worker. A block volume on storage-1 gets `--snap-mib`
of random data written through the worker (random, so that no copy can skip a block as unwritten). Then,
each `--samples` times, driver and raw floor side by side, each sample removed off the clock:

- CreateSnapshot, next to the thin `lvcreate --snapshot` the agent runs (same options, same lvm.conf);
- CreateVolume from that snapshot on storage-1 (a thin snapshot of the snapshot), next to that lvcreate;
- CreateVolume from that snapshot on storage-2: the agent there copies the data from storage-1 over mutual
  TLS and verifies it (sha256) before the call returns. Raw floor: what a person would do by hand over the
  same lab network, with neither TLS nor a checksum: activate the snapshot on storage-1, `lvcreate` a thin
  volume on storage-2, and stream the device across with plain TCP into it, fsync at the end.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from csi.lab import VG_NAME, Lab, LabNode
from csi.lab.deploy import PYTHON, Deployment
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there

MiB, GiB = 1 << 20, 1 << 30
COPY_PORT = 7802
ZONE_KEY = "topology.lvm-iscsi.csi.dev/zone"
ZONES = {"storage-1": "zone-a", "storage-2": "zone-b"}
BLOCK = attach.BLOCK


@dataclass
class Row:
    name: str
    raw_is: str
    driver: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)


class SnapshotBench(attach.Clients):
    def __init__(self, lab: Lab, d: Deployment, s1: LabNode, s2: LabNode, w: LabNode, log):
        super().__init__(d, w)
        self.lab, self.d, self.s1, self.s2, self.w, self.log = lab, d, s1, s2, w, log

    def lvm_env(self, node: LabNode) -> dict[str, str]:
        return attach.lvm_env(self.d, node)

    def guest(self, node: LabNode, *argv: str, timeout: float = 600) -> dict:
        return attach.guest(node, *argv, env=self.lvm_env(node), timeout=timeout)

    # ------------------------------------------------------------------------------------ CSI calls

    def create(self, name: str, size: int, zone: str, snapshot_id: str = "") -> csi.Volume:
        req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                      volume_capabilities=[BLOCK])
        req.accessibility_requirements.requisite.add(segments={ZONE_KEY: zone})
        if snapshot_id:
            req.volume_content_source.snapshot.snapshot_id = snapshot_id
        return self.ctrl.CreateVolume(req, timeout=3600).volume

    def delete(self, vid: str) -> None:
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=600)

    def fill(self, vid: str, size: int) -> None:
        """Writes `size` bytes of random data into the volume through the worker, then detaches it."""
        target = attach.attach(self.ctrl, self.node, self.d, self.w, vid, "src")
        self.log(f"writing {size // MiB} MiB of random data to the source volume")
        attach.fill_random(self.w, target, size)
        attach.detach(self.ctrl, self.node, self.d, self.w, vid, "src")

    # ------------------------------------------------------------------------------------ samples

    def run(self, size: int, samples: int) -> list[Row]:
        src = self.create("bench-snap-src", size, "zone-a")
        src_lv = src.volume_id.rsplit(":", 1)[-1]
        self.fill(src.volume_id, size)
        snap_row = Row("CreateSnapshot", "thin `lvcreate --snapshot` of the volume")
        near_row = Row("CreateVolume from the snapshot, same storage node",
                       "thin `lvcreate --snapshot` of the snapshot")
        far_row = Row("CreateVolume from the snapshot, other storage node",
                      "activate the snapshot + thin `lvcreate` there + plain TCP stream of the device, fsync")
        for i in range(samples):
            began = time.monotonic()
            snap = self.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(
                name=f"bench-snap-{i}", source_volume_id=src.volume_id), timeout=600).snapshot
            snap_row.driver.append(time.monotonic() - began)
            self.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=600)
            snap_row.raw.append(self.raw_snapshot(self.s1, src_lv, f"bench-raw-snap-{i}", activate=False))
            self.log(f"  snapshot sample {i + 1}/{samples}: driver {snap_row.driver[-1]:.2f}s, "
                     f"raw {snap_row.raw[-1]:.2f}s")
        snap = self.ctrl.CreateSnapshot(csi.CreateSnapshotRequest(name="bench-snap", source_volume_id=src.volume_id),
                                        timeout=600).snapshot
        snap_lv = snap.snapshot_id.rsplit(":", 1)[-1]
        for i in range(samples):
            for row, zone in ((near_row, "zone-a"), (far_row, "zone-b")):
                began = time.monotonic()
                vol = self.create(f"bench-restore-{zone}-{i}", size, zone, snapshot_id=snap.snapshot_id)
                row.driver.append(time.monotonic() - began)
                self.delete(vol.volume_id)
            near_row.raw.append(self.raw_snapshot(self.s1, snap_lv, f"bench-raw-near-{i}", activate=True))
            far_row.raw.append(self.raw_copy(snap_lv, f"bench-raw-far-{i}", size))
            self.log(f"  restore sample {i + 1}/{samples}: same node {near_row.driver[-1]:.2f}s "
                     f"(raw {near_row.raw[-1]:.2f}s), other node {far_row.driver[-1]:.2f}s "
                     f"(raw {far_row.raw[-1]:.2f}s)")
        self.ctrl.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=600)
        self.delete(src.volume_id)
        return [snap_row, near_row, far_row]

    def raw_snapshot(self, node: LabNode, origin: str, name: str, activate: bool) -> float:
        """The agent's thin snapshot argv (kept inactive for a snapshot, active for a restore), timed."""
        flags = ["--setactivationskip", "n", "--activate", "y"] if activate else \
            ["--setactivationskip", "y", "--activate", "n"]
        seconds = self.guest(node, "timed", "lvcreate", "--yes", "--snapshot", "--name", name, *flags,
                             "--addtag", "bench.raw/kind=snapshot", f"{VG_NAME}/{origin}")["seconds"]
        self.guest(node, "timed", "lvremove", "--yes", f"{VG_NAME}/{name}")
        return seconds

    def raw_copy(self, snap_lv: str, name: str, size: int) -> float:
        activate = self.guest(self.s1, "timed", "lvchange", "--activate", "y", "--ignoreactivationskip",
                              f"{VG_NAME}/{snap_lv}")["seconds"]
        create = self.guest(self.s2, "timed", "lvcreate", "--yes", "--name", name, "--activate", "y",
                            "--setactivationskip", "n", "--virtualsize", f"{size}b", "--thin",
                            f"{VG_NAME}/{attach.THIN_POOL}")["seconds"]
        self.s2.spawn("recv-file", [PYTHON, str(attach.GUEST), "recv-file",
                                    self.s2.ip, str(COPY_PORT), f"/dev/{VG_NAME}/{name}"])
        self.guest(self.s1, "send-file", self.s2.ip, str(COPY_PORT), f"/dev/{VG_NAME}/{snap_lv}", str(size),
                   timeout=3600)
        rc = self.s2.wait_exit("recv-file", timeout=600)
        last = self.s2.run(["tail", "-n", "1", str(self.s2.log_path("recv-file"))], timeout=30).stdout
        if rc != 0:
            raise RuntimeError(f"recv-file exited with {rc}: {last}")
        got = json.loads(last)
        if got["bytes"] != size:
            raise RuntimeError(f"raw copy moved {got['bytes']} bytes, not {size}")
        self.guest(self.s1, "timed", "lvchange", "--activate", "n", f"{VG_NAME}/{snap_lv}")
        self.guest(self.s2, "timed", "lvremove", "--yes", f"{VG_NAME}/{name}")
        return activate + create + got["seconds"]


def render(rows: list[Row], size: int, samples: int, memory: list[tuple[str, str, int, int]] = ()) -> str:
    lines = [f"### Snapshots and restores of {size // MiB} MiB of written data, median of {samples} samples", "",
             "| operation | driver (s) | raw floor (s) | driver / raw | raw floor is |", "|---|---:|---:|---:|---|"]
    for r in rows:
        d, w = statistics.median(r.driver), statistics.median(r.raw)
        lines.append(f"| {r.name} | {d:.2f} | {w:.2f} | {d / w:.2f} | {r.raw_is} |")
    far = rows[-1]
    lines += ["", f"Across storage nodes the driver moved {size / statistics.median(far.driver) / 1e6:.1f} MB/s "
                  f"(mutual TLS, sparse-aware, sha256-verified); the plain TCP stream "
                  f"{size / statistics.median(far.raw) / 1e6:.1f} MB/s (setup included in both)."]
    if memory:   # storage-1 sent the cross-node copies, storage-2 received them
        lines += ["", *attach.memory_table(memory)]
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, size: int, samples: int, disk_gib: int, log) -> str:
    with Lab(workdir, name=f"bsnap{os.getpid() % 10000}", subnet=subnet) as lab:
        s1 = lab.add_node("storage-1", role="storage", disk_bytes=disk_gib * GiB, mem="1G")
        s2 = lab.add_node("storage-2", role="storage", disk_bytes=disk_gib * GiB, mem="1G")
        w = lab.add_node("worker-1", role="worker")
        lab.boot_all(timeout=180)
        d = Deployment(lab, cluster_id="bench", zones=dict(ZONES))
        # bench/hook: the runner's debug lines ("ran [argv] ... in Xs"), for the profile of each operation
        d.start_all([s1, s2], [w], agent_env={"PYTHONPATH": str(Path(__file__).resolve().parent / "hook")})
        bench = SnapshotBench(lab, d, s1, s2, w, log)
        try:
            rows = bench.run(size, samples)
            memory = [attach.process_memory(node, "agent") for node in (s1, s2)]
        finally:
            bench.close()
            d.stop_controller()
    return render(rows, size, samples, memory)
