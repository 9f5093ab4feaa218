"""What the agent does when it starts: bring the kernel back to what its records say.

LIO's configuration does not survive a reboot, and /etc/target is not used: every export, ACL and CHAP
secret is re-created from the per-volume records and the LVs. Deletions that were cut short are finished;
ACLs that no record holds are removed. In two parts: plan() reads the LVM report and the records (quick, before
the agent serves); finish() brings the volumes back a batch at a time while the agent already serves, each
volume's ID held (AgentService.start_restore) until it is back, so a call on it gets ABORTED meanwhile (and is
retried) while every other call is served, health probes included.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from csi import faults
from csi.runner import CommandError
from csi.storage import rebuild, tags
from csi.storage.lio import Access
from csi.storage.records import VolumeRecord

log = logging.getLogger(__name__)

# LVs per lvchange at start: LVM reads the VG's metadata once per command, which is most of a command's cost and
# grows with the VG (one lvchange per LV made a start with 150 volumes take 109 s); an argv of a few KiB.
ACTIVATE_BATCH = 100


def _activate(lvm, wanted: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Activates the LVs with one lvchange per batch of a VG; returns those it activated. A batch that fails (LVM
    fails the command when one LV of it cannot be activated, after activating the others) is left to the caller's
    activation one by one, which says which LV it is."""
    by_vg: dict[str, list[str]] = defaultdict(list)
    for vg, name in wanted:
        by_vg[vg].append(name)
    done: set[tuple[str, str]] = set()
    for vg, names in sorted(by_vg.items()):
        for i in range(0, len(names), ACTIVATE_BATCH):
            batch = names[i:i + ACTIVATE_BATCH]
            try:
                lvm.activate_all(vg, batch)
            except CommandError as exc:
                log.warning("activating %d LVs of %s in one command failed (%s): one by one instead", len(batch),
                            vg, str(exc)[-300:])
                continue
            done.update((vg, name) for name in batch)
    return done


def _tag_older_volumes(service, records, lvs) -> None:
    """Volumes made before the attributes tag get it (so a lost state directory can be rebuilt), and copies
    that finished before the content tag was removed at their end lose it: one lvchange each, once."""
    for rec in records:
        lv = lvs.get((rec.vg, rec.lv))
        if lv is None or rec.deleting or not service._ours(lv):
            continue
        try:
            if lv.tag(tags.ATTRS) is None and (wanted := tags.attributes_tag(rec.attributes)):
                service.lvm.add_tag(rec.vg, rec.lv, wanted)
            if rec.state == "ready" and lv.tag(tags.CONTENT) == "copy":
                service.lvm.del_tag(rec.vg, rec.lv, tags.tag("content", "copy"))
        except CommandError:
            log.exception("could not bring the tags of %s/%s up to date", rec.vg, rec.lv)


@dataclass
class Plan:
    """What a start must bring back, read before the agent serves (the LVM report, the records; quick): the
    records, the LVs by (vg, name), the LVs cut short in CreateVolume before their record, and which LVs need
    activating; and what rebuilding records from the LVs' tags did (rebuild.py's counts)."""
    records: list[VolumeRecord]
    lvs: dict
    unrecorded: list[tuple[str, str]]
    inactive: set[tuple[str, str]]
    rebuilt: dict[str, int]

    def work(self) -> list[tuple[tuple[str, str], VolumeRecord | None]]:
        """((vg, name), its record or None when it has none) of every volume the start touches, in order."""
        return [(key, None) for key in self.unrecorded] + [((rec.vg, rec.lv), rec) for rec in self.records]

    def keys(self) -> list[str]:
        """The agent's lock IDs of every volume it touches: held from before it serves until each is back."""
        return [f"{vg}/{name}" for (vg, name), _ in self.work()]


def plan(service) -> Plan:
    cfg, lvm = service.config, service.lvm
    for pool in cfg.pools:
        state = lvm.thin_pool(pool.vg, pool.thin_pool) if pool.thin else None
        if state is not None and state.metadata_percent == 0:
            # Inactive (after a reboot, until its first volume is): LVM knows no fill for it. Activated first, so
            # that the report GetInfo is served from (seed below) says how full the pool is from the start.
            try:
                lvm.activate(pool.vg, pool.thin_pool)
                state = lvm.thin_pool(pool.vg, pool.thin_pool) or state
            except CommandError as exc:
                log.warning("could not activate thin pool %s/%s before its volumes: %s", pool.vg,
                            pool.thin_pool, str(exc)[-300:])
        if state is not None and not state.zeroing:
            log.warning("thin pool %s/%s did not zero new blocks; turning zeroing on so no tenant reads "
                        "another's old data", pool.vg, pool.thin_pool)
            lvm.set_zeroing(pool.vg, pool.thin_pool)
            state = dataclasses.replace(state, zeroing=True)
        if state is not None and not state.error_when_full:
            # Nothing extends a pool here (the agent's lvm.conf has monitoring off: no dmeventd, no autoextend),
            # so a full pool that queues I/O only hangs every writer for the kernel's no_space_timeout (60 s)
            # before failing it anyway. New volumes are refused before the edge (maxFillPercent) instead.
            log.warning("thin pool %s/%s queued writes when full; making it fail them at once (--errorwhenfull y)",
                        pool.vg, pool.thin_pool)
            lvm.set_error_when_full(pool.vg, pool.thin_pool)
            state = dataclasses.replace(state, error_when_full=True)
        if state is not None and state.metadata_percent > 0:
            # Its size and fill, what GetInfo needs. An inactive pool (after a reboot, before the first of its
            # volumes is activated) reports no fill at all, not 0 %: GetInfo reads that one itself.
            service.pool_reports.seed(pool.vg, pool.thin_pool, state)
    lvs = {}
    for vg in sorted({p.vg for p in cfg.pools}):
        listed = lvm.lvs(vg)
        service.totals.seed(vg, listed)
        lvs.update({(vg, lv.name): lv for lv in listed})
    rebuilt = rebuild.ensure(service, lvs)
    records = list(service.records.all())
    recorded = {(rec.vg, rec.lv) for rec in records}
    _tag_older_volumes(service, records, lvs)
    # A creation cut short before its record (and a reboot since): active, its device node tells CreateVolume and
    # GetVolume that it exists (see AgentService._may_exist); the retry finishes it.
    unrecorded = [key for key, lv in sorted(lvs.items()) if key not in recorded and service._ours(lv) and not lv.active]
    exported = [(rec.vg, rec.lv) for rec in records if not rec.deleting and rec.state == "ready"
                and (rec.vg, rec.lv) in lvs and not lvs[(rec.vg, rec.lv)].active]
    return Plan(records, lvs, unrecorded, set(unrecorded) | set(exported), rebuilt)


