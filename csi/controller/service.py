"""CSI Controller service: validates, locks, routes to the agent that the volume ID names, maps errors.

The volume ID names the storage node, VG and LV; the agents hold the rest. The one state of the controller's
own is the placement journal (journal.py, placement.py): where each name is being placed, so that a retry
goes to the same storage node and a new volume needs only the agent it is placed on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from google.protobuf.wrappers_pb2 import Int64Value

from csi import capabilities as caps
from csi import contract, errors, faults, ids, mkfs_options
from csi.bounded import BoundedMap
from csi.config import ControllerConfig
from csi.controller import health, listing, replica_capacity, replicas, scheduler
from csi.controller.agents import Agents
from csi.controller.journal import Entry
from csi.controller.placement import Placement
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.server import KeyLocks

log = logging.getLogger(__name__)

Cap = csi.ControllerServiceCapability.RPC.Type
CAPABILITIES = (Cap.CREATE_DELETE_VOLUME, Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.LIST_VOLUMES, Cap.GET_CAPACITY,
                Cap.LIST_VOLUMES_PUBLISHED_NODES, Cap.GET_VOLUME, Cap.PUBLISH_READONLY,
                Cap.SINGLE_NODE_MULTI_WRITER, Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS, Cap.CLONE_VOLUME,
                Cap.EXPAND_VOLUME, Cap.GET_VOLUME_HEALTH, Cap.LIST_VOLUME_HEALTH)

# How long the source agent of a copy lets the destination's agent read it; each retry of the CreateVolume
# allows it again, so a copy longer than this is not cut off while its CreateVolume is retried.
COPY_ALLOWANCE_SECONDS = 3600


def volume_attributes(access: caps.Access, params: caps.Params) -> dict[str, str]:
    """What the agent stores with the volume; part of the identity of a CreateVolume request. A key that newer
    versions add is present only when set, so a volume made without it keeps the attributes it always had."""
    attributes = {"accessType": "block" if access.block else "mount",
                  "fsType": "" if access.block else (params.fs_type or access.fs_type),
                  "accessModes": ",".join(sorted(caps.mode_name(m) for m in access.modes)),
                  "mutualChap": str(params.mutual_chap).lower(),
                  "wipe": caps.wipe_attribute(params.wipe)}
    # A raw block volume is never formatted: the class's mkfs options do not apply to it.
    if params.mkfs_options and not access.block:
        mkfs_options.check_fs(mkfs_options.parse(params.mkfs_options), attributes["fsType"])
        attributes[mkfs_options.PARAM] = params.mkfs_options
    return attributes


@dataclass(frozen=True)
class Source:
    kind: str          # snapshot | volume
    ref: ids.LvRef
    size: int
    text: str          # "snapshot:<id>" / "volume:<id>": part of the request's identity
    pool: str = ""     # the source volume's pool
    offset: int = 0    # where the content starts in ref's LV: md's data offset in a replicated volume's leg
    # (node, vg) of a replicated source's other legs: an earlier attempt may have taken its point-in-time snapshot
    # of one of them (the current leg changed between attempts); dropped with this attempt's.
    other_legs: tuple[tuple[str, str], ...] = ()


# Agent answers after which nothing was made for a new name: its placement record can go.
_NOTHING_MADE = (errors.Code.RESOURCE_EXHAUSTED, errors.Code.INVALID_ARGUMENT)
# A page of ListVolumes / ListSnapshots when the caller sets no max_entries: bounded at every level.
DEFAULT_PAGE = 1000

class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, config: ControllerConfig, agents: Agents, placement: Placement, nodes):
        """nodes: which node an initiator name belongs to (nodes.py: CSINode objects, or a static file)."""
        self.config = config
        self.agents = agents
        self.placement = placement
        self.nodes = nodes
        self.locks = KeyLocks()
        self.topology_key = ids.topology_key(config.driver_name)
        self.replicas = replicas.Replicas(self)   # "r1:" volume ids and replicas=2 CreateVolume go there
        # snapshot_id -> its agent's Snapshot: its size and whether it is of a replica leg never change, so a
        # restore asks once (CreateSnapshot fills it, DeleteSnapshot empties it). Another controller replica may
        # have deleted it (each sidecar elects its own leader): the agent's restore then finds it gone (NOT_FOUND).
        self.known_snapshots: BoundedMap[str, apb.Snapshot] = BoundedMap()

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
        known = self.agents.node(node)
        zone = known.zone if known else ""
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
        if vol.attributes.get(mkfs_options.PARAM):
            ctx[mkfs_options.PARAM] = vol.attributes[mkfs_options.PARAM]   # the node applies them at mkfs
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
        if params.replicas > 1:
            return self.replicas.create(request, name, params, access, required, limit, requisite, preferred,
                                        attributes)
        source = self._source(request) if request.HasField("volume_content_source") else None
        if source is not None:
            if not request.HasField("capacity_range") or request.capacity_range.required_bytes == 0 or \
                    source.offset:
                # From a replicated source: its array is a little larger than its claim (the restoreSize the
                # snapshot reports, csi/controller/replica_sources.py), and the filesystem fills the array.
                required = max(required, source.size)
            if required < source.size:
                raise errors.out_of_range(f"the source holds {source.size} bytes; a volume of {required} "
                                          "cannot hold it")
            if limit and source.size > limit:
                raise errors.out_of_range(f"the source holds {source.size} bytes, above limit_bytes {limit}")
            attributes["source"] = source.text
        with self.locks.hold("name:" + name):
            entry = self.placement.find("volume", name)
            if entry is not None and self.agents.is_retired(entry.node):
                log.warning("volume %r was being placed on %s, which is retired: placing it again", name, entry.node)
                self.placement.forget("volume", entry.key)
                entry = None
            if entry is None:
                wanted_thin = params.thin if params.thin is not None else (None if params.pool else True)

                def choose():
                    candidates, down = self._candidates()
                    return down, lambda: scheduler.choose(
                        candidates, required=required, limit=limit, pool=params.pool, thin=wanted_thin,
                        requisite_zones=requisite, preferred_zones=preferred, near=source.ref.node if source else "",
                        down=down)
                down, attempt = choose()
                try:
                    place = attempt()
                except errors.CsiError as exc:
                    # Nothing fits among the nodes that answered the last poll: a node down then may be back
                    # (an agent restarted a moment ago). Ask those once more, now, before refusing.
                    if exc.code != errors.Code.RESOURCE_EXHAUSTED or not down:
                        raise
                    self.agents.recheck(n for n, _ in down)
                    place = choose()[1]()
                entry = self.placement.claim(Entry(ids.lv_name(self.config.cluster_id, name), "volume", name,
                                                   place.candidate.node, pool=place.candidate.pool,
                                                   source=source.text if source else ""))
                faults.step("create.placed")
                if entry.node != place.candidate.node:
                    log.info("volume %r: another controller placed it on %s first", name, entry.node)
                else:
                    self.agents.consume(entry.node, entry.pool, place.size)
                size = place.size if entry.node == place.candidate.node else required
            else:
                size = required
            if entry.kind != "volume" or entry.name != name or entry.legs:
                raise errors.exists(f"volume {name!r}: the journal holds another object (or a replicated volume) "
                                    "under its key")
            if entry.source != (source.text if source else ""):
                raise errors.exists(f"volume {name!r} exists with another content source")
            node, pool = entry.node, entry.pool
            agent_source = self._agent_source(source, node, pool, name, self._thin_pools()) if source else None
            transient = source is not None and source.kind == "volume" and agent_source.lv != source.ref.lv
            try:
                vol = self.agents.get(node).call("CreateVolume", apb.CreateVolumeRequest(
                    name=name, pool=pool, size_bytes=size, attributes=attributes, source=agent_source))
            except errors.CsiError as exc:
                # A copy still running (or an agent away for a moment) needs its source for the retry;
                # any other failure ends this attempt, and the point-in-time source with it.
                if transient and exc.code not in (errors.Code.DEADLINE_EXCEEDED, errors.Code.ABORTED,
                                                  errors.Code.UNAVAILABLE):
                    self._drop_transient(source.ref.node, agent_source, source)
                if entry.state == "placing" and exc.code in _NOTHING_MADE:
                    # The agent made nothing (the pool filled up since the scheduler looked, say): let the
                    # retry place the volume afresh instead of insisting on this node.
                    self.placement.forget("volume", entry.key)
                raise
            faults.step("create.made")
            self.placement.made(entry)
            if transient:
                self._drop_transient(source.ref.node, agent_source, source)   # it served its purpose
            if vol.size_bytes < required or (limit and vol.size_bytes > limit):
                raise errors.exists(f"volume {name!r} exists with size {vol.size_bytes}, outside the range asked")
            ref = ids.LvRef(node, vol.vg, vol.lv)
            log.info("volume %s is %s (%d bytes, pool %s%s)", name, ref, vol.size_bytes, pool,
                     f", from {source.text}" if source else "")
            return csi.CreateVolumeResponse(volume=self._to_volume(ref, vol))

    def _candidates(self) -> tuple[list[scheduler.Candidate], list[tuple[str, str]]]:
        """Every pool of every storage node that is up, listed and not retired, as the poller last saw it; and
        (node, zone) of the listed ones that are down."""
        out, down = [], []
        infos = self.agents.infos()
        for known, seen in self.agents.serving():     # one look at the membership, not three per node
            info = infos.get(known.name)
            if info is None or not seen.listed:
                continue
            if isinstance(info, errors.CsiError):
                down.append((known.name, known.zone))
                continue
            out += seen.candidates(known)
        return out, down

    def _source(self, request) -> "Source":
        src = request.volume_content_source
        if src.HasField("snapshot"):
            sid = src.snapshot.snapshot_id
            if not sid:
                raise errors.invalid("volume_content_source.snapshot.snapshot_id is required")
            ref = ids.parse_id(sid, kind="snapshot")
            if ref is None or not self._serves(ref.node):
                raise errors.not_found(f"snapshot {sid!r} does not exist")
            snap = self.known_snapshots.get(sid)
            if snap is None:
                snap = self.agents.get(ref.node).call("GetSnapshot", apb.GetSnapshotRequest(vg=ref.vg, lv=ref.lv))
                self.known_snapshots.remember(sid, snap)
            if snap.source_replicated:
                # A snapshot of one leg: the array's data, past md's superblock and bitmap.
                return Source("snapshot", ref, snap.size_bytes - replicas.MD_RESERVE, "snapshot:" + sid,
                              offset=replicas.MD_RESERVE)
            return Source("snapshot", ref, snap.size_bytes, "snapshot:" + sid)
        if src.HasField("volume"):
            vid = src.volume.volume_id
            if not vid:
                raise errors.invalid("volume_content_source.volume.volume_id is required")
            if (key := self.replicas.key_of(vid)) is not None:
                # Its leg that holds every write the array acknowledged (as a snapshot of it is taken).
                entry = self.replicas._entry(key, vid)
                leg = self.replicas.sources.current(key, entry)
                vol = self.agents.get(leg.node).call("GetVolume", apb.GetVolumeRequest(vg=leg.vg, lv=key,
                                                                                       brief=True))
                others = tuple((x.node, x.vg) for x in replicas.legs_of(entry) if x.node != leg.node)
                return Source("volume", leg.ref(key), vol.size_bytes - replicas.MD_RESERVE, "volume:" + vid,
                              leg.pool, offset=replicas.MD_RESERVE, other_legs=others)
            ref = self._ref(vid)
            if ref is None or not self._serves(ref.node):
                raise errors.not_found(f"volume {vid!r} does not exist")
            vol = self._get(ref)
            return Source("volume", ref, vol.size_bytes, "volume:" + vid, vol.pool)
        raise errors.invalid("volume_content_source names neither a snapshot nor a volume")

    def _drop_transient(self, node: str, src: apb.VolumeSource, source: "Source | None" = None) -> None:
        self.agents.get(node).call("DeleteSnapshot", apb.DeleteSnapshotRequest(vg=src.vg, lv=src.lv))
        for other, vg in source.other_legs if source is not None else ():
            try:     # the same name there (it derives from the new volume's): gone already is success
                self.agents.get(other).call("DeleteSnapshot", apb.DeleteSnapshotRequest(vg=vg, lv=src.lv))
            except errors.CsiError as exc:
                log.warning("a point-in-time snapshot %s/%s on %s may be left from an earlier attempt (the "
                            "orphan scan finds it): %s", vg, src.lv, other, exc.message)

    def _agent_source(self, source: "Source", node: str, pool: str, name: str,
                      thin: set[tuple[str, str]]) -> apb.VolumeSource:
        ref = source.ref
        if source.offset:
            self._require_offsets({node, ref.node})
        if source.kind == "volume" and (source.offset or
                                        not (ref.node == node and pool == source.pool and (node, pool) in thin)):
            # A volume in use changes under a copy: copy a point-in-time snapshot of it instead (thin, or a
            # transient COW snapshot of a thick volume). In the source's own thin pool, the agent's thin
            # snapshot of the volume is that point in time already.
            transfer = "transfer/" + hashlib.sha256(name.encode()).hexdigest()[:32]
            snap = self.agents.get(ref.node).call("CreateSnapshot", apb.CreateSnapshotRequest(
                name=transfer, source_vg=ref.vg, source_lv=ref.lv, transient=True))
            faults.step("clone.transfer-snapshot")
            ref = ids.LvRef(ref.node, snap.vg, snap.lv, "snapshot")
        if ref.node != node:
            # The one way another agent reads anything on the source's node (storage/authz.py).
            self.agents.get(ref.node).call("AllowCopy", apb.AllowCopyRequest(
                vg=ref.vg, lv=ref.lv, destination_node=node, ttl_seconds=COPY_ALLOWANCE_SECONDS))
        return apb.VolumeSource(node=ref.node, address=self.agents.node(ref.node).address, vg=ref.vg, lv=ref.lv,
                                snapshot=ref.kind == "snapshot", size_bytes=source.size, offset_bytes=source.offset)

    def _require_offsets(self, nodes: set[str]) -> None:
        """An agent before VolumeSource.offset_bytes would copy from the LV's start: refuse rather than ask it."""
        for node in sorted(nodes):
            h = self.agents.health(node)
            if h is None or h.info is None:
                raise errors.unavailable(f"storage node {node} has not answered yet: whether its agent copies "
                                         "from a replicated source is not known")
            if "source-offset" not in h.info.features:
                raise errors.precondition(f"storage node {node} runs an agent that cannot copy a plain volume from "
                                          "a replicated source; upgrade it first")

    def _thin_pools(self) -> set[tuple[str, str]]:
        """(node, pool) of every thin pool of the storage nodes that answer."""
        return {(c.node, c.pool) for c in self._candidates()[0] if c.thin}

    def _serves(self, node: str) -> bool:
        """A storage node this controller knows and that is not retired (its volumes may exist)."""
        return self.agents.node(node) is not None and not self.agents.is_retired(node)

    def _gone_with_node(self, node: str, what: str) -> bool:
        """True when `what` lived on a retired storage node (so it is gone); FAILED_PRECONDITION when its node is
        not known at all: the controller cannot tell whether it still exists."""
        if self.agents.is_retired(node):
            log.warning("%s was on storage node %s, which is retired: treated as gone", what, node)
            return True
        if self.agents.node(node) is None:
            raise errors.precondition(f"storage node {node} of {what} is not known to this controller: add it back "
                                      f"(label or list it as a storage node), or retire it for good with "
                                      f"`lvm-iscsi-csi retire-storage-node {node}` (its volumes are then gone)")
        return False

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
        if (key := self.replicas.key_of(request.volume_id)) is not None:
            return self.replicas.delete(key, request.volume_id)
        ref = self._ref(request.volume_id)
        if ref is None:
            return csi.DeleteVolumeResponse()  # not ours, so it does not exist: success, as the spec says
        with self.locks.hold(request.volume_id):
            if not self._gone_with_node(ref.node, f"volume {request.volume_id}"):
                self.agents.get(ref.node).call("DeleteVolume", apb.DeleteVolumeRequest(vg=ref.vg, lv=ref.lv))
                faults.step("delete.removed")
            self.placement.forget("volume", ref.lv)
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
        node_id = ids.normalize_iqn(request.node_id)   # any case: one node, one lower-case ACL
        if node_id is None:
            raise errors.not_found(f"node {request.node_id!r} does not exist: node ids of this driver are iSCSI "
                                   "initiator names (iqn.*)")
        # The grant names the node its initiator belongs to, from a source that node cannot forge: only that
        # node's plugin gets the grant's credentials from the agent.
        node_name = self.nodes.node_of(node_id)
        if (key := self.replicas.key_of(request.volume_id)) is not None:
            return self.replicas.publish(request, key, access, node_id, node_name)
        ref = self._require_ref(request.volume_id)
        if not self._serves(ref.node):
            raise errors.not_found(f"volume {request.volume_id} does not exist: its storage node {ref.node} is "
                                   f"{'retired' if self.agents.is_retired(ref.node) else 'not known'}")
        with self.locks.hold(request.volume_id):
            vol = self._get(ref)
            self._check_compatible(vol, access)
            others = [i.iqn for i in vol.initiators if i.iqn != node_id]
            if others and self._single_node(vol):
                raise errors.precondition(f"volume {request.volume_id} is published to {others[0]} and its access "
                                          "mode allows one node only")
            read_only = request.readonly or access.read_only
            mine = [i for i in vol.initiators if i.iqn == node_id]
            if mine and mine[0].read_only != read_only:
                raise errors.exists(f"volume {request.volume_id} is already published to {node_id} "
                                    f"{'read-only' if mine[0].read_only else 'read-write'}; unpublish it first")
            grant = self.agents.get(ref.node).call("GrantAccess", apb.GrantAccessRequest(
                vg=ref.vg, lv=ref.lv, initiator_iqn=node_id, read_only=read_only, node_name=node_name,
                mutual_chap=vol.attributes.get("mutualChap") == "true"))
        # No secret: publish_context ends up in the VolumeAttachment (csi/contract.py).
        return csi.ControllerPublishVolumeResponse(publish_context=contract.publish_context(
            grant.target_iqn, grant.portals, grant.lun, ref.node, self.agents.node(ref.node).address))

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
        if (key := self.replicas.key_of(request.volume_id)) is not None:
            return self.replicas.unpublish(request, key)
        ref = self._ref(request.volume_id)
        # Not ours: published nowhere. On a retired node: gone with it. On a node not known at all:
        # FAILED_PRECONDITION, since an OK would let the attacher believe the node fenced while its ACL stays.
        if ref is None or self._gone_with_node(ref.node, f"volume {request.volume_id}"):
            return csi.ControllerUnpublishVolumeResponse()
        with self.locks.hold(request.volume_id):
            targets = [request.node_id] if request.node_id else [i.iqn for i in self._get_or_none(ref)]
            for iqn in map(ids.normalize_iqn, targets):
                if iqn is None:
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
        key = self.replicas.key_of(request.volume_id)
        ref = self._require_ref(request.volume_id) if key is None else None
        if not request.volume_capabilities:
            raise errors.invalid("volume_capabilities is required")
        caps.parse_params(request.parameters)
        if key is not None:
            return self.replicas.validate(request, key)
        return self._validated(request, self._get(ref))

    def _validated(self, request, vol: apb.Volume, check=lambda access: access):
        """The answer of ValidateVolumeCapabilities for a volume as its agent has it: confirmed, or the reason
        the capabilities do not fit (`check` adds the rules of a kind of volume, e.g. replicated ones')."""
        try:
            self._check_compatible(vol, check(caps.check_capabilities(request.volume_capabilities)))
        except errors.CsiError as exc:
            if exc.code != errors.Code.INVALID_ARGUMENT:
                raise
            return csi.ValidateVolumeCapabilitiesResponse(message=exc.message)
        return csi.ValidateVolumeCapabilitiesResponse(confirmed=csi.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters))

    def ListVolumes(self, request, context):
        page, next_token = listing.walk(self.agents, "volume", request.max_entries, request.starting_token,
                                        DEFAULT_PAGE, keep=listing.keep_volume)
        return csi.ListVolumesResponse(entries=[self._listed(node, vol) for node, vol in page], next_token=next_token)

    def _listed(self, node: str, vol: apb.Volume) -> csi.ListVolumesResponse.Entry:
        if caps.is_replica_leg(vol.attributes):
            return self.replicas.listed(node, vol)
        return csi.ListVolumesResponse.Entry(
            volume=self._to_volume(ids.LvRef(node, vol.vg, vol.lv), vol),
            status=csi.ListVolumesResponse.VolumeStatus(published_node_ids=[i.iqn for i in vol.initiators]))

    def ControllerGetVolume(self, request, context):
        if (key := self.replicas.key_of(request.volume_id)) is not None:
            return self.replicas.get_volume(key, request.volume_id)
        ref = self._require_ref(request.volume_id)
        vol = self._get(ref, brief=False)
        return csi.ControllerGetVolumeResponse(
            volume=self._to_volume(ref, vol),
            status=csi.ControllerGetVolumeResponse.VolumeStatus(published_node_ids=[i.iqn for i in vol.initiators]))

    def ControllerGetVolumeHealth(self, request, context):
        """The volume as its storage node sees it (health.py): no entry while healthy; INACCESSIBLE with a
        reason when its LV or export is missing or its storage node's agent does not answer."""
        if (key := self.replicas.key_of(request.volume_id)) is not None:
            return self.replicas.health(key, request.volume_id)
        ref = self._require_ref(request.volume_id)
        if not self._serves(ref.node):
            raise errors.not_found(f"volume {request.volume_id} does not exist: its storage node {ref.node} is "
                                   f"{'retired' if self.agents.is_retired(ref.node) else 'not known'}")
        return csi.ControllerGetVolumeHealthResponse(volume_health=health.get(self.agents, ref, request.volume_id))

    def ControllerListVolumeHealth(self, request, context):
        entries, next_token = health.list_page(self.agents, request.max_entries, request.starting_token,
                                               DEFAULT_PAGE)
        return csi.ControllerListVolumeHealthResponse(entries=entries, next_token=next_token)

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
        # zone -> node -> (free in its matching pools, in its largest), of the storage nodes that answer: one
        # that is down has no capacity to offer now.
        by_zone: dict[str, dict[str, tuple[int, int]]] = {}
        for c in self._candidates()[0]:
            if (params.pool and c.pool != params.pool) or (wanted_thin is not None and c.thin != wanted_thin):
                continue
            nodes = by_zone.setdefault(c.zone, {})
            free, best = nodes.get(c.node, (0, 0))
            nodes[c.node] = (free + c.available, max(best, c.available))
        if params.replicas > 1 and zone is None:
            total, largest = replica_capacity.capacity_any_zone(by_zone, params.replica_zones)
        elif params.replicas > 1:
            total, largest = replica_capacity.capacity_in_zone(by_zone, zone, params.replica_zones)
        else:
            own = [v for z, nodes in by_zone.items() if zone is None or z == zone for v in nodes.values()]
            total, largest = sum(f for f, _ in own), max((b for _, b in own), default=0)
        return csi.GetCapacityResponse(available_capacity=total, maximum_volume_size=Int64Value(value=largest))

    def ControllerGetCapabilities(self, request, context):
        return csi.ControllerGetCapabilitiesResponse(capabilities=[
            csi.ControllerServiceCapability(rpc=csi.ControllerServiceCapability.RPC(type=c)) for c in CAPABILITIES])

    # ------------------------------------------------------------------------------------ snapshots

    def _to_snapshot(self, node: str, snap: apb.Snapshot) -> csi.Snapshot:
        source = (ids.replicated_volume_id(snap.source_lv) if snap.source_replicated else
                  ids.LvRef(node, snap.source_vg, snap.source_lv).encode())
        out = csi.Snapshot(snapshot_id=ids.LvRef(node, snap.vg, snap.lv, "snapshot").encode(),
                           source_volume_id=source, ready_to_use=snap.ready,
                           size_bytes=self.replicas.sources.restore_size(node, snap) if snap.source_replicated
                           else snap.size_bytes)
        out.creation_time.FromSeconds(snap.created_unix)
        return out

    def CreateSnapshot(self, request, context):
        name = ids.check_request_name(request.name)
        if not request.source_volume_id:
            raise errors.invalid("source_volume_id is required")
        key = self.replicas.key_of(request.source_volume_id)
        if key is not None:
            return self.replicas.sources.snapshot(request, name, key)
        ref = self._require_ref(request.source_volume_id)
        if not self._serves(ref.node):
            raise errors.not_found(f"volume {request.source_volume_id!r} does not exist")
        source = "volume:" + request.source_volume_id
        with self.locks.hold("snapshot:" + name):
            # Only the source's agent is needed: the journal says whether the name is taken elsewhere.
            entry = self.placement.find("snapshot", name)
            if entry is None:
                entry = self.placement.claim(Entry(ids.lv_name(self.config.cluster_id, name, kind="snapshot"),
                                                   "snapshot", name, ref.node, vg=ref.vg, source=source))
                faults.step("snapshot.placed")
            if entry.kind != "snapshot" or entry.name != name or entry.node != ref.node or entry.source != source:
                raise errors.exists(f"snapshot {name!r} exists for another volume")
            try:
                snap = self.agents.get(ref.node).call("CreateSnapshot", apb.CreateSnapshotRequest(
                    name=name, source_vg=ref.vg, source_lv=ref.lv))
            except errors.CsiError as exc:
                if entry.state == "placing" and exc.code in _NOTHING_MADE + (errors.Code.FAILED_PRECONDITION,
                                                                             errors.Code.NOT_FOUND):
                    self.placement.forget("snapshot", entry.key)
                raise
            self.placement.made(entry)
            made = self._to_snapshot(ref.node, snap)
            self.known_snapshots.remember(made.snapshot_id, snap)
            return csi.CreateSnapshotResponse(snapshot=made)

    def DeleteSnapshot(self, request, context):
        if not request.snapshot_id:
            raise errors.invalid("snapshot_id is required")
        ref = ids.parse_id(request.snapshot_id, kind="snapshot")
        if ref is None or not ref.lv.startswith(self.config.cluster_id + "-"):
            return csi.DeleteSnapshotResponse()
        with self.locks.hold(request.snapshot_id):
            self.known_snapshots.forget(request.snapshot_id)
            if not self._gone_with_node(ref.node, f"snapshot {request.snapshot_id}"):
                self.agents.get(ref.node).call("DeleteSnapshot", apb.DeleteSnapshotRequest(vg=ref.vg, lv=ref.lv))
            self.placement.forget("snapshot", ref.lv)
        return csi.DeleteSnapshotResponse()

    def ListSnapshots(self, request, context):
        if request.snapshot_id:
            if request.max_entries < 0:
                raise errors.invalid("max_entries must not be negative")
            ref = ids.parse_id(request.snapshot_id, kind="snapshot")
            entries = []
            if ref is not None and self._serves(ref.node):
                try:
                    snap = self.agents.get(ref.node).call("GetSnapshot", apb.GetSnapshotRequest(vg=ref.vg,
                                                                                                lv=ref.lv))
                    entries.append(self._to_snapshot(ref.node, snap))
                except errors.CsiError as exc:
                    if exc.code != errors.Code.NOT_FOUND:
                        raise
            if request.source_volume_id:
                entries = [e for e in entries if e.source_volume_id == request.source_volume_id]
            return csi.ListSnapshotsResponse(entries=[csi.ListSnapshotsResponse.Entry(snapshot=s) for s in entries])
        nodes, keep = None, (lambda node, snap: True)
        if request.source_volume_id:
            src = self._ref(request.source_volume_id)
            key = self.replicas.key_of(request.source_volume_id)
            entry = self.placement.journal.get(key) if key is not None else None
            # A replicated volume's snapshots are on its legs' nodes (every node, once the volume is deleted).
            nodes = ([src.node] if src is not None and self._serves(src.node) else [] if key is None else
                     sorted({d["node"] for d in entry.legs if self._serves(d["node"])}) if entry and entry.legs
                     else None)
            keep = lambda node, snap: self._to_snapshot(node, snap).source_volume_id == \
                request.source_volume_id  # noqa: E731
        page, next_token = listing.walk(self.agents, "snapshot", request.max_entries, request.starting_token,
                                        DEFAULT_PAGE, nodes=nodes, keep=keep)
        return csi.ListSnapshotsResponse(entries=[csi.ListSnapshotsResponse.Entry(
            snapshot=self._to_snapshot(node, snap)) for node, snap in page], next_token=next_token)

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
        if (key := self.replicas.key_of(request.volume_id)) is not None:
            return self.replicas.expand(request, key, required, limit)
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
