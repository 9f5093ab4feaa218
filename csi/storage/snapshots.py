"""Snapshots on one storage node: thin snapshots kept for users (independent of their source), and the
transient point-in-time sources of a clone ("transfer" snapshots), removed after the copy.

A snapshot has no record: its LV tags (cluster, kind, request name, source LV) are all there is.
"""

from __future__ import annotations

import logging
import time

from csi import capabilities as caps
from csi import errors, faults, ids
from csi.bounded import BoundedMap
from csi.proto import agent_pb2 as pb
from csi.runner import CommandError
from csi.storage import copy, listing, lvm, tags
from csi.storage.lvm import LogicalVolume

log = logging.getLogger(__name__)

KINDS = ("snapshot", "transfer")


COW_FRACTION = 0.25
COW_MIN = 64 << 20


def known() -> BoundedMap[tuple[str, str], LogicalVolume]:
    """The snapshots this agent made or read since it started, by (vg, lv). A thin snapshot's LV never changes
    (nothing writes, grows or retags it), so what a restore needs of it (whose it is, its pool, its size) is
    known without an LVM report, which costs about what the restore's own lvcreate does. DeleteSnapshot forgets
    one; one removed behind the agent's back makes the restore's lvcreate fail, and is forgotten then."""
    return BoundedMap()


def remember(service, lv: LogicalVolume) -> None:
    """Keeps a thin snapshot of this cluster in service.known_snapshots (see known())."""
    if lv.pool and service._ours(lv, "snapshot"):
        service.known_snapshots.remember((lv.vg, lv.name), lv)


def message(lv: LogicalVolume, size: int = 0) -> pb.Snapshot:
    return pb.Snapshot(name=tags.decode_name(lv.tag(tags.NAME) or ""), vg=lv.vg, lv=lv.name,
                       source_vg=lv.vg, source_lv=lv.tag(tags.SOURCE) or "",
                       size_bytes=size or lv.size, created_unix=tags.created(lv), ready=True,
                       source_replicated=lv.tag(tags.LEG) is not None)


def is_split(lv: LogicalVolume) -> bool:
    """A thick transfer snapshot split off its origin (snapshot.split): COW data, no content to copy."""
    return not lv.pool and not lv.origin and lv.tag(tags.KIND) == "transfer"


def is_cow(lv: LogicalVolume) -> bool:
    """A thick COW snapshot (a thin snapshot has a pool; a split one has no origin any more)."""
    return bool(lv.origin) and not lv.pool


def is_snapshot(service, lv: LogicalVolume | None) -> bool:
    return lv is not None and any(service._ours(lv, k) for k in KINDS)


