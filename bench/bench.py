"""`bench/run`: what the driver costs on real kernels, next to what the same work costs without it.

One storage node and one worker (User-Mode Linux, csi/lab) run the real agent and node plugin; the controller
runs on the host and reaches the agent over mutual TLS (csi/lab/deploy.py, as the e2e tests run it).

1. CreateVolume + ControllerPublishVolume through the controller, with N existing volumes on the storage node
   (made through the driver, in bulk), next to the raw floor measured in the same run on the same node: the
   agent's thin lvcreate (same argv, same LVM configuration) and the same LIO export with ACL + CHAP, done
   directly by bench/guest.py. Samples of the two alternate; each sample's volume is removed (off the clock)
   before the next, so every sample sees exactly N volumes. The agent logs each command it runs (runner
   debug lines, turned on by bench/hook) and each RPC's duration: summed per sample in the profile table.
2. Resident memory of the agent, the node plugin and the controller after the run.
3. Read throughput of a volume staged by the node plugin (dd iflag=direct on the worker) next to raw TCP
   between the same two nodes (bench/guest.py tcp-send / tcp-recv), measured the same way: bytes / seconds;
   and next to a TCP stream of the same LV read with O_DIRECT (send-device), which does the reading LIO does.
   Caches are dropped on both nodes before every run.
4. Snapshot and restore latency, same storage node and across two, next to their raw floors: in its own lab,
   see bench/snapshots.py.
5. Random and sequential I/O with fio over iSCSI, next to the same LV on its storage node: in its own lab,
   see bench/randio.py (`--parts randio`); and the iSCSI path's knobs (session queue depth, the keys the
   login negotiates, the worker's disk queue), each measured against the driver's defaults in one run:
   bench/iscsi_tuning.py (`--parts tuning`).
6. Replicated volumes: write IOPS and throughput with two legs next to one, resync after an outage per GiB
   changed and a full recovery per GiB: in its own lab of two storage nodes, see bench/replicas.py
   (`--parts replicas`).
7. A storage node's reboot with N volumes in use: from the agent's start to every export back, next to one
   `vgchange -ay` and the same exports made with rtslib: in its own lab, see bench/restart.py (`--parts restart`).
8. Under load: a hundred volumes made and deleted at once through the controller, publishes and unpublishes
   timed meanwhile, and the rate next to LVM's own serial lvcreate: in its own lab, see bench/load.py
   (`--parts load`).
9. NodeStageVolume and NodeUnstageVolume next to the same login, mkfs and mount done by hand on the worker: in
   its own lab, see bench/stage.py (`--parts stage`).
10. Many NodeStageVolume calls at once on one worker, each with kubelet's deadline: in its own lab, see
   bench/stage_burst.py (`--parts burst`).

Prints the tables as Markdown and writes them to bench/results.md (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi import ids
from csi.lab import VG_NAME, Lab, LabError, LabNode, preflight
from csi.lab.deploy import PYTHON, Deployment
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attach  # noqa: E402  (bench/ is not a package: bench/run runs this file)
import iscsi_tuning  # noqa: E402
import load  # noqa: E402
import randio  # noqa: E402
import replicas  # noqa: E402
import restart  # noqa: E402
import snapshots  # noqa: E402
import stage  # noqa: E402
import stage_burst  # noqa: E402
import stats  # noqa: E402
from stats import percentile  # noqa: E402

HERE = Path(__file__).resolve().parent
GUEST = HERE / "guest.py"
MiB, GiB = 1 << 20, 1 << 30
PARTS = {"create", "snapshots", "randio", "tuning", "replicas", "restart", "load", "stage", "burst"}
VOLUME_BYTES = 4 * MiB
TCP_PORT = 7801
# Lines of csi/runner.py (debug) and csi/server.py (info) in the agent's log.
RPC = re.compile(r" csi\.server: (\w+) (?:ok in ([\d.]+)s$|failed after ([\d.]+)s: (\w+))", re.M)
DD_RATE = re.compile(r"^(\d+) bytes .* copied, ([\d.]+) s", re.M)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def command_label(argv: list[str]) -> str:
    """What an agent command does, independent of the volume it names."""
    cmd, last = argv[0], argv[-1]
    if cmd == "lvs":
        fields = argv[argv.index("-o") + 1] if "-o" in argv else ""
        if "zero" in fields.split(","):
            return "lvs VG/thinpool (pool state)"
        return "lvs VG/LV (one LV)" if "/" in last else "lvs VG (every LV in the VG)"
    if cmd == "vgs":
        return "vgs VG"
    if argv[:2] == ["dmsetup", "status"]:
        return "dmsetup status (thin pool fill, from the kernel)"
    if cmd == "lvcreate":
        return "lvcreate --thin" if "--thin" in argv else "lvcreate"
    return cmd


@dataclass
class Reads:
    """Read runs of one kind: MB/s of each, the host CPU seconds each lab node used meanwhile, and the frames
    each node sent."""
    rates: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    frames: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: int = 0

    def cpu_per_100mb(self, who: str) -> float:
        return self.cpu[who] / self.bytes * 1e8

    def frames_per_mb(self, who: str) -> float:
        return self.frames[who] / self.bytes * 1e6


@dataclass
class Point:
    """The samples taken with `volumes` existing volumes on the storage node."""
    volumes: int
    driver: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    raw_parts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # one dict per driver sample, from the agent's log: label -> (calls, seconds)
    commands: list[dict[str, tuple[int, float]]] = field(default_factory=list)
    rpcs: list[dict[str, tuple[int, float]]] = field(default_factory=list)
    storage_cpu: list[float] = field(default_factory=list)  # host CPU seconds of the storage node per sample

    def ratio(self) -> float:
        return statistics.median(self.driver) / statistics.median(self.raw)


class Bench:
    def __init__(self, lab: Lab, d: Deployment, storage: LabNode, worker: LabNode, samples: int, parallel: int):
        self.lab, self.d, self.s, self.w = lab, d, storage, worker
        self.samples, self.parallel = samples, parallel
        self._cch = grpc.insecure_channel(d.controller_target)
        self._nch = grpc.insecure_channel(d.node_target(worker))
        self.ctrl = csi_pb2_grpc.ControllerStub(self._cch)
        self.node = csi_pb2_grpc.NodeStub(self._nch)
        self.background = 0
        self.lvm_env = attach.lvm_env(d, storage)

    def close(self) -> None:
        self._cch.close()
        self._nch.close()

    # ------------------------------------------------------------------------------------ CSI calls

    def create(self, name: str, size: int = VOLUME_BYTES, cap=attach.MOUNT, timeout: float = 300) -> str:
        req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=size),
                                      volume_capabilities=[cap])
        return self.ctrl.CreateVolume(req, timeout=timeout).volume.volume_id

    def publish(self, vid: str, cap=attach.MOUNT) -> dict[str, str]:
        return dict(self.ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=self.w.initiator_iqn, volume_capability=cap), timeout=300).publish_context)

    def remove(self, vid: str) -> None:
        self.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id=self.w.initiator_iqn), timeout=300)
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=300)

    # ------------------------------------------------------------------------------------ latency

    def fill(self, count: int) -> None:
        """Existing volumes up to `count`, through the driver, `parallel` calls at a time."""
        names = [f"bench-bg-{k:04d}" for k in range(self.background, count)]
        if not names:
            return
        log(f"creating {len(names)} background volumes ({self.background} -> {count}), {self.parallel} at a time")
        started = time.monotonic()
        with ThreadPoolExecutor(self.parallel) as pool:
            for done, _ in enumerate(pool.map(lambda n: self.create(n, timeout=3600), names), 1):
                if done % 50 == 0 or done == len(names):
                    log(f"  {done}/{len(names)} in {time.monotonic() - started:.0f}s")
        self.background = count

    def point(self, volumes: int) -> Point:
        self.fill(volumes)
        p = Point(volumes)
        for i in range(self.samples):
            self.driver_sample(p, f"bench-sample-{volumes}-{i}")
            self.raw_sample(p, f"bench-raw-{volumes}-{i}")
            log(f"  {volumes} volumes, sample {i + 1}/{self.samples}: driver {p.driver[-1]:.2f}s, "
                f"raw {p.raw[-1]:.2f}s")
        return p

    def driver_sample(self, p: Point, name: str) -> None:
        start = stats.log_size(self.s, "agent")
        cpu = self.cpu()[self.s.name]
        began = time.monotonic()
        vid = self.create(name)
        self.publish(vid)
        p.driver.append(time.monotonic() - began)
        p.storage_cpu.append(self.cpu()[self.s.name] - cpu)
        text = stats.log_since(self.s, "agent", start)
        self.remove(vid)
        p.commands.append(stats.commands(text, command_label))
        p.rpcs.append(stats.tally((f"{m[1]} -> {m[4]}" if m[4] else m[1], float(m[2] or m[3]))
                             for m in RPC.finditer(text)))

    def raw_sample(self, p: Point, lv: str) -> None:
        iqn = f"iqn.2026-11.dev.csi.bench:{lv}"
        r = self.s.run([PYTHON, str(GUEST), "raw-create", VG_NAME, attach.THIN_POOL, lv, str(VOLUME_BYTES), iqn,
                        self.s.ip, self.w.initiator_iqn], env=self.lvm_env, timeout=300, check=True)
        parts = json.loads(r.stdout.splitlines()[-1])
        p.raw.append(parts["total"])
        p.raw_parts["lvcreate"].append(parts["lvcreate"])
        p.raw_parts["export"].append(parts["export"])
        self.s.run([PYTHON, str(GUEST), "raw-delete", VG_NAME, lv, iqn], env=self.lvm_env, timeout=300, check=True)

    # ------------------------------------------------------------------------------------ throughput

    def throughput(self, size: int, runs: int) -> dict[str, Reads]:
        """dd iflag=direct from a staged volume and raw TCP, storage node -> worker, runs alternating."""
        vid = self.create("bench-io", size=size, cap=attach.BLOCK)
        target = attach.attach(self.ctrl, self.node, self.d, self.w, vid, "io")
        log(f"writing {size // MiB} MiB to the staged volume")
        attach.fill_random(self.w, target, size)
        ref = ids.parse_id(vid)
        device = f"/dev/{ref.vg}/{ref.lv}"
        reads = {"iscsi": Reads(), "tcp": Reads(), "device": Reads()}
        for i in range(runs):
            for kind, measure in (("iscsi", lambda: self.dd_rate(target, size)), ("tcp", lambda: self.tcp_rate(size)),
                                  ("device", lambda: self.tcp_rate(size, device))):
                for node in (self.s, self.w):  # every kind starts with cold caches on both nodes
                    node.run(["sysctl", "-q", "vm.drop_caches=3"], timeout=60, check=True)
                before, sent = self.cpu(), self.frames_sent()
                reads[kind].rates.append(measure())
                for who, seconds in self.cpu().items():
                    reads[kind].cpu[who] += seconds - before[who]
                for who, frames in self.frames_sent().items():
                    reads[kind].frames[who] += frames - sent[who]
                reads[kind].bytes += size
            log(f"  read run {i + 1}/{runs}: iSCSI {reads['iscsi'].rates[-1]:.1f} MB/s, "
                f"TCP {reads['tcp'].rates[-1]:.1f} MB/s, device over TCP {reads['device'].rates[-1]:.1f} MB/s")
        attach.detach(self.ctrl, self.node, self.d, self.w, vid, "io")
        self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=300)
        return reads

    def dd_rate(self, target: Path, size: int) -> float:
        r = self.w.run(["dd", f"if={target}", "of=/dev/null", "bs=1M", f"count={size // MiB}", "iflag=direct"],
                       timeout=1200, check=True)
        m = DD_RATE.search(r.stderr)
        return int(m.group(1)) / float(m.group(2)) / 1e6

    def tcp_rate(self, size: int, device: str | None = None) -> float:
        """A TCP stream storage node -> worker: from memory, or read from `device` with O_DIRECT."""
        self.w.spawn("tcp-recv", [PYTHON, str(GUEST), "tcp-recv", self.w.ip, str(TCP_PORT)])
        send = ["send-device", self.w.ip, str(TCP_PORT), device, str(size)] if device else \
            ["tcp-send", self.w.ip, str(TCP_PORT), str(size)]
        self.s.run([PYTHON, str(GUEST), *send], timeout=1200, check=True)
        rc = self.w.wait_exit("tcp-recv", timeout=120)
        last = self.w.run(["tail", "-n", "1", str(self.w.log_path("tcp-recv"))], timeout=30).stdout
        if rc != 0:
            raise LabError(f"tcp-recv exited with {rc}: {last}")
        got = json.loads(last)
        return got["bytes"] / got["seconds"] / 1e6

    def cpu(self) -> dict[str, float]:
        """Host CPU seconds used so far by each UML node (all its host processes; the host bridge's share is
        mostly in the sending node's system time)."""
        sessions = {n.name: int((n.workdir / f"{self.lab.netns}-{n.name}" / "pid").read_text())
                    for n in (self.s, self.w)}
        return {who: _session_cpu(sid) for who, sid in sessions.items()}

    def frames_sent(self) -> dict[str, int]:
        """Frames each node has sent on its lab interface so far."""
        return {n.name: int(n.run(["cat", "/sys/class/net/eth0/statistics/tx_packets"], timeout=30,
                                  check=True).stdout) for n in (self.s, self.w)}


def _session_cpu(sid: int) -> float:
    """user + system seconds of the processes of one session, their reaped children included."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == sid:  # fields from 3 (state) on: session is 6, utime..cstime 14..17
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- report

def render(points: list[Point], memory, reads: dict[str, Reads], samples: int, io_mib: int) -> str:
    lines = [f"### CreateVolume + ControllerPublishVolume, {samples} samples per point", "",
             "| existing volumes | driver median (s) | driver p90 (s) | raw median (s) | raw p90 (s) | driver / raw |",
             "|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p.volumes} | {statistics.median(p.driver):.2f} | {percentile(p.driver, .9):.2f} | "
                     f"{statistics.median(p.raw):.2f} | {percentile(p.raw, .9):.2f} | {p.ratio():.2f} |")
    if len(points) > 1:
        first, last = points[0], points[-1]
        met = "met" if last.ratio() <= first.ratio() else "NOT met"
        lines += ["", f"Target, ratio at {last.volumes} no higher than at {first.volumes}: **{met}** "
                      f"({first.ratio():.2f} -> {last.ratio():.2f})."]
    lines += ["", "Raw: the agent's thin `lvcreate` (same argv, same lvm.conf) + rtslib export (backstore, target, "
                  "TPG, LUN 0, portal, ACL with CHAP, mapped LUN), run directly on the storage node.", ""]
    lines += _profile(points)
    lines += ["", *attach.memory_table(memory)]
    lines += _throughput(reads, io_mib)
    return "\n".join(lines) + "\n"


def _throughput(reads: dict[str, Reads], io_mib: int) -> list[str]:
    iscsi, tcp, device = (statistics.median(reads[k].rates) for k in ("iscsi", "tcp", "device"))
    who, senders = list(reads["tcp"].cpu), list(reads["tcp"].frames)
    heads = [f"host CPU s per 100 MB: {w}" for w in who] + [f"frames sent per MB: {w}" for w in senders]
    lines = ["", f"### Read throughput, storage node -> worker, {io_mib} MiB, median of {len(reads['tcp'].rates)} "
                 "runs", "", "| path | MB/s | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for kind, name in (("iscsi", "iSCSI: `dd iflag=direct bs=1M` from the volume staged by the node plugin"),
                       ("tcp", "raw TCP between the same two nodes (Python, one 1 MiB buffer sent over and over)"),
                       ("device", "raw TCP stream of the same LV, read with O_DIRECT on the storage node")):
        cells = [f"{reads[kind].cpu_per_100mb(w):.2f}" for w in who] + \
                [f"{reads[kind].frames_per_mb(w):.0f}" for w in senders]
        lines.append(f"| {name} | {statistics.median(reads[kind].rates):.1f} | {' | '.join(cells)} |")
    lines.append(f"| ratio iSCSI / TCP from memory (target >= 0.90) | {iscsi / tcp:.2f} |" + " |" * len(heads))
    lines.append(f"| ratio iSCSI / TCP stream of the LV | {iscsi / device:.2f} |" + " |" * len(heads))
    return lines


def _profile(points: list[Point]) -> list[str]:
    heads = " | ".join(f"calls @{p.volumes} | s @{p.volumes}" for p in points)
    lines = ["### Where the time goes (mean per CreateVolume + ControllerPublishVolume, from the agent's log)", "",
             f"| step | {heads} |", "|---|" + "---:|---:|" * len(points)]

    def row(name: str, cells: list[tuple[float | None, float]]) -> str:
        return f"| {name} | " + " | ".join(f"{'' if c is None else f'{c:g}'} | {s:.3f}" for c, s in cells) + " |"

    def mean(samples: list[dict[str, tuple[int, float]]], label: str) -> tuple[float, float]:
        series = [sample.get(label, (0, 0.0)) for sample in samples]
        return round(statistics.mean(n for n, _ in series), 1), statistics.mean(s for _, s in series)

    def total(samples: list[dict[str, tuple[int, float]]]) -> float:
        return statistics.mean(sum(s for _, s in sample.values()) for sample in samples)

    for label in sorted({k for p in points for sample in p.commands for k in sample}):
        lines.append(row(f"command `{label}`", [mean(p.commands, label) for p in points]))
    totals = [(total(p.commands), total(p.rpcs), statistics.mean(p.driver)) for p in points]
    lines.append(row("all external commands", [(None, c) for c, _, _ in totals]))
    for label in sorted({k for p in points for sample in p.rpcs for k in sample}):
        lines.append(row(f"agent RPC {label}", [mean(p.rpcs, label) for p in points]))
    lines.append(row("agent, outside commands (rtslib, records, gRPC handlers)", [(None, r - c) for c, r, _ in totals]))
    lines.append(row("controller, TLS, network (client time - agent RPCs)", [(None, t - r) for _, r, t in totals]))
    lines.append(row("client-measured total", [(None, t) for _, _, t in totals]))
    lines.append(row("host CPU of the storage node (UML) meanwhile, less sensitive to host load",
                     [(None, statistics.mean(p.storage_cpu)) for p in points]))
    for part, name in (("lvcreate", "raw floor: `lvcreate --thin`"), ("export", "raw floor: rtslib export + ACL")):
        lines.append(row(name, [(None, statistics.mean(p.raw_parts[part])) for p in points]))
    return lines


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    a.add_argument("--volumes", default="10,500", help="existing volume counts to measure at (default 10,500)")
    a.add_argument("--samples", type=int, default=5, help="samples per count (default 5)")
    a.add_argument("--parallel", type=int, default=8, help="CreateVolume calls at a time for background volumes")
    a.add_argument("--io-mib", type=int, default=256, help="MiB written to, then read from, the staged volume")
    a.add_argument("--io-runs", type=int, default=3, help="read runs of each kind (median reported)")
    a.add_argument("--disk-gib", type=int, default=16, help="sparse disk of the storage node (thin pool: 60%%)")
    a.add_argument("--subnet", default="10.213.7", help="first three octets of the lab's private subnet")
    a.add_argument("--workdir", default=None, help="lab directory (default: a new one under /var/tmp)")
    a.add_argument("--keep", action="store_true", help="keep the lab directory (logs) afterwards")
    a.add_argument("--parts", default="create,snapshots,randio,tuning,replicas,restart,load,stage,burst",
                   help="comma-separated: create (tables 1-3), snapshots (table 4), randio (fio), tuning (the iSCSI "
                        "path's knobs under fio), replicas (two legs next to one, resync), restart (a storage node's "
                        "reboot), load (quick calls while many volumes are made at once), stage (NodeStageVolume "
                        "next to a login, mkfs and mount by hand), burst (many NodeStageVolume at once on one worker); "
                        "default all")
    a.add_argument("--load-volumes", type=int, default=100, help="volumes made at once by the load part (default 100)")
    a.add_argument("--load-runs", type=int, default=2, help="runs of the load part (default 2)")
    a.add_argument("--restart-volumes", default="0,500", help="volumes in use at the reboots (default 0,500)")
    a.add_argument("--restart-runs", type=int, default=2, help="reboots per count and side (default 2)")
    a.add_argument("--stage-samples", type=int, default=5, help="samples of the stage part (default 5)")
    a.add_argument("--burst-volumes", type=int, default=100,
                   help="volumes staged at once by the burst part (default 100)")
    a.add_argument("--snap-mib", type=int, default=1024, help="MiB written to the snapshot bench's source volume")
    a.add_argument("--snap-samples", type=int, default=3, help="samples per snapshot / restore kind")
    a.add_argument("--fio-mib", type=int, default=512, help="MiB of the fio bench's volumes")
    a.add_argument("--fio-runs", type=int, default=3, help="runs of each fio job on each side (median reported)")
    a.add_argument("--fio-seconds", type=int, default=10, help="seconds of each fio run (after a 2 s ramp)")
    a.add_argument("--tuning-variants", default="",
                   help="comma-separated indexes into bench/iscsi_tuning.py VARIANTS (the defaults always run); "
                        "default all")
    a.add_argument("--out", default=str(HERE / "results.md"))
    args = a.parse_args(argv)
    try:
        args.volumes = sorted({int(v) for v in args.volumes.split(",") if v.strip()})
    except ValueError:
        a.error(f"--volumes {args.volumes!r}: a comma-separated list of counts, like 10,500")
    if not args.volumes or args.volumes[0] < 0 or args.samples < 1 or args.io_runs < 1 or args.io_mib < 1:
        a.error("counts must be >= 0, samples, io runs and io size >= 1")
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - PARTS:
        a.error(f"--parts: any of {', '.join(sorted(PARTS))}, not {sorted(args.parts)}")
    try:
        args.restart_volumes = sorted({int(v) for v in args.restart_volumes.split(",") if v.strip()})
    except ValueError:
        a.error(f"--restart-volumes {args.restart_volumes!r}: a comma-separated list of counts, like 0,500")
    if not args.restart_volumes or args.restart_volumes[0] < 0 or args.restart_runs < 1:
        a.error("--restart-volumes: counts >= 0; --restart-runs >= 1")
    if args.snap_mib < 1 or args.snap_samples < 1:
        a.error("--snap-mib and --snap-samples must be >= 1")
    try:
        args.tuning_variants = [int(v) for v in args.tuning_variants.split(",") if v.strip()] or None
    except ValueError:
        a.error(f"--tuning-variants {args.tuning_variants!r}: comma-separated indexes, like 2,3")
    if args.tuning_variants and not all(0 <= i < len(iscsi_tuning.VARIANTS) for i in args.tuning_variants):
        a.error(f"--tuning-variants: indexes from 0 to {len(iscsi_tuning.VARIANTS) - 1}")
    if args.stage_samples < 1:
        a.error("--stage-samples must be >= 1")
    if args.burst_volumes < 1:
        a.error("--burst-volumes must be >= 1")
    if args.load_volumes < 1 or args.load_runs < 1:
        a.error("--load-volumes and --load-runs must be >= 1")
    if args.fio_mib < 64 or args.fio_runs < 1 or args.fio_seconds < 1:
        a.error("--fio-mib must be >= 64, --fio-runs and --fio-seconds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = preflight()
    if problem:
        print(f"bench cannot run: {problem}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="csi-bench-", dir="/var/tmp"))
    started, host_load = time.monotonic(), os.getloadavg()[0]
    report = ""
    try:
        if "create" in args.parts:
            report += create_part(args, workdir / "create")
        if "snapshots" in args.parts:
            log(f"snapshots and restores of {args.snap_mib} MiB, {args.snap_samples} samples each")
            report += "\n" + snapshots.run(workdir / "snapshots", args.subnet, args.snap_mib * MiB, args.snap_samples,
                                           args.disk_gib, log)
        if "randio" in args.parts:
            log(f"fio on {args.fio_mib} MiB volumes, {args.fio_runs} runs of {args.fio_seconds} s per job and side")
            report += "\n" + randio.run(workdir / "randio", args.subnet, args.fio_mib * MiB, args.fio_runs,
                                        args.fio_seconds, args.disk_gib, log)
        if "tuning" in args.parts:
            log(f"the iSCSI path's knobs on a {args.fio_mib} MiB volume, {args.fio_runs} rounds of "
                f"{args.fio_seconds} s per job and variant")
            report += "\n" + iscsi_tuning.run(workdir / "tuning", args.subnet, args.fio_mib * MiB, args.fio_runs,
                                              args.fio_seconds, args.disk_gib, log, args.tuning_variants)
        if "replicas" in args.parts:
            log(f"replicated volumes of {args.fio_mib} MiB, {args.fio_runs} runs of {args.fio_seconds} s per job")
            report += "\n" + replicas.run(workdir / "replicas", args.subnet, args.fio_mib * MiB, args.fio_runs,
                                          args.fio_seconds, args.disk_gib, log)
        if "restart" in args.parts:
            log(f"a storage node's reboot at {args.restart_volumes} volumes, {args.restart_runs} runs each")
            report += "\n" + restart.run(workdir / "restart", args.subnet, args.restart_volumes, args.restart_runs,
                                          args.disk_gib, log)
        if "load" in args.parts:
            log(f"{args.load_volumes} volumes made and deleted at once, {args.load_runs} runs")
            report += "\n" + load.run(workdir / "load", args.subnet, args.load_volumes, args.load_runs,
                                       args.disk_gib, log)
        if "stage" in args.parts:
            log(f"NodeStageVolume and NodeUnstageVolume next to them by hand, {args.stage_samples} samples")
            report += "\n" + stage.run(workdir / "stage", args.subnet, args.stage_samples, args.disk_gib, log)
        if "burst" in args.parts:
            log(f"{args.burst_volumes} NodeStageVolume at once on one worker, then as many NodeUnstageVolume")
            report += "\n" + stage_burst.run(workdir / "burst", args.subnet, args.burst_volumes, args.disk_gib, log)
    finally:
        if args.keep:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report = (f"## lvm-iscsi-csi benchmark, {time.strftime('%Y-%m-%d')}: UML lab on {os.cpu_count()} host CPUs, "
              f"{(time.monotonic() - started) / 60:.0f} min, host load average {host_load:.1f} at start and "
              f"{os.getloadavg()[0]:.1f} at the end\n\n") + report
    print(report)
    Path(args.out).write_text(report)
    log(f"written to {args.out}")
    return 0


def create_part(args: argparse.Namespace, workdir: Path) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    with Lab(workdir, name=f"bench{os.getpid() % 100000}", subnet=args.subnet) as lab:
        s = lab.add_node("storage-1", role="storage", disk_bytes=args.disk_gib * GiB, mem="1G")
        w = lab.add_node("worker-1", role="worker")
        lab.boot_all(timeout=180)
        d = Deployment(lab, cluster_id="bench")
        d.start_agent(s, env={"PYTHONPATH": str(HERE / "hook")})  # the runner's debug lines only
        d.start_node_plugin(w)
        d.start_controller([s])
        bench = Bench(lab, d, s, w, args.samples, args.parallel)
        try:
            points = [bench.point(n) for n in args.volumes]
            log(f"read throughput, {args.io_runs} runs of {args.io_mib} MiB")
            reads = bench.throughput(args.io_mib * MiB, args.io_runs)
            memory = attach.daemon_memory(d, s, w)
        finally:
            bench.close()
            d.stop_controller()
    return render(points, memory, reads, args.samples, args.io_mib)


if __name__ == "__main__":
    sys.exit(main())
