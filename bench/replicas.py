"""`bench/run --parts replicas`: what the second leg of a replicated volume (replicas: "2") costs, and how fast
a leg catches up.

Its own lab: two storage nodes and one worker. A plain and a replicated raw block volume of the same size,
attached as kubelet does it and filled with random data first:

- fio write jobs (and a read) on each, alternating, `--fio-runs` times: the same flags as `--parts randio`
  (libaio, O_DIRECT). A write to the replicated volume is acknowledged when both legs hold it, over two iSCSI
  sessions to two nodes; a read is served by one leg.
- resync after an outage: storage-2 cut off by the network while `--fio-mib`/2 MiB are written to the volume
  (md drops its leg and records the written regions in its write-intent bitmap), the cable back, and the time
  from md taking the leg back to the array in sync: seconds per GiB changed.
- full recovery: a leg's md superblock erased (what a replacement leg looks like), the node plugin's reconciler
  adds it back with a full copy: seconds per GiB of the volume.

md's own resync speed limits are left as the kernel sets them (dev.raid.speed_limit_min/max).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from csi import ids
from csi.lab import Lab, LabNode
from csi.lab.deploy import Deployment
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there
from randio import Cell, Job, RandioBench

MiB, GiB = 1 << 20, 1 << 30
JOBS = (Job("4 KiB random write, QD1", "randwrite", "4k", 1),
        Job("4 KiB random write, QD32", "randwrite", "4k", 32),
        Job("1 MiB sequential write, QD8", "write", "1m", 8),
        Job("4 KiB random read, QD1", "randread", "4k", 1))
REPLICATED = {"replicas": "2"}


def mdstat(w: LabNode) -> str:
    return w.run(["cat", "/proc/mdstat"], timeout=30).stdout


def array(w: LabNode, key: str) -> tuple[str, str]:
    """The array's member count line ("[2/1] [U_]") and the whole stanza of /proc/mdstat."""
    md = w.run(["readlink", "-f", f"/dev/md/csi-{ids.md_name(key).split(':')[1]}"], timeout=30).stdout.strip()
    name = md.rsplit("/", 1)[-1]
    text = mdstat(w)
    m = re.search(rf"^{re.escape(name)} : .*?(?=^\S|\Z)", text, re.M | re.S) if name else None
    stanza = m.group(0) if m else ""
    counts = re.search(r"\[\d/\d\] \[[U_]+\]", stanza)
    return (counts.group(0) if counts else ""), stanza


def wait(what: str, check, timeout: float, every: float = 0.25) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(every)
    return time.monotonic()


