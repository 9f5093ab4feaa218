"""What of this cluster's objects on a storage node no record explains: the leaks users of other drivers
find months later (an LV whose CreateVolume was never retried, a transient snapshot of a clone whose claim
went away, a target or ACL left by hand).

Ownership is decided by exact fields, never by a name prefix (cluster `prod` must not claim the objects of
cluster `prod-eu` on a shared storage node): an LV is ours when its cluster tag equals our cluster id; a
target is ours when its LUN 0 is backed by one of our LVs (or, with no LUN, when its IQN is exactly the one
an LV of ours is exported under); an ACL is ours when its target is. Only objects older than a minimum age
are reported: LVs by LVM's creation time; targets and ACLs, for which LIO keeps no time, by when this agent
first saw them as candidates (persisted in its state directory). Each volume is decided under the same lock
its RPCs take, with its record read again there, so an export or a grant made while a sweep runs is never
taken for a leak.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

from csi import errors, faults, ids
from csi.fsutil import write_atomic
from csi.proto import agent_pb2 as pb
from csi.storage import rebuild, snapshots
from csi.storage.lvm import LogicalVolume

log = logging.getLogger(__name__)

FIRST_SEEN_FILE = "orphans-first-seen.json"


class FirstSeen:
    """When this agent first saw each candidate that LIO keeps no creation time for, by key."""

    def __init__(self, path: Path, now: float):
        self.path, self.now = path, now
        try:
            self._old: dict[str, float] = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            self._old = {}
        self._seen: dict[str, float] = {}

    def age(self, key: str) -> float:
        first = self._seen.setdefault(key, min(self._old.get(key, self.now), self.now))
        return self.now - first

    def save(self) -> None:
        """Keeps only what this sweep saw: an object gone (or no longer a candidate) starts over."""
        if self._seen != self._old:
            write_atomic(self.path, json.dumps(self._seen, sort_keys=True), mode=0o600)


def find(service, min_age: int, remove: bool) -> list[pb.Orphan]:
    with service.locks.hold("orphans"):
        return _Sweep(service, min_age, remove).run()


class _Sweep:
    def __init__(self, service, min_age: int, remove: bool):
        self.service, self.min_age, self.remove = service, min_age, remove
        self.now = time.time()
        self.seen = FirstSeen(service.config.state_dir / FIRST_SEEN_FILE, self.now)
        self.out: list[pb.Orphan] = []
        self.unrebuilt = rebuild.unrebuilt(service)

    def report(self, kind: str, name: str, reason: str, age: float, fix) -> None:
        orphan = pb.Orphan(kind=kind, name=name, reason=reason, age_seconds=int(age) if age >= 0 else -1)
        if self.remove:
            try:
                fix()
                orphan.removed = True
                log.warning("removed orphan %s %s (%s)", kind, name, reason)
            except Exception as exc:  # noqa: BLE001 - one object that cannot go now must not stop the sweep
                log.info("orphan %s %s not removed now: %s", kind, name, getattr(exc, "message", exc))
        self.out.append(orphan)

    def run(self) -> list[pb.Orphan]:
        service = self.service
        lvs: dict[tuple[str, str], LogicalVolume] = {}
        for vg in sorted({p.vg for p in service.config.pools}):
            lvs.update({(vg, lv.name): lv for lv in service.lvm.lvs(vg)})
        volumes = {key: lv for key, lv in lvs.items() if service._ours(lv)}
        by_device = {lv.path: key for key, lv in volumes.items()}
        by_iqn = {ids.target_iqn(*key): key for key in volumes}
        exported: dict[tuple[str, str], list[str]] = {}
        for iqn in service.lio.exported_iqns(ids.IQN_PREFIX):
            device = service.lio.lun_device(iqn)
            key = by_device.get(device) if device else by_iqn.get(iqn)
            if key is not None:
                exported.setdefault(key, []).append(iqn)
            # else: backed by no LV of ours (another cluster's, or nothing this agent can tell): not ours
        faults.pause("orphans.listed")
        for key, lv in sorted(volumes.items()):
            self._volume(lv, exported.get(key, []))
        for key, lv in sorted(lvs.items()):
            if service._ours(lv, "transfer"):
                age = self.now - lv.created if lv.created else -1
                if age >= self.min_age:
                    self.report("transfer-snapshot", f"{lv.vg}/{lv.name}", "a point-in-time copy source nothing "
                                "uses", age, lambda lv=lv: snapshots.delete(service, lv.vg, lv.name))
        self.seen.save()
        return self.out

    def _volume(self, lv: LogicalVolume, iqns: list[str]) -> None:
        """One volume LV of ours and the targets backed by it, decided under the volume's lock."""
        service = self.service
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(service.locks.hold(f"{lv.vg}/{lv.name}"))
            except errors.CsiError:
                return   # a call on this volume is running: nothing of it is an orphan now
            rec = service.records.load(lv.vg, lv.name)
            if rec is not None and not rec.deleting:
                if rec.state == "ready":
                    self._exports(rec, iqns)
                return   # a copy in progress is never exported; its CreateVolume finishes it
            age = self.now - lv.created if lv.created else -1
            if f"{lv.vg}/{lv.name}" in self.unrebuilt:
                self.out.append(pb.Orphan(kind="lv", name=f"{lv.vg}/{lv.name}", age_seconds=int(age), reason=(
                    "a volume whose record was lost with the state directory and could not be rebuilt (see "
                    f"{rebuild.MARKER} there): never removed by cleanup")))
                return
            if age < self.min_age:
                return   # its CreateVolume may still be running (the record comes after the LV)
            for iqn in iqns:
                self._target(iqn, "a target of a volume LV that has no record")
            self.report("lv", f"{lv.vg}/{lv.name}", "a volume LV without a record: its CreateVolume never "
                        "finished", age, lambda: service._delete(lv.vg, lv.name))

    def _exports(self, rec, iqns: list[str]) -> None:
        service = self.service
        for iqn in iqns:
            if iqn != rec.target_iqn:
                self._target(iqn, f"exports {rec.vg}/{rec.lv} under another name than its record's")
                continue
            for acl in service.lio.acls(iqn):
                if acl.initiator in rec.grants:
                    continue
                age = self.seen.age(f"acl {iqn} {acl.initiator}")
                if age >= self.min_age:
                    self.report("acl", f"{iqn} {acl.initiator}", "the volume's record grants this initiator "
                                "nothing", age, lambda iqn=iqn, who=acl.initiator: service.lio.revoke(iqn, who))

    def _target(self, iqn: str, reason: str) -> None:
        age = self.seen.age(f"target {iqn}")
        if age >= self.min_age:
            self.report("target", iqn, reason, age, lambda: self.service.lio.remove_target(iqn))
