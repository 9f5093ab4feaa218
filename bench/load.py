"""`bench/run --parts load`: quick calls while a hundred volumes are made and deleted at once, and the rate at
which they are made, next to LVM's own.

Its own lab: one storage node and one worker. PROBES volumes made first. Then, `--load-runs` times, in turn:

- raw floor: N thin `lvcreate` one after another on the storage node (the agent's argv shape and lvm.conf,
  bench/guest.py raw-create-serial): LVM's own serial rate there; the LVs removed after, off the clock.
- driver: N CreateVolume calls through the controller at once (N client threads, as the provisioner's 100
  workers make them), while one client publishes and unpublishes the probe volumes to the worker, one call
  after another (ControllerPublishVolume, ControllerUnpublishVolume: what the attacher does for pods starting
  and stopping meanwhile), until the last volume is made; then the N volumes deleted at once, the probes
  going on. Every call is retried as the sidecars do after ABORTED, UNAVAILABLE or DEADLINE_EXCEEDED, and its
  latency is the client's, retries included.

Targets (issue 17): ControllerPublish / Unpublish p95 at most 2 s while the volumes are made; CreateVolume's
rate within 1.5x LVM's own serial rate (the time for all N at most 1.5x the N serial lvcreates).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi.lab import VG_NAME
from csi.lab.deploy import PYTHON
from csi.proto import csi_pb2 as csi

import attach  # bench/ is on sys.path: bench.py puts it there
from stats import percentile

MiB = 1 << 20
SIZE = 4 * MiB
PROBES = 4
RETRIED = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.RESOURCE_EXHAUSTED)
# Retried too, as the provisioner and the attacher retry every failure, but reported as errors with their message.
FAILED = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
GUEST = Path(__file__).resolve().parent / "guest.py"


@dataclass
class Run:
    """One run's figures: seconds."""
    created: float = 0.0
    deleted: float = 0.0
    raw: float = 0.0
    latency: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    retries: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


KINDS = ("CreateVolume", "DeleteVolume", "ControllerPublishVolume while made", "ControllerUnpublishVolume while made",
         "ControllerPublishVolume while deleted", "ControllerUnpublishVolume while deleted")


class LoadBench(attach.Clients):
    def __init__(self, d, s, w, log):
        super().__init__(d, w)
        self.d, self.s, self.w, self.log = d, s, w, log
        self._mutex = threading.Lock()

    def retried(self, run: Run, name: str, call, deadline: float = 600) -> float:
        """Seconds until `call` succeeded, retried after a transient code as the sidecars do."""
        started, wait = time.monotonic(), 0.5
        while True:
            try:
                call()
                return time.monotonic() - started
            except grpc.RpcError as exc:
                if exc.code() not in RETRIED + FAILED or time.monotonic() - started > deadline:
                    raise
                with self._mutex:
                    run.retries[f"{name}: {exc.code().name}"] += 1
                    if exc.code() in FAILED:
                        run.errors[f"{name}: {exc.code().name}: {exc.details()}"] += 1
                time.sleep(wait)
                wait = min(wait * 2, 8.0)

    def create(self, run: Run, name: str) -> str:
        out = {}

        def call():
            out["vid"] = self.ctrl.CreateVolume(csi.CreateVolumeRequest(
                name=name, capacity_range=csi.CapacityRange(required_bytes=SIZE),
                volume_capabilities=[attach.BLOCK]), timeout=300).volume.volume_id
        took = self.retried(run, "CreateVolume", call)
        with self._mutex:
            run.latency["CreateVolume"].append(took)
        return out["vid"]

    def delete(self, run: Run, vid: str) -> None:
        took = self.retried(run, "DeleteVolume", lambda: self.ctrl.DeleteVolume(
            csi.DeleteVolumeRequest(volume_id=vid), timeout=300))
        with self._mutex:
            run.latency["DeleteVolume"].append(took)

    def probe(self, run: Run, probes: list[str], phase: str, stop: threading.Event) -> None:
        """Publishes and unpublishes the probe volumes one call after another until `stop`."""
        i = 0
        while not stop.is_set():
            vid = probes[i % len(probes)]
            i += 1
            pub = self.retried(run, "ControllerPublishVolume", lambda: self.ctrl.ControllerPublishVolume(
                csi.ControllerPublishVolumeRequest(volume_id=vid, node_id=self.w.initiator_iqn,
                                                   volume_capability=attach.BLOCK), timeout=60))
            unpub = self.retried(run, "ControllerUnpublishVolume", lambda: self.ctrl.ControllerUnpublishVolume(
                csi.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=self.w.initiator_iqn), timeout=60))
            with self._mutex:
                run.latency[f"ControllerPublishVolume while {phase}"].append(pub)
                run.latency[f"ControllerUnpublishVolume while {phase}"].append(unpub)

    def _at_once(self, run: Run, probes: list[str], phase: str, work) -> tuple[float, object]:
        """work() with the probes going on meanwhile: its seconds and its result."""
        stop = threading.Event()
        prober = threading.Thread(target=self.probe, args=(run, probes, phase, stop), daemon=True)
        prober.start()
        started = time.monotonic()
        try:
            result = work()
        finally:
            took = time.monotonic() - started
            stop.set()
            prober.join(120)
        return took, result

    def driver(self, run: Run, count: int, probes: list[str], tag: str) -> None:
        with ThreadPoolExecutor(count) as pool:
            run.created, vids = self._at_once(run, probes, "made", lambda: list(pool.map(
                lambda i: self.create(run, f"bench-load-{tag}-{i}"), range(count))))
            run.deleted, _ = self._at_once(run, probes, "deleted", lambda: list(pool.map(
                lambda vid: self.delete(run, vid), vids)))

    def raw(self, run: Run, count: int, tag: str) -> None:
        env = attach.lvm_env(self.d, self.s)
        prefix = f"raw-load-{tag}"
        r = self.s.run([PYTHON, str(GUEST), "raw-create-serial", VG_NAME, attach.THIN_POOL, prefix, str(count),
                        str(SIZE)], env=env, timeout=3600, check=True)
        run.raw = json.loads(r.stdout.splitlines()[-1])["total"]
        self.s.run([PYTHON, str(GUEST), "raw-remove-serial", VG_NAME, prefix, str(count)], env=env, timeout=3600,
                   check=True)


