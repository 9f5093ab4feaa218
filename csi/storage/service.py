"""The storage agent's gRPC service: cinder-volume's job on one storage node.

Order of side effects, chosen so that a process killed at any point leaves what a retry finishes:
  create:  tagged LV (found again by its deterministic name) -> record -> export
  delete:  record marked deleting -> every grant revoked -> export removed -> LV removed, or (thick, wiped)
           renamed out of the volume namespace and queued for zeroing (wipe.py) -> record removed
  grant:   record (with the new secret) -> ACL in the kernel
  revoke:  record without the grant -> ACL removed (the kernel ends the sessions)
At start, `restore` brings the kernel back to what the records say, each volume's calls held off until it is.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from csi import capabilities as caps
from csi import errors, faults, ids, peers
from csi.config import AgentConfig, PoolConfig
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.runner import CommandError
from csi.server import KeyLocks
from csi.storage import (access, authz, capacity, copy, listing, lvm, orphans, replica_legs, restore, snapshots,
                         tags, transfer, wipe)
from csi.storage.capacity import PoolReports, PoolTotals, PoolUsage
from csi.storage.lio import Lio
from csi.storage.lvm import LogicalVolume, Lvm
from csi.storage.records import RecordStore, VolumeRecord
from csi.storage.tags import attributes_digest, encode_name, tag

log = logging.getLogger(__name__)

API_VERSION = "v1"
AGENT_VERSION = "0.1.0"
class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, config: AgentConfig, lvm: Lvm, lio: Lio, records: RecordStore,
                 device_node_exists: Callable[[str], bool] = os.path.exists):
        self.config = config
        # /dev/<vg>/<lv> is there exactly while the LV is active (LVM makes it: udev_rules = 0). The unit tests
        # pass their simulated LVM's answer.
        self.device_node_exists = device_node_exists
        self.lvm = lvm
        self.lio = lio
        self.records = records
        self.peer_legs = replica_legs.PeerLegs(config.state_dir / "peer-legs")
        self.locks = KeyLocks()
        self.copies = copy.CopyJobs()
        self.known_snapshots = snapshots.known()
        self.totals = PoolTotals(self)
        self.pool_reports = PoolReports(lvm)
        self.wiper = wipe.Wiper(self, config.state_dir)
        self.listed = listing.RecentListing(lvm.lvs)
        self.restoring = restore.Progress(self.locks)    # volumes the agent's start has not brought back yet
        # Who may call what (authz.py): the server asks it before every call; AllowCopy adds to it.
        self.authorizer = authz.Authorizer(config.node_name)

    # ------------------------------------------------------------------------------------ helpers

    def _ours(self, lv: LogicalVolume, kind: str = "volume") -> bool:
        return tags.is_ours(lv, self.config.cluster_id, kind)

    def _pool(self, name: str) -> PoolConfig:
        pool = self.config.pool(name)
        if pool is None:
            raise errors.invalid(f"storage node {self.config.node_name} has no pool {name!r}; "
                                 f"it has {', '.join(p.name for p in self.config.pools)}")
        return pool

    def _pool_of(self, vg: str, lv: LogicalVolume | None) -> PoolConfig | None:
        for p in self.config.pools:
            if p.vg == vg and (lv is None or (lv.pool or "") == p.thin_pool):
                return p
        return None

    def usage(self, pool: PoolConfig) -> PoolUsage:
        return capacity.usage(self, pool)

    def _volume_message(self, rec: VolumeRecord, lv: LogicalVolume | None, exported: bool | None = None) -> pb.Volume:
        if exported is None:
            exported = self.lio.is_exported(rec.target_iqn)
        healthy, reason, condition, copying = True, "", "", False
        if rec.state == "copying":
            p = self.copies.progress(f"{rec.vg}/{rec.lv}")
            healthy, copying = False, p is not None
            reason = "ContentBeingCopied" if p else "CopyNotFinished"
            condition = f"content being copied: {p.percent:.0f}%" if p else "copy not finished"
        elif lv is None:
            healthy, reason, condition = False, "LogicalVolumeMissing", f"logical volume {rec.vg}/{rec.lv} is missing"
        elif not (lv.active and exported) and self.locks.reserved(f"{rec.vg}/{rec.lv}"):
            healthy, reason, condition = (False, "ExportBeingRestored",
                                          f"iSCSI target {rec.target_iqn} is {restore.RESTORING}")
        elif not lv.active:
            healthy, reason, condition = (False, "LogicalVolumeInactive",
                                          f"logical volume {rec.vg}/{rec.lv} is not active")
        elif not exported:
            healthy, reason, condition = False, "TargetNotExported", f"iSCSI target {rec.target_iqn} is not exported"
        msg = self._record_message(rec)
        if lv is not None:
            msg.size_bytes = lv.size
        msg.exported, msg.healthy, msg.condition, msg.copy_running = exported, healthy, condition, copying
        msg.condition_reason = reason
        return msg

    @staticmethod
    def _record_message(rec: VolumeRecord) -> pb.Volume:
        """What the record alone says: no LVM report, no look at the kernel (health left unset)."""
        return pb.Volume(name=rec.name, pool=rec.pool, vg=rec.vg, lv=rec.lv, size_bytes=rec.size,
                         attributes=rec.attributes, target_iqn=rec.target_iqn,
                         initiators=[pb.Initiator(iqn=g.initiator, read_only=g.read_only, node=g.node)
                                     for g in rec.grants.values()],
                         created_unix=int(rec.created), ready=rec.state == "ready")

    @staticmethod
    def _round(size: int, extent: int) -> int:
        return -(-size // extent) * extent

    # ------------------------------------------------------------------------------------ RPCs

    def GetInfo(self, request, context):
        pools = []
        for p in self.config.pools:
            try:
                u = self.usage(p)
            except errors.CsiError as exc:
                if exc.code != errors.Code.FAILED_PRECONDITION:
                    raise
                # Every storage node gets the same pool definitions; a VG or thin pool that this node lacks
                # makes that pool absent here, not the node down.
                log.debug("pool %s is not on this node: %s", p.name, exc.message)
                continue
            backlog = self.wiper.backlog(p.vg) if not p.thin else wipe.Backlog(0, 0, "")
            pools.append(pb.Pool(name=p.name, vg=p.vg, thin_pool=p.thin_pool, extent_bytes=u.extent,
                                 physical_total_bytes=u.physical_total, physical_used_bytes=u.physical_used,
                                 overprovision_ratio=p.overprovision_ratio, available_bytes=u.available,
                                 data_percent=u.data_percent, metadata_percent=u.metadata_percent,
                                 max_fill_percent=p.max_fill_percent, warn_fill_percent=p.warn_fill_percent,
                                 volume_count=u.volumes, wiping_volumes=backlog.volumes,
                                 wiping_bytes=backlog.bytes_left, wipe_error=backlog.error))
        not_ready = self.restoring.reason()
        return pb.AgentInfo(node_name=self.config.node_name, api_version=API_VERSION, agent_version=AGENT_VERSION,
                            pools=pools, portals=[str(p) for p in self.config.portals], ready=not not_ready,
                            not_ready_reason=not_ready, features=transfer.FEATURES)

    def CreateVolume(self, request, context):
        name = ids.check_request_name(request.name)
        pool = self._pool(request.pool)
        if request.size_bytes <= 0:
            raise errors.invalid("size_bytes must be positive")
        attributes = dict(request.attributes)
        source = request.source if request.HasField("source") else None
        if source is not None:
            ids.check_lvm_name(source.vg, "source vg")
            ids.check_lvm_name(source.lv, "source lv")
            transfer.check_offset(source.offset_bytes)
        lv_name = ids.lv_name(self.config.cluster_id, name)
        with self.locks.hold(f"{pool.vg}/{lv_name}"):
            # An LV's size is a whole number of extents, so comparing it with the unrounded size is the same
            # as comparing with the rounded one: an existing volume costs no report of the VG.
            size = max(request.size_bytes, source.size_bytes if source else 0)
            digest = attributes_digest(attributes)
            lv = None
            if self._may_exist(pool.vg, lv_name):
                lv = self.lvm.lv(pool.vg, lv_name)
            if lv is None:
                try:
                    lv = self._create_lv(name, pool, lv_name, size, digest, source, attributes)
                except CommandError as exc:
                    # lvcreate is the atomic check: an LV that neither a record nor a device node showed
                    # (deactivated by hand) is compared below like any existing one.
                    if not lvm.already_exists(exc):
                        raise
                    lv = self.lvm.lv(pool.vg, lv_name)
                    if lv is None:
                        raise
            if not self._ours(lv) or lv.tag(tags.REQUEST) not in tags.request_digests(attributes) or \
                    (lv.pool or "") != pool.thin_pool or lv.size < size:
                raise errors.exists(f"volume {name!r} exists with another size, pool, source or capabilities")
            rec = self.records.load(pool.vg, lv_name)
            if rec is not None and rec.deleting:
                raise errors.aborted(f"volume {name!r} is being deleted")
            if rec is not None and rec.attributes != attributes:
                rec.attributes = attributes     # the same request in today's encoding (see request_digests)
                self.records.save(rec)
            if rec is None:
                copying = lv.tag(f"{ids.TAG_PREFIX}/content") == "copy"
                rec = VolumeRecord(name=name, pool=pool.name, vg=pool.vg, lv=lv_name, size=lv.size,
                                   attributes=attributes, target_iqn=ids.target_iqn(pool.vg, lv_name),
                                   state="copying" if copying else "ready",
                                   source=transfer.source_dict(source) if copying and source else {})
                self.records.save(rec)
                faults.step("create.record")
            if not lv.active:
                self.lvm.activate(pool.vg, lv_name)
            if rec.state == "copying":
                rec = transfer.finish(self, rec, lv, pool)
            self.lio.export(rec.target_iqn, lv_name, lv.path, pool.thin)
            faults.step("create.export")
            return self._volume_message(rec, lv, exported=True)

    def _create_lv(self, name: str, pool: PoolConfig, lv_name: str, size: int, digest: str, source,
                   attributes: dict[str, str]) -> LogicalVolume:
        usage = self.usage(pool)
        size = self._round(size, usage.extent)
        if size > usage.available:
            raise errors.exhausted(
                f"pool {pool.name} on {self.config.node_name} has {usage.available} bytes available "
                f"for new volumes, {size} requested"
                + (f" (thin pool {usage.data_percent:.0f}% full, limit {pool.max_fill_percent:.0f}%)"
                   if pool.thin and usage.available == 0 else ""))
        lv_tags = [tag("cluster", self.config.cluster_id), tag("kind", "volume"), tag("name", encode_name(name)),
                   tag("request", digest)]
        attrs = tags.attributes_tag(attributes)
        if attrs:
            lv_tags.append(attrs)   # rebuilds the record if the state directory is lost (rebuild.py)
        src_lv = None
        if source is not None and source.node == self.config.node_name:
            src_lv = (self.known_snapshots.get((source.vg, source.lv)) if source.snapshot else None) or \
                self.lvm.lv(source.vg, source.lv)
            if src_lv is None or not (self._ours(src_lv) or self._ours(src_lv, "snapshot") or
                                      self._ours(src_lv, "transfer")):
                raise errors.not_found(f"source {source.vg}/{source.lv} is not on {self.config.node_name}")
            if source.snapshot:
                snapshots.remember(self, src_lv)
        if src_lv is not None and pool.thin and src_lv.pool == pool.thin_pool and source.vg == pool.vg and \
                not source.offset_bytes:
            # Same thin pool: a thin snapshot of the source is the new volume, at once and independent of it.
            try:
                self.lvm.snapshot(pool.vg, source.lv, lv_name, lv_tags, activate=True)
            except CommandError as exc:
                if not lvm.is_missing(exc):
                    raise
                self.known_snapshots.forget((source.vg, source.lv))
                raise errors.not_found(f"source {source.vg}/{source.lv} is not on {self.config.node_name}") from None
            faults.step("create.lv")
            # A thin snapshot is its origin's size; grown when more was asked. lvcreate and lvextend exited 0,
            # so the LV is what their arguments said, as for a new LV below.
            if src_lv.size < size:
                self.lvm.extend(pool.vg, lv_name, size)
            lv = LogicalVolume(pool.vg, lv_name, max(src_lv.size, size), tuple(lv_tags), pool.thin_pool,
                               "Vwi-a-tz--", created=time.time())
        else:
            if source is not None:
                lv_tags.append(tag("content", "copy"))   # its content is copied in: see transfer.py
            self.lvm.create(pool.vg, lv_name, size, lv_tags, pool.thin_pool)
            if not pool.thin:
                self.pool_reports.forget(pool.vg)
            faults.step("create.lv")
            # lvcreate exited 0, so the LV is what its arguments said: active, exactly `size` bytes (a whole
            # number of extents), these tags. Describing it from them saves a report that grows with the VG.
            lv = LogicalVolume(pool.vg, lv_name, size, tuple(lv_tags), pool.thin_pool,
                               "Vwi-a-tz--" if pool.thin else "-wi-a-----", created=time.time())
        self.totals.add(pool, lv.size, 1)
        return lv

    def ReadData(self, request, context):
        yield from transfer.read_data(self, request)

    def DeleteVolume(self, request, context):
        vg, lv_name = request.vg, request.lv
        ids.check_lvm_name(vg, "vg")
        ids.check_lvm_name(lv_name, "lv")
        with self.locks.hold(f"{vg}/{lv_name}"):
            self._delete(vg, lv_name)
        return pb.DeleteVolumeResponse()

    def _delete(self, vg: str, lv_name: str) -> None:
        if vg not in {p.vg for p in self.config.pools}:
            return   # not a VG of this agent: nothing of ours can be there (and a backstore of that name is
            #          another volume's)
        rec = self.records.load(vg, lv_name)
        lv = self.lvm.lv(vg, lv_name)
        if lv is not None and not self._ours(lv):
            if rec is None:
                log.warning("not deleting %s/%s: not a volume of cluster %s", vg, lv_name, self.config.cluster_id)
                return
        if rec is not None and not rec.deleting:
            rec.deleting = True
            self.records.save(rec)
            faults.step("delete.marked")
        self._fence_all(vg, lv_name, rec)
        self.lio.unexport(ids.target_iqn(vg, lv_name), lv_name)
        faults.step("delete.unexported")
        if lv is not None and self._ours(lv):
            pool = self._pool_of(vg, lv)
            if lv.attr.startswith("o"):
                self._drop_copy_sources(vg, lv_name)
            if not lv.pool and self._wipes(rec):
                self.wiper.retire(vg, lv)    # zeroed in the background, removed after
            else:
                self.lvm.remove(vg, lv_name)
                if not lv.pool:
                    self.pool_reports.forget(vg)
                faults.step("delete.lv")
            self.totals.add(pool, -lv.size, -1)
            log.info("deleted %s/%s (pool %s)", vg, lv_name, pool.name if pool else "?")
        self.records.delete(vg, lv_name)
        self.peer_legs.delete(vg, lv_name)

    def _drop_copy_sources(self, vg: str, lv_name: str) -> None:
        """A thick volume being deleted may be the origin of point-in-time snapshots of clones (their copy
        would fail now anyway): each is split off and wiped first, never removed with its origin unwiped."""
        for snap in self.lvm.lvs(vg):
            if snap.origin == lv_name and snapshots.is_snapshot(self, snap) and snapshots.is_cow(snap):
                log.warning("deleting %s/%s: dropping its point-in-time snapshot %s first", vg, lv_name, snap.name)
                with self.locks.hold(f"{vg}/{snap.name}"):
                    snapshots.drop_thick(self, snap)

    def _wipes(self, rec: VolumeRecord | None) -> bool:
        """Whether a deleted thick volume is zeroed: its class's wipe parameter, else the agent's wipeThick."""
        wanted = rec.attributes.get("wipe", "") if rec is not None else ""
        if wanted == caps.WIPE_OFF:
            return False
        return wanted == caps.WIPE_ON or self.config.wipe_thick

    def _fence_all(self, vg: str, lv_name: str, rec: VolumeRecord | None) -> None:
        """Revokes every grant still on a volume being deleted, each on its own, so the kernel ends each
        initiator's sessions before the target and the LV go. In Kubernetes such a grant is stale (the
        provisioner deletes only after every VolumeAttachment is gone); csi-sanity deletes published volumes
        and expects success, so this warns and goes on."""
        iqn = ids.target_iqn(vg, lv_name)
        granted = set(rec.grants) if rec is not None else set()
        initiators = sorted(granted | {acl.initiator for acl in self.lio.acls(iqn)})
        if not initiators:
            return
        log.warning("deleting %s/%s, still granted to %s: revoking first (their sessions end)", vg, lv_name,
                    ", ".join(initiators))
        for initiator in initiators:
            self.lio.revoke(iqn, initiator)
        faults.step("delete.revoked")

    def GetVolume(self, request, context):
        if request.name:
            name = ids.check_request_name(request.name)
            lv_name = ids.lv_name(self.config.cluster_id, name)
            for vg in sorted({p.vg for p in self.config.pools}):
                rec = self.records.load(vg, lv_name)
                if rec is None and not self._may_exist(vg, lv_name):
                    continue
                lv = self.lvm.lv(vg, lv_name)
                if lv is not None and self._ours(lv):
                    if rec is None or rec.deleting:
                        # An LV whose record is missing was cut short in CreateVolume: the retry finishes it.
                        return pb.Volume(name=name, vg=vg, lv=lv_name, size_bytes=lv.size, healthy=False,
                                         condition="creation not finished",
                                         condition_reason="CreationNotFinished", pool=(self._pool_of(vg, lv) or
                                                                                 PoolConfig("", vg)).name)
                    return self._volume_message(rec, lv)
            raise errors.not_found(f"no volume named {name!r} on {self.config.node_name}")
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        rec = self.records.load(request.vg, request.lv)
        if rec is None or rec.deleting:
            raise errors.not_found(f"no volume {request.vg}/{request.lv} on {self.config.node_name}")
        if request.brief:
            return self._record_message(rec)
        return self._volume_message(rec, self.lvm.lv(request.vg, request.lv))

    def ListVolumes(self, request, context):
        keys, next_token = listing.page(self.records.keys(), request.max_entries, request.starting_token)
        fresh = not request.starting_token   # a walk through the pages takes one LVM listing per VG
        lvs = {}
        for vg in sorted({vg for vg, _ in keys}):
            lvs.update({(vg, lv.name): lv for lv in self.listed.get(vg, fresh) if self._ours(lv)})
        exported = set(self.lio.exported_iqns(ids.IQN_PREFIX))
        out = []
        for vg, lv in keys:
            rec = self.records.load(vg, lv)
            if rec is not None and not rec.deleting:
                out.append(self._volume_message(rec, lvs.get((vg, lv)), exported=rec.target_iqn in exported))
        return pb.ListVolumesResponse(volumes=out, next_token=next_token)

    def ExpandVolume(self, request, context):
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        with self.locks.hold(f"{request.vg}/{request.lv}"):
            rec = self.records.load(request.vg, request.lv)
            lv = self.lvm.lv(request.vg, request.lv)
            if rec is None or rec.deleting or lv is None:
                raise errors.not_found(f"no volume {request.vg}/{request.lv} on {self.config.node_name}")
            pool = self._pool(rec.pool)
            usage = self.usage(pool)
            size = self._round(request.size_bytes, usage.extent)
            if request.limit_bytes and size > request.limit_bytes:
                raise errors.out_of_range(f"{request.size_bytes} bytes rounded up to the extent size is {size}, "
                                          f"above limit_bytes {request.limit_bytes}")
            if size < lv.size:
                raise errors.out_of_range(f"volume {rec.name!r} is {lv.size} bytes; shrinking to {size} is not "
                                          "supported")
            if size > lv.size:
                if size - lv.size > usage.available:
                    raise errors.exhausted(f"pool {pool.name} on {self.config.node_name} has {usage.available} "
                                           f"bytes available, growing needs {size - lv.size}")
                self.lvm.extend(request.vg, request.lv, size)
                if not lv.pool:
                    self.pool_reports.forget(request.vg)
                faults.step("expand.lv")
                self.totals.add(pool, size - lv.size)
                lv = self.lvm.lv(request.vg, request.lv)
                rec.size = lv.size if lv else size
                self.records.save(rec)
            return self._volume_message(rec, lv)

    def GrantAccess(self, request, context):
        return access.grant(self, request)

    def GetCredentials(self, request, context):
        return access.credentials(self, request, peers.peer_of(context))

    def AllowCopy(self, request, context):
        return access.allow_copy(self, request)

    def _may_exist(self, vg: str, lv_name: str) -> bool:
        """Whether an LV with no record might exist: only if its device node does. Every LV of ours is active
        (lvcreate activates it, restore() activates the ones whose creation was cut short), so a create or a
        look-up by name of a new volume costs no LVM report, a cost that grows with the VG."""
        return self.device_node_exists(f"/dev/{vg}/{lv_name}")

    def _active_device(self, rec: VolumeRecord) -> str:
        """The volume's device, activating the LV if it is not. The device node is there exactly while the LV
        is active (LVM makes it: udev_rules = 0), so the common case costs no LVM report."""
        path = f"/dev/{rec.vg}/{rec.lv}"
        if self.device_node_exists(path):
            return path
        lv = self.lvm.lv(rec.vg, rec.lv)
        if lv is None:
            raise errors.not_found(f"no volume {rec.vg}/{rec.lv} on {self.config.node_name}")
        if not lv.active:
            self.lvm.activate(rec.vg, rec.lv)
        return lv.path

    def RevokeAccess(self, request, context):
        return access.revoke(self, request)

    # ------------------------------------------------------------------------------------ snapshots

    def CreateSnapshot(self, request, context):
        return snapshots.create(self, request)

    def DeleteSnapshot(self, request, context):
        snapshots.delete(self, ids.check_lvm_name(request.vg, "vg"), ids.check_lvm_name(request.lv, "lv"))
        return pb.DeleteSnapshotResponse()

    def GetSnapshot(self, request, context):
        return snapshots.get(self, request)

    def ListSnapshots(self, request, context):
        return snapshots.list_page(self, request.max_entries, request.starting_token)

    def ExamineLeg(self, request, context):
        return replica_legs.examine(self, request)

    def SetPeerLeg(self, request, context):
        return replica_legs.set_peer(self, request)

    def GetPeerLeg(self, request, context):
        return replica_legs.peer(self, request, peers.peer_of(context))

    def Orphans(self, request, context):
        if request.min_age_seconds < 0:
            raise errors.invalid("min_age_seconds must not be negative")
        return pb.OrphansResponse(orphans=orphans.find(self, request.min_age_seconds, request.remove))

    # ------------------------------------------------------------------------------------ start-up

    def restore(self) -> dict[str, int]:
        """Brings the kernel back to what the records say (see restore.py), before returning."""
        return restore.restore(self)

    def start_restore(self, then=(), fatal=None):
        """The same while the agent serves: each volume's calls wait (ABORTED) only until it is back."""
        return restore.start(self, then, fatal)
