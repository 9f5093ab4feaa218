"""A pool's capacity, without a cost that grows with the number of volumes: thin pool fill from the kernel,
VG free space from a report kept a minute, and per-pool LV totals kept up to date by the agent's own changes.
The controller asks every agent for capacity on every CreateVolume, so none of this may list every LV per call.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass

from csi import errors, runner
from csi.config import PoolConfig
from csi.storage.lvm import LogicalVolume, Lvm, ThinPoolState, VolumeGroup

log = logging.getLogger(__name__)

POOL_REPORT_TTL = 5.0
VG_REPORT_TTL = 60.0
STALE_REPORT_MAX = 120.0   # the oldest report served when a new one is late
ABSENT_TTL = 30.0          # a pool or VG found missing is looked for again after this; made later, seen then
REPORT_WAIT = 3.0          # how long a GetInfo with an older report at hand waits for a new one
REPORT_LIMIT = 120.0       # how long an LVM report read in the background may take


class LateReads:
    """One LVM read per key at a time, run in the background. A caller with an older report at hand waits up
    to REPORT_WAIT for the new one and otherwise serves the old one; the read goes on, and whoever asks next
    takes its result if it is still recent (started at most max_age ago) and nothing changed since it started
    (forget). Without this a loaded storage node's GetInfo took as long as its slowest LVM command (20 s and
    more in the Kubernetes tier), past the controller's probe, and the node was counted down. With nothing at
    hand (the first read, or a report too old to serve) the caller reads itself, within its own deadline."""

    def __init__(self):
        self._jobs: dict[object, tuple[float, futures.Future]] = {}    # key -> (when it started, the read)
        self._mutex = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lvm-report")

    def forget(self, key) -> None:
        """This agent changed what the key's report says: a read started before answers for the state before."""
        with self._mutex:
            self._jobs.pop(key, None)

    def read(self, key, fn, fallback, max_age: float):
        """fn()'s value (or its exception); `fallback` when there is one and fn is still running after
        REPORT_WAIT."""
        with self._mutex:
            started, job = self._jobs.get(key, (0.0, None))
            if fallback is None or (job is not None and job.done() and time.monotonic() - started > max_age):
                self._jobs.pop(key, None)
                job = None
            if job is None and fallback is not None:
                started, job = self._jobs[key] = (time.monotonic(), self._pool.submit(self._bounded, fn))
        if job is None:
            return fn()
        try:
            return job.result(timeout=min(REPORT_WAIT, runner.time_left()))
        except futures.TimeoutError:
            return fallback
        finally:
            if job.done():
                with self._mutex:
                    if self._jobs.get(key, (0.0, None))[1] is job:
                        del self._jobs[key]

    @staticmethod
    def _bounded(fn):
        with runner.deadline(REPORT_LIMIT):
            return fn()


@dataclass(frozen=True)
class PoolUsage:
    pool: PoolConfig
    extent: int
    physical_total: int
    physical_used: int
    available: int
    data_percent: float
    metadata_percent: float
    volumes: int


TOTALS_TTL = 60.0


@dataclass
class Totals:
    virtual: int = 0      # sum of the sizes of every thin LV in the pool (any owner: all of them use it)
    volumes: int = 0      # this cluster's volumes in the pool
    at: float = 0.0


