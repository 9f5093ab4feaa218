"""`bench/scale`: the real controller against many simulated storage agents and many volumes.

Per agent count (e.g. 10 and 100): a work directory, a throw-away PKI, the simulated agents (the real
AgentService over gRPC with mutual TLS, LVM and LIO simulated in memory: bench/agent_simulation.py), several
per process, and the real controller (`python -m csi controller`, a file placement journal, the static list
of storage nodes). Every agent count's fleet is up for the whole run. All calls go through the controller's
CSI gRPC API on its unix socket, as the sidecars make them:

1. fill: CreateVolume of (volumes - samples) volumes, --fill-parallel calls in flight (the provisioner's way),
   one agent count after the other;
2. in --rounds rounds that alternate between the agent counts (so the host's load, which moves a lot on a
   shared machine, weighs on each alike): CreateVolume one at a time (serial latency), CreateVolume from
   --clients clients at once, GetCapacity, ControllerPublishVolume of distinct volumes; the last CreateVolume
   brings each controller to exactly --volumes volumes;
3. ListVolumes of every volume through pagination (max_entries --page), --walks times; the entries are
   counted and checked against the volumes made, and the largest page is recorded;
4. each controller's VmRSS and VmHWM (/proc/<pid>/status) with every volume made; the simulated agents
   report the largest response of each agent RPC they served.

Also the controller's CPU seconds per call of each phase (less sensitive to the host's load than latency),
and with --profile, where its busy threads are during the fill (py-spy).

Prints a Markdown table with the targets of issue 14 (met / not met) and writes it to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from csi import ids
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scale_fleet import Fleet, Profiler, log, proc_cpu, proc_status  # noqa: E402  (bench/ is not a package)
from stats import percentile  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
MESSAGE_BOUND = 4 * MiB          # gRPC's default limit on a received message
RSS_TARGET_MIB = 150
RATIO_TARGET = 1.5
NODE_IQN = "iqn.2026-11.dev.csi.bench:worker-1"
M = csi.VolumeCapability.AccessMode
MOUNT = csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                             access_mode=M(mode=M.SINGLE_NODE_WRITER))
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
CALL_TIMEOUT = 60.0


def volume_name(i: int) -> str:
    """What the external-provisioner sends: pvc-<uuid> (40 characters)."""
    return f"pvc-{uuid.uuid5(uuid.NAMESPACE_URL, f'csi-scale-bench/{i}')}"


@dataclass
class Level:
    agents: int
    processes: int = 0
    volumes: int = 0
    fill_count: int = 0
    fill_seconds: float = 0.0
    fill_parallel: int = 0
    serial: list[float] = field(default_factory=list)
    concurrent: list[float] = field(default_factory=list)
    clients: int = 0
    capacity: list[float] = field(default_factory=list)
    publish: list[float] = field(default_factory=list)
    walks: list[float] = field(default_factory=list)
    pages: int = 0
    page_size: int = 0
    listed: int = 0
    most_entries: int = 0
    largest_page: int = 0
    agent_largest: dict[str, int] = field(default_factory=dict)
    agent_calls: dict[str, int] = field(default_factory=dict)
    rss_kib: int = 0
    hwm_kib: int = 0
    per_agent: tuple[int, int] = (0, 0)
    retries: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    # Controller CPU seconds per phase (every thread): less sensitive to the host's load than latency.
    cpu: dict[str, float] = field(default_factory=dict)
    profile: dict[str, float] = field(default_factory=dict)   # share of the controller's busy samples


# ---------------------------------------------------------------------------------------------- the calls

class Client:
    """One CSI client (its own channel), as one sidecar worker."""

    def __init__(self, fleet: Fleet, level: Level):
        self.channel = fleet.channel()
        self.stub = csi_pb2_grpc.ControllerStub(self.channel)
        self.level = level

    def close(self) -> None:
        self.channel.close()

    def create(self, i: int) -> tuple[float, str]:
        """Seconds of the call that succeeded, and the volume ID. Retried as the provisioner retries."""
        req = csi.CreateVolumeRequest(name=volume_name(i), capacity_range=csi.CapacityRange(required_bytes=GiB),
                                      volume_capabilities=[MOUNT])
        for attempt in range(5):
            started = time.perf_counter()
            try:
                resp = self.stub.CreateVolume(req, timeout=CALL_TIMEOUT)
                return time.perf_counter() - started, resp.volume.volume_id
            except grpc.RpcError as exc:
                if exc.code() not in RETRIED or attempt == 4:
                    self.level.failures[f"CreateVolume {exc.code().name}"] += 1
                    raise
                self.level.retries[f"CreateVolume {exc.code().name}"] += 1
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def timed(self, method: str, request) -> float:
        started = time.perf_counter()
        try:
            getattr(self.stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            self.level.failures[f"{method} {exc.code().name}"] += 1
            raise
        return time.perf_counter() - started


def fill(fleet: Fleet, level: Level, first: int, count: int, parallel: int) -> None:
    """CreateVolume of names first..first+count-1, `parallel` in flight."""
    lock = threading.Lock()
    state = {"next": first, "done": 0}
    started = time.monotonic()

    def worker() -> None:
        client = Client(fleet, level)
        try:
            while True:
                with lock:
                    i = state["next"]
                    if i >= first + count:
                        return
                    state["next"] += 1
                client.create(i)
                with lock:
                    state["done"] += 1
                    done = state["done"]
                if done % 1000 == 0:
                    log(f"  {done}/{count} volumes, {done / (time.monotonic() - started):.0f}/s")
        finally:
            client.close()

    with ThreadPoolExecutor(parallel) as pool:
        for job in [pool.submit(worker) for _ in range(parallel)]:
            job.result()
    level.fill_count = count
    level.fill_seconds = time.monotonic() - started
    level.fill_parallel = parallel


class Measured:
    """One agent count's fleet and figures, while every fleet of the run is up."""

    def __init__(self, args, agents: int):
        self.args = args
        self.level = Level(agents, processes=math.ceil(agents / args.per_process), volumes=args.volumes,
                           clients=args.clients, page_size=args.page)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"csi-scale-{agents}-", dir=args.workdir))
        self.fleet = Fleet(self.workdir, agents, args.per_process)
        self.client: Client | None = None
        self.made: list[str] = []            # volume IDs of the serial samples, published later
        self.next = 0                        # the next volume name's number
        self._cpu: Counter = Counter()       # controller CPU seconds per phase
        self._calls: Counter = Counter()

    @property
    def pid(self) -> int:
        return self.fleet.controller.pid

    def phase(self, name: str, calls: int, fn) -> None:
        """Runs fn, counting the controller's CPU seconds against `calls` calls of phase `name`."""
        mark = proc_cpu(self.pid)
        fn()
        self._cpu[name] += proc_cpu(self.pid) - mark
        self._calls[name] += calls
        self.level.cpu[name] = self._cpu[name] / max(self._calls[name], 1)

    def fill(self, count: int) -> None:
        lv, fleet = self.level, self.fleet
        agents_mark = fleet.agents_cpu()
        profiler = Profiler(self.pid, self.workdir / "controller-fill.raw") if self.args.profile else None
        log(f"{lv.agents} agents: fill, {count} volumes through CreateVolume, {self.args.fill_parallel} in flight")
        self.phase("fill", count, lambda: fill(fleet, lv, 0, count, self.args.fill_parallel))
        lv.cpu["agents fill"] = (fleet.agents_cpu() - agents_mark) / max(count, 1)
        if profiler is not None:
            lv.profile = profiler.stop()
        log(f"{lv.agents} agents: fill took {lv.fill_seconds:.0f}s ({count / max(lv.fill_seconds, 1e-9):.0f}/s)")
        self.next = count
        self.client = Client(fleet, lv)

    def serial(self, count: int) -> None:
        def run() -> None:
            for i in range(self.next, self.next + count):
                took, vid = self.client.create(i)
                self.level.serial.append(took)
                self.made.append(vid)
        self.phase("serial", count, run)
        self.next += count

    def concurrent(self, count: int) -> None:
        clients, base = self.args.clients, self.next
        per = count // clients

        def burst(c: int) -> list[float]:
            mine = Client(self.fleet, self.level)
            try:
                return [mine.create(i)[0] for i in range(base + c * per, base + (c + 1) * per)]
            finally:
                mine.close()

        def run() -> None:
            with ThreadPoolExecutor(clients) as pool:
                for got in pool.map(burst, range(clients)):
                    self.level.concurrent += got
        self.phase("concurrent", per * clients, run)
        self.next += per * clients

    def capacity(self, count: int) -> None:
        def run() -> None:
            for _ in range(count):
                self.level.capacity.append(self.client.timed("GetCapacity", csi.GetCapacityRequest(
                    volume_capabilities=[MOUNT])))
        self.phase("capacity", count, run)

    def publish(self, count: int) -> None:
        todo = self.made[len(self.level.publish):len(self.level.publish) + count]

        def run() -> None:
            for vid in todo:
                self.level.publish.append(self.client.timed("ControllerPublishVolume",
                                                            csi.ControllerPublishVolumeRequest(
                                                                volume_id=vid, node_id=NODE_IQN,
                                                                volume_capability=MOUNT)))
        self.phase("publish", len(todo), run)

    def walk(self) -> None:
        lv, page = self.level, self.args.page
        seen: set[str] = set()
        per_node: Counter = Counter()

        def run() -> None:
            token, pages, started = "", 0, time.perf_counter()
            while True:
                resp = self.client.stub.ListVolumes(csi.ListVolumesRequest(max_entries=page, starting_token=token),
                                                    timeout=CALL_TIMEOUT)
                pages += 1
                lv.largest_page = max(lv.largest_page, resp.ByteSize())
                lv.most_entries = max(lv.most_entries, len(resp.entries))
                for e in resp.entries:
                    seen.add(e.volume.volume_id)
                    per_node[ids.parse_id(e.volume.volume_id).node] += 1
                token = resp.next_token
                if not token:
                    break
            lv.walks.append(time.perf_counter() - started)
            lv.pages = pages
        self.phase("walk", 1, run)
        lv.listed = len(seen)
        lv.per_agent = (min(per_node.get(f"sim-{i:03d}", 0) for i in range(lv.agents)), max(per_node.values()))
        if len(seen) != lv.volumes:
            lv.failures[f"ListVolumes listed {len(seen)} of {lv.volumes}"] += 1

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        stats = self.fleet.stop()
        self.level.agent_largest, self.level.agent_calls = stats["largest"], stats["calls"]
        if self.args.keep:
            log(f"kept {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def split(total: int, parts: int, unit: int = 1) -> list[int]:
    """total in `parts` batches, each a multiple of unit (the remainder in the first)."""
    each = total // parts // unit * unit
    return [total - each * (parts - 1)] + [each] * (parts - 1)


def run(args, counts: list[int]) -> list[Level]:
    """Every agent count's fleet up at once; the fills one after the other; then the measured calls in rounds
    that alternate between the fleets (and their order), so that the host's load, which moves a lot on a
    shared machine, weighs on every agent count alike."""
    serial_n = max(args.rounds, min(args.samples, args.volumes // 8))
    concurrent_n = max(args.clients * args.rounds, min(2 * args.samples, args.volumes // 4))
    concurrent_n = concurrent_n // (args.clients * args.rounds) * args.clients * args.rounds
    fill_n = args.volumes - serial_n - concurrent_n
    if fill_n < 0:
        raise SystemExit(f"--volumes {args.volumes} is below the samples ({serial_n} + {concurrent_n})")
    runs = [Measured(args, n) for n in counts]
    try:
        for m in runs:
            log(f"{m.level.agents} simulated agents in {m.level.processes} process(es), work dir {m.workdir}")
            m.fleet.start()
        marks = [(proc_cpu(m.pid), m.fleet.agents_cpu()) for m in runs]
        time.sleep(args.idle)
        for m, (cpu, agents_cpu) in zip(runs, marks):
            m.level.cpu["idle"] = (proc_cpu(m.pid) - cpu) / args.idle
            m.level.cpu["agents idle"] = (m.fleet.agents_cpu() - agents_cpu) / args.idle
        for m in runs:
            m.fill(fill_n)
        batches = zip(split(serial_n, args.rounds), split(concurrent_n, args.rounds, args.clients),
                      split(args.samples, args.rounds))
        for r, (serial, concurrent, samples) in enumerate(batches):
            log(f"round {r + 1} of {args.rounds}: {serial} CreateVolume one at a time, {concurrent} from "
                f"{args.clients} clients, {samples} GetCapacity and ControllerPublishVolume, per agent count")
            for m in (runs if r % 2 == 0 else runs[::-1]):
                m.serial(serial)
                m.concurrent(concurrent)
                m.capacity(samples)
                m.publish(samples)
        for m in runs:
            m.level.rss_kib, _ = proc_status(m.pid)
        log(f"ListVolumes, max_entries {args.page}, {args.walks} walk(s) per agent count")
        for w in range(args.walks):
            for m in (runs if w % 2 == 0 else runs[::-1]):
                m.walk()
        for m in runs:
            rss, m.level.hwm_kib = proc_status(m.pid)
            m.level.rss_kib = max(m.level.rss_kib, rss)
    finally:
        for m in runs:
            m.stop()
    return [m.level for m in runs]


# ---------------------------------------------------------------------------------------------- the report

def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f}" if values else "-"


def kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < MiB else f"{n / MiB:.2f} MiB"


def report(levels: list[Level], args) -> str:
    head = "| | " + " | ".join(f"{lv.agents} simulated agents" for lv in levels) + " |"
    lines = [head, "|---|" + "---|" * len(levels)]

    def row(label: str, fn) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(lv) for lv in levels) + " |")

    v = args.volumes
    row("simulated agents per process", lambda lv: f"{min(args.per_process, lv.agents)} x {lv.processes}")
    row(f"fill: CreateVolume, {args.fill_parallel} in flight", lambda lv:
        f"{lv.fill_count} in {lv.fill_seconds:.0f} s = {lv.fill_count / max(lv.fill_seconds, 1e-9):.0f}/s")
    row("CreateVolume, 1 in flight: p50 / p99 ms", lambda lv: f"{ms(lv.serial, .5)} / {ms(lv.serial, .99)} "
        f"(n={len(lv.serial)})")
    row(f"CreateVolume, {args.clients} clients at once: p50 / p99 ms", lambda lv:
        f"{ms(lv.concurrent, .5)} / {ms(lv.concurrent, .99)} (n={len(lv.concurrent)})")
    row("controller CPU per CreateVolume: filling / 1 in flight / clients at once, ms", lambda lv:
        " / ".join(f"{lv.cpu.get(k, 0) * 1000:.1f}" for k in ("fill", "serial", "concurrent")))
    row(f"controller CPU with no calls ({args.idle:.0f} s: the poller)", lambda lv:
        f"{lv.cpu.get('idle', 0) * 100:.1f}% of a CPU")
    row("simulated agents' CPU (every process): per CreateVolume while filling / with no calls", lambda lv:
        f"{lv.cpu.get('agents fill', 0) * 1000:.1f} ms / {lv.cpu.get('agents idle', 0) * 100:.1f}% of a CPU")
    row("GetCapacity: p50 / p99 ms", lambda lv: f"{ms(lv.capacity, .5)} / {ms(lv.capacity, .99)}")
    row("ControllerPublishVolume: p50 / p99 ms", lambda lv: f"{ms(lv.publish, .5)} / {ms(lv.publish, .99)}")
    row("controller CPU per GetCapacity / ControllerPublishVolume, ms", lambda lv:
        f"{lv.cpu.get('capacity', 0) * 1000:.2f} / {lv.cpu.get('publish', 0) * 1000:.1f}")
    row(f"ListVolumes of all {v}, max_entries {args.page}: s (median of {args.walks}), pages", lambda lv:
        f"{statistics.median(lv.walks):.2f} s, {lv.pages} pages" if lv.walks else "-")
    row("controller CPU per ListVolumes walk", lambda lv: f"{lv.cpu.get('walk', 0):.2f} s")
    row("volumes listed / made", lambda lv: f"{lv.listed} / {v}")
    row("largest ListVolumes page from the controller", lambda lv: f"{kib(lv.largest_page)} "
        f"({lv.most_entries} entries)")
    row("largest ListVolumes answer of a simulated agent", lambda lv: kib(lv.agent_largest.get("ListVolumes", 0)))
    row("largest answer of a simulated agent, any RPC", lambda lv:
        (lambda m: f"{kib(lv.agent_largest[m])} ({m})")(max(lv.agent_largest, key=lv.agent_largest.get))
        if lv.agent_largest else "-")
    row(f"controller VmRSS / VmHWM at {v} volumes", lambda lv: f"{lv.rss_kib / 1024:.0f} / {lv.hwm_kib / 1024:.0f} MiB")
    row("volumes per simulated agent, min - max", lambda lv: f"{lv.per_agent[0]} - {lv.per_agent[1]}")
    row("agent calls by the controller (all phases)", lambda lv: ", ".join(
        f"{k} {n}" for k, n in sorted(lv.agent_calls.items(), key=lambda kv: -kv[1])))
    row("retried / failed calls", lambda lv: f"{sum(lv.retries.values())} / {sum(lv.failures.values())}"
        + (f" ({', '.join(f'{k}: {n}' for k, n in (lv.retries + lv.failures).items())})"
           if lv.retries or lv.failures else ""))

    lines += ["", "| target | measured | |", "|---|---|---|"]
    by = {lv.agents: lv for lv in levels}
    lo, hi = (by.get(10), by.get(100)) if 10 in by and 100 in by else (levels[0], levels[-1])
    for label, values in (("1 in flight", "serial"), (f"{args.clients} clients at once", "concurrent")):
        if lo is hi:
            lines.append(f"| CreateVolume p99 at 100 agents <= {RATIO_TARGET}x at 10 ({label}) | "
                         "needs two agent counts | not measured |")
            continue
        a, b = percentile(getattr(lo, values), .99), percentile(getattr(hi, values), .99)
        ratio = b / a
        lines.append(f"| CreateVolume p99 at {hi.agents} agents <= {RATIO_TARGET}x at {lo.agents} ({label}) | "
                     f"{b * 1000:.1f} / {a * 1000:.1f} ms = {ratio:.2f}x | "
                     f"{'met' if ratio <= RATIO_TARGET else 'not met'} |")
    bounded = all(lv.most_entries <= args.page and lv.largest_page < MESSAGE_BOUND and
                  lv.agent_largest.get("ListVolumes", 0) < MESSAGE_BOUND and lv.listed == v for lv in levels)
    lines.append(f"| ListVolumes paged at every level: pages of at most {args.page} entries, no message above "
                 f"{MESSAGE_BOUND // MiB} MiB (controller's pages, agents' answers), every volume listed | "
                 + "; ".join(f"{lv.agents}: {kib(max(lv.largest_page, lv.agent_largest.get('ListVolumes', 0)))}"
                             for lv in levels) + f" | {'met' if bounded else 'not met'} |")
    for lv in levels:
        mib = lv.hwm_kib / 1024
        lines.append(f"| controller memory at {v} volumes < {RSS_TARGET_MIB} MiB ({lv.agents} agents, VmHWM) | "
                     f"{mib:.0f} MiB | {'met' if mib < RSS_TARGET_MIB else 'not met'} |")
    profiled = [lv for lv in levels if lv.profile]
    if profiled:
        names = sorted({n for lv in profiled for n, share in lv.profile.items() if share >= 0.02},
                       key=lambda n: -max(lv.profile.get(n, 0) for lv in profiled))
        lines += ["", "Where the controller's busy threads were during the fill (py-spy, share of samples whose "
                  "stack holds the function; the driver's functions only, those at 2% or more):", "",
                  "| function | " + " | ".join(f"{lv.agents} agents" for lv in profiled) + " |",
                  "|---|" + "---|" * len(profiled)]
        for n in names[:25]:
            lines.append(f"| `{n}` | " + " | ".join(f"{lv.profile.get(n, 0) * 100:.0f}%" for lv in profiled) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="10,100", help="agent counts, comma-separated")
    p.add_argument("--volumes", type=int, default=10_000)
    p.add_argument("--per-process", type=int, default=25, help="simulated agents per process")
    p.add_argument("--fill-parallel", type=int, default=16, help="CreateVolume calls in flight while filling")
    p.add_argument("--clients", type=int, default=8, help="clients at once for the concurrent CreateVolume")
    p.add_argument("--samples", type=int, default=500,
                   help="serial CreateVolume, GetCapacity and ControllerPublishVolume samples (the concurrent "
                        "CreateVolume takes twice as many); at most volumes/8")
    p.add_argument("--page", type=int, default=500, help="ListVolumes max_entries")
    p.add_argument("--rounds", type=int, default=5, help="rounds of measured calls, alternating agent counts")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of the controller's idle CPU measure")
    p.add_argument("--walks", type=int, default=3, help="ListVolumes walks through every page")
    p.add_argument("--workdir", default=None, help="parent of the work directories (default: $TMPDIR or /tmp)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy on the controller during the fill: where its busy threads are (needs py-spy)")
    p.add_argument("--keep", action="store_true", help="keep the work directories (logs, records, journal)")
    p.add_argument("--out", default=str(HERE / "scale-results.md"))
    args = p.parse_args(argv)
    counts = [int(x) for x in args.agents.split(",") if x]
    args.samples = max(1, min(args.samples, args.volumes // 8))
    started, load = time.monotonic(), os.getloadavg()
    levels = run(args, counts)
    took = time.monotonic() - started
    end_load = os.getloadavg()
    command = "bench/scale " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# Scale benchmark: the real controller, simulated agents\n\n"
            f"`{command.strip()}`, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
            f"{took / 60:.1f} min; host load average (1, 5, 15 min) {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at "
            f"the start, {end_load[0]:.1f} {end_load[1]:.1f} {end_load[2]:.1f} at the end. Agents' LVM and LIO are "
            f"a simulation (bench/agent_simulation.py); everything else is real. Latencies are of calls through "
            f"the controller's CSI socket, measured at the last "
            f"{len(levels[0].serial) + len(levels[0].concurrent)} of {args.volumes} volumes (the fill makes the "
            f"others), in {args.rounds} rounds that alternate between the agent counts.\n\n") + report(levels, args)
    print(text)
    Path(args.out).write_text(text)
    return 1 if any(lv.failures for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
