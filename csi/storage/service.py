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
import dataclasses
import hashlib
import logging
import os
import secrets
import string
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable

import grpc

from csi import errors, faults, ids, runner
from csi.config import AgentConfig, PoolConfig
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.server import KeyLocks, TlsFiles
from csi.runner import CommandError
from csi.storage import copy, lvm, orphans
from csi.storage.lio import Access, Lio
from csi.storage.lvm import LogicalVolume, Lvm, ThinPoolState, VolumeGroup
from csi.storage.records import Grant, RecordStore, VolumeRecord

log = logging.getLogger(__name__)

API_VERSION = "v1"
AGENT_VERSION = "0.1.0"
CHAP_ALPHABET = string.ascii_letters + string.digits
POOL_REPORT_TTL = 5.0
VG_REPORT_TTL = 60.0
CHAP_SECRET_LEN = 24  # LIO takes 12 to 255; many initiators want at least 12


def tag(key: str, value: str) -> str:
    return f"{ids.TAG_PREFIX}/{key}={value}"


def attributes_digest(attributes: dict[str, str]) -> str:
    # The size is not part of it: a retry with another but compatible capacity range gets the volume.
    text = "\n".join(f"{k}={v}" for k, v in sorted(attributes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_name(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _source_dict(source) -> dict:
    return {"node": source.node, "address": source.address, "vg": source.vg, "lv": source.lv,
            "snapshot": source.snapshot, "size": source.size_bytes}


def _decode_name(encoded: str) -> str:
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode(errors="replace")


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


TOTALS_TTL = 60.0


@dataclass
class Totals:
    virtual: int = 0      # sum of the sizes of every thin LV in the pool (any owner: all of them use it)
    volumes: int = 0      # this cluster's volumes in the pool
    at: float = 0.0


class PoolTotals:
    """Per-pool LV totals without listing every LV on every call (see AgentService.usage)."""

    def __init__(self, service: "AgentService"):
        self._service = service
        self._totals: dict[str, Totals] = {}
        self._mutex = threading.Lock()

    def get(self, pool: PoolConfig) -> Totals:
        with self._mutex:
            t = self._totals.get(pool.name)
            if t is not None and time.monotonic() - t.at < TOTALS_TTL:
                return Totals(t.virtual, t.volumes, t.at)
        # One listing of the VG recounts every pool in it (a thin and a thick pool often share one).
        lvs = self._service.lvm.lvs(pool.vg)
        now = time.monotonic()
        counted = {p.name: self._count(p, lvs, now) for p in self._service.config.pools if p.vg == pool.vg}
        counted.setdefault(pool.name, self._count(pool, lvs, now))
        with self._mutex:
            self._totals.update(counted)
        t = counted[pool.name]
        return Totals(t.virtual, t.volumes, t.at)

    def _count(self, pool: PoolConfig, lvs: list[LogicalVolume], at: float) -> Totals:
        if pool.thin:
            inside = [lv for lv in lvs if lv.pool == pool.thin_pool]
        else:
            inside = [lv for lv in lvs if not lv.pool and not lv.is_thin_pool and not lv.attr.startswith(("e", "l"))]
        return Totals(sum(lv.size for lv in inside), sum(1 for lv in inside if self._service._ours(lv)), at)

    def add(self, pool: PoolConfig | None, size: int, volumes: int = 0) -> None:
        if pool is None:
            return
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
        self._reports: dict[tuple[str, str], tuple[float, object]] = {}
        self._mutex = threading.Lock()

    def _cached(self, key: tuple[str, str], ttl: float):
        """(report or None if too old or never read, the last report read)."""
        with self._mutex:
            at, report = self._reports.get(key, (0.0, None))
        return (report if report is not None and time.monotonic() - at < ttl else None), report

    def _keep(self, key: tuple[str, str], report) -> None:
        if report is not None:
            with self._mutex:
                self._reports[key] = (time.monotonic(), report)

    def thin_pool(self, vg: str, pool: str) -> ThinPoolState | None:
        fresh, last = self._cached((vg, pool), POOL_REPORT_TTL)
        if fresh is not None:
            return fresh
        fill = self._lvm.thin_pool_fill(vg, pool) if last is not None else None
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
        return state

    def vg(self, vg: str) -> VolumeGroup | None:
        fresh, _ = self._cached((vg, ""), VG_REPORT_TTL)
        if fresh is not None:
            return fresh
        report = self._lvm.vg(vg)
        self._keep((vg, ""), report)
        return report

    def forget(self, vg: str) -> None:
        """After this agent changed the VG's free space (a thick LV created, grown or removed)."""
        with self._mutex:
            self._reports.pop((vg, ""), None)


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
        self.locks = KeyLocks()
        self.copies = copy.CopyJobs()
        self.totals = PoolTotals(self)
        self.pool_reports = PoolReports(lvm)

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
        """Capacity of a pool, from one LVM report of the thin pool (or of the VG, for a thick pool) plus
        the totals of the LVs in it, which are kept up to date by this agent's own changes and recounted
        from a full listing at most every TOTALS_TTL seconds: no per-volume scan per call."""
        if pool.thin:
            tp = self.pool_reports.thin_pool(pool.vg, pool.thin_pool)
            if tp is None or tp.group is None:
                raise errors.precondition(f"thin pool {pool.vg}/{pool.thin_pool} of pool {pool.name} is missing")
            totals = self.totals.get(pool)
            available = max(0, int(tp.size * pool.overprovision_ratio) - totals.virtual)
            if tp.data_percent >= pool.max_fill_percent or tp.metadata_percent >= pool.max_fill_percent:
                available = 0
            used = int(tp.size * tp.data_percent / 100)
            return PoolUsage(pool, tp.group.extent_size, tp.size, used, available, tp.data_percent,
                             tp.metadata_percent, totals.volumes)
        vg = self.pool_reports.vg(pool.vg)
        if vg is None:
            raise errors.precondition(f"volume group {pool.vg} of pool {pool.name} is missing")
        return PoolUsage(pool, vg.extent_size, vg.size, vg.size - vg.free, vg.free,
                         100.0 * (vg.size - vg.free) / vg.size if vg.size else 0.0, 0.0, self.totals.get(pool).volumes)

    def _volume_message(self, rec: VolumeRecord, lv: LogicalVolume | None, exported: bool | None = None) -> pb.Volume:
        if exported is None:
            exported = self.lio.is_exported(rec.target_iqn)
        healthy, condition = True, ""
        if rec.state == "copying":
            p = self.copies.progress(f"{rec.vg}/{rec.lv}")
            healthy, condition = False, f"content being copied: {p.percent:.0f}%" if p else "copy not finished"
        elif lv is None:
            healthy, condition = False, f"logical volume {rec.vg}/{rec.lv} is missing"
        elif not lv.active:
            healthy, condition = False, f"logical volume {rec.vg}/{rec.lv} is not active"
        elif not exported:
            healthy, condition = False, f"iSCSI target {rec.target_iqn} is not exported"
        msg = self._record_message(rec)
        if lv is not None:
            msg.size_bytes = lv.size
        msg.exported, msg.healthy, msg.condition = exported, healthy, condition
        return msg

    @staticmethod
    def _record_message(rec: VolumeRecord) -> pb.Volume:
        """What the record alone says: no LVM report, no look at the kernel (health left unset)."""
        return pb.Volume(name=rec.name, pool=rec.pool, vg=rec.vg, lv=rec.lv, size_bytes=rec.size,
                         attributes=rec.attributes, target_iqn=rec.target_iqn,
                         initiators=[pb.Initiator(iqn=g.initiator, read_only=g.read_only) for g in rec.grants.values()],
                         created_unix=int(rec.created), ready=rec.state == "ready")

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
        source = request.source if request.HasField("source") else None
        if source is not None:
            ids.check_lvm_name(source.vg, "source vg")
            ids.check_lvm_name(source.lv, "source lv")
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
                    lv = self._create_lv(name, pool, lv_name, size, digest, source)
                except CommandError as exc:
                    # lvcreate is the atomic check: an LV that neither a record nor a device node showed
                    # (deactivated by hand) is compared below like any existing one.
                    if not lvm.already_exists(exc):
                        raise
                    lv = self.lvm.lv(pool.vg, lv_name)
                    if lv is None:
                        raise
            if not self._ours(lv) or lv.tag(f"{ids.TAG_PREFIX}/request") != digest or \
                    (lv.pool or "") != pool.thin_pool or lv.size < size:
                raise errors.exists(f"volume {name!r} exists with another size, pool, source or capabilities")
            rec = self.records.load(pool.vg, lv_name)
            if rec is not None and rec.deleting:
                raise errors.aborted(f"volume {name!r} is being deleted")
            if rec is None:
                copying = lv.tag(f"{ids.TAG_PREFIX}/content") == "copy"
                rec = VolumeRecord(name=name, pool=pool.name, vg=pool.vg, lv=lv_name, size=lv.size,
                                   attributes=attributes, target_iqn=ids.target_iqn(pool.vg, lv_name),
                                   state="copying" if copying else "ready",
                                   source=_source_dict(source) if copying and source else {})
                self.records.save(rec)
                faults.step("create.record")
            if not lv.active:
                self.lvm.activate(pool.vg, lv_name)
            if rec.state == "copying":
                rec = self._finish_copy(rec, lv, pool)
            self.lio.export(rec.target_iqn, lv_name, lv.path, pool.thin)
            faults.step("create.export")
            return self._volume_message(rec, lv, exported=True)

    def _create_lv(self, name: str, pool: PoolConfig, lv_name: str, size: int, digest: str, source) -> LogicalVolume:
        usage = self.usage(pool)
        size = self._round(size, usage.extent)
        if size > usage.available:
            raise errors.exhausted(
                f"pool {pool.name} on {self.config.node_name} has {usage.available} bytes available "
                f"for new volumes, {size} requested"
                + (f" (thin pool {usage.data_percent:.0f}% full, limit {pool.max_fill_percent:.0f}%)"
                   if pool.thin and usage.available == 0 else ""))
        tags = [tag("cluster", self.config.cluster_id), tag("kind", "volume"), tag("name", encode_name(name)),
                tag("request", digest)]
        src_lv = None
        if source is not None and source.node == self.config.node_name:
            src_lv = self.lvm.lv(source.vg, source.lv)
            if src_lv is None or not (self._ours(src_lv) or self._ours(src_lv, "snapshot") or
                                      self._ours(src_lv, "transfer")):
                raise errors.not_found(f"source {source.vg}/{source.lv} is not on {self.config.node_name}")
        if src_lv is not None and pool.thin and src_lv.pool == pool.thin_pool and source.vg == pool.vg:
            # Same thin pool: a thin snapshot of the source is the new volume, at once and independent of it.
            self.lvm.snapshot(pool.vg, source.lv, lv_name, tags, activate=True)
            faults.step("create.lv")
            # A thin snapshot is its origin's size; grown when more was asked. lvcreate and lvextend exited 0,
            # so the LV is what their arguments said, as for a new LV below.
            if src_lv.size < size:
                self.lvm.extend(pool.vg, lv_name, size)
            lv = LogicalVolume(pool.vg, lv_name, max(src_lv.size, size), tuple(tags), pool.thin_pool,
                               "Vwi-a-tz--", created=time.time())
        else:
            if source is not None:
                tags.append(tag("content", "copy"))   # its content is copied in: see _finish_copy
            self.lvm.create(pool.vg, lv_name, size, tags, pool.thin_pool)
            if not pool.thin:
                self.pool_reports.forget(pool.vg)
            faults.step("create.lv")
            # lvcreate exited 0, so the LV is what its arguments said: active, exactly `size` bytes (a whole
            # number of extents), these tags. Describing it from them saves a report that grows with the VG.
            lv = LogicalVolume(pool.vg, lv_name, size, tuple(tags), pool.thin_pool,
                               "Vwi-a-tz--" if pool.thin else "-wi-a-----", created=time.time())
        self.totals.add(pool, lv.size, 1)
        return lv

    def _finish_copy(self, rec: VolumeRecord, lv: LogicalVolume, pool: PoolConfig) -> VolumeRecord:
        """Starts or joins the copy into this volume and waits for it while the call's time lasts."""
        key = f"{rec.vg}/{rec.lv}"
        job = self.copies.start(key, int(rec.source.get("size", 0)),
                                lambda progress: self._copy(rec, lv, pool, progress))
        try:
            job.result(timeout=max(1.0, runner.time_left() - 2.0))
        except FutureTimeout:
            p = self.copies.progress(key)
            raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED,
                                  f"copying into {rec.name!r} is in progress ({p.percent if p else 0:.0f}%); "
                                  "a retry joins it") from None
        except Exception:
            self.copies.forget(key)   # the next retry starts the copy again from the beginning
            raise
        done = self.records.load(rec.vg, rec.lv)
        return done if done is not None else rec

    def _copy(self, rec: VolumeRecord, lv: LogicalVolume, pool: PoolConfig, progress: copy.Progress) -> None:
        src = rec.source
        size = int(src["size"])
        if src["node"] == self.config.node_name:
            src_lv = self.lvm.lv(src["vg"], src["lv"])
            if src_lv is None:
                raise errors.not_found(f"source {src['vg']}/{src['lv']} is gone")
            if not src_lv.active:
                self.lvm.activate(src["vg"], src["lv"])
            stream = copy.sparse_stream(src_lv.path, size)
        else:
            stream = self._remote_stream(src)
        sent = copy.write_stream(lv.path, size, stream, sparse=pool.thin, progress=progress)
        written = copy.digest_of(lv.path, size)
        if written != sent:
            raise errors.internal(f"copy into {rec.name!r} does not verify: sha256 {written} != source {sent}")
        rec.state = "ready"
        self.records.save(rec)

    def _remote_stream(self, src: dict):
        creds = TlsFiles(self.config.tls_dir).channel_credentials()
        options = [("grpc.ssl_target_name_override", ids.AGENT_SERVER_NAME),
                   ("grpc.max_receive_message_length", 8 << 20)]
        with grpc.secure_channel(src["address"], creds, options=options) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            for chunk in stub.ReadData(pb.ReadDataRequest(vg=src["vg"], lv=src["lv"])):
                if chunk.done:
                    yield chunk.size_bytes, None, chunk.sha256
                    return
                yield chunk.offset, chunk.data, ""

    def ReadData(self, request, context):
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        lv = self.lvm.lv(request.vg, request.lv)
        if lv is None or not any(self._ours(lv, k) for k in ("volume", "snapshot", "transfer")):
            raise errors.not_found(f"no volume or snapshot {request.vg}/{request.lv} on {self.config.node_name}")
        if not lv.active:
            self.lvm.activate(request.vg, request.lv)
        for offset, data, final in copy.sparse_stream(lv.path, lv.size):
            if final:
                yield pb.DataChunk(done=True, size_bytes=lv.size, sha256=final)
            elif data is not None:
                yield pb.DataChunk(offset=offset, data=data)

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
        self.lio.unexport(ids.target_iqn(vg, lv_name), lv_name)
        faults.step("delete.unexported")
        if lv is not None and self._ours(lv):
            pool = self._pool_of(vg, lv)
            if not lv.pool and self.config.wipe_thick and (rec is None or rec.attributes.get("wipe") != "false"):
                if not lv.active:
                    self.lvm.activate(vg, lv_name)
                log.info("zeroing thick volume %s/%s before removal", vg, lv_name)
                self.lvm.zero_out(lv.path)
            self.lvm.remove(vg, lv_name)
            if not lv.pool:
                self.pool_reports.forget(vg)
            self.totals.add(pool, -lv.size, -1)
            faults.step("delete.lv")
            log.info("deleted %s/%s (pool %s)", vg, lv_name, pool.name if pool else "?")
        self.records.delete(vg, lv_name)

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
                                         condition="creation not finished", pool=(self._pool_of(vg, lv) or
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
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        if not ids.is_iqn(request.initiator_iqn):
            raise errors.invalid(f"initiator {request.initiator_iqn!r} is not an iSCSI qualified name")
        with self.locks.hold(f"{request.vg}/{request.lv}"):
            rec = self.records.load(request.vg, request.lv)
            if rec is None or rec.deleting:
                raise errors.not_found(f"no volume {request.vg}/{request.lv} on {self.config.node_name}")
            device = self._active_device(rec)
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
                faults.step("grant.record")
            pool = self.config.pool(rec.pool)
            self.lio.export(rec.target_iqn, rec.lv, device, bool(pool and pool.thin))
            self.lio.grant(rec.target_iqn, Access(grant.initiator, grant.read_only, grant.chap_user,
                                                  grant.chap_secret, grant.mutual_user, grant.mutual_secret))
            faults.step("grant.acl")
            return pb.GrantAccessResponse(target_iqn=rec.target_iqn, portals=[str(p) for p in self.config.portals],
                                          lun=0, chap_user=grant.chap_user, chap_secret=grant.chap_secret,
                                          mutual_chap_user=grant.mutual_user, mutual_chap_secret=grant.mutual_secret)

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
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        if not ids.is_iqn(request.initiator_iqn):
            raise errors.invalid(f"initiator {request.initiator_iqn[:230]!r} is not an iSCSI qualified name")
        with self.locks.hold(f"{request.vg}/{request.lv}"):
            rec = self.records.load(request.vg, request.lv)
            if rec is not None and rec.grants.pop(request.initiator_iqn, None) is not None:
                self.records.save(rec)
                faults.step("revoke.record")
            ended = self.lio.revoke(ids.target_iqn(request.vg, request.lv), request.initiator_iqn)
            return pb.RevokeAccessResponse(sessions_ended=ended)

    # ------------------------------------------------------------------------------------ snapshots

    def _snapshot_message(self, lv: LogicalVolume) -> pb.Snapshot:
        return pb.Snapshot(name=_decode_name(lv.tag(f"{ids.TAG_PREFIX}/name") or ""), vg=lv.vg, lv=lv.name,
                           source_vg=lv.vg, source_lv=lv.tag(f"{ids.TAG_PREFIX}/source") or "",
                           size_bytes=lv.size, created_unix=int(lv.created), ready=True)

    def CreateSnapshot(self, request, context):
        name = ids.check_request_name(request.name)
        ids.check_lvm_name(request.source_vg, "source vg")
        ids.check_lvm_name(request.source_lv, "source lv")
        kind = "transfer" if request.transient else "snapshot"
        snap = ids.lv_name(self.config.cluster_id, name, kind="snapshot")
        vg = request.source_vg
        with self.locks.hold(f"{vg}/{snap}"):
            # The source's record says where it is and how big; the snapshot's name is checked by lvcreate
            # itself ("already exists"), so a new snapshot costs no LVM report before its lvcreate.
            rec = self.records.load(vg, request.source_lv)
            pool = self.config.pool(rec.pool) if rec is not None and not rec.deleting else None
            if pool is None or pool.vg != vg:
                return self._existing_snapshot(vg, snap, kind, request, f"no volume {vg}/{request.source_lv} on "
                                                                     f"{self.config.node_name}")
            if not pool.thin:
                return self._existing_snapshot(vg, snap, kind, request, precondition=(
                    f"volume {rec.name!r} is in a thick pool: snapshots need a thin pool (StorageClass "
                    "parameter type: thin)"))
            if self.usage(pool).available == 0:
                return self._existing_snapshot(vg, snap, kind, request, exhausted=(
                    f"thin pool of {pool.name} on {self.config.node_name} is above {pool.max_fill_percent:.0f}% "
                    "full: no new snapshots"))
            tags = [tag("cluster", self.config.cluster_id), tag("kind", kind), tag("name", encode_name(name)),
                    tag("source", request.source_lv)]
            try:
                self.lvm.snapshot(vg, request.source_lv, snap, tags, activate=False)
            except CommandError as exc:
                if lvm.already_exists(exc):
                    return self._existing_snapshot(vg, snap, kind, request, "")
                if lvm.is_missing(exc):
                    raise errors.not_found(f"no volume {vg}/{request.source_lv} on {self.config.node_name}") \
                        from None
                raise
            faults.step("snapshot.lv")
            self.totals.add(pool, rec.size)
            # Read back once: its creation time is LVM's, the one ListSnapshots and retries will report.
            created = self.lvm.lv(vg, snap)
            if created is None:
                raise errors.internal(f"lvcreate --snapshot {vg}/{snap} succeeded but the LV is not there")
            return self._snapshot_message(created)

    def _existing_snapshot(self, vg: str, snap: str, kind: str, request, not_found: str = "",
                           precondition: str = "", exhausted: str = "") -> pb.Snapshot:
        """A retried CreateSnapshot finds the snapshot it made (even when its source is gone since, or the
        pool filled up); another request with the same name gets ALREADY_EXISTS; with no snapshot, the
        error the caller names."""
        existing = self.lvm.lv(vg, snap)
        if existing is not None:
            if self._ours(existing, kind) and existing.tag(f"{ids.TAG_PREFIX}/source") == request.source_lv:
                return self._snapshot_message(existing)
            raise errors.exists(f"snapshot {request.name!r} exists with another source")
        if precondition:
            raise errors.precondition(precondition)
        if exhausted:
            raise errors.exhausted(exhausted)
        raise errors.not_found(not_found or f"no volume {vg}/{request.source_lv} on {self.config.node_name}")

    def DeleteSnapshot(self, request, context):
        ids.check_lvm_name(request.vg, "vg")
        ids.check_lvm_name(request.lv, "lv")
        with self.locks.hold(f"{request.vg}/{request.lv}"):
            lv = self.lvm.lv(request.vg, request.lv)
            if lv is not None and (self._ours(lv, "snapshot") or self._ours(lv, "transfer")):
                self.lvm.remove(request.vg, request.lv)
                self.totals.add(self._pool_of(request.vg, lv), -lv.size)
        return pb.DeleteSnapshotResponse()

    def GetSnapshot(self, request, context):
        if request.name:
            snap = ids.lv_name(self.config.cluster_id, ids.check_request_name(request.name), kind="snapshot")
            places = [(vg, snap) for vg in sorted({p.vg for p in self.config.pools})]
        else:
            places = [(ids.check_lvm_name(request.vg, "vg"), ids.check_lvm_name(request.lv, "lv"))]
        for vg, lv_name in places:
            lv = self.lvm.lv(vg, lv_name)
            if lv is not None and (self._ours(lv, "snapshot") or self._ours(lv, "transfer")):
                return self._snapshot_message(lv)
        raise errors.not_found(f"no such snapshot on {self.config.node_name}")

    def ListSnapshots(self, request, context):
        out = []
        for vg in sorted({p.vg for p in self.config.pools}):
            out += [self._snapshot_message(lv) for lv in self.lvm.lvs(vg) if self._ours(lv, "snapshot")]
        return pb.ListSnapshotsResponse(snapshots=out)

    def Orphans(self, request, context):
        if request.min_age_seconds < 0:
            raise errors.invalid("min_age_seconds must not be negative")
        return pb.OrphansResponse(orphans=orphans.find(self, request.min_age_seconds, request.remove))

    # ------------------------------------------------------------------------------------ start-up

    def restore(self) -> dict[str, int]:
        """Brings the kernel back to what the records say: exports and ACLs re-created, deletions that
        were cut short finished, ACLs that no record holds removed."""
        counts = {"exported": 0, "finished_deletes": 0, "stale_acls_removed": 0, "activated_unrecorded": 0,
                  "failed": 0}
        for pool in self.config.pools:
            state = self.lvm.thin_pool(pool.vg, pool.thin_pool) if pool.thin else None
            if state is not None and not state.zeroing:
                log.warning("thin pool %s/%s did not zero new blocks; turning zeroing on so no tenant reads "
                            "another's old data", pool.vg, pool.thin_pool)
                self.lvm.set_zeroing(pool.vg, pool.thin_pool)
        lvs = {}
        for vg in sorted({p.vg for p in self.config.pools}):
            lvs.update({(vg, lv.name): lv for lv in self.lvm.lvs(vg)})
        records = list(self.records.all())
        recorded = {(rec.vg, rec.lv) for rec in records}
        for (vg, name), lv in sorted(lvs.items()):
            if (vg, name) not in recorded and self._ours(lv) and not lv.active:
                # A creation cut short before its record (and a reboot since): active, its device node tells
                # CreateVolume and GetVolume that it exists (see _may_exist); the retry finishes it.
                try:
                    self.lvm.activate(vg, name)
                    counts["activated_unrecorded"] += 1
                except CommandError:
                    log.exception("could not activate %s/%s, whose creation was cut short", vg, name)
                    counts["failed"] += 1
        for rec in records:
            try:
                lv = lvs.get((rec.vg, rec.lv))
                if rec.deleting or lv is None:
                    self._delete(rec.vg, rec.lv)
                    counts["finished_deletes"] += 1
                    continue
                if rec.state != "ready":
                    continue   # an unfinished copy is never exported; CreateVolume's retry restarts it
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
