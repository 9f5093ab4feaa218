"""`bench/run --parts randio`: random and sequential I/O with fio, over iSCSI next to the same LV on its node.

Its own lab: one storage node and one worker. Two volumes made and attached by the driver as kubelet does it
(ControllerPublish, NodeStage, NodePublish), each filled with random data first (thin blocks never written
read back at no cost):

- a raw block volume: each job runs on the worker against the staged device (over iSCSI) and on the storage
  node against the LV itself, alternating, `--fio-runs` times;
- an ext4 volume: each job runs on a file in the staged filesystem, `--fio-runs` times; then on the storage
  node, on the same file in an LV of the same size in the same thin pool (the volume's own LV stays claimed by
  its LIO export until it is deleted), made, formatted and filled the same way.

The same fio flags on both sides: libaio, O_DIRECT, no fsync (a direct write is acknowledged by the device,
which for iSCSI means by the target), time-based runs after a ramp, random offsets over the whole volume.
Reported: IOPS, MB/s, mean and p99 latency (submission to completion), median over the runs, and iSCSI / local.
The UML lab's local figures are low and move between runs (one CPU per node, a loop device over a host file):
read the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from csi import ids
from csi.lab import LabNode
from csi.lab.deploy import PYTHON, Deployment
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there

MiB, GiB = 1 << 20, 1 << 30
GUEST = Path(__file__).resolve().parent / "guest.py"
ECHO_PORT = 7803
PINGS = 2000
M = csi.VolumeCapability.AccessMode
EXT4 = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                            access_mode=M(mode=M.SINGLE_NODE_WRITER))


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    depth: int
    target: float | None = None   # iSCSI / local IOPS at least this much


JOBS = (Job("4 KiB random read, QD1", "randread", "4k", 1, 0.6),
        Job("4 KiB random read, QD32", "randread", "4k", 32, 0.8),
        Job("4 KiB random write, QD1", "randwrite", "4k", 1, 0.6),
        Job("4 KiB random write, QD32", "randwrite", "4k", 32, 0.8),
        Job("1 MiB sequential read, QD8", "read", "1m", 8),
        Job("1 MiB sequential write, QD8", "write", "1m", 8))


@dataclass
class Result:
    iops: float
    mbps: float
    mean_us: float
    p99_us: float


@dataclass
class Cell:
    runs: list[Result] = field(default_factory=list)

    def median(self, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs)


def fio_argv(job: Job, path: str, runtime: int, size: int | None = None) -> list[str]:
    """One fio job, the same flags on every side; `size` for a file (fio lays it out first)."""
    argv = ["fio", "--name=bench", f"--filename={path}", f"--rw={job.rw}", f"--bs={job.bs}",
            f"--iodepth={job.depth}", "--ioengine=libaio", "--direct=1", "--time_based", f"--runtime={runtime}",
            "--ramp_time=2", "--norandommap", "--randrepeat=0", "--lat_percentiles=1", "--percentile_list=99",
            "--output-format=json"]
    return argv + [f"--size={size}"] if size else argv


def parse(output: str, rw: str) -> Result:
    """fio's JSON (one job): the read or write side, whichever the job did."""
    side = json.loads(output[output.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
    lat = side["lat_ns"]
    p99 = lat.get("percentile", {}).get("99.000000", 0)
    return Result(side["iops"], side["bw_bytes"] / 1e6, lat["mean"] / 1000, p99 / 1000)


class RandioBench(attach.Clients):
    def __init__(self, d: Deployment, s: LabNode, w: LabNode, runtime: int, log):
        super().__init__(d, w)
        self.d, self.s, self.w, self.runtime, self.log = d, s, w, runtime, log

    def create(self, name: str, size: int, cap) -> str:
        return self.ctrl.CreateVolume(csi.CreateVolumeRequest(
            name=name, capacity_range=csi.CapacityRange(required_bytes=size), volume_capabilities=[cap]),
            timeout=600).volume.volume_id

    def fio(self, node: LabNode, job: Job, path: str, size: int | None = None) -> Result:
        for n in (self.s, self.w):   # the page cache plays no part (O_DIRECT), but the lab's host file does
            n.run(["sysctl", "-q", "vm.drop_caches=3"], timeout=60, check=True)
        r = node.run(fio_argv(job, path, self.runtime, size), timeout=self.runtime + 600, check=True)
        return parse(r.stdout, job.rw)

    def round_trip(self) -> tuple[float, float]:
        """The lab's network floor of one synchronous 4 KiB write: a 4 KiB message worker -> storage node and
        a 48-byte answer, over TCP between the same two nodes (Python at both ends): mean and p99 in us."""
        self.s.spawn("tcp-echo", [PYTHON, str(GUEST), "tcp-echo", self.s.ip, str(ECHO_PORT)])
        r = self.w.run([PYTHON, str(GUEST), "tcp-ping", self.s.ip, str(ECHO_PORT), str(PINGS)], timeout=600,
                       check=True)
        self.s.wait_exit("tcp-echo", timeout=60)
        got = json.loads(r.stdout.splitlines()[-1])
        return got["mean_us"], got["p99_us"]

    def block(self, size: int, runs: int) -> dict[str, tuple[Cell, Cell]]:
        vid = self.create("bench-randio-block", size, attach.BLOCK)
        device = attach.attach(self.ctrl, self.node, self.d, self.w, vid, "randio")
        self.log(f"filling the block volume ({size // MiB} MiB)")
        attach.fill_random(self.w, device, size)
        ref = ids.parse_id(vid)
        local = f"/dev/{ref.vg}/{ref.lv}"
        out = {j.name: (Cell(), Cell()) for j in JOBS}
        for i in range(runs):
            for job in JOBS:
                over, here = out[job.name]
                over.runs.append(self.fio(self.w, job, str(device)))
                here.runs.append(self.fio(self.s, job, local))
                self.log(f"  block run {i + 1}/{runs}, {job.name}: iSCSI {over.runs[-1].iops:,.0f} IOPS, "
                         f"local {here.runs[-1].iops:,.0f} IOPS")
        attach.detach(self.ctrl, self.node, self.d, self.w, vid, "randio")
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=600)
        return out

    def filesystem(self, size: int, runs: int) -> dict[str, tuple[Cell, Cell]]:
        """The file takes 3/4 of the volume; fio lays it out (writes it) on its first job."""
        vid = self.create("bench-randio-fs", size, EXT4)
        target = attach.attach(self.ctrl, self.node, self.d, self.w, vid, "randio-fs", cap=EXT4)
        file_size = size * 3 // 4 // MiB * MiB
        self.log(f"filling a {file_size // MiB} MiB file in the ext4 volume")
        self.w.run(["dd", "if=/dev/urandom", f"of={target}/fio.dat", "bs=1M", f"count={file_size // MiB}",
                    "oflag=direct", "conv=fsync", "status=none"], timeout=3600, check=True)
        out = {j.name: (Cell(), Cell()) for j in JOBS}
        for i in range(runs):
            for job in JOBS:
                out[job.name][0].runs.append(self.fio(self.w, job, f"{target}/fio.dat", file_size))
            self.log(f"  ext4 over iSCSI, run {i + 1}/{runs} done")
        attach.detach(self.ctrl, self.node, self.d, self.w, vid, "randio-fs")
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=600)
        # The volume's LV stays claimed by its LIO export until it is deleted, so the local side is an LV of
        # the same size in the same thin pool, made, formatted and filled the same way.
        ref = ids.parse_id(vid)
        env = attach.lvm_env(self.d, self.s)
        lv, mnt = f"{ref.vg}/bench-randio-local", self.s.workdir / "randio-fs"
        self.s.run(["lvcreate", "--yes", "--thin", "--virtualsize", f"{size}b", "--name", lv.split("/")[1],
                    f"{ref.vg}/thinpool"], env=env, timeout=300, check=True)
        self.s.run(["mkfs.ext4", "-q", f"/dev/{lv}"], timeout=600, check=True)
        self.s.run(["mkdir", "-p", str(mnt)], timeout=30, check=True)
        self.s.run(["mount", "-t", "ext4", f"/dev/{lv}", str(mnt)], timeout=120, check=True)
        try:
            self.s.run(["dd", "if=/dev/urandom", f"of={mnt}/fio.dat", "bs=1M", f"count={file_size // MiB}",
                        "oflag=direct", "conv=fsync", "status=none"], timeout=3600, check=True)
            for i in range(runs):
                for job in JOBS:
                    out[job.name][1].runs.append(self.fio(self.s, job, f"{mnt}/fio.dat", file_size))
                self.log(f"  ext4 on the storage node, run {i + 1}/{runs} done")
        finally:
            self.s.run(["umount", str(mnt)], timeout=120, check=True)
            self.s.run(["lvremove", "--yes", lv], env=env, timeout=300, check=True)
        return out