class PoolTotals:
    """Per-pool LV totals without listing every LV on every call (see usage below)."""

    def __init__(self, service):
        self._service = service
        self._totals: dict[str, Totals] = {}
        self._mutex = threading.Lock()
        self._late = LateReads()

    def get(self, pool: PoolConfig) -> Totals:
        with self._mutex:
            t = self._totals.get(pool.name)
            if t is not None and time.monotonic() - t.at < TOTALS_TTL:
                return Totals(t.virtual, t.volumes, t.at)
        # One listing of the VG recounts every pool in it (a thin and a thick pool often share one).
        usable = t is not None and time.monotonic() - t.at <= STALE_REPORT_MAX
        try:
            lvs = self._late.read(("lvs", pool.vg), lambda: self._service.lvm.lvs(pool.vg), t if usable else None,
                                  TOTALS_TTL)
            if lvs is t:
                log.info("pool %s: the LVM listing is late; the last count serves meanwhile", pool.name)
                return Totals(t.virtual, t.volumes, t.at)
        except errors.CsiError as exc:
            # Late on a loaded node: the last count serves for a while (as PoolReports does for fill levels).
            if exc.code != errors.Code.DEADLINE_EXCEEDED or t is None or time.monotonic() - t.at > STALE_REPORT_MAX:
                raise
            log.info("pool %s: the LVM listing was late; the last count serves meanwhile", pool.name)
            return Totals(t.virtual, t.volumes, t.at)
        t = self._recount(pool.vg, lvs, pool)[pool.name]
        return Totals(t.virtual, t.volumes, t.at)

    def seed(self, vg: str, lvs: list[LogicalVolume]) -> None:
        """A listing of the VG read by the agent's start (restore.plan), before it serves: the count the first
        GetInfo serves while its own listing waits behind the start's activation, which holds the VG."""
        self._recount(vg, lvs)

    def _recount(self, vg: str, lvs: list[LogicalVolume], asked: PoolConfig | None = None) -> dict[str, Totals]:
        """Every configured pool of the VG counted from one listing (and `asked`, should it not be configured)."""
        now = time.monotonic()
        counted = {p.name: self._count(p, lvs, now) for p in self._service.config.pools if p.vg == vg}
        if asked is not None:
            counted.setdefault(asked.name, self._count(asked, lvs, now))
        with self._mutex:
            self._totals.update(counted)
        return counted

    def _count(self, pool: PoolConfig, lvs: list[LogicalVolume], at: float) -> Totals:
        if pool.thin:
            inside = [lv for lv in lvs if lv.pool == pool.thin_pool]
        else:
            inside = [lv for lv in lvs if not lv.pool and not lv.is_thin_pool and not lv.attr.startswith(("e", "l"))]
        return Totals(sum(lv.size for lv in inside), sum(1 for lv in inside if self._service._ours(lv)), at)

    def add(self, pool: PoolConfig | None, size: int, volumes: int = 0) -> None:
        if pool is None:
            return
        self._late.forget(("lvs", pool.vg))    # a listing started before this change would undo it
        with self._mutex:
            t = self._totals.get(pool.name)
            if t is not None:
                t.virtual += size if pool.thin else 0
                t.volumes += volumes