class ReplicaBench(RandioBench):
    def create(self, name: str, size: int, cap, params: dict | None = None) -> str:
        return self.ctrl.CreateVolume(csi.CreateVolumeRequest(
            name=name, capacity_range=csi.CapacityRange(required_bytes=size), volume_capabilities=[cap],
            parameters=params or {}), timeout=600).volume.volume_id

    def io(self, plain: Path, replicated: Path, runs: int) -> dict[str, tuple[Cell, Cell]]:
        out = {j.name: (Cell(), Cell()) for j in JOBS}
        for i in range(runs):
            for job in JOBS:
                two, one = out[job.name]
                two.runs.append(self.fio(self.w, job, str(replicated)))
                one.runs.append(self.fio(self.w, job, str(plain)))
                self.log(f"  run {i + 1}/{runs}, {job.name}: replicated {two.runs[-1].iops:,.0f} IOPS, "
                         f"one leg {one.runs[-1].iops:,.0f} IOPS")
        return out

    def resync_after_outage(self, s2: LabNode, key: str, device: Path, changed: int) -> float:
        """Seconds from md taking storage-2's leg back to the array in sync, after `changed` bytes were written
        while the leg was away."""
        s2.unplug()
        try:
            src = self.w.workdir / "bench-changed.bin"
            with open(src, "wb") as f:
                for _ in range(changed // MiB):
                    f.write(os.urandom(MiB))
            self.w.run(["dd", f"if={src}", f"of={device}", "bs=1M", "oflag=direct", "conv=fsync", "status=none"],
                       timeout=3600, check=True)
            src.unlink()
            wait("md to drop the leg", lambda: "_" in array(self.w, key)[0], 120)
        finally:
            s2.plug()
        taken = wait("md to take the leg back", lambda: "recovery" in array(self.w, key)[1]
                     or array(self.w, key)[0] == "[2/2] [UU]", 300)
        done = wait("the array in sync", lambda: array(self.w, key)[0] == "[2/2] [UU]"
                    and "recovery" not in array(self.w, key)[1], 3600)
        return done - taken

    def full_recovery(self, key: str) -> float:
        """Seconds from the reconciler adding a leg with no superblock (a full copy) to the array in sync."""
        counts, stanza = array(self.w, key)
        leg = sorted(re.findall(r"(sd[a-z]+)\[\d+\]", stanza))[-1]
        md = f"/dev/md/csi-{ids.md_name(key).split(':')[1]}"
        self.w.run(["mdadm", "--manage", md, "--fail", f"/dev/{leg}"], timeout=60, check=True)
        self.w.run(["mdadm", "--manage", md, "--remove", f"/dev/{leg}"], timeout=60, check=True)
        self.w.run(["mdadm", "--zero-superblock", f"/dev/{leg}"], timeout=60, check=True)
        taken = wait("the reconciler to add the blank leg", lambda: "recovery" in array(self.w, key)[1], 300)
        done = wait("the array in sync", lambda: array(self.w, key)[0] == "[2/2] [UU]"
                    and "recovery" not in array(self.w, key)[1], 3600)
        return done - taken


def render(io: dict[str, tuple[Cell, Cell]], resync: list[float], full: list[float], size: int, runs: int,
           runtime: int, speed: str) -> str:
    changed = size // 2
    lines = [f"### Replicated volumes: two legs next to one ({size // MiB} MiB raw block volumes over iSCSI, "
             f"filled first, {runtime} s per fio run, median of {runs} runs)", "",
             "| job | replicated IOPS | one leg IOPS | ratio | replicated MB/s | one leg MB/s | "
             "replicated mean / p99 (us) | one leg mean / p99 (us) |", "|---|" + "---:|" * 7]
    for job in JOBS:
        two, one = io[job.name]
        lines.append(f"| {job.name} | {two.median('iops'):,.0f} | {one.median('iops'):,.0f} | "
                     f"{two.median('iops') / one.median('iops'):.2f} | {two.median('mbps'):.1f} | "
                     f"{one.median('mbps'):.1f} | {two.median('mean_us'):,.0f} / {two.median('p99_us'):,.0f} | "
                     f"{one.median('mean_us'):,.0f} / {one.median('p99_us'):,.0f} |")
    per_gib = [t / (changed / GiB) for t in resync]
    full_gib = [t / (size / GiB) for t in full]
    lines += ["", "| resync | runs (s) | seconds per GiB |", "|---|---|---:|",
              f"| after an outage, {changed // MiB} MiB written meanwhile (bitmap) | "
              f"{', '.join(f'{t:.1f}' for t in resync)} | {sorted(per_gib)[len(per_gib) // 2]:.1f} |",
              f"| full recovery of a blank leg, {size // MiB} MiB | {', '.join(f'{t:.1f}' for t in full)} | "
              f"{sorted(full_gib)[len(full_gib) // 2]:.1f} |", "",
              f"md's resync limits as the kernel set them: {speed}. The time runs from md taking the leg back "
              "(after the cable is back, the iSCSI session's reconnect and the node plugin's next reconcile round, "
              "every 5 s) to the array in sync."]
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, size: int, runs: int, runtime: int, disk_gib: int, log) -> str:
    started = time.monotonic()
    with Lab(workdir, name=f"brep{os.getpid() % 10000}", subnet=subnet) as lab:
        s1 = lab.add_node("storage-1", role="storage", disk_bytes=disk_gib * GiB, mem="1G")
        s2 = lab.add_node("storage-2", role="storage", disk_bytes=disk_gib * GiB, mem="1G")
        w = lab.add_node("worker-1", role="worker")
        lab.boot_all(timeout=240)
        d = Deployment(lab, cluster_id="bench")
        d.start_all([s1, s2], [w])
        bench = ReplicaBench(d, s1, w, runtime, log)
        try:
            plain = bench.create("bench-replicas-one", size, attach.BLOCK)
            replicated = bench.create("bench-replicas-two", size, attach.BLOCK, REPLICATED)
            key = ids.parse_replicated_id(replicated)
            one = attach.attach(bench.ctrl, bench.node, d, w, plain, "one")
            two = attach.attach(bench.ctrl, bench.node, d, w, replicated, "two")
            log(f"filling both volumes ({size // MiB} MiB each)")
            attach.fill_random(w, one, size)
            attach.fill_random(w, two, size)
            io = bench.io(one, two, runs)
            speed = "min {} / max {} KB/s".format(*(w.run(["sysctl", "-n", f"dev.raid.speed_limit_{m}"],
                                                          timeout=30).stdout.strip() for m in ("min", "max")))
            resync, full = [], []
            for i in range(runs):
                resync.append(bench.resync_after_outage(s2, key, two, size // 2))
                full.append(bench.full_recovery(key))
                log(f"  resync run {i + 1}/{runs}: after an outage {resync[-1]:.1f} s, full {full[-1]:.1f} s")
            attach.detach(bench.ctrl, bench.node, d, w, plain, "one")
            attach.detach(bench.ctrl, bench.node, d, w, replicated, "two")
            for vid in (plain, replicated):
                bench.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=600)
        finally:
            bench.close()
            d.stop_controller()
    log(f"replicas part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(io, resync, full, size, runs, runtime, speed)
