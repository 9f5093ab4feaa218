"""`bench/run --parts tuning`: the iSCSI path's knobs, each measured against the driver's defaults in one run.

Its own lab: one storage node and one worker, one raw block volume made, attached and filled by the driver as
randio.py does it. Then, in rounds (so that the lab's drift reaches every variant alike), each variant is set
from the defaults read at the start plus its own changes, the session logged out and in again (session and
target parameters are negotiated at login), and each fio job run once on the device over iSCSI; each round
also runs the jobs on the LV itself on its storage node, the local floor. Reported: the median IOPS of each job
and variant, its ratio to the defaults' and to the local floor, and what the login negotiated.

A variant changes some of: the worker's node record (`iscsiadm -m node -o update`: session queue depth and
cmds_max, the iSCSI keys it offers), the target's TPG parameters (configfs `param/`: what LIO offers), and the
worker's disk queue (sysfs: scheduler, nr_requests). The driver's defaults are open-iscsi's and LIO's own, with
the node plugin's timeouts.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from csi import ids
from csi.lab import LabNode
from csi.lab.deploy import PYTHON
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there
import randio

MiB = 1 << 20
TPG_PARAMS = "/sys/kernel/config/target/iscsi/{iqn}/tpgt_1/param/{key}"
JOBS = randio.JOBS
NEGOTIATED = ("MaxRecvDataSegmentLength", "MaxXmitDataSegmentLength", "FirstBurstLength", "MaxBurstLength",
              "ImmediateData", "InitialR2T")
WRITE = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"


@dataclass(frozen=True)
class Variant:
    name: str
    record: tuple[tuple[str, str], ...] = ()    # the worker's node record
    target: tuple[tuple[str, str], ...] = ()    # LIO's TPG parameters
    disk: tuple[tuple[str, str], ...] = ()      # /sys/block/<disk>/queue/<key> on the worker


VARIANTS = (
    Variant("the driver's defaults"),
    Variant("session queue_depth 128, cmds_max 1024",
            record=(("node.session.queue_depth", "128"), ("node.session.cmds_max", "1024"))),
    Variant("worker disk: scheduler none", disk=(("scheduler", "none"),)),
    Variant("worker disk: scheduler none, nr_requests 256", disk=(("scheduler", "none"), ("nr_requests", "256"))),
    Variant("InitialR2T No, ImmediateData Yes, FirstBurst 256 KiB, MaxBurst 1 MiB (both ends)",
            record=(("node.session.iscsi.InitialR2T", "No"), ("node.session.iscsi.ImmediateData", "Yes"),
                    ("node.session.iscsi.FirstBurstLength", "262144"),
                    ("node.session.iscsi.MaxBurstLength", "1048576")),
            target=(("InitialR2T", "No"), ("ImmediateData", "Yes"), ("FirstBurstLength", "262144"),
                    ("MaxBurstLength", "1048576"))),
    Variant("MaxRecvDataSegmentLength 256 KiB (both ends)",
            record=(("node.conn[0].iscsi.MaxRecvDataSegmentLength", "262144"),),
            target=(("MaxRecvDataSegmentLength", "262144"), ("MaxXmitDataSegmentLength", "262144"))),
)


class Session:
    """The one iSCSI session of the bench's volume on the worker, and its target on the storage node."""

    def __init__(self, s: LabNode, w: LabNode, iqn: str, portal: str):
        self.s, self.w, self.iqn, self.portal = s, w, iqn, portal
        self.path = f"/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-0"
        self.device = ""

    def iscsiadm(self, *args: str, ok=(0,)) -> str:
        r = self.w.run(["iscsiadm", "-m", "node", "-T", self.iqn, "-p", self.portal, *args], timeout=180)
        if r.rc not in ok:
            raise RuntimeError(f"iscsiadm {args}: rc {r.rc}: {r.stderr.strip()[-300:]}")
        return r.stdout

    def disk(self) -> str:
        r = self.w.run(["readlink", "-f", self.path], timeout=30, check=True)
        return Path(r.stdout.strip()).name

    def record(self) -> dict[str, str]:
        out = {}
        for line in self.iscsiadm().splitlines():
            key, sep, value = line.partition(" = ")
            if sep:
                out[key.strip()] = value.strip()
        return out

    def target_param(self, key: str) -> str:
        return self.s.run(["cat", TPG_PARAMS.format(iqn=self.iqn, key=key)], timeout=30, check=True).stdout.strip()

    def disk_queue(self, key: str) -> str:
        value = self.w.run(["cat", f"/sys/block/{self.disk()}/queue/{key}"], timeout=30, check=True).stdout.strip()
        found = re.search(r"\[(\S+)\]", value)   # scheduler: "[mq-deadline] none"
        return found.group(1) if found else value

    def set(self, record: dict[str, str], target: dict[str, str], disk: dict[str, str]) -> None:
        """Logs out, sets the record and the target's parameters, logs in, then sets the disk's queue."""
        self.iscsiadm("--logout", ok=(0, 21))
        for key, value in record.items():
            self.iscsiadm("-o", "update", "-n", key, "-v", value)
        for key, value in target.items():
            self.s.run([PYTHON, "-c", WRITE, TPG_PARAMS.format(iqn=self.iqn, key=key), value], timeout=30,
                       check=True)
        self.iscsiadm("--login", ok=(0, 15))
        deadline = time.monotonic() + 60
        while self.w.run(["test", "-b", self.path], timeout=30).rc != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path} did not come back after the login")
            time.sleep(0.5)
        name = self.disk()
        for key, value in disk.items():
            self.w.run([PYTHON, "-c", WRITE, f"/sys/block/{name}/queue/{key}", value], timeout=30, check=True)
        self.device = f"/dev/{name}"     # fio takes ':' in a file name (by-path has them) for a list of files

    def negotiated(self) -> str:
        """What the login agreed, from `iscsiadm -m session -P 2`, and the disk's queue."""
        text = self.w.run(["iscsiadm", "-m", "session", "-P", "2"], timeout=60, check=True).stdout
        block = text[text.find(self.iqn):]
        got = {k: m.group(1) for k in NEGOTIATED if (m := re.search(rf"\b{k}: (\S+)", block))}
        name = self.disk()
        depth = self.w.run(["cat", f"/sys/block/{name}/device/queue_depth"], timeout=30).stdout.strip()
        queue = f"queue_depth {depth}, {self.disk_queue('scheduler')}, nr_requests {self.disk_queue('nr_requests')}"
        return ", ".join(f"{k} {v}" for k, v in got.items()) + f"; {queue}"


