"""The storage agent's gRPC service: cinder-volume's job on one storage node.

Order of side effects, chosen so that a process killed at any point leaves what a retry finishes:
  create:  tagged LV (found again by its deterministic name) -> record -> export
  delete:  record marked deleting -> export removed -> LV wiped (thick) and removed -> record removed
  grant:   record (with the new secret) -> ACL in the kernel
  revoke:  record without the grant -> ACL removed (the kernel ends the sessions)
At start, `restore` brings the kernel back to what the records say.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import string
from dataclasses import dataclass

from csi import errors, ids
from csi.config import AgentConfig, PoolConfig
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.server import KeyLocks
from csi.storage.lio import Access, Lio
from csi.storage.lvm import LogicalVolume, Lvm
from csi.storage.records import Grant, RecordStore, VolumeRecord

log = logging.getLogger(__name__)

API_VERSION = "v1"
AGENT_VERSION = "0.1.0"
CHAP_ALPHABET = string.ascii_letters + string.digits
CHAP_SECRET_LEN = 24  # LIO takes 12 to 255; many initiators want at least 12


def tag(key: str, value: str) -> str:
    return f"{ids.TAG_PREFIX}/{key}={value}"


def attributes_digest(size: int, attributes: dict[str, str]) -> str:
    text = "\n".join([str(size)] + [f"{k}={v}" for k, v in sorted(attributes.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_name(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def new_secret() -> str:
    return "".join(secrets.choice(CHAP_ALPHABET) for _ in range(CHAP_SECRET_LEN))


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


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, config: AgentConfig, lvm: Lvm, lio: Lio, records: RecordStore):
        self.config = config
        self.lvm = lvm
        self.lio = lio
        self.records = records
        self.locks = KeyLocks()

    # ------------------------------------------------------------------------------------ helpers

    def _ours(self, lv: LogicalVolume, kind: str = "volume") -> bool:
        return lv.tag(f"{ids.TAG_PREFIX}/cluster") == self.config.cluster_id and \
            lv.tag(f"{ids.TAG_PREFIX}/kind") == kind

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
        vg = self.lvm.vg(pool.vg)
        if vg is None:
            raise errors.precondition(f"volume group {pool.vg} of pool {pool.name} is missing")
        ours = [lv for lv in self.lvm.lvs(pool.vg) if self._ours(lv) or self._ours(lv, "snapshot")]
        if pool.thin:
            tp = self.lvm.thin_pool(pool.vg, pool.thin_pool)
            if tp is None:
                raise errors.precondition(f"thin pool {pool.vg}/{pool.thin_pool} of pool {pool.name} is missing")
            mine = [lv for lv in ours if lv.pool == pool.thin_pool]
            virtual = sum(lv.size for lv in mine)
            available = max(0, int(tp.size * pool.overprovision_ratio) - virtual)
            if tp.data_percent >= pool.max_fill_percent or tp.metadata_percent >= pool.max_fill_percent:
                available = 0
            used = int(tp.size * tp.data_percent / 100)
            return PoolUsage(pool, vg.extent_size, tp.size, used, available, tp.data_percent, tp.metadata_percent,
                             len(mine))
        mine = [lv for lv in ours if not lv.pool]
        return PoolUsage(pool, vg.extent_size, vg.size, vg.size - vg.free, vg.free,
                         100.0 * (vg.size - vg.free) / vg.size if vg.size else 0.0, 0.0, len(mine))

    def _volume_message(self, rec: VolumeRecord, lv: LogicalVolume | None, exported: bool | None = None) -> pb.Volume:
        if exported is None:
            exported = self.lio.is_exported(rec.target_iqn)
        healthy, condition = True, ""
        if lv is None:
            healthy, condition = False, f"logical volume {rec.vg}/{rec.lv} is missing"
        elif not lv.active:
            healthy, condition = False, f"logical volume {rec.vg}/{rec.lv} is not active"
        elif not exported:
            healthy, condition = False, f"iSCSI target {rec.target_iqn} is not exported"
        return pb.Volume(name=rec.name, pool=rec.pool, vg=rec.vg, lv=rec.lv, size_bytes=lv.size if lv else rec.size,
                         attributes=rec.attributes, target_iqn=rec.target_iqn,
                         initiators=[pb.Initiator(iqn=g.initiator, read_only=g.read_only) for g in rec.grants.values()],
                         exported=exported, created_unix=int(rec.created), healthy=healthy, condition=condition)

    @staticmethod
    def _round(size: int, extent: int) -> int:
        return -(-size // extent) * extent

    # ------------------------------------------------------------------------------------ RPCs

    def GetInfo(self, request, context):
        pools = []
        for p in self.config.pools:
            u = self.usage(p)
            pools.append(pb.Pool(name=p.name, vg=p.vg, thin_pool=p.thin_pool, extent_bytes=u.extent,
                                 physical_total_bytes=u.physical_total, physical_used_bytes=u.physical_used,
                                 overprovision_ratio=p.overprovision_ratio, available_bytes=u.available,
                                 data_percent=u.data_percent, metadata_percent=u.metadata_percent,
                                 max_fill_percent=p.max_fill_percent, warn_fill_percent=p.warn_fill_percent,
                                 volume_count=u.volumes))
        return pb.AgentInfo(node_name=self.config.node_name, api_version=API_VERSION, agent_version=AGENT_VERSION,
                            pools=pools, portals=[str(p) for p in self.config.portals], ready=True)

    def CreateVolume(self, request, context):
        name = ids.check_request_name(request.name)
        pool = self._pool(request.pool)
        if request.size_bytes <= 0:
            raise errors.invalid("size_bytes must be positive")
        attributes = dict(request.attributes)
        lv_name = ids.lv_name(self.config.cluster_id, name)
        with self.locks.hold(f"{pool.vg}/{lv_name}"):
            vg = self.lvm.vg(pool.vg)
            if vg is None:
                raise errors.precondition(f"volume group {pool.vg} of pool {pool.name} is missing")
            size = self._round(request.size_bytes, vg.extent_size)
            digest = attributes_digest(size, attributes)
            lv = self.lvm.lv(pool.vg, lv_name)
            if lv is None:
                usage = self.usage(pool)
                if size > usage.available:
                    raise errors.exhausted(
                        f"pool {pool.name} on {self.config.node_name} has {usage.available} bytes available "
                        f"for new volumes, {size} requested"
                        + (f" (thin pool {usage.data_percent:.0f}% full, limit {pool.max_fill_percent:.0f}%)"
                           if pool.thin and usage.available == 0 else ""))
                tags = [tag("cluster", self.config.cluster_id), tag("kind", "volume"), tag("name", encode_name(name)),
                        tag("request", digest)]
                self.lvm.create(pool.vg, lv_name, size, tags, pool.thin_pool)
                lv = self.lvm.lv(pool.vg, lv_name)
                if lv is None:
                    raise errors.internal(f"lvcreate {pool.vg}/{lv_name} succeeded but the LV is not there")
            elif not self._ours(lv) or lv.tag(f"{ids.TAG_PREFIX}/request") != digest or \
                    (lv.pool or "") != pool.thin_pool:
                raise errors.exists(f"volume {name!r} exists with another size, pool or capabilities")
            rec = self.records.load(pool.vg, lv_name)
            if rec is None or rec.deleting:
                if rec is not None and rec.deleting:
                    raise errors.aborted(f"volume {name!r} is being deleted")
                rec = VolumeRecord(name=name, pool=pool.name, vg=pool.vg, lv=lv_name, size=lv.size,
                                   attributes=attributes, target_iqn=ids.target_iqn(pool.vg, lv_name))
                self.records.save(rec)
            if not lv.active:
                self.lvm.activate(pool.vg, lv_name)
            self.lio.export(rec.target_iqn, lv_name, lv.path, pool.thin)
            return self._volume_message(rec, lv, exported=True)

    def DeleteVolume(self, request, context):
        vg, lv_name = request.vg, request.lv
        ids.check_lvm_name(vg, "vg")
        ids.check_lvm_name(lv_name, "lv")
        with self.locks.hold(f"{vg}/{lv_name}"):
            self._delete(vg, lv_name)
        return pb.DeleteVolumeResponse()

    def _delete(self, vg: str, lv_name: str) -> None:
        rec = self.records.load(vg, lv_name)
        lv = self.lvm.lv(vg, lv_name)
        if lv is not None and not self._ours(lv):
            if rec is None:
                log.warning("not deleting %s/%s: not a volume of cluster %s", vg, lv_name, self.config.cluster_id)
                return
        if rec is not None and not rec.deleting:
            rec.deleting = True
            self.records.save(rec)
        self.lio.unexport(ids.target_iqn(vg, lv_name), lv_name)
        if lv is not None and self._ours(lv):
            pool = self._pool_of(vg, lv)
            if not lv.pool and self.config.wipe_thick and (rec is None or rec.attributes.get("wipe") != "false"):
                if not lv.active:
                    self.lvm.activate(vg, lv_name)
                log.info("zeroing thick volume %s/%s before removal", vg, lv_name)
                self.lvm.zero_out(lv.path)
            self.lvm.remove(vg, lv_name)
            log.info("deleted %s/%s (pool %s)", vg, lv_name, pool.name if pool else "?")
        self.records.delete(vg, lv_name)

    def GetVolume(self, request, context):
        if request.name:
            name = ids.check_request_name(request.name)
            lv_name = ids.lv_name(self.config.cluster_id, name)
            for vg in sorted({p.vg for p in self.config.pools}):
                rec = self.records.load(vg, lv_name)
                lv = self.lvm.lv(vg, lv_name)
                if lv is not None and self._ours(lv):
                    if rec is None or rec.deleting:
                        # An LV whose record is missing was cut short in CreateVolume: the retry finishes it.
                        return pb.Volume(name=name, vg=vg, lv=lv_name, size_bytes=lv.size, healthy=False,
                                         condition="creation not finished", pool=(self._pool_of(vg, lv) or
                                                                                 PoolConfig("", vg)).name)
                    return self._volume_message(rec, lv)
            raise errors.not_found(f"no volume named {name!r} on {self.config.node_name}")
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        rec = self.records.load(request.vg, request.lv)
        if rec is None or rec.deleting:
            raise errors.not_found(f"no volume {request.vg}/{request.lv} on {self.config.node_name}")
        return self._volume_message(rec, self.lvm.lv(request.vg, request.lv))

    def ListVolumes(self, request, context):
        # One lvs per VG, not one per volume: ListVolumes must cost the same per volume at any count.
        lvs = {}
        for vg in sorted({p.vg for p in self.config.pools}):
            lvs.update({(vg, lv.name): lv for lv in self.lvm.lvs(vg) if self._ours(lv)})
        exported = set(self.lio.exported_iqns(ids.IQN_PREFIX))
        out = [self._volume_message(rec, lvs.get((rec.vg, rec.lv)), exported=rec.target_iqn in exported)
               for rec in self.records.all() if not rec.deleting]
        return pb.ListVolumesResponse(volumes=out)

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
            if size > lv.size:
                if size - lv.size > usage.available:
                    raise errors.exhausted(f"pool {pool.name} on {self.config.node_name} has {usage.available} "
                                           f"bytes available, growing needs {size - lv.size}")
                self.lvm.extend(request.vg, request.lv, size)
                lv = self.lvm.lv(request.vg, request.lv)
                rec.size = lv.size if lv else size
                self.records.save(rec)
            return self._volume_message(rec, lv)

    def GrantAccess(self, request, context):
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        if not ids.is_iqn(request.initiator_iqn):
            raise errors.invalid(f"initiator {request.initiator_iqn!r} is not an iSCSI qualified name")
        with self.locks.hold(f"{request.vg}/{request.lv}"):
            rec = self.records.load(request.vg, request.lv)
            lv = self.lvm.lv(request.vg, request.lv)
            if rec is None or rec.deleting or lv is None:
                raise errors.not_found(f"no volume {request.vg}/{request.lv} on {self.config.node_name}")
            grant = rec.grants.get(request.initiator_iqn)
            wanted_mutual = request.mutual_chap
            if grant is None or grant.read_only != request.read_only or bool(grant.mutual_user) != wanted_mutual:
                user = "u" + hashlib.sha256(f"{rec.lv}\0{request.initiator_iqn}".encode()).hexdigest()[:15]
                grant = Grant(initiator=request.initiator_iqn, read_only=request.read_only,
                              chap_user=grant.chap_user if grant else user,
                              chap_secret=grant.chap_secret if grant else new_secret(),
                              mutual_user=("t" + user[1:]) if wanted_mutual else "",
                              mutual_secret=((grant.mutual_secret if grant and grant.mutual_secret else new_secret())
                                             if wanted_mutual else ""))
                rec.grants[request.initiator_iqn] = grant
                self.records.save(rec)
            if not lv.active:
                self.lvm.activate(request.vg, request.lv)
            pool = self._pool_of(request.vg, lv)
            self.lio.export(rec.target_iqn, rec.lv, lv.path, bool(pool and pool.thin))
            self.lio.grant(rec.target_iqn, Access(grant.initiator, grant.read_only, grant.chap_user,
                                                  grant.chap_secret, grant.mutual_user, grant.mutual_secret))
            return pb.GrantAccessResponse(target_iqn=rec.target_iqn, portals=[str(p) for p in self.config.portals],
                                          lun=0, chap_user=grant.chap_user, chap_secret=grant.chap_secret,
                                          mutual_chap_user=grant.mutual_user, mutual_chap_secret=grant.mutual_secret)

    def RevokeAccess(self, request, context):
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        with self.locks.hold(f"{request.vg}/{request.lv}"):
            rec = self.records.load(request.vg, request.lv)
            if rec is not None and rec.grants.pop(request.initiator_iqn, None) is not None:
                self.records.save(rec)
            ended = self.lio.revoke(ids.target_iqn(request.vg, request.lv), request.initiator_iqn)
            return pb.RevokeAccessResponse(sessions_ended=ended)

    # ------------------------------------------------------------------------------------ start-up

    def restore(self) -> dict[str, int]:
        """Brings the kernel back to what the records say: exports and ACLs re-created, deletions that
        were cut short finished, ACLs that no record holds removed."""
        counts = {"exported": 0, "finished_deletes": 0, "stale_acls_removed": 0, "failed": 0}
        for pool in self.config.pools:
            state = self.lvm.thin_pool(pool.vg, pool.thin_pool) if pool.thin else None
            if state is not None and not state.zeroing:
                log.warning("thin pool %s/%s did not zero new blocks; turning zeroing on so no tenant reads "
                            "another's old data", pool.vg, pool.thin_pool)
                self.lvm.set_zeroing(pool.vg, pool.thin_pool)
        for rec in self.records.all():
            try:
                lv = self.lvm.lv(rec.vg, rec.lv)
                if rec.deleting or lv is None:
                    self._delete(rec.vg, rec.lv)
                    counts["finished_deletes"] += 1
                    continue
                if not lv.active:
                    self.lvm.activate(rec.vg, rec.lv)
                pool = self._pool_of(rec.vg, lv)
                self.lio.export(rec.target_iqn, rec.lv, lv.path, bool(pool and pool.thin))
                for g in rec.grants.values():
                    self.lio.grant(rec.target_iqn, Access(g.initiator, g.read_only, g.chap_user, g.chap_secret,
                                                          g.mutual_user, g.mutual_secret))
                for acl in self.lio.acls(rec.target_iqn):
                    if acl.initiator not in rec.grants:
                        self.lio.revoke(rec.target_iqn, acl.initiator)
                        counts["stale_acls_removed"] += 1
                counts["exported"] += 1
            except Exception:  # noqa: BLE001 - one broken volume must not keep the others down
                log.exception("could not restore the export of %s/%s", rec.vg, rec.lv)
                counts["failed"] += 1
        log.info("restored exports: %s", counts)
        return counts
