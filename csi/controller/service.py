"""CSI Controller service: validates, locks, routes to the agent that the volume ID names, maps errors.

Holds no state: the volume ID names the storage node, VG and LV; the agents hold the rest.
"""

from __future__ import annotations

import logging

from google.protobuf.wrappers_pb2 import Int64Value

from csi import capabilities as caps
from csi import errors, ids
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
                Cap.SINGLE_NODE_MULTI_WRITER)

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
        return csi.Volume(volume_id=ref.encode(), capacity_bytes=vol.size_bytes, volume_context=ctx,
                          accessible_topology=self._topology(ref.node))

    # ------------------------------------------------------------------------------------ volumes

    def CreateVolume(self, request, context):
        name = ids.check_request_name(request.name)
        params = caps.parse_params(request.parameters)
        access = caps.check_capabilities(request.volume_capabilities, params.fs_type or caps.DEFAULT_FS)
        if request.HasField("volume_content_source"):
            raise errors.invalid("creating a volume from a snapshot or another volume is not supported yet")
        required, limit = self._size(request)
        requisite, preferred = self._zones(request)
        attributes = volume_attributes(access, params)
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
                                         thin=wanted_thin, requisite_zones=requisite, preferred_zones=preferred)
                node, pool, size = place.candidate.node, place.candidate.pool, place.size
            else:
                node, vol = existing[0]
                pool, size = vol.pool, required
                if vol.size_bytes < required or (limit and vol.size_bytes > limit):
                    raise errors.exists(f"volume {name!r} exists with size {vol.size_bytes}, outside the range asked")
            vol = self.agents.get(node).call("CreateVolume", apb.CreateVolumeRequest(
                name=name, pool=pool, size_bytes=size, attributes=attributes))
            ref = ids.LvRef(node, vol.vg, vol.lv)
            log.info("volume %s is %s (%d bytes, pool %s)", name, ref, vol.size_bytes, pool)
            return csi.CreateVolumeResponse(volume=self._to_volume(ref, vol))

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

    def _get(self, ref: ids.LvRef) -> apb.Volume:
        return self.agents.get(ref.node).call("GetVolume", apb.GetVolumeRequest(vg=ref.vg, lv=ref.lv))

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
        vol = self._get(ref)
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

    # Not advertised: the CSI spec asks for UNIMPLEMENTED. (Snapshots and expansion: issue 3.)
    def _unimplemented(self, what: str):
        raise errors.CsiError(errors.Code.UNIMPLEMENTED, f"{what} is not supported by this driver yet")

    def CreateSnapshot(self, request, context):
        self._unimplemented("CreateSnapshot")

    def DeleteSnapshot(self, request, context):
        self._unimplemented("DeleteSnapshot")

    def ListSnapshots(self, request, context):
        self._unimplemented("ListSnapshots")

    def ControllerExpandVolume(self, request, context):
        self._unimplemented("ControllerExpandVolume")

    def ControllerModifyVolume(self, request, context):
        self._unimplemented("ControllerModifyVolume")

    def GetSnapshot(self, request, context):
        self._unimplemented("GetSnapshot")
