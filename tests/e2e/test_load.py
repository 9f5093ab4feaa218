"""Concurrency and load (issue 6), against the real driver in UML: two storage nodes (zone-a, zone-b) and two
workers (one per zone), VOLUMES volumes brought up in parallel (CreateVolume, ControllerPublishVolume,
NodeStageVolume, NodePublishVolume, a few bytes written) and torn down in parallel (the bytes read back,
NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume, DeleteVolume), ROUNDS times with the same
names, so a round also re-creates what the last one deleted.

Each volume's chain of calls runs in one thread of a pool as large as the volume count: calls of different
volumes are concurrent, so the agents' per-volume locks, LVM's VG lock, LIO's configfs, the node plugins'
locks and open-iscsi's record lock are all contended. A call failing with ABORTED or DEADLINE_EXCEEDED is
retried with exponential backoff, as the sidecars and kubelet do; every retry is counted by code. Any other
error fails the test, and so does a chain that does not finish within PHASE_BOUND (a deadlock). Between the
phases the whole state is compared with what it must be: on the storage nodes LVs, LIO targets with their
ACLs and the agents' records; on the workers iSCSI sessions, node records, mounts and the node plugins' stage
records. After the last round nothing of the driver is left anywhere.

pytest -s prints the counts (calls per RPC, retries per code, errors, latencies) and the wall time per phase
per round. CSI_LOAD_VOLUMES and CSI_LOAD_ROUNDS change the size of the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi import ids
from csi.lab import Lab
from csi.lab.deploy import Deployment
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from tests.e2e.cluster import BLOCK, MOUNT, ZONE_KEY, MiB, driver_lab

pytestmark = pytest.mark.e2e
campaign = pytest.mark.campaign   # minutes of load: scripts/fault-campaign runs it, CI does not

VOLUMES = int(os.environ.get("CSI_LOAD_VOLUMES", "100"))
ROUNDS = int(os.environ.get("CSI_LOAD_ROUNDS", "2"))
CLUSTER_ID = "load"
TARGETS = "/sys/kernel/config/target/iscsi"
WORKERS = {"zone-a": "worker-1", "zone-b": "worker-2"}

# One call's timeout, as the sidecars and kubelet give it (the chart's provisioner and attacher timeouts,
# kubelet's two minutes for the node calls).
TIMEOUT = {"CreateVolume": 300.0, "DeleteVolume": 300.0, "ControllerPublishVolume": 60.0,
           "ControllerUnpublishVolume": 60.0, "NodeStageVolume": 120.0, "NodeUnstageVolume": 120.0,
           "NodePublishVolume": 120.0, "NodeUnpublishVolume": 120.0}
RPCS = list(TIMEOUT)
RETRIED = (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
BACKOFF_START, BACKOFF_MAX = 0.5, 16.0
# Every chain of one phase finishes within this, or the test calls it a deadlock.
PHASE_BOUND = float(os.environ.get("CSI_LOAD_PHASE_BOUND", "1200"))
# A call that returns later than its own timeout by more than this means the client's deadline did not hold.
LATE = 15.0
SECTOR = 512


# ---------------------------------------------------------------------------------------------- the lab

@dataclass
class Worker:
    name: str
    node: object                       # LabNode
    stub: csi_pb2_grpc.NodeStub
    node_id: str
    kubelet: Path


class LoadCluster:
    def __init__(self, lab: Lab, d: Deployment):
        self.lab, self.d = lab, d
        self.storage = [lab.node("storage-1"), lab.node("storage-2")]
        self._channels = [grpc.insecure_channel(d.controller_target)]
        self.ctrl = csi_pb2_grpc.ControllerStub(self._channels[0])
        self.workers: dict[str, Worker] = {}
        for name in WORKERS.values():
            node = lab.node(name)
            ch = grpc.insecure_channel(d.node_target(node))
            self._channels.append(ch)
            stub = csi_pb2_grpc.NodeStub(ch)
            node_id = stub.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=30).node_id
            self.workers[name] = Worker(name, node, stub, node_id, d.kubelet_dir(node))

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


@pytest.fixture(scope="module")
def load_cluster(tmp_path_factory):
    with driver_lab(tmp_path_factory.mktemp("load"), f"load{os.getpid() % 100000}", "10.213.5", CLUSTER_ID,
                    {"storage-1": "zone-a", "storage-2": "zone-b"}, {"worker-1": "zone-a", "worker-2": "zone-b"},
                    boot_timeout=240) as (lab, d):
        c = LoadCluster(lab, d)
        try:
            yield c
        finally:
            c.close()


# ---------------------------------------------------------------------------------------------- volumes

@dataclass
class Volume:
    index: int
    name: str
    zone: str
    worker: Worker
    block: bool
    size: int
    volume_id: str = ""
    context: dict = field(default_factory=dict)
    marker: str = ""

    @property
    def cap(self) -> csi.VolumeCapability:
        return BLOCK if self.block else MOUNT

    def paths(self) -> tuple[Path, Path]:
        h = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        base = self.worker.kubelet
        return (base / "plugins/kubernetes.io/csi/lvm-iscsi.csi.dev" / h / "globalmount",
                base / "pods" / h / ("volumeDevices/dev" if self.block else "volumes/mount"))

    @property
    def data_path(self) -> str:
        _, target = self.paths()
        return str(target) if self.block else str(target / "load.bin")


def plan(workers: dict[str, Worker]) -> list[Volume]:
    """Every other volume in zone-b (and on worker-2); in each zone, half raw block and half ext4; 16 or 32 MiB."""
    out = []
    for i in range(VOLUMES):
        zone = ("zone-a", "zone-b")[i % 2]
        out.append(Volume(i, f"load-{i:03d}", zone, workers[WORKERS[zone]], block=(i // 2) % 2 == 1,
                          size=(16, 32)[(i // 4) % 2] * MiB))
    return out


# ---------------------------------------------------------------------------------------------- calls

class Failed(Exception):
    pass


class Stats:
    """Counts of one run, thread-safe: attempts and outcomes per RPC, latencies, retries, errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, int] = defaultdict(int)
        self.ok: dict[str, int] = defaultdict(int)
        self.retries: dict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.late: list[str] = []

    def record(self, rpc: str, seconds: float, code: grpc.StatusCode | None, retried: bool) -> None:
        with self._lock:
            self.calls[rpc] += 1
            self.latency[rpc].append(seconds)
            if code is None:
                self.ok[rpc] += 1
            elif retried:
                self.retries[(rpc, code.name)] += 1
            if seconds > TIMEOUT[rpc] + LATE:
                self.late.append(f"{rpc} returned after {seconds:.1f}s, timeout {TIMEOUT[rpc]:.0f}s")

    def error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def total_retries(self) -> int:
        return sum(self.retries.values())