def finish(service, p: Plan, done: Callable[[str], None] = lambda key: None) -> dict[str, int]:
    """Brings every volume of the plan back, a batch of ACTIVATE_BATCH at a time (one lvchange, then each
    export): `done(key)` as each volume is back (or failed), so that the agent serves it while the next batch
    comes back."""
    counts = {"exported": 0, "finished_deletes": 0, "stale_acls_removed": 0, "activated_unrecorded": 0,
              "failed": 0, **p.rebuilt}
    work = p.work()
    for i in range(0, len(work), ACTIVATE_BATCH):
        batch = work[i:i + ACTIVATE_BATCH]
        active = _activate(service.lvm, [key for key, _ in batch if key in p.inactive])
        for (vg, name), rec in batch:
            try:
                faults.pause("restore.volume")   # tests: a call made while this volume is still to come back
                if rec is None:
                    _activate_unrecorded(service, vg, name, active, counts)
                else:
                    _restore_record(service, p, rec, active, counts)
            finally:
                done(f"{vg}/{name}")
    log.info("restored exports: %s", counts)
    return counts


def restore(service) -> dict[str, int]:
    """The whole start in the caller's thread (the tests', and what start() does with the agent serving)."""
    return finish(service, plan(service))


RESTORING = "being brought back after the agent's start"


class Progress:
    """How many volumes a start still has to bring back: the IDs it still holds in the agent's key locks (the
    start is their only holder by reservation). GetInfo reports it (ready, not_ready_reason)."""

    def __init__(self, locks) -> None:
        self._locks = locks
        self.total = 0

    @property
    def left(self) -> int:
        return self._locks.reserved_count()

    def reason(self) -> str:
        """Why the agent is not ready yet; "" once every volume is back."""
        left = self.left
        return f"restoring exports after the agent's start: {left} of {self.total} volumes left" if left else ""


def start(service, then: tuple[Callable[[], None], ...] = (), fatal: Callable[[], None] | None = None
          ) -> threading.Thread:
    """plan() now, every volume of it held in the agent's key locks; then, in a thread, finish() releasing each
    as it is back, and `then` (work that takes volumes' locks itself: the CHAP rotation, the wiper) once all
    are. An unexpected failure releases every volume and calls `fatal` (the agent exits: kubelet restarts it and
    the start is tried again, as when the whole restore ran before serving)."""
    p = plan(service)
    keys = p.keys()
    service.restoring.total = len(keys)
    service.locks.reserve(keys, RESTORING)

    def run() -> None:
        try:
            finish(service, p, service.locks.release)
            for task in then:
                task()
        except Exception:  # noqa: BLE001 - reported, then the agent's own policy (fatal)
            log.exception("the agent's start failed while it brought its volumes back")
            for key in keys:
                service.locks.release(key)
            if fatal is not None:
                fatal()

    thread = threading.Thread(target=run, name="restore", daemon=True)
    thread.start()
    return thread


def _activate_unrecorded(service, vg: str, name: str, active: set, counts: dict[str, int]) -> None:
    try:
        if (vg, name) not in active:
            service.lvm.activate(vg, name)
        counts["activated_unrecorded"] += 1
    except CommandError:
        log.exception("could not activate %s/%s, whose creation was cut short", vg, name)
        counts["failed"] += 1


def _restore_record(service, p: Plan, rec, active: set, counts: dict[str, int]) -> None:
    lvm, lio = service.lvm, service.lio
    try:
        lv = p.lvs.get((rec.vg, rec.lv))
        if rec.deleting or lv is None:
            service._delete(rec.vg, rec.lv)
            counts["finished_deletes"] += 1
            return
        if rec.state != "ready":
            return   # an unfinished copy is never exported; CreateVolume's retry restarts it
        if not lv.active and (rec.vg, rec.lv) not in active:
            lvm.activate(rec.vg, rec.lv)
        pool = service._pool_of(rec.vg, lv)
        lio.export(rec.target_iqn, rec.lv, lv.path, bool(pool and pool.thin))
        for g in rec.grants.values():
            lio.grant(rec.target_iqn, Access(g.initiator, g.read_only, g.chap_user, g.chap_secret,
                                             g.mutual_user, g.mutual_secret))
        for acl in lio.acls(rec.target_iqn):
            if acl.initiator not in rec.grants:
                lio.revoke(rec.target_iqn, acl.initiator)
                counts["stale_acls_removed"] += 1
        counts["exported"] += 1
    except Exception:  # noqa: BLE001 - one broken volume must not keep the others down
        log.exception("could not restore the export of %s/%s", rec.vg, rec.lv)
        counts["failed"] += 1