def create(service, request) -> pb.Snapshot:
    name = ids.check_request_name(request.name)
    ids.check_lvm_name(request.source_vg, "source vg")
    ids.check_lvm_name(request.source_lv, "source lv")
    cfg = service.config
    kind = "transfer" if request.transient else "snapshot"
    snap = ids.lv_name(cfg.cluster_id, name, kind="snapshot")
    vg = request.source_vg
    # The source's lock too: no expansion of it between its snapshot and the size this answer gives.
    with service.locks.hold(f"{vg}/{snap}", f"{vg}/{request.source_lv}"):
        # The source's record says where it is and how big; the snapshot's name is checked by lvcreate
        # itself ("already exists"), so a new snapshot costs no LVM report before its lvcreate.
        rec = service.records.load(vg, request.source_lv)
        pool = cfg.pool(rec.pool) if rec is not None and not rec.deleting else None
        if pool is None or pool.vg != vg:
            return _existing(service, vg, snap, kind, request, f"no volume {vg}/{request.source_lv} on "
                                                               f"{cfg.node_name}")
        if not pool.thin:
            if request.transient:
                return _thick_copy_source(service, rec, pool, snap, request, name)
            return _existing(service, vg, snap, kind, request, precondition=(
                f"volume {rec.name!r} is in a thick pool: snapshots need a thin pool (StorageClass "
                "parameter type: thin)"))
        if service.usage(pool).available == 0:
            return _existing(service, vg, snap, kind, request, exhausted=(
                f"thin pool of {pool.name} on {cfg.node_name} is above {pool.max_fill_percent:.0f}% "
                "full: no new snapshots"))
        now = int(time.time())
        lv_tags = [tags.tag("cluster", cfg.cluster_id), tags.tag("kind", kind),
                   tags.tag("name", tags.encode_name(name)), tags.tag("source", request.source_lv),
                   tags.tag("created", str(now))]
        leg = caps.is_replica_leg(rec.attributes)
        if leg:
            lv_tags.append(tags.tag("leg", str(caps.replica_leg(rec.attributes))))
        try:
            service.lvm.snapshot(vg, request.source_lv, snap, lv_tags, activate=False)
        except CommandError as exc:
            if lvm.already_exists(exc):
                return _existing(service, vg, snap, kind, request, "")
            if lvm.is_missing(exc):
                raise errors.not_found(f"no volume {vg}/{request.source_lv} on {cfg.node_name}") from None
            raise
        faults.step("snapshot.lv")
        size = _origin_size(vg, request.source_lv, rec.size)
        service.totals.add(pool, size)
        # No read-back (an LVM report of the VG costs about what the lvcreate did): the answer is all known here,
        # its creation time the tag that retries and ListSnapshots report too.
        remember(service, LogicalVolume(vg, snap, size, tuple(lv_tags), pool.thin_pool, "Vwi---tz-k", created=now))
        return pb.Snapshot(name=name, vg=vg, lv=snap, source_vg=vg, source_lv=request.source_lv,
                           size_bytes=size, created_unix=now, ready=True, source_replicated=leg)


def _origin_size(vg: str, lv: str, recorded: int) -> int:
    """A thin snapshot is its origin's size: the origin's device says it exactly (its record may lag behind an
    expansion cut short between lvextend and the record), without an LVM report; the record's size when the
    origin's device is not there (not active on this node)."""
    try:
        return copy.device_size(f"/dev/{vg}/{lv}")
    except OSError:
        return recorded