class Runner:
    """Calls one RPC the way a sidecar does: with its timeout, again after ABORTED or DEADLINE_EXCEEDED with
    exponential backoff (jittered), until it succeeds, fails otherwise, or the phase's bound is spent."""

    def __init__(self, stats: Stats, bound_at: float, ctrl: csi_pb2_grpc.ControllerStub):
        self.stats = stats
        self.bound_at = bound_at
        self.ctrl = ctrl

    def __call__(self, rpc: str, stub, request, what: str):
        delay = BACKOFF_START
        attempts = 0
        while True:
            attempts += 1
            started = time.monotonic()
            try:
                response = getattr(stub, rpc)(request, timeout=TIMEOUT[rpc])
            except grpc.RpcError as exc:
                took = time.monotonic() - started
                code = exc.code()
                retry = code in RETRIED and time.monotonic() + delay < self.bound_at
                self.stats.record(rpc, took, code, retried=retry)
                if not retry:
                    raise Failed(f"{what}: {rpc} attempt {attempts}: {code.name}: {exc.details()}"
                                 + (" (phase bound spent: deadlock?)" if code in RETRIED else "")) from None
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.stats.record(rpc, time.monotonic() - started, None, retried=False)
            return response


def up(v: Volume, call: Runner, round_no: int) -> None:
    """Create, publish, stage, publish on the node, write a marker."""
    req = csi.CreateVolumeRequest(name=v.name, capacity_range=csi.CapacityRange(required_bytes=v.size),
                                  volume_capabilities=[v.cap])
    req.accessibility_requirements.requisite.add(segments={ZONE_KEY: v.zone})
    vol = call("CreateVolume", call.ctrl, req, v.name).volume
    v.volume_id = vol.volume_id
    zones = [t.segments.get(ZONE_KEY) for t in vol.accessible_topology]
    if zones != [v.zone]:
        raise Failed(f"{v.name}: created in {zones}, asked for {v.zone}")
    v.context = dict(call("ControllerPublishVolume", call.ctrl, csi.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=v.worker.node_id, volume_capability=v.cap), v.name).publish_context)
    staging, target = v.paths()
    staging.mkdir(parents=True, exist_ok=True)   # kubelet makes the staging directory
    call("NodeStageVolume", v.worker.stub, csi.NodeStageVolumeRequest(
        volume_id=v.volume_id, publish_context=v.context, staging_target_path=str(staging),
        volume_capability=v.cap, volume_context=dict(vol.volume_context)), v.name)
    call("NodePublishVolume", v.worker.stub, csi.NodePublishVolumeRequest(
        volume_id=v.volume_id, publish_context=v.context, staging_target_path=str(staging),
        target_path=str(target), volume_capability=v.cap, volume_context=dict(vol.volume_context)), v.name)
    text = f"round {round_no} {v.name} {v.volume_id} {os.urandom(8).hex()}"
    v.marker = text + " " * (SECTOR - len(text) - 1) + "\n"
    r = v.worker.node.run(["dd", f"of={v.data_path}", f"bs={SECTOR}", "count=1", "conv=fsync", "status=none"],
                          input=v.marker, timeout=120)
    if r.rc != 0:
        raise Failed(f"{v.name}: writing to {v.data_path} on {v.worker.name}: rc {r.rc}: {r.stderr.strip()}")