class PoolReports:
    """Thin pool fill (size, data and metadata use) and VG free space, each reused for a few seconds: the
    controller asks every agent for capacity on every CreateVolume.

    Only the first look at a thin pool (or one whose kernel device is not active) takes an LVM report, which
    reads the metadata of every LV in the VG (about 1 s at 500 LVs); afterwards its fill comes from the kernel
    (`dmsetup status`), the same cost at any count, every POOL_REPORT_TTL seconds. Thin fill levels may lag by
    those seconds; the max_fill_percent guard is a margin, not an exact line. A VG's free space changes only
    through LVM: this agent's own thick changes forget the VG's report at once, and anything else (an
    administrator, another cluster's agent on the same VG) is seen within VG_REPORT_TTL seconds."""

    def __init__(self, lvm: Lvm):
        self._lvm = lvm
        self._late = LateReads()
        self._reports: dict[tuple[str, str], tuple[float, object]] = {}
        self._absent: dict[tuple[str, str], float] = {}   # pools and VGs found missing, and when
        self._mutex = threading.Lock()

    def _known_absent(self, key: tuple[str, str]) -> bool:
        """Found missing less than ABSENT_TTL seconds ago. Every storage node gets every pool definition, and a
        pool a node lacks was looked for with an LVM command on every GetInfo (a second a time on a loaded node)."""
        with self._mutex:
            return time.monotonic() - self._absent.get(key, -ABSENT_TTL) < ABSENT_TTL

    def _note(self, key: tuple[str, str], report) -> None:
        with self._mutex:
            if report is None:
                self._absent[key] = time.monotonic()
            else:
                self._absent.pop(key, None)

    def _cached(self, key: tuple[str, str], ttl: float):
        """(report or None if too old or never read, the last report read, the last report if not older than
        STALE_REPORT_MAX: what serves while a new one is late)."""
        with self._mutex:
            at, report = self._reports.get(key, (0.0, None))
        age = time.monotonic() - at
        return (report if report is not None and age < ttl else None), report, \
            (report if age < STALE_REPORT_MAX else None)

    def _or_last(self, key, read, last, what: str, max_age: float):
        """read(), or the last report when reading takes too long (LVM slow on a loaded node): a capacity that
        is seconds old serves GetInfo better than an error or a wait, which made the controller count the node
        down."""
        try:
            report = self._late.read(key, read, last, max_age)
            if report is last and last is not None:
                log.info("%s: the LVM report is late; the last one serves meanwhile", what)
            return report
        except errors.CsiError as exc:
            if exc.code != errors.Code.DEADLINE_EXCEEDED or last is None:
                raise
            log.info("%s: the LVM report was late (%s); the last one serves meanwhile", what, exc.message[:80])
            return last

    def _keep(self, key: tuple[str, str], report) -> None:
        if report is not None:
            with self._mutex:
                self._reports[key] = (time.monotonic(), report)

    def seed(self, vg: str, pool: str, state: ThinPoolState) -> None:
        """A thin pool's report read by the agent's start (restore.plan), before it serves: later looks take its
        fill from the kernel (no LVM command, none waiting behind the start's activation of the VG)."""
        self._keep((vg, pool), state)
        self._note((vg, pool), state)
        if state.group is not None:
            self._keep((vg, ""), state.group)

    def thin_pool(self, vg: str, pool: str) -> ThinPoolState | None:
        fresh, last, recent = self._cached((vg, pool), POOL_REPORT_TTL)
        if fresh is not None:
            return fresh
        if self._known_absent((vg, pool)):
            return None
        fill = self._or_last((vg, pool), lambda: self._lvm.thin_pool_fill(vg, pool), recent,
                             f"thin pool {vg}/{pool}", POOL_REPORT_TTL) if last is not None else None
        if fill is not None and fill is recent:
            return recent
        if fill is not None:
            # Its extent size and zeroing are the LVM report's; they do not change while the pool exists.
            state = dataclasses.replace(last, size=fill.size, data_percent=fill.data_percent,
                                        metadata_percent=fill.metadata_percent)
        else:
            state = self._lvm.thin_pool(vg, pool)
            if state is not None and state.group is not None:
                # The report carries its VG's numbers too: a thick pool in the same VG needs no vgs of its own.
                self._keep((vg, ""), state.group)
        self._keep((vg, pool), state)
        self._note((vg, pool), state)
        return state

    def vg(self, vg: str) -> VolumeGroup | None:
        fresh, _, recent = self._cached((vg, ""), VG_REPORT_TTL)
        if fresh is not None:
            return fresh
        if self._known_absent((vg, "")):
            return None
        report = self._or_last((vg, ""), lambda: self._lvm.vg(vg), recent, f"volume group {vg}", VG_REPORT_TTL)
        if report is None or report is not recent:
            self._keep((vg, ""), report)
            self._note((vg, ""), report)
        return report

    def forget(self, vg: str) -> None:
        """After this agent changed the VG's free space (a thick LV created, grown or removed)."""
        with self._mutex:
            self._reports.pop((vg, ""), None)
        self._late.forget((vg, ""))


def usage(service, pool: PoolConfig) -> PoolUsage:
    """Capacity of a pool, from one LVM report of the thin pool (or of the VG, for a thick pool) plus
    the totals of the LVs in it, which are kept up to date by this agent's own changes and recounted
    from a full listing at most every TOTALS_TTL seconds: no per-volume scan per call."""
    if pool.thin:
        tp = service.pool_reports.thin_pool(pool.vg, pool.thin_pool)
        if tp is None or tp.group is None:
            raise errors.precondition(f"thin pool {pool.vg}/{pool.thin_pool} of pool {pool.name} is missing")
        totals = service.totals.get(pool)
        available = max(0, int(tp.size * pool.overprovision_ratio) - totals.virtual)
        if tp.data_percent >= pool.max_fill_percent or tp.metadata_percent >= pool.max_fill_percent:
            available = 0
        used = int(tp.size * tp.data_percent / 100)
        return PoolUsage(pool, tp.group.extent_size, tp.size, used, available, tp.data_percent,
                         tp.metadata_percent, totals.volumes)
    vg = service.pool_reports.vg(pool.vg)
    if vg is None:
        raise errors.precondition(f"volume group {pool.vg} of pool {pool.name} is missing")
    return PoolUsage(pool, vg.extent_size, vg.size, vg.size - vg.free, vg.free,
                     100.0 * (vg.size - vg.free) / vg.size if vg.size else 0.0, 0.0, service.totals.get(pool).volumes)