def cow_size(volume: int, extent: int) -> int:
    """Copy-on-write space for a thick volume's point-in-time copy source: room for COW_FRACTION of the
    volume to be rewritten while the copy runs (at least COW_MIN, at most the volume: no more is ever
    needed), in whole extents. A copy that meets more writes fails cleanly (RESOURCE_EXHAUSTED) and its
    retry copies from a new point in time."""
    size = min(volume, max(COW_MIN, int(volume * COW_FRACTION)))
    return -(-size // extent) * extent


def _thick_copy_source(service, rec, pool, snap: str, request, name: str) -> pb.Snapshot:
    """A transient COW snapshot of a thick volume, the point in time a clone copies from (as Cinder's
    create_cloned_volume does): a thick volume in use changes under a copy."""
    cfg, vg = service.config, pool.vg
    usage = service.usage(pool)
    size = cow_size(rec.size, usage.extent)
    if size > usage.available:
        return _existing(service, vg, snap, "transfer", request, exhausted=(
            f"volume group {vg} on {cfg.node_name} has {usage.available} bytes free; the point-in-time "
            f"snapshot of {rec.name!r} for its copy needs {size}"))
    lv_tags = [tags.tag("cluster", cfg.cluster_id), tags.tag("kind", "transfer"),
               tags.tag("name", tags.encode_name(name)), tags.tag("source", request.source_lv)]
    for attempt in (1, 2):
        try:
            service.lvm.cow_snapshot(vg, request.source_lv, snap, size, lv_tags)
            break
        except CommandError as exc:
            if lvm.is_missing(exc):
                raise errors.not_found(f"no volume {vg}/{request.source_lv} on {cfg.node_name}") from None
            if not lvm.already_exists(exc):
                raise
            existing = service.lvm.lv(vg, snap)
            if attempt == 2 or existing is None or not is_split(existing) or \
                    not service._ours(existing, "transfer") or existing.tag(tags.SOURCE) != request.source_lv:
                return _existing(service, vg, snap, "transfer", request, "")
            # A drop cut short between its split and its wipe (snapshot.split): no point in time any more.
            # Finish the drop, then make a new one under the name.
            drop_thick(service, existing)
    service.pool_reports.forget(vg)
    faults.step("snapshot.lv")
    created = service.lvm.lv(vg, snap)
    if created is None:
        raise errors.internal(f"lvcreate --snapshot {vg}/{snap} succeeded but the LV is not there")
    log.info("point-in-time snapshot %s/%s of %s with %d bytes of copy-on-write space", vg, snap,
             request.source_lv, size)
    return message(created, size=rec.size)


def _existing(service, vg: str, snap: str, kind: str, request, not_found: str = "", precondition: str = "",
              exhausted: str = "") -> pb.Snapshot:
    """A retried CreateSnapshot finds the snapshot it made (even when its source is gone since, or the
    pool filled up); another request with the same name gets ALREADY_EXISTS; with no snapshot, the
    error the caller names."""
    existing = service.lvm.lv(vg, snap)
    if existing is not None:
        if service._ours(existing, kind) and existing.tag(tags.SOURCE) == request.source_lv:
            if is_split(existing):
                # A drop cut short between its split and its wipe: no point in time any more. Finish the drop;
                # the retry makes a new snapshot.
                drop_thick(service, existing)
                raise errors.aborted(f"the previous point-in-time snapshot {vg}/{snap} was being dropped; retry")
            return message(existing)
        raise errors.exists(f"snapshot {request.name!r} exists with another source")
    if precondition:
        raise errors.precondition(precondition)
    if exhausted:
        raise errors.exhausted(exhausted)
    raise errors.not_found(not_found or f"no volume {vg}/{request.source_lv} on {service.config.node_name}")


def delete(service, vg: str, lv_name: str) -> None:
    with service.locks.hold(f"{vg}/{lv_name}"):
        service.known_snapshots.forget((vg, lv_name))
        lv = service.lvm.lv(vg, lv_name)
        if not is_snapshot(service, lv):
            return
        if lv.pool:
            service.lvm.remove(vg, lv_name)
            service.totals.add(service._pool_of(vg, lv), -lv.size)
            return
        drop_thick(service, lv)


def drop_thick(service, lv: LogicalVolume) -> None:
    """A thick point-in-time snapshot's COW space holds its origin's older data: split off the origin, it
    is zeroed like a deleted thick volume before its extents are freed (wipe.py). The caller holds its lock."""
    if is_cow(lv):
        service.lvm.split_snapshot(lv.vg, lv.name)
        faults.step("snapshot.split")
        lv = service.lvm.lv(lv.vg, lv.name) or lv
    service.wiper.retire(lv.vg, lv)


def get(service, request) -> pb.Snapshot:
    cfg = service.config
    if request.name:
        snap = ids.lv_name(cfg.cluster_id, ids.check_request_name(request.name), kind="snapshot")
        places = [(vg, snap) for vg in sorted({p.vg for p in cfg.pools})]
    else:
        places = [(ids.check_lvm_name(request.vg, "vg"), ids.check_lvm_name(request.lv, "lv"))]
    for vg, lv_name in places:
        lv = service.lvm.lv(vg, lv_name)
        if is_snapshot(service, lv):
            remember(service, lv)
            return message(lv)
    raise errors.not_found(f"no such snapshot on {cfg.node_name}")


def list_page(service, max_entries: int, token: str) -> pb.ListSnapshotsResponse:
    """One page of ListSnapshots (storage/listing.py): the VGs' listing is kept for the walk's later pages."""
    fresh = not token
    snaps = {(vg, lv.name): lv for vg in sorted({p.vg for p in service.config.pools})
             for lv in service.listed.get(vg, fresh) if service._ours(lv, "snapshot")}
    keys, next_token = listing.page(snaps, max_entries, token)
    return pb.ListSnapshotsResponse(snapshots=[message(snaps[k]) for k in keys], next_token=next_token)