def down(v: Volume, call: Runner) -> None:
    """Read the marker back (from the disk, not the page cache), then unpublish, unstage, unpublish, delete."""
    r = v.worker.node.run(["dd", f"if={v.data_path}", f"bs={SECTOR}", "count=1", "iflag=direct", "status=none"],
                          timeout=120)
    if r.rc != 0 or r.stdout != v.marker:
        raise Failed(f"{v.name}: data not intact at {v.data_path} on {v.worker.name}: rc {r.rc}, "
                     f"read {r.stdout[:80]!r}, wrote {v.marker[:80]!r} {r.stderr.strip()}")
    staging, target = v.paths()
    call("NodeUnpublishVolume", v.worker.stub, csi.NodeUnpublishVolumeRequest(
        volume_id=v.volume_id, target_path=str(target)), v.name)
    call("NodeUnstageVolume", v.worker.stub, csi.NodeUnstageVolumeRequest(
        volume_id=v.volume_id, staging_target_path=str(staging)), v.name)
    call("ControllerUnpublishVolume", call.ctrl, csi.ControllerUnpublishVolumeRequest(
        volume_id=v.volume_id, node_id=v.worker.node_id), v.name)
    call("DeleteVolume", call.ctrl, csi.DeleteVolumeRequest(volume_id=v.volume_id), v.name)


def run_phase(lc: LoadCluster, vols: list[Volume], fn, stats: Stats, *args) -> tuple[float, float]:
    """fn(volume, runner, *args) for every volume at once, one thread each; (wall time, slowest chain)."""
    started = time.monotonic()
    call = Runner(stats, started + PHASE_BOUND, lc.ctrl)
    chains: list[float] = []

    def chain(v: Volume) -> None:
        t0 = time.monotonic()
        try:
            fn(v, call, *args)
        except Failed as exc:
            stats.error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a broken chain is an error of the run, reported with the rest
            stats.error(f"{v.name}: {type(exc).__name__}: {exc}")
        finally:
            chains.append(time.monotonic() - t0)

    pool = ThreadPoolExecutor(max_workers=len(vols), thread_name_prefix="load")
    futures = [pool.submit(chain, v) for v in vols]
    _, pending = wait(futures, timeout=PHASE_BOUND + max(TIMEOUT.values()) + LATE)
    if pending:
        stats.error(f"{len(pending)} chain(s) still running after {PHASE_BOUND:.0f}s + a call's timeout: deadlock")
    pool.shutdown(wait=not pending)
    return time.monotonic() - started, max(chains, default=0.0)


