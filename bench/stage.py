"""`bench/run --parts stage`: NodeStageVolume and NodeUnstageVolume next to the same work done by hand.

Its own lab: one storage node and one worker. Each of `--stage-samples` samples, driver and raw floor in turn:

- driver: a 1 GiB ext4 volume made and published through the controller (off the clock), then, timed from the
  bench's gRPC client to the node plugin: the first NodeStageVolume (node record, CHAP credentials from the
  storage node's agent, login, the disk, blkid, mkfs, mount), NodeUnstageVolume, a second NodeStageVolume (the
  filesystem there: blkid and e2fsck -p instead of mkfs) and NodeUnstageVolume again.
- raw floor: the same export made directly on the storage node (bench/guest.py raw-create: LV, target, ACL with
  CHAP), then on the worker by hand, timed inside the worker (bench/guest.py raw-stage / raw-unstage):
  `iscsiadm -o new`, the CHAP lines written into the node record, `--login`, the /dev/disk/by-path link awaited,
  `mkfs.ext4` with the driver's options (the first time), `mount`; and `umount`, `--logout`, `-o delete`.

The node plugin logs each command it runs (bench/hook): summed per first stage in the profile table.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from csi import ids
from csi.lab import VG_NAME, LabNode
from csi.lab.deploy import Deployment
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there
import stats

MiB, GiB = 1 << 20, 1 << 30
SIZE = GiB
STEPS = ("NodeStageVolume, blank volume (mkfs)", "NodeUnstageVolume",
         "NodeStageVolume, formatted volume", "NodeUnstageVolume, again")
TARGET = {STEPS[0]: 1.2}


@dataclass
class Samples:
    driver: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    raw: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # per first stage: command label -> (calls, seconds), from the node plugin's log
    commands: list[dict[str, tuple[int, float]]] = field(default_factory=list)
    # per first raw stage: its steps' seconds
    raw_parts: list[dict[str, float]] = field(default_factory=list)


def command_label(argv: list[str]) -> str:
    """What a node plugin command does, independent of the volume it names."""
    cmd = os.path.basename(argv[0])
    if cmd == "nsenter":
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv[1:]
        cmd = os.path.basename(argv[0])
    if cmd != "iscsiadm":
        return cmd
    for op in ("--login", "--logout", "-R"):
        if op in argv:
            return f"iscsiadm {op}"
    if "-o" in argv:
        return f"iscsiadm -m node -o {argv[argv.index('-o') + 1]}"
    return f"iscsiadm -m {argv[argv.index('-m') + 1]}" if "-m" in argv else "iscsiadm"


class StageBench(attach.Clients):
    def __init__(self, d: Deployment, s: LabNode, w: LabNode, log):
        super().__init__(d, w)
        self.d, self.s, self.w, self.log = d, s, w, log
        self.lvm_env = attach.lvm_env(d, s)

    def driver_sample(self, out: Samples, name: str) -> None:
        vid = self.ctrl.CreateVolume(csi.CreateVolumeRequest(
            name=name, capacity_range=csi.CapacityRange(required_bytes=SIZE), volume_capabilities=[attach.MOUNT]),
            timeout=300).volume.volume_id
        ctx = dict(self.ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=self.w.initiator_iqn, volume_capability=attach.MOUNT), timeout=300).publish_context)
        staging, _ = attach.paths(self.d, self.w, vid, name)
        staging.mkdir(parents=True, exist_ok=True)
        stage = csi.NodeStageVolumeRequest(volume_id=vid, publish_context=ctx, staging_target_path=str(staging),
                                           volume_capability=attach.MOUNT)
        unstage = csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
        offset = stats.log_size(self.w, "node-plugin")
        for step, call, request in zip(STEPS, (self.node.NodeStageVolume, self.node.NodeUnstageVolume) * 2,
                                       (stage, unstage) * 2):
            began = time.monotonic()
            call(request, timeout=300)
            out.driver[step].append(time.monotonic() - began)
            if step == STEPS[0]:
                out.commands.append(stats.commands(stats.log_since(self.w, "node-plugin", offset), command_label))
        self.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id=self.w.initiator_iqn), timeout=300)
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=300)

    def raw_sample(self, out: Samples, lv: str) -> None:
        iqn = ids.target_iqn(VG_NAME, lv)
        attach.guest(self.s, "raw-create", VG_NAME, attach.THIN_POOL, lv, str(SIZE), iqn, self.s.ip,
                     self.w.initiator_iqn, env=self.lvm_env)
        mountpoint = self.w.workdir / f"raw-stage-{lv}"
        portal = f"{self.s.ip}:3260"
        try:
            for step, argv in zip(STEPS, (("raw-stage", iqn, portal, "1", str(mountpoint)),
                                          ("raw-unstage", iqn, str(mountpoint)),
                                          ("raw-stage", iqn, portal, "0", str(mountpoint)),
                                          ("raw-unstage", iqn, str(mountpoint)))):
                parts = attach.guest(self.w, *argv)
                out.raw[step].append(parts["total"])
                if step == STEPS[0]:
                    out.raw_parts.append(parts)
        finally:
            attach.guest(self.s, "raw-delete", VG_NAME, lv, iqn, env=self.lvm_env)


def render(out: Samples, samples: int) -> str:
    lines = [f"### NodeStageVolume and NodeUnstageVolume, 1 GiB ext4 volume (median of {samples})", "",
             "| step | driver (s) | by hand (s) | driver / by hand | target |", "|---|---:|---:|---:|---|"]
    for step in STEPS:
        driver, raw = statistics.median(out.driver[step]), statistics.median(out.raw[step])
        ratio = driver / raw if raw else float("nan")
        target = TARGET.get(step)
        met = "" if target is None else f"<= {target:g}: **{'met' if ratio <= target else 'NOT met'}**"
        lines.append(f"| {step} | {driver:.2f} | {raw:.2f} | {ratio:.2f} | {met} |")
    lines += ["", "driver: from the bench's gRPC client to the node plugin on the worker; by hand: timed inside the "
              "worker (iscsiadm -o new, the CHAP lines written into the node record, --login, the by-path link "
              "awaited, mkfs.ext4 with the driver's options, mount; umount, --logout, -o delete).", "",
              "### Where a first NodeStageVolume's time goes (mean per call, from the node plugin's log)", "",
              "| step | calls | s |", "|---|---:|---:|"]
    labels = sorted({k for sample in out.commands for k in sample})
    commands = 0.0
    for label in labels:
        series = [sample.get(label, (0, 0.0)) for sample in out.commands]
        seconds = statistics.mean(s for _, s in series)
        commands += seconds
        lines.append(f"| command `{label}` | {statistics.mean(n for n, _ in series):g} | {seconds:.3f} |")
    total = statistics.mean(out.driver[STEPS[0]])
    lines.append(f"| all external commands | | {commands:.3f} |")
    lines.append(f"| the rest (credentials from the agent, records, waits, gRPC) | | {total - commands:.3f} |")
    lines.append(f"| client-measured total | | {total:.3f} |")
    for part in ("login", "device", "mkfs", "mount"):
        lines.append(f"| by hand: {part} | | {statistics.mean(p[part] for p in out.raw_parts):.3f} |")
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, samples: int, disk_gib: int, log) -> str:
    started = time.monotonic()
    out = Samples()
    name = f"bstg{os.getpid() % 10000}"
    with attach.storage_and_worker_profiled(workdir, name, subnet, disk_gib, 240) as (d, s, w):
        bench = StageBench(d, s, w, log)
        try:
            for i in range(samples):
                bench.driver_sample(out, f"bench-stage-{i}")
                bench.raw_sample(out, f"bench-stage-raw-{i}")
                log(f"  stage sample {i + 1}/{samples}: driver {out.driver[STEPS[0]][-1]:.2f} s, by hand "
                    f"{out.raw[STEPS[0]][-1]:.2f} s")
        finally:
            bench.close()
    log(f"stage part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(out, samples)