def render(block: dict[str, tuple[Cell, Cell]], fs: dict[str, tuple[Cell, Cell]], size: int, runs: int,
           runtime: int, rtt: list[tuple[float, float]] | None = None) -> str:
    lines = [f"### Random and sequential I/O with fio: over iSCSI vs the same LV on its storage node "
             f"({size // MiB} MiB volume filled first, {runtime} s per run, median of {runs} runs)", ""]
    for title, table in (("raw block volume", block), ("ext4 volume, a file of 3/4 of it", fs)):
        lines += [f"{title}:", "", "| job | iSCSI IOPS | local IOPS | IOPS ratio | iSCSI MB/s | local MB/s | "
                  "iSCSI mean / p99 (us) | local mean / p99 (us) | target |", "|---|" + "---:|" * 7 + "---|"]
        for job in JOBS:
            over, here = table[job.name]
            ratio = over.median("iops") / here.median("iops")
            target = "" if job.target is None else \
                f">= {job.target:.1f}: **{'met' if ratio >= job.target else 'NOT met'}**"
            lines.append(f"| {job.name} | {over.median('iops'):,.0f} | {here.median('iops'):,.0f} | {ratio:.2f} | "
                         f"{over.median('mbps'):.1f} | {here.median('mbps'):.1f} | "
                         f"{over.median('mean_us'):,.0f} / {over.median('p99_us'):,.0f} | "
                         f"{here.median('mean_us'):,.0f} / {here.median('p99_us'):,.0f} | {target} |")
        lines.append("")
    lines += ["fio flags on both sides: `--ioengine=libaio --direct=1 --time_based --ramp_time=2 --norandommap "
              "--randrepeat=0`, the job's `--rw --bs --iodepth`; caches dropped on both nodes before each run."]
    if rtt:
        mean, p99 = statistics.median(m for m, _ in rtt), statistics.median(p for _, p in rtt)
        write = block["4 KiB random write, QD1"]
        added = write[0].median("mean_us") - write[1].median("mean_us")
        lines += ["", f"The lab's network floor: a 4 KiB message worker -> storage node answered with 48 bytes, over "
                      f"TCP between the same nodes ({PINGS} in a row, median of {len(rtt)} runs): mean {mean:,.0f} us, "
                      f"p99 {p99:,.0f} us. A QD1 4 KiB write over iSCSI adds {added:,.0f} us to the local one: "
                      f"{added / mean:.1f}x that round trip."]
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, size: int, runs: int, runtime: int, disk_gib: int, log) -> str:
    started = time.monotonic()
    with attach.storage_and_worker(workdir, f"brio{os.getpid() % 10000}", subnet, disk_gib, 180) as (d, s, w):
        bench = RandioBench(d, s, w, runtime, log)
        try:
            rtt = [bench.round_trip() for _ in range(runs)]
            log(f"TCP round trip (4 KiB / 48 B): {', '.join(f'{m:,.0f} us' for m, _ in rtt)}")
            block = bench.block(size, runs)
            fs = bench.filesystem(size, runs)
        finally:
            bench.close()
    log(f"fio part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(block, fs, size, runs, runtime, rtt)