# ---------------------------------------------------------------------------------------------- state

def state(lc: LoadCluster) -> dict:
    """Everything of this driver on the storage nodes and the workers, each as the nodes themselves say."""
    out = {}
    for n in lc.storage:
        lvs = n.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=60, check=True).stdout.split()
        # One `grep -r` over every ACL's directory instead of one `ls` per target.
        acl_dirs = n.run(["find", TARGETS, "-mindepth", "4", "-maxdepth", "4", "-path", "*/tpgt_1/acls/*",
                          "-type", "d"], timeout=60).stdout.split()
        targets: dict[str, list[str]] = {t: [] for t in n.run(["ls", TARGETS], timeout=60).stdout.split()
                                         if t.startswith("iqn.")}
        for path in acl_dirs:
            parts = path.split("/")
            targets.setdefault(parts[-4], []).append(parts[-1])
        records = {}
        for p in (lc.d.agent_state(n) / "volumes").glob("*/*.json"):
            rec = json.loads(p.read_text())
            records[rec["lv"]] = sorted(rec.get("grants", {}))
        out[n.name] = {"lvs": sorted(x for x in lvs if x != "thinpool"),
                       "targets": {t: sorted(a) for t, a in targets.items()}, "records": records}
    for w in lc.workers.values():
        mounts = [line.split()[4] for line in w.node.run(["cat", "/proc/self/mountinfo"], timeout=60).stdout
                  .splitlines() if str(w.kubelet) in line.split()[4]]
        staged = {}
        for p in (w.kubelet / "plugins/lvm-iscsi.csi.dev/staged").glob("*.json"):
            staged[p.name] = json.loads(p.read_text())["volume_id"]
        out[w.name] = {"sessions": _iqns(w.node.run(["iscsiadm", "-m", "session"], timeout=60).stdout),
                       "node_records": _iqns(w.node.run(["iscsiadm", "-m", "node"], timeout=60).stdout),
                       "mounts": sorted(mounts), "staged": staged}
    return out


def _iqns(text: str) -> list[str]:
    return sorted(word for line in text.splitlines() for word in line.split() if word.startswith("iqn."))


def expected(lc: LoadCluster, vols: list[Volume]) -> dict:
    """What state() must say with every volume of vols created, published, staged and published on its node."""
    out = {n.name: {"lvs": [], "targets": {}, "records": {}} for n in lc.storage}
    out.update({w: {"sessions": [], "node_records": [], "mounts": [], "staged": {}} for w in lc.workers})
    for v in vols:
        ref = ids.parse_id(v.volume_id)
        s = out[ref.node]
        s["lvs"].append(ref.lv)
        s["targets"][ref.iqn] = [v.worker.node_id]
        s["records"][ref.lv] = [v.worker.node_id]
        w = out[v.worker.name]
        w["sessions"].append(ref.iqn)
        w["node_records"].append(ref.iqn)
        staging, target = v.paths()
        w["mounts"] += [str(target)] if v.block else [str(staging), str(target)]
        w["staged"][hashlib.sha256(v.volume_id.encode()).hexdigest()[:32] + ".json"] = v.volume_id
    for part in out.values():
        for key in ("lvs", "sessions", "node_records", "mounts"):
            if key in part:
                part[key].sort()
    return out


def differences(got: dict, want: dict) -> list[str]:
    out = []
    for node in sorted(want):
        for key in sorted(want[node]):
            g, w = got[node][key], want[node][key]
            if g == w:
                continue
            if isinstance(w, dict):
                extra = sorted(set(g) - set(w))
                missing = sorted(set(w) - set(g))
                changed = sorted(k for k in set(g) & set(w) if g[k] != w[k])
                out.append(f"{node} {key}: {len(extra)} extra {extra[:5]}, {len(missing)} missing {missing[:5]}, "
                           f"{len(changed)} differ {[(k, g[k], w[k]) for k in changed[:3]]}")
            else:
                extra = sorted(set(g) - set(w))
                missing = sorted(set(w) - set(g))
                out.append(f"{node} {key}: {len(g)} instead of {len(w)}; extra {extra[:5]}, missing {missing[:5]}")
    return out


# ---------------------------------------------------------------------------------------------- report

