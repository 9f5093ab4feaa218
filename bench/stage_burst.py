"""`bench/run --parts burst`: many NodeStageVolume calls at once on one worker, each with kubelet's deadline.

A node that starts many pods at once (a node drained onto another, a StatefulSet scaled up) gets one
NodeStageVolume per volume at the same time. open-iscsi's node database takes one change at a time (the node
plugin runs its `iscsiadm -m node` commands under one lock, csi/node/iscsi.py), so the stages queue there; the
target is that none of them reaches kubelet's deadline (its csiTimeout, 2 minutes a call) and fails.

Its own lab: one storage node, one worker. `--burst-volumes` ext4 volumes are made and published through the
controller 16 at a time (off the clock), then staged all at once, each call from its own client thread with
kubelet's deadline, then unstaged all at once; then unpublished and deleted. The table gives each call's
latency and every failure by its code. The lab's own rate comes after, on the same two nodes: as many exports
made directly on the storage node (bench/guest.py raw-create-serial and raw-restore), then staged by hand on the
worker one after another (raw-stage-serial: login, the by-path link, mkfs, mount, as `--parts stage` does).
The node plugin keeps 16 calls in progress (csi/server.py NODE_WORKERS); the rest wait in gRPC's queue, on the
clock, as kubelet's would. The node plugin logs each command it runs (bench/hook): the profile table sums them
over the stage burst.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi import ids
from csi.lab.deploy import Deployment
from csi.lab import VG_NAME, LabNode
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there
import stage
import stats

MiB = 1 << 20
SIZE = 256 * MiB
KUBELET_DEADLINE_S = 120.0     # kubelet's csiTimeout (pkg/volume/csi): the deadline of each of its CSI calls
SETUP_AT_ONCE = 16
CALLS = ("NodeStageVolume", "NodeUnstageVolume")


@dataclass
class Outcome:
    """Each call's seconds (those that succeeded) and failures by code, and each burst's wall time."""
    seconds: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CALLS})
    failures: dict[str, dict[str, int]] = field(default_factory=lambda: {c: {} for c in CALLS})
    wall: dict[str, float] = field(default_factory=dict)
    # the stage burst's external commands on the worker: label -> (calls, seconds), from the node plugin's log
    commands: dict[str, tuple[int, float]] = field(default_factory=dict)
    # by hand, one after another on the same worker: each stage's seconds, and the whole
    raw_stages: list[float] = field(default_factory=list)
    raw_total: float = 0.0

    def record(self, call: str, seconds: float, code: str | None) -> None:
        if code is None:
            self.seconds[call].append(seconds)
        else:
            self.failures[call][code] = self.failures[call].get(code, 0) + 1


class Burst(attach.Clients):
    def __init__(self, d: Deployment, w: LabNode, log):
        super().__init__(d, w)
        self.d, self.w, self.log = d, w, log
        self.volumes: list[tuple[str, dict[str, str], Path]] = []   # (volume id, publish_context, staging)

    def make(self, count: int) -> None:
        def one(i: int):
            name = f"bench-burst-{i}"
            vid = self.ctrl.CreateVolume(csi.CreateVolumeRequest(
                name=name, capacity_range=csi.CapacityRange(required_bytes=SIZE), volume_capabilities=[attach.MOUNT]),
                timeout=600).volume.volume_id
            ctx = dict(self.ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
                volume_id=vid, node_id=self.w.initiator_iqn, volume_capability=attach.MOUNT),
                timeout=600).publish_context)
            staging, _ = attach.paths(self.d, self.w, vid, name)
            staging.mkdir(parents=True, exist_ok=True)
            return vid, ctx, staging
        started = time.monotonic()
        with ThreadPoolExecutor(SETUP_AT_ONCE) as pool:
            self.volumes = list(pool.map(one, range(count)))
        self.log(f"  {count} volumes made and published in {time.monotonic() - started:.0f} s")

    def _call(self, out: Outcome, call: str, request) -> None:
        began = time.monotonic()
        try:
            getattr(self.node, call)(request, timeout=KUBELET_DEADLINE_S)
            code = None
        except grpc.RpcError as exc:
            code = exc.code().name
        out.record(call, time.monotonic() - began, code)

    def burst(self, out: Outcome, call: str) -> None:
        if call == "NodeStageVolume":
            requests = [csi.NodeStageVolumeRequest(volume_id=vid, publish_context=ctx, staging_target_path=str(st),
                                                   volume_capability=attach.MOUNT) for vid, ctx, st in self.volumes]
        else:
            requests = [csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(st))
                        for vid, _, st in self.volumes]
        offset = stats.log_size(self.w, "node-plugin")
        started = time.monotonic()
        with ThreadPoolExecutor(len(requests)) as pool:
            list(pool.map(lambda r: self._call(out, call, r), requests))
        out.wall[call] = time.monotonic() - started
        if call == "NodeStageVolume":
            out.commands = stats.commands(stats.log_since(self.w, "node-plugin", offset), stage.command_label)
        self.log(f"  {len(requests)} {call} at once: {out.wall[call]:.1f} s, failures {out.failures[call] or 0}")

    def raw(self, out: Outcome, s: LabNode, count: int) -> None:
        """The same number of exports made directly on the storage node, staged by hand one after another."""
        env = attach.lvm_env(self.d, s)
        prefix = "bench-burst-raw"
        attach.guest(s, "raw-create-serial", VG_NAME, attach.THIN_POOL, prefix, str(count), str(SIZE), env=env,
                     timeout=3600)
        iqns = [ids.target_iqn(VG_NAME, f"{prefix}-{i}") for i in range(count)]
        listing = s.workdir / "bench-burst-raw.json"
        listing.write_text(json.dumps([[f"{prefix}-{i}", iqn] for i, iqn in enumerate(iqns)]))
        attach.guest(s, "raw-restore", VG_NAME, s.ip, self.w.initiator_iqn, str(listing), env=env, timeout=3600)
        wanted = self.w.workdir / "bench-burst-iqns.json"
        wanted.write_text(json.dumps(iqns))
        r = attach.guest(self.w, "raw-stage-serial", f"{s.ip}:3260", str(self.w.workdir / "burst-raw"), str(wanted),
                         timeout=3600)
        out.raw_stages, out.raw_total = r["stages"], r["total"]
        self.log(f"  {count} stages by hand, one after another: {out.raw_total:.1f} s")

    def tidy(self) -> None:
        """Every volume unstaged (again: a failed unstage of the burst is retried here), unpublished, deleted."""
        def one(v):
            vid, _, staging = v
            self.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
                                        timeout=600)
            self.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
                volume_id=vid, node_id=self.w.initiator_iqn), timeout=600)
            self.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=600)
        with ThreadPoolExecutor(SETUP_AT_ONCE) as pool:
            list(pool.map(one, self.volumes))


def _spread(seconds: list[float]) -> list[str]:
    """p50, p95 and the slowest, as the table prints them; dashes when there are none."""
    if not seconds:
        return ["-"] * 3
    return [f"{stats.percentile(seconds, q):.2f}" for q in (0.5, 0.95)] + [f"{max(seconds):.2f}"]


def render(out: Outcome, count: int) -> str:
    lines = [f"### {count} NodeStageVolume at once on one worker, then {count} NodeUnstageVolume "
             f"(each with kubelet's {KUBELET_DEADLINE_S:.0f} s deadline)", "",
             "| call | succeeded | failed (by code) | p50 (s) | p95 (s) | slowest (s) | the burst's wall time (s) | "
             "target |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for call in CALLS:
        ok, failed = out.seconds[call], out.failures[call]
        spread = _spread(ok)
        codes = ", ".join(f"{code} {n}" for code, n in sorted(failed.items())) or "none"
        target = ""
        if call == "NodeStageVolume":
            target = f"none reaches its deadline: **{'met' if not failed and len(ok) == count else 'NOT met'}**"
        lines.append(f"| {call} | {len(ok)} | {codes} | {' | '.join(spread)} | {out.wall.get(call, 0.0):.1f} | "
                     f"{target} |")
    if out.raw_stages:
        lines.append(f"| by hand, one after another (the lab's own rate) | {len(out.raw_stages)} | | "
                     f"{' | '.join(_spread(out.raw_stages))} | {out.raw_total:.1f} | |")
    if out.commands:
        lines += ["", "The worker's commands during the stage burst (from the node plugin's log; a command's seconds "
                  "include its wait for the CPU):", "", "| command | calls | mean (s) | total (s) |",
                  "|---|---:|---:|---:|"]
        for label, (n, seconds) in sorted(out.commands.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"| `{label}` | {n} | {seconds / n:.3f} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, count: int, disk_gib: int, log) -> str:
    started = time.monotonic()
    out = Outcome()
    name = f"bbst{os.getpid() % 10000}"
    with attach.storage_and_worker_profiled(workdir, name, subnet, disk_gib, 240) as (d, s, w):
        bench = Burst(d, w, log)
        try:
            bench.make(count)
            for call in CALLS:
                bench.burst(out, call)
            bench.tidy()
            bench.raw(out, s, count)
        finally:
            bench.close()
    log(f"burst part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(out, count)
