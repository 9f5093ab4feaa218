"""`bench/run --parts restart`: a storage node's reboot with N volumes in use, from the agent's start to every export
back, next to the same work done without the driver.

Its own lab: one storage node and one worker. N thin volumes made through the controller and published to the
worker (each export with its ACL and CHAP secrets, as volumes in use have). Then, `--restart-runs` times, in turn:

- driver: the storage node power-cut and booted, the agent started: seconds until it serves (it answers calls
  while its start brings the volumes back), and until its GetInfo says ready: every export restored (the LVs
  activated, LIO's backstores, targets, LUNs, portals and ACLs made again from its records:
  csi/storage/restore.py); every target is then checked in LIO's configfs.
- raw floor: the storage node power-cut and booted, no agent: one `vgchange -ay` of the VG, then the same exports
  made with rtslib directly in one process (bench/guest.py raw-restore).

The same with no volume first: what the agent's start costs by itself.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from csi import ids
from csi.lab import VG_NAME, LabNode
from csi.lab.deploy import PYTHON, Deployment
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there

MiB = 1 << 20
SIZE = 64 * MiB
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
           grpc.StatusCode.DEADLINE_EXCEEDED)
GUEST = Path(__file__).resolve().parent / "guest.py"
IQN_PREFIX = "iqn.2026-11.dev.csi.lvm-iscsi:"


def _retried(call, attempts: int = 30):
    """As the sidecars do: again after a transient answer (the storage node's one CPU, busy making volumes, can
    miss the controller's probe, which then takes it for down for a moment)."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRIED or attempt == attempts - 1:
                raise
            time.sleep(2)


def targets(s: LabNode) -> int:
    """The driver's iSCSI targets in the storage node's LIO."""
    out = s.run(["ls", "/sys/kernel/config/target/iscsi"], timeout=60).stdout.split()
    return sum(1 for name in out if name.startswith(IQN_PREFIX))


class RestartBench(attach.Clients):
    def __init__(self, d: Deployment, s: LabNode, w: LabNode, log):
        super().__init__(d, w)
        self.d, self.s, self.w, self.log = d, s, w, log
        self.volumes: list[str] = []

    def make(self, count: int, parallel: int = 16) -> None:
        # 16 at once: the agent takes LVM's changes four at a time itself, and keeps the rest queued (the volumes'
        # making is set-up, not the measure).
        def one(i: int) -> str:
            vid = _retried(lambda: self.ctrl.CreateVolume(csi.CreateVolumeRequest(
                name=f"bench-restart-{i}", capacity_range=csi.CapacityRange(required_bytes=SIZE),
                volume_capabilities=[attach.BLOCK]), timeout=600).volume.volume_id)
            _retried(lambda: self.ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
                volume_id=vid, node_id=self.w.initiator_iqn, volume_capability=attach.BLOCK), timeout=600))
            return vid
        started = time.monotonic()
        with ThreadPoolExecutor(parallel) as pool:
            self.volumes = list(pool.map(one, range(count)))
        self.log(f"  {count} volumes made and published in {time.monotonic() - started:.0f} s")

    def power_cycle(self) -> None:
        self.s.kill()
        self.s.boot(timeout=240)

    def driver(self) -> tuple[float, float]:
        """Seconds from the agent's start to it serving, and to every export restored (GetInfo ready)."""
        self.power_cycle()
        started = time.monotonic()
        self.d.start_agent(self.s, timeout=3600, restored=False)
        serving = time.monotonic() - started
        self.d.wait_restored(self.s, timeout=3600)
        took = time.monotonic() - started
        found = targets(self.s)
        if found != len(self.volumes):
            raise RuntimeError(f"the agent says ready with {found} of {len(self.volumes)} exports restored")
        return serving, took

    def raw(self) -> dict[str, float]:
        self.d.stop_agent(self.s)
        self.power_cycle()
        listing = self.s.workdir / "bench-restart-volumes.json"
        lvs = [ids.parse_id(vid).lv for vid in self.volumes]
        listing.write_text(json.dumps([[lv, ids.target_iqn(VG_NAME, lv)] for lv in lvs]))
        env = attach.lvm_env(self.d, self.s)
        r = self.s.run([PYTHON, str(GUEST), "raw-restore", VG_NAME, self.s.ip, self.w.initiator_iqn, str(listing)],
                       env=env, timeout=3600, check=True)
        found = targets(self.s)
        if found != len(self.volumes):
            raise RuntimeError(f"the raw floor made {found} of {len(self.volumes)} exports")
        return json.loads(r.stdout.splitlines()[-1])


def render(rows: list[tuple[int, list[float], list[dict[str, float]], list[float]]], runs: int) -> str:
    """rows: (volumes, the driver's seconds to every export back, the raw floor's parts, the driver's seconds to
    serving) per count."""
    lines = [f"### A storage node's reboot: agent start to every export back (median of {runs} runs)", "",
             "| volumes | driver (s) | raw floor (s) | raw: one `vgchange -ay` / rtslib exports (s) | driver / raw | "
             "target | driver serving after (s) |", "|---:|---:|---:|---:|---:|---|---:|"]
    for count, driver, raw, serving in rows:
        total = statistics.median(r["total"] for r in raw)
        act, exp = (statistics.median(r[k] for r in raw) for k in ("activate", "export"))
        ratio = statistics.median(driver) / total if total else float("nan")
        met = "" if not count else ("<= 1.5: **met**" if ratio <= 1.5 else "<= 1.5: **NOT met**")
        lines.append(f"| {count} | {statistics.median(driver):.1f} ({', '.join(f'{t:.1f}' for t in driver)}) | "
                     f"{total:.1f} | {act:.1f} / {exp:.1f} | {ratio:.2f} | {met} | {statistics.median(serving):.1f} |")
    lines += ["", "driver: the node power-cut and booted, from the agent's start to its GetInfo saying ready (every "
              "export back), every target checked in configfs; serving after: from its start to it answering calls "
              "(the volumes already back are served while the rest come back). raw floor: the node power-cut and "
              "booted, one `vgchange -ay --ignoreactivationskip` of the VG and the same exports (backstore, target, "
              "TPG, LUN, portal, ACL with CHAP, mapped LUN) made with rtslib in one process. With 0 volumes the "
              "driver's figure is the agent's own start."]
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, counts: list[int], runs: int, disk_gib: int, log) -> str:
    started = time.monotonic()
    rows = []
    with attach.storage_and_worker(workdir, f"brst{os.getpid() % 10000}", subnet, disk_gib, 240) as (d, s, w):
        bench = RestartBench(d, s, w, log)
        try:
            for count in sorted(set(counts)):
                log(f"restart: {count} volumes in use")
                bench.make(count)
                driver, raw, serving = [], [], []
                for i in range(runs):
                    first, back = bench.driver()
                    serving.append(first)
                    driver.append(back)
                    raw.append(bench.raw())
                    log(f"  run {i + 1}/{runs}: driver {driver[-1]:.1f} s (serving after {first:.1f} s), raw "
                        f"{raw[-1]['total']:.1f} s (activation {raw[-1]['activate']:.1f} s)")
                rows.append((count, driver, raw, serving))
                bench.power_cycle()               # LIO as a boot leaves it: the agent's exports, not raw-restore's
                d.start_agent(s, timeout=3600)    # the volumes stay for the next count
        finally:
            bench.close()
    log(f"restart part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(rows, runs)