def report(stats: Stats, phases: list[tuple]) -> str:
    lines = ["", f"load: {VOLUMES} volumes x {ROUNDS} rounds, 2 storage nodes, 2 workers, {VOLUMES} threads",
             "",
             f"{'round':>5}  {'phase':<5}  {'wall s':>7}  {'slowest chain s':>15}  {'calls':>6}  {'retries':>7}  "
             f"{'errors':>6}"]
    for rnd, phase, wall, slowest, calls, retries, errs in phases:
        lines.append(f"{rnd:>5}  {phase:<5}  {wall:>7.1f}  {slowest:>15.1f}  {calls:>6}  {retries:>7}  {errs:>6}")
    codes = sorted({code for _, code in stats.retries}) or [c.name for c in RETRIED]
    head = f"{'RPC':<26}  {'calls':>6}  {'ok':>5}  " + "  ".join(f"{'retry ' + c:>{max(9, len(c) + 6)}}"
                                                              for c in codes)
    lines += ["", head + f"  {'p50 s':>6}  {'p95 s':>6}  {'max s':>6}"]
    for rpc in RPCS:
        lat = sorted(stats.latency.get(rpc, []))
        p50 = statistics.median(lat) if lat else 0.0
        p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))] if lat else 0.0
        lines.append(f"{rpc:<26}  {stats.calls.get(rpc, 0):>6}  {stats.ok.get(rpc, 0):>5}  "
                     + "  ".join(f"{stats.retries.get((rpc, c), 0):>{max(9, len(c) + 6)}}" for c in codes)
                     + f"  {p50:>6.2f}  {p95:>6.2f}  {max(lat, default=0.0):>6.2f}")
    total = "  ".join(f"{sum(n for (_, c), n in stats.retries.items() if c == code):>{max(9, len(code) + 6)}}"
                      for code in codes)
    lines.append(f"{'total':<26}  {stats.total_calls():>6}  {sum(stats.ok.values()):>5}  {total}")
    lines.append(f"errors: {len(stats.errors)}")
    lines += [f"  {e}" for e in stats.errors[:20]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the test

@campaign
def test_parallel_volumes_up_and_down_leave_nothing_behind(load_cluster):
    lc = load_cluster
    assert differences(state(lc), expected(lc, [])) == [], "the lab is not clean before the run"
    stats = Stats()
    phases: list[tuple] = []
    problems: list[str] = []
    try:
        for rnd in range(1, ROUNDS + 1):
            vols = plan(lc.workers)
            for phase, fn, args in (("up", up, (rnd,)), ("down", down, ())):
                calls, retries, errs = stats.total_calls(), stats.total_retries(), len(stats.errors)
                wall, slowest = run_phase(lc, vols, fn, stats, *args)
                phases.append((rnd, phase, wall, slowest, stats.total_calls() - calls,
                               stats.total_retries() - retries, len(stats.errors) - errs))
                if stats.errors:
                    break
                want = expected(lc, vols if phase == "up" else [])
                diff = differences(state(lc), want)
                if diff:
                    problems += [f"round {rnd} after {phase}: {d}" for d in diff]
                    break
                if phase == "up":
                    # The agents' own view, through the controller: every volume listed, published to its worker.
                    listed = {e.volume.volume_id: list(e.status.published_node_ids)
                              for e in lc.ctrl.ListVolumes(csi.ListVolumesRequest(), timeout=120).entries}
                    wanted = {v.volume_id: [v.worker.node_id] for v in vols}
                    if listed != wanted:
                        problems.append(f"round {rnd}: ListVolumes differs from the volumes made: "
                                        f"{len(set(listed) ^ set(wanted))} differ")
                        break
            if stats.errors or problems:
                break
        if not stats.errors and not problems:
            leftover = lc.ctrl.ListVolumes(csi.ListVolumesRequest(), timeout=120).entries
            if leftover:
                problems.append(f"ListVolumes still lists {len(leftover)} volume(s)")
    finally:
        print(report(stats, phases))
        for p in problems:
            print(f"  {p}")
    assert not stats.errors, f"{len(stats.errors)} error(s), first: {stats.errors[0]}"
    assert not stats.late, stats.late[:5]
    assert not problems, problems
