"""What of this cluster's objects on a storage node no record explains: the leaks users of other drivers
find months later (an LV whose CreateVolume was never retried, a transient snapshot of a clone whose claim
went away, a target or ACL left by hand). Only objects of this driver's prefix and cluster id, and only
those older than a minimum age, so that a call in flight is never taken for a leak."""

from __future__ import annotations

import logging
import re
import time

from csi import errors, ids
from csi.proto import agent_pb2 as pb

log = logging.getLogger(__name__)


def find(service, min_age: int, remove: bool) -> list[pb.Orphan]:
    cfg = service.config
    now = time.time()
    records = {(r.vg, r.lv): r for r in service.records.all()}
    live = {r.target_iqn: r for r in records.values() if not r.deleting and r.state == "ready"}
    out: list[pb.Orphan] = []

    def report(kind: str, name: str, reason: str, age: float, fix) -> None:
        orphan = pb.Orphan(kind=kind, name=name, reason=reason, age_seconds=int(age) if age >= 0 else -1)
        if remove:
            try:
                fix()
                orphan.removed = True
                log.warning("removed orphan %s %s (%s)", kind, name, reason)
            except errors.CsiError as exc:
                log.info("orphan %s %s not removed now: %s", kind, name, exc.message)
        out.append(orphan)

    vgs = sorted({p.vg for p in cfg.pools})
    for vg in vgs:
        for lv in service.lvm.lvs(vg):
            age = now - lv.created if lv.created else -1
            if age < min_age:
                continue
            if service._ours(lv) and ((vg, lv.name) not in records or records[(vg, lv.name)].deleting):
                report("lv", f"{vg}/{lv.name}", "a volume LV without a record: its CreateVolume never finished",
                       age, lambda vg=vg, name=lv.name: _remove_volume(service, vg, name))
            elif service._ours(lv, "transfer"):
                report("transfer-snapshot", f"{vg}/{lv.name}", "a point-in-time copy source nothing uses", age,
                       lambda vg=vg, name=lv.name: _remove_snapshot(service, vg, name))
    ours = tuple(re.sub(r"[^a-z0-9.-]", "-", f"{vg}.{cfg.cluster_id}-".lower()) for vg in vgs)
    for iqn in service.lio.exported_iqns(ids.IQN_PREFIX):
        if not iqn[len(ids.IQN_PREFIX):].startswith(ours):
            continue   # another cluster's
        rec = live.get(iqn)
        if rec is None:
            if any(r.target_iqn == iqn for r in records.values() if r.state != "ready" or r.deleting):
                continue   # its volume is being created or deleted
            report("target", iqn, "no volume record names this target", -1,
                   lambda iqn=iqn: service.lio.remove_target(iqn))
            continue
        for acl in service.lio.acls(iqn):
            if acl.initiator not in rec.grants:
                report("acl", f"{iqn} {acl.initiator}", "the volume's record grants this initiator nothing", -1,
                       lambda iqn=iqn, who=acl.initiator: service.lio.revoke(iqn, who))
    return out


def _remove_volume(service, vg: str, lv: str) -> None:
    with service.locks.hold(f"{vg}/{lv}"):
        service._delete(vg, lv)


def _remove_snapshot(service, vg: str, lv: str) -> None:
    with service.locks.hold(f"{vg}/{lv}"):
        service.lvm.remove(vg, lv)