def p95(values: list[float]) -> float:
    return percentile(values, 0.95) if values else float("nan")


def _fmt(values: list[float]) -> str:
    return (f"{statistics.median(values):.2f} / {p95(values):.2f} / {max(values):.2f}"
            if values else "-")


def render(count: int, runs: list[Run], memory: list[tuple[str, str, int, int]] = ()) -> str:
    created = statistics.median(r.created for r in runs)
    deleted = statistics.median(r.deleted for r in runs)
    raw = statistics.median(r.raw for r in runs)
    ratio = created / raw if raw else float("nan")
    pooled = {k: [v for r in runs for v in r.latency[k]] for k in KINDS}
    p95s = [p95(pooled[k]) for k in KINDS[2:4]]
    lines = [f"### {count} volumes made and deleted at once, quick calls meanwhile ({len(runs)} runs)", "",
             "| measure | driver | raw floor | driver / raw | target |", "|---|---:|---:|---:|---|",
             f"| all {count} CreateVolume at once, until the last returned (s) | {created:.1f} "
             f"({', '.join(f'{r.created:.1f}' for r in runs)}) | {raw:.1f} | {ratio:.2f} | "
             f"<= 1.5: **{'met' if ratio <= 1.5 else 'NOT met'}** |",
             f"| all {count} DeleteVolume at once (s) | {deleted:.1f} | | | |", "",
             "| call (latency as the client saw it, retries included) | calls | p50 / p95 / max (s) | target |",
             "|---|---:|---:|---|"]
    for k in KINDS:
        target = ""
        if k in KINDS[2:4]:
            high = p95(pooled[k])
            target = f"p95 <= 2: **{'met' if high <= 2 else 'NOT met'}**"
        lines.append(f"| {k} | {len(pooled[k])} | {_fmt(pooled[k])} | {target} |")
    retries = sum((r.retries for r in runs), Counter())
    errors = sum((r.errors for r in runs), Counter())
    lines += ["", "Retries: " + (", ".join(f"{k} {v}" for k, v in sorted(retries.items())) or "none") + ".",
              "Errors (retried as the sidecars retry them): " + (
                  "; ".join(f"{k} ({v}x)" for k, v in sorted(errors.items())) or "none") + ".",
              f"Raw floor: {count} thin `lvcreate` one after another on the storage node (the agent's argv shape and "
              f"lvm.conf). Quick calls: the probe volumes published to the worker and unpublished, one call after "
              f"another, while the {count} calls ran (p95 of the two phases while made: "
              f"{', '.join(f'{p:.2f}' for p in p95s)} s)."]
    if memory:
        lines.append("Peak resident memory after the runs: " + ", ".join(
            f"{name} {hwm / 1024:.1f} MiB" for name, _, _, hwm in memory) + ".")
    return "\n".join(lines) + "\n"


def run(workdir: Path, subnet: str, count: int, runs: int, disk_gib: int, log) -> str:
    started = time.monotonic()
    results = []
    with attach.storage_and_worker(workdir, f"blod{os.getpid() % 10000}", subnet, disk_gib, 240) as (d, s, w):
        bench = LoadBench(d, s, w, log)
        try:
            setup = Run()
            probes = [bench.create(setup, f"bench-load-probe-{i}") for i in range(PROBES)]
            for i in range(runs):
                r = Run()
                bench.raw(r, count, str(i))
                bench.driver(r, count, probes, str(i))
                results.append(r)
                log(f"  run {i + 1}/{runs}: {count} made in {r.created:.1f} s (raw serial lvcreate {r.raw:.1f} s), "
                    f"deleted in {r.deleted:.1f} s; publish p95 while made "
                    f"{p95(r.latency[KINDS[2]]):.2f} s")
            for vid in probes:
                bench.delete(setup, vid)
            memory = attach.daemon_memory(d, s, w)
        finally:
            bench.close()
    log(f"load part done in {(time.monotonic() - started) / 60:.1f} min")
    return render(count, results, memory)