def run(workdir: Path, subnet: str, size: int, runs: int, runtime: int, disk_gib: int, log,
        chosen: list[int] | None = None) -> str:
    """`chosen`: indexes into VARIANTS (the defaults, 0, always run first); None: all."""
    variants = [VARIANTS[0]] + [VARIANTS[i] for i in sorted(set(chosen or range(1, len(VARIANTS)))) if i]
    started = time.monotonic()
    with attach.storage_and_worker(workdir, f"btun{os.getpid() % 10000}", subnet, disk_gib, 180) as (d, s, w):
        bench = randio.RandioBench(d, s, w, runtime, log)
        try:
            vid = bench.create("bench-tuning", size, attach.BLOCK)
            device = attach.attach(bench.ctrl, bench.node, d, w, vid, "tuning")
            log(f"filling the block volume ({size // MiB} MiB)")
            attach.fill_random(w, device, size)
            ref = ids.parse_id(vid)
            line = next(ln for ln in w.run(["iscsiadm", "-m", "session"], timeout=60, check=True).stdout.splitlines()
                        if ref.lv in ln)
            portal, iqn = re.search(r"\] (\S+?),\d+ (\S+)", line).groups()
            session = Session(s, w, iqn, portal)
            keys_record = sorted({k for v in variants for k, _ in v.record})
            keys_target = sorted({k for v in variants for k, _ in v.target})
            keys_disk = sorted({k for v in variants for k, _ in v.disk})
            record = session.record()
            defaults = ({k: record[k] for k in keys_record}, {k: session.target_param(k) for k in keys_target},
                        {k: session.disk_queue(k) for k in keys_disk})
            log(f"defaults: {defaults}")
            iops: dict[tuple[str, str], list[float]] = {}
            negotiated: dict[str, str] = {}
            local = f"/dev/{ref.vg}/{ref.lv}"
            for i in range(runs):
                for variant in variants:
                    if negotiated.get(variant.name, "").startswith("not measured"):
                        continue
                    try:
                        session.set({**defaults[0], **dict(variant.record)},
                                    {**defaults[1], **dict(variant.target)}, {**defaults[2], **dict(variant.disk)})
                    except Exception as exc:  # noqa: BLE001 - one knob the lab refuses, not the whole run
                        negotiated[variant.name] = f"not measured: {str(exc)[-300:]}"
                        log(f"  {variant.name}: {negotiated[variant.name]}")
                        session.set(*defaults)
                        continue
                    negotiated.setdefault(variant.name, session.negotiated())
                    for job in JOBS:
                        iops.setdefault((variant.name, job.name), []).append(
                            bench.fio(w, job, session.device).iops)
                    log(f"  round {i + 1}/{runs}, {variant.name}: " + ", ".join(
                        f"{iops[(variant.name, j.name)][-1]:,.0f}" for j in JOBS))
                for job in JOBS:
                    iops.setdefault(("local", job.name), []).append(bench.fio(s, job, local).iops)
                session.set(*defaults)
            attach.detach(bench.ctrl, bench.node, d, w, vid, "tuning")
            bench.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=600)
        finally:
            bench.close()
    log(f"tuning part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(iops, negotiated, size, runs, runtime, variants)


def render(iops: dict[tuple[str, str], list[float]], negotiated: dict[str, str], size: int, runs: int,
           runtime: int, variants=VARIANTS) -> str:
    med = {key: statistics.median(values) for key, values in iops.items()}
    base = VARIANTS[0].name
    lines = [f"### The iSCSI path's knobs: IOPS over iSCSI per variant ({size // MiB} MiB raw block volume filled "
             f"first, {runtime} s per fio run, median of {runs} rounds, variants interleaved)", "",
             "| variant | " + " | ".join(j.name for j in JOBS) + " |", "|---|" + "---:|" * len(JOBS)]
    for variant in variants:
        cells = []
        for job in JOBS:
            value = med.get((variant.name, job.name))
            if value is None:
                cells.append("-")
                continue
            cells.append(f"{value:,.0f} ({value / med[(base, job.name)]:.2f}x, {value / med[('local', job.name)]:.2f}"
                         " local)")
        lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
    lines.append("| the same LV on its storage node (local) | " +
                 " | ".join(f"{med[('local', j.name)]:,.0f}" for j in JOBS) + " |")
    lines += ["", "Each cell: IOPS, then its ratio to the driver's defaults and to the local figure. What each "
              "login negotiated:", ""]
    lines += [f"- {name}: {text}" for name, text in negotiated.items()]
    return "\n".join(lines) + "\n"
