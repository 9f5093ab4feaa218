"""CSI Controller service: validates, locks, routes to the agent that the volume ID names, maps errors.

Holds no state: the volume ID names the storage node, VG and LV; the agents hold the rest.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from google.protobuf.wrappers_pb2 import Int64Value

from csi import capabilities as caps
from csi import errors, faults, ids
from csi.config import ControllerConfig
from csi.controller import scheduler
from csi.controller.agents import Agents
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.server import KeyLocks

log = logging.getLogger(__name__)

Cap = csi.ControllerServiceCapability.RPC.Type
CAPABILITIES = (Cap.CREATE_DELETE_VOLUME, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY,
                Cap.LIST_VOLUMES_PUBLISHED_NODES, Cap.GET_VOLUME, Cap.VOLUME_CONDITION, Cap.PUBLISH_READONLY,
                Cap.SINGLE_NODE_MULTI_WRITER, Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS, Cap.CLONE_VOLUME,
                Cap.EXPAND_VOLUME)

# publish_context keys: what NodeStageVolume needs to log in. Holds CHAP secrets: see README on who can
# read VolumeAttachments.
CTX_IQN = "targetIqn"
CTX_PORTALS = "portals"
CTX_LUN = "lun"
CTX_CHAP_USER = "chapUser"
CTX_CHAP_SECRET = "chapSecret"
CTX_MUTUAL_USER = "mutualChapUser"
CTX_MUTUAL_SECRET = "mutualChapSecret"


def volume_attributes(access: caps.Access, params: caps.Params) -> dict[str, str]:
    """What the agent stores with the volume; part of the identity of a CreateVolume request."""
    return {"accessType": "block" if access.block else "mount",
            "fsType": "" if access.block else (params.fs_type or access.fs_type),
            "accessModes": ",".join(sorted(caps.mode_name(m) for m in access.modes)),
            "mutualChap": str(params.mutual_chap).lower(),
            "wipe": str(params.wipe).lower()}


@dataclass(frozen=True)
class Source:
    kind: str          # snapshot | volume
    ref: ids.LvRef
    size: int
    text: str          # "snapshot:<id>" / "volume:<id>": part of the request's identity
    pool: str = ""     # the source volume's pool


def _lookup(agent, name: str) -> tuple[apb.Volume | None, apb.AgentInfo]:
    info = agent.info()
    try:
        return agent.call("GetVolume", apb.GetVolumeRequest(name=name)), info
    except errors.CsiError as exc:
        if exc.code == errors.Code.NOT_FOUND:
            return None, info
        raise


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, config: ControllerConfig, agents: Agents):
        self.config = config
        self.agents = agents
        self.locks = KeyLocks()
        self.topology_key = ids.topology_key(config.driver_name)

    # ------------------------------------------------------------------------------------ helpers

    def _ref(self, volume_id: str) -> ids.LvRef | None:
        ref = ids.parse_id(volume_id)
        if ref is None or not ref.lv.startswith(self.config.cluster_id + "-"):
            return None
        return ref

    def _require_ref(self, volume_id: str) -> ids.LvRef:
        if not volume_id:
            raise errors.invalid("volume_id is required")
        ref = self._ref(volume_id)
        if ref is None:
            raise errors.not_found(f"volume {volume_id!r} does not exist (not an ID of this driver and cluster)")
        return ref

    def _topology(self, node: str) -> list[csi.Topology]:
        zone = self.config.node(node).zone if self.config.node(node) else ""
        return [csi.Topology(segments={self.topology_key: zone})] if zone else []

    def _zones(self, req) -> tuple[list[str] | None, list[str]]:
        """(requisite zones or None for no constraint, preferred zones in order)."""
        if not req.HasField("accessibility_requirements"):
            return None, []
        ar = req.accessibility_requirements

        def zones(topologies) -> list[str]:
            out = []
            for t in topologies:
                extra = set(t.segments) - {self.topology_key}
                if extra:
                    raise errors.invalid(f"unknown topology key(s) {', '.join(sorted(extra))}; "
                                         f"this driver knows {self.topology_key}")
                if self.topology_key in t.segments:
                    out.append(t.segments[self.topology_key])
            return out

        requisite = zones(ar.requisite)
        return (requisite if ar.requisite else None), zones(ar.preferred)

    def _to_volume(self, ref: ids.LvRef, vol: apb.Volume) -> csi.Volume:
        ctx = {"fsType": vol.attributes.get("fsType", ""), "accessType": vol.attributes.get("accessType", "")}
        out = csi.Volume(volume_id=ref.encode(), capacity_bytes=vol.size_bytes, volume_context=ctx,
                         accessible_topology=self._topology(ref.node))
        kind, _, sid = vol.attributes.get("source", "").partition(":")
        if kind == "snapshot":
            out.content_source.snapshot.snapshot_id = sid
        elif kind == "volume":
            out.content_source.volume.volume_id = sid
        return out

    # ------------------------------------------------------------------------------------ volumes

    def CreateVolume(self, request, context):
        name = ids.check_request_name(request.name)
        params = caps.parse_params(request.parameters)
        access = caps.check_capabilities(request.volume_capabilities, params.fs_type or caps.DEFAULT_FS)
        required, limit = self._size(request)
        requisite, preferred = self._zones(request)
        attributes = volume_attributes(access, params)
        source = self._source(request) if request.HasField("volume_content_source") else None
        if source is not None:
            if not request.HasField("capacity_range") or request.capacity_range.required_bytes == 0:
                required = max(required, source.size)
            if required < source.size:
                raise errors.out_of_range(f"the source holds {source.size} bytes; a volume of {required} "
                                          "cannot hold it")
            if limit and source.size > limit:
                raise errors.out_of_range(f"the source holds {source.size} bytes, above limit_bytes {limit}")
            attributes["source"] = source.text
        with self.locks.hold("name:" + name):
            # A retry must find what an earlier attempt made, wherever the scheduler put it: ask every agent.
            # An unreachable agent might hold it, so creating elsewhere could leak a duplicate: UNAVAILABLE.
            found = self.agents.each(lambda a: _lookup(a, name))
            existing = []
            candidates = []
            for node, result in found.items():
                if isinstance(result, errors.CsiError):
                    raise errors.unavailable(f"cannot rule out that volume {name!r} exists: {result.message}")
                if result[0] is not None:
                    existing.append((node, result[0]))
            if not existing:
                for client in self.agents.all():
                    info = self._info_or_none(found, client.node.name)
                    if info is None:
                        continue
                    for p in info.pools:
                        candidates.append(scheduler.Candidate(client.node.name, client.node.zone, p.name,
                                                              bool(p.thin_pool), p.available_bytes, p.extent_bytes))
                wanted_thin = params.thin if params.thin is not None else (None if params.pool else True)
                place = scheduler.choose(candidates, required=required, limit=limit, pool=params.pool,
                                         thin=wanted_thin, requisite_zones=requisite, preferred_zones=preferred,
                                         near=source.ref.node if source else "")
                node, pool, size = place.candidate.node, place.candidate.pool, place.size
            else:
                node, vol = existing[0]
                pool, size = vol.pool, vol.size_bytes
                if vol.size_bytes < required or (limit and vol.size_bytes > limit):
                    raise errors.exists(f"volume {name!r} exists with size {vol.size_bytes}, outside the range asked")
            agent_source = self._agent_source(source, node, pool, name) if source else None
            transient = source is not None and source.kind == "volume" and agent_source.lv != source.ref.lv
            try:
                vol = self.agents.get(node).call("CreateVolume", apb.CreateVolumeRequest(
                    name=name, pool=pool, size_bytes=size, attributes=attributes, source=agent_source))
            except errors.CsiError as exc:
                # A copy still running (or an agent away for a moment) needs its source for the retry;
                # any other failure ends this attempt, and the point-in-time source with it.
                if transient and exc.code not in (errors.Code.DEADLINE_EXCEEDED, errors.Code.ABORTED,
                                                  errors.Code.UNAVAILABLE):
                    self._drop_transient(source.ref.node, agent_source)
                raise
            if transient:
                self._drop_transient(source.ref.node, agent_source)   # it served its purpose
            ref = ids.LvRef(node, vol.vg, vol.lv)
            log.info("volume %s is %s (%d bytes, pool %s%s)", name, ref, vol.size_bytes, pool,
                     f", from {source.text}" if source else "")
            return csi.CreateVolumeResponse(volume=self._to_volume(ref, vol))

    def _source(self, request) -> "Source":
        src = request.volume_content_source
        if src.HasField("snapshot"):
            sid = src.snapshot.snapshot_id
            if not sid:
                raise errors.invalid("volume_content_source.snapshot.snapshot_id is required")
            ref = ids.parse_id(sid, kind="snapshot")
            if ref is None or self.config.node(ref.node) is None:
                raise errors.not_found(f"snapshot {sid!r} does not exist")
            snap = self.agents.get(ref.node).call("GetSnapshot", apb.GetSnapshotRequest(vg=ref.vg, lv=ref.lv))
            return Source("snapshot", ref, snap.size_bytes, "snapshot:" + sid)
        if src.HasField("volume"):
            vid = src.volume.volume_id
            if not vid:
                raise errors.invalid("volume_content_source.volume.volume_id is required")
            ref = self._ref(vid)
            if ref is None or self.config.node(ref.node) is None:
                raise errors.not_found(f"volume {vid!r} does not exist")
            vol = self._get(ref)
            return Source("volume", ref, vol.size_bytes, "volume:" + vid, vol.pool)
        raise errors.invalid("volume_content_source names neither a snapshot nor a volume")

    def _drop_transient(self, node: str, src: apb.VolumeSource) -> None:
        self.agents.get(node).call("DeleteSnapshot", apb.DeleteSnapshotRequest(vg=src.vg, lv=src.lv))

    def _agent_source(self, source: "Source", node: str, pool: str, name: str) -> apb.VolumeSource:
        ref = source.ref
        if source.kind == "volume" and (ref.node != node or pool != source.pool):
            # A volume in use changes under a copy: copy a point-in-time snapshot of it instead. (In the
            # same thin pool, the agent's thin snapshot of the volume is that point in time already.)
            transfer = "transfer/" + hashlib.sha256(name.encode()).hexdigest()[:32]
            snap = self.agents.get(ref.node).call("CreateSnapshot", apb.CreateSnapshotRequest(
                name=transfer, source_vg=ref.vg, source_lv=ref.lv, transient=True))
            faults.step("clone.transfer-snapshot")
            ref = ids.LvRef(ref.node, snap.vg, snap.lv, "snapshot")
        return apb.VolumeSource(node=ref.node, address=self.config.node(ref.node).address, vg=ref.vg, lv=ref.lv,
                                snapshot=ref.kind == "snapshot", size_bytes=source.size)

    @staticmethod
    def _info_or_none(found, node: str):
        result = found.get(node)
        if result is None or isinstance(result, errors.CsiError):
            return None
        return result[1]

    def _size(self, request) -> tuple[int, int]:
        if not request.HasField("capacity_range"):
            return self.config.default_size, 0
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0:
            raise errors.invalid("capacity_range bytes must not be negative")
        if required == 0 and limit == 0:
            raise errors.invalid("capacity_range has neither required_bytes nor limit_bytes set")
        if limit and required > limit:
            raise errors.invalid(f"capacity_range: required_bytes {required} exceeds limit_bytes {limit}")
        if required == 0:
            required = min(self.config.default_size, limit)
        return required, limit

    def DeleteVolume(self, request, context):
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        ref = self._ref(request.volume_id)
        if ref is None:
            return csi.DeleteVolumeResponse()  # not ours, so it does not exist: success, as the spec says
        if self.config.node(ref.node) is None:
            raise errors.precondition(f"storage node {ref.node} of volume {request.volume_id} is not in the "
                                      "controller's configuration; add it back to delete the volume")
        with self.locks.hold(request.volume_id):
            self.agents.get(ref.node).call("DeleteVolume", apb.DeleteVolumeRequest(vg=ref.vg, lv=ref.lv))
        return csi.DeleteVolumeResponse()

    def _get(self, ref: ids.LvRef, brief: bool = True) -> apb.Volume:
        """The volume as its agent's record has it; with brief=False also its health (an LVM report and a
        look at the target), which only ControllerGetVolume needs."""
        return self.agents.get(ref.node).call("GetVolume", apb.GetVolumeRequest(vg=ref.vg, lv=ref.lv,
                                                                                brief=brief))

    def ControllerPublishVolume(self, request, context):
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        if not request.node_id:
            raise errors.invalid("node_id is required")
        if not request.HasField("volume_capability"):
            raise errors.invalid("volume_capability is required")
        access = caps.check_capability(request.volume_capability)
        ref = self._require_ref(request.volume_id)
        if not ids.is_iqn(request.node_id):
            raise errors.not_found(f"node {request.node_id!r} does not exist: node ids of this driver are iSCSI "
                                   "initiator names (iqn.*)")
        with self.locks.hold(request.volume_id):
            vol = self._get(ref)
            self._check_compatible(vol, access)
            others = [i.iqn for i in vol.initiators if i.iqn != request.node_id]
            if others and self._single_node(vol):
                raise errors.precondition(f"volume {request.volume_id} is published to {others[0]} and its access "
                                          "mode allows one node only")
            read_only = request.readonly or access.read_only
            mine = [i for i in vol.initiators if i.iqn == request.node_id]
            if mine and mine[0].read_only != read_only:
                raise errors.exists(f"volume {request.volume_id} is already published to {request.node_id} "
                                    f"{'read-only' if mine[0].read_only else 'read-write'}; unpublish it first")
            grant = self.agents.get(ref.node).call("GrantAccess", apb.GrantAccessRequest(
                vg=ref.vg, lv=ref.lv, initiator_iqn=request.node_id, read_only=read_only,
                mutual_chap=vol.attributes.get("mutualChap") == "true"))
        ctx = {CTX_IQN: grant.target_iqn, CTX_PORTALS: ",".join(grant.portals), CTX_LUN: str(grant.lun),
               CTX_CHAP_USER: grant.chap_user, CTX_CHAP_SECRET: grant.chap_secret}
        if grant.mutual_chap_user:
            ctx.update({CTX_MUTUAL_USER: grant.mutual_chap_user, CTX_MUTUAL_SECRET: grant.mutual_chap_secret})
        return csi.ControllerPublishVolumeResponse(publish_context=ctx)

    @staticmethod
    def _single_node(vol: apb.Volume) -> bool:
        modes = {caps.Mode.Mode.Value(m) for m in vol.attributes.get("accessModes", "").split(",") if m}
        return bool(modes) and modes <= caps.SINGLE_NODE

    @staticmethod
    def _check_compatible(vol: apb.Volume, access: caps.Access) -> None:
        kind = vol.attributes.get("accessType")
        if kind and (kind == "block") != access.block:
            raise errors.invalid(f"the volume was created for {kind} access; the capability asks for "
                                 f"{'block' if access.block else 'mount'}")

    def ControllerUnpublishVolume(self, request, context):
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        ref = self._ref(request.volume_id)
        if ref is None or self.config.node(ref.node) is None:
            return csi.ControllerUnpublishVolumeResponse()
        with self.locks.hold(request.volume_id):
            targets = [request.node_id] if request.node_id else [i.iqn for i in self._get_or_none(ref)]
            for iqn in targets:
                if not ids.is_iqn(iqn):
                    continue  # no such node, so it holds no access
                r = self.agents.get(ref.node).call("RevokeAccess", apb.RevokeAccessRequest(
                    vg=ref.vg, lv=ref.lv, initiator_iqn=iqn))
                log.info("revoked %s on %s (%d live session(s) ended)", iqn, ref, r.sessions_ended)
        return csi.ControllerUnpublishVolumeResponse()

    def _get_or_none(self, ref: ids.LvRef):
        try:
            return list(self._get(ref).initiators)
        except errors.CsiError as exc:
            if exc.code == errors.Code.NOT_FOUND:
                return []
            raise

    def ValidateVolumeCapabilities(self, request, context):
        ref = self._require_ref(request.volume_id)
        if not request.volume_capabilities:
            raise errors.invalid("volume_capabilities is required")
        caps.parse_params(request.parameters)
        vol = self._get(ref)
        try:
            access = caps.check_capabilities(request.volume_capabilities)
            self._check_compatible(vol, access)
        except errors.CsiError as exc:
            if exc.code != errors.Code.INVALID_ARGUMENT:
                raise
            return csi.ValidateVolumeCapabilitiesResponse(message=exc.message)
        return csi.ValidateVolumeCapabilitiesResponse(confirmed=csi.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters))

    def ListVolumes(self, request, context):
        if request.max_entries < 0:
            raise errors.invalid("max_entries must not be negative")
        if request.starting_token and ids.parse_id(request.starting_token) is None:
            raise errors.aborted(f"starting_token {request.starting_token!r} is not one this driver gave out")
        results = self.agents.each(lambda a: a.call("ListVolumes", apb.ListVolumesRequest()))
        entries = []
        for node, result in results.items():
            if isinstance(result, errors.CsiError):
                raise errors.unavailable(f"cannot list volumes: {result.message}")
            for vol in result.volumes:
                ref = ids.LvRef(node, vol.vg, vol.lv)
                entries.append((ref.encode(), ref, vol))
        entries.sort(key=lambda e: e[0])
        if request.starting_token:
            entries = [e for e in entries if e[0] > request.starting_token]
        page = entries[:request.max_entries] if request.max_entries else entries
        next_token = page[-1][0] if request.max_entries and len(entries) > len(page) else ""
        return csi.ListVolumesResponse(entries=[csi.ListVolumesResponse.Entry(
            volume=self._to_volume(ref, vol),
            status=csi.ListVolumesResponse.VolumeStatus(
                published_node_ids=[i.iqn for i in vol.initiators],
                volume_condition=csi.VolumeCondition(abnormal=not vol.healthy, message=vol.condition or "healthy")))
            for _, ref, vol in page], next_token=next_token)

    def ControllerGetVolume(self, request, context):
        ref = self._require_ref(request.volume_id)
        vol = self._get(ref, brief=False)
        return csi.ControllerGetVolumeResponse(
            volume=self._to_volume(ref, vol),
            status=csi.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=[i.iqn for i in vol.initiators],
                volume_condition=csi.VolumeCondition(abnormal=not vol.healthy, message=vol.condition or "healthy")))

    def GetCapacity(self, request, context):
        params = caps.parse_params(request.parameters)
        for cap in request.volume_capabilities:
            caps.check_capability(cap)
        zone = None
        if request.HasField("accessible_topology"):
            extra = set(request.accessible_topology.segments) - {self.topology_key}
            if extra:
                raise errors.invalid(f"unknown topology key(s) {', '.join(sorted(extra))}")
            zone = request.accessible_topology.segments.get(self.topology_key)
        wanted_thin = params.thin if params.thin is not None else (None if params.pool else True)
        total = largest = 0
        clients = [c for c in self.agents.all() if zone is None or c.node.zone == zone]
        for node, info in self.agents.each(lambda a: a.info()).items():
            if isinstance(info, errors.CsiError) or all(c.node.name != node for c in clients):
                continue
            for p in info.pools:
                if (params.pool and p.name != params.pool) or (wanted_thin is not None and
                                                               bool(p.thin_pool) != wanted_thin):
                    continue
                total += p.available_bytes
                largest = max(largest, p.available_bytes)
        return csi.GetCapacityResponse(available_capacity=total, maximum_volume_size=Int64Value(value=largest))

    def ControllerGetCapabilities(self, request, context):
        return csi.ControllerGetCapabilitiesResponse(capabilities=[
            csi.ControllerServiceCapability(rpc=csi.ControllerServiceCapability.RPC(type=c)) for c in CAPABILITIES])

    # ------------------------------------------------------------------------------------ snapshots

    def _to_snapshot(self, node: str, snap: apb.Snapshot) -> csi.Snapshot:
        out = csi.Snapshot(snapshot_id=ids.LvRef(node, snap.vg, snap.lv, "snapshot").encode(),
                           source_volume_id=ids.LvRef(node, snap.source_vg, snap.source_lv).encode(),
                           size_bytes=snap.size_bytes, ready_to_use=snap.ready)
        out.creation_time.FromSeconds(snap.created_unix)
        return out

    def CreateSnapshot(self, request, context):
        name = ids.check_request_name(request.name)
        if not request.source_volume_id:
            raise errors.invalid("source_volume_id is required")
        ref = self._require_ref(request.source_volume_id)
        if self.config.node(ref.node) is None:
            raise errors.not_found(f"volume {request.source_volume_id!r} does not exist")
        with self.locks.hold("snapshot:" + name):
            found = self.agents.each(lambda a: a.call("GetSnapshot", apb.GetSnapshotRequest(name=name)))
            for node, result in found.items():
                if isinstance(result, errors.CsiError):
                    if result.code == errors.Code.NOT_FOUND:
                        continue
                    raise errors.unavailable(f"cannot rule out that snapshot {name!r} exists: {result.message}")
                if node != ref.node or result.source_lv != ref.lv:
                    raise errors.exists(f"snapshot {name!r} exists for another volume")
            snap = self.agents.get(ref.node).call("CreateSnapshot", apb.CreateSnapshotRequest(
                name=name, source_vg=ref.vg, source_lv=ref.lv))
            return csi.CreateSnapshotResponse(snapshot=self._to_snapshot(ref.node, snap))

    def DeleteSnapshot(self, request, context):
        if not request.snapshot_id:
            raise errors.invalid("snapshot_id is required")
        ref = ids.parse_id(request.snapshot_id, kind="snapshot")
        if ref is None or not ref.lv.startswith(self.config.cluster_id + "-"):
            return csi.DeleteSnapshotResponse()
        if self.config.node(ref.node) is None:
            raise errors.precondition(f"storage node {ref.node} of snapshot {request.snapshot_id} is not in the "
                                      "controller's configuration; add it back to delete the snapshot")
        with self.locks.hold(request.snapshot_id):
            self.agents.get(ref.node).call("DeleteSnapshot", apb.DeleteSnapshotRequest(vg=ref.vg, lv=ref.lv))
        return csi.DeleteSnapshotResponse()

    def ListSnapshots(self, request, context):
        if request.max_entries < 0:
            raise errors.invalid("max_entries must not be negative")
        if request.starting_token and ids.parse_id(request.starting_token, kind="snapshot") is None:
            raise errors.aborted(f"starting_token {request.starting_token!r} is not one this driver gave out")
        entries: list[tuple[str, csi.Snapshot]] = []
        if request.snapshot_id:
            ref = ids.parse_id(request.snapshot_id, kind="snapshot")
            if ref is not None and self.config.node(ref.node) is not None:
                try:
                    snap = self.agents.get(ref.node).call("GetSnapshot", apb.GetSnapshotRequest(vg=ref.vg,
                                                                                                lv=ref.lv))
                    entries.append((request.snapshot_id, self._to_snapshot(ref.node, snap)))
                except errors.CsiError as exc:
                    if exc.code != errors.Code.NOT_FOUND:
                        raise
        else:
            for node, result in self.agents.each(lambda a: a.call("ListSnapshots",
                                                                  apb.ListSnapshotsRequest())).items():
                if isinstance(result, errors.CsiError):
                    raise errors.unavailable(f"cannot list snapshots: {result.message}")
                for snap in result.snapshots:
                    s = self._to_snapshot(node, snap)
                    entries.append((s.snapshot_id, s))
        if request.source_volume_id:
            entries = [e for e in entries if e[1].source_volume_id == request.source_volume_id]
        entries.sort(key=lambda e: e[0])
        if request.starting_token:
            entries = [e for e in entries if e[0] > request.starting_token]
        page = entries[:request.max_entries] if request.max_entries else entries
        next_token = page[-1][0] if request.max_entries and len(entries) > len(page) else ""
        return csi.ListSnapshotsResponse(entries=[csi.ListSnapshotsResponse.Entry(snapshot=s) for _, s in page],
                                         next_token=next_token)

    # ------------------------------------------------------------------------------------ expansion

    def ControllerExpandVolume(self, request, context):
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        if not request.HasField("capacity_range"):
            raise errors.invalid("capacity_range is required")
        required, limit = request.capacity_range.required_bytes, request.capacity_range.limit_bytes
        if required < 0 or limit < 0 or (required == 0 and limit == 0):
            raise errors.invalid("capacity_range needs a positive required_bytes or limit_bytes")
        if limit and required > limit:
            raise errors.invalid(f"required_bytes {required} exceeds limit_bytes {limit}")
        ref = self._require_ref(request.volume_id)
        with self.locks.hold(request.volume_id):
            vol = self.agents.get(ref.node).call("ExpandVolume", apb.ExpandVolumeRequest(
                vg=ref.vg, lv=ref.lv, size_bytes=required or limit, limit_bytes=limit))
        # The node always has work: rescan the iSCSI session, then grow the filesystem (block: rescan only).
        return csi.ControllerExpandVolumeResponse(capacity_bytes=vol.size_bytes, node_expansion_required=True)

    # Not advertised: the CSI spec asks for UNIMPLEMENTED.
    def _unimplemented(self, what: str):
        raise errors.CsiError(errors.Code.UNIMPLEMENTED, f"{what} is not supported by this driver")

    def ControllerModifyVolume(self, request, context):
        self._unimplemented("ControllerModifyVolume")

    def GetSnapshot(self, request, context):
        self._unimplemented("GetSnapshot")
