"""Replicated volumes (StorageClass `replicas: "2"`), the controller's side: two LVs of one name (the volume's
key, ids.lv_name of its request name) on two storage nodes of one zone, each exported as a plain volume is; the
node assembles them as an md RAID1 (csi/node).

The volume_id names no storage node ("r1:<key>", ids.py): replacing a leg must not change it, and two node
names would not fit CSI's 128 bytes. Where the legs are is in the placement journal's record of the volume
(journal.Entry.legs), claimed with both legs before any agent is asked to make one, so a retry goes to the same
nodes and a crash leaves a record naming every LV that may exist. The record also holds each leg's state:
"outdated" once writes may go on without it (csi/contract.py gives it to the node, which never reads such a
leg as current).

The legs carry the attributes capabilities.ATTR_REPLICAS and ATTR_LEG on their agents: listing, health and the
journal's adoption scan know them by these, so a leg never shows up, or is adopted, as a plain volume.
Snapshots and clones of replicated volumes, and the volumes made from them: csi/controller/replica_sources.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from csi import capabilities as caps
from csi import contract, errors, faults, ids
from csi.controller import health, late_grants
from csi.controller.journal import Conflict, Entry
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi

log = logging.getLogger(__name__)

IN_SYNC, OUTDATED = "in-sync", "outdated"
# Each leg is this much larger than the volume: md's metadata 1.2 superblock and its write-intent bitmap take
# the first MiB of each leg (the node creates the array with --data-offset=1M), and the array must hold at
# least the bytes asked for.
MD_RESERVE = 1 << 20


def usable(leg_bytes: int, limit: int = 0) -> int:
    """The capacity a replicated volume reports for legs of leg_bytes: at most what its array holds."""
    size = leg_bytes - MD_RESERVE
    return min(size, limit) if limit else size


def mark_legs(journal, entry: Entry, indexes: list[int], state: str) -> None:
    """Records legs' state before the caller goes on (the outdated record must be durable before writes go on
    without the leg); a concurrent change of the record is read again and applied to it."""
    for _ in range(5):
        for i in indexes:
            entry.legs[i]["state"] = state
        try:
            entry.version = journal.update(entry).version
            return
        except Conflict:
            fresh = journal.get(entry.key)
            if fresh is None:
                raise errors.aborted(f"volume {entry.name!r} was deleted meanwhile") from None
            entry.legs, entry.version, entry.state = fresh.legs, fresh.version, fresh.state
    raise errors.aborted(f"the journal record of volume {entry.name!r} keeps changing; try again")


COUNT = 2
DOWN = (errors.Code.UNAVAILABLE, errors.Code.DEADLINE_EXCEEDED)     # an agent that does not answer
# Agent answers after which nothing was made on that leg's node (as service._NOTHING_MADE).
_NOTHING_MADE = (errors.Code.RESOURCE_EXHAUSTED, errors.Code.INVALID_ARGUMENT)


@dataclass(frozen=True)
class Leg:
    index: int
    node: str
    pool: str
    vg: str
    state: str

    def ref(self, key: str) -> ids.LvRef:
        return ids.LvRef(self.node, self.vg, key)


def seed_index(entry: Entry) -> int | None:
    """The seed leg of a volume made from a replicated source (csi/controller/replica_sources.py), else None."""
    return next((i for i, d in enumerate(entry.legs) if d.get("seed")), None)


def legs_of(entry: Entry) -> list[Leg]:
    return [Leg(i, d["node"], d.get("pool", ""), d.get("vg", ""), d.get("state", IN_SYNC))
            for i, d in enumerate(entry.legs)]


def leg_attributes(attributes: dict[str, str], index: int) -> dict[str, str]:
    return dict(attributes, **{caps.ATTR_REPLICAS: str(COUNT), caps.ATTR_LEG: str(index)})


def volume_context(vol: apb.Volume) -> dict[str, str]:
    ctx = {"fsType": vol.attributes.get("fsType", ""), "accessType": vol.attributes.get("accessType", "")}
    if vol.attributes.get(caps.PARAM_MKFS_OPTIONS):
        ctx[caps.PARAM_MKFS_OPTIONS] = vol.attributes[caps.PARAM_MKFS_OPTIONS]
    return ctx


class Replicas:
    """The replicated-volume half of the ControllerService: `service` lends its agents, journal (placement),
    node directory, locks and topology; it dispatches "r1:" ids and replicas=2 CreateVolume here."""

    def __init__(self, service):
        from csi.controller.replica_sources import ReplicaSources   # it builds on this module's legs
        self.svc = service
        self.sources = ReplicaSources(self)
        self.late = late_grants.LateGrants(service, legs_of)

    # ------------------------------------------------------------------------------------ look-up

    def key_of(self, volume_id: str) -> str | None:
        """The key of a replicated volume_id of this cluster, None for any other ID."""
        key = ids.parse_replicated_id(volume_id)
        return key if key is not None and key.startswith(self.svc.config.cluster_id + "-") else None

    def _entry(self, key: str, volume_id: str) -> Entry:
        entry = self.svc.placement.journal.get(key)
        if entry is None or not entry.legs:
            raise errors.not_found(f"volume {volume_id} does not exist")
        return entry

    def _vg_of(self, node: str, pool: str) -> str:
        h = self.svc.agents.health(node)
        for p in (h.info.pools if h is not None and h.info is not None else ()):
            if p.name == pool:
                return p.vg
        return ""   # filled in from the agent's answer (made())

    def _volume(self, volume_id: str, entry: Entry, vol: apb.Volume, size: int) -> csi.Volume:
        out = csi.Volume(volume_id=volume_id, capacity_bytes=size, volume_context=volume_context(vol),
                         accessible_topology=self.svc._topology(entry.node))
        kind, _, sid = entry.source.partition(":")
        if kind == "snapshot":
            out.content_source.snapshot.snapshot_id = sid
        elif kind == "volume":
            out.content_source.volume.volume_id = sid
        return out

    def _ask(self, entry: Entry, fn) -> tuple[dict[int, object], dict[int, str]]:
        """fn(leg, agent client) on every leg: (answer by leg index, why not by leg index) for the legs whose
        agent is down, unknown or retired, or whose LV is gone. Other errors are raised."""
        answers, missing = {}, {}
        for leg in legs_of(entry):
            if not self.svc._serves(leg.node):
                missing[leg.index] = f"storage node {leg.node} is retired or not known"
                continue
            try:
                answers[leg.index] = fn(leg, self.svc.agents.get(leg.node))
            except errors.CsiError as exc:
                if exc.code not in DOWN + (errors.Code.NOT_FOUND,):
                    raise
                missing[leg.index] = f"leg {leg.index} on {leg.node}: {exc.message}"
        return answers, missing

    def _get_legs(self, key: str, entry: Entry, brief: bool = True):
        return self._ask(entry, lambda leg, a: a.call("GetVolume", apb.GetVolumeRequest(
            vg=leg.vg, lv=key, brief=brief)))

    # ------------------------------------------------------------------------------------ create / delete

    def create(self, request, name: str, params: caps.Params, access: caps.Access, required: int, limit: int,
               requisite, preferred, attributes: dict[str, str]) -> csi.CreateVolumeResponse:
        caps.check_replicated(access)
        svc = self.svc
        source = self.sources.source_text(request)
        key = ids.lv_name(svc.config.cluster_id, name)
        with svc.locks.hold("name:" + name):
            entry = svc.placement.find("volume", name)
            if entry is not None and entry.legs and entry.state == "placing" and \
                    any(svc.agents.is_retired(leg.node) for leg in legs_of(entry)):
                log.warning("volume %r was being placed on a retired storage node: placing it again", name)
                self._undo(key, entry)
                entry = None
            seed = None
            if source and entry is not None and entry.source == source:
                seed = self.sources.recorded_seed(entry)     # a retry: the seed chosen then, whatever is current now
            elif source and entry is None:
                seed = self.sources.seed(request)
            if seed is not None:
                # The new legs are at least the seed's size, whatever was asked: its array must hold the source's
                # (a leg is its volume plus md's reserve, rounded to the pool's extent, so a claim of the source's
                # own size asks a little less than the source leg's array holds).
                held = usable(seed.size)
                if limit and held > limit:
                    raise errors.out_of_range(f"the source holds {held} bytes, above limit_bytes {limit}")
                required = max(required, held)
                attributes = dict(attributes, source=seed.text)
            if entry is None:
                from csi.controller import replica_placement    # it builds on this module's legs
                # No limit on the legs: their extent rounding is above the reserve; the capacity reported is capped.
                entry = svc.placement.claim(
                    replica_placement.place_seeded(self, key, name, params, required + MD_RESERVE, requisite,
                                                   preferred, seed) if seed is not None else
                    replica_placement.place(self, key, name, params, required + MD_RESERVE, 0, requisite, preferred))
                faults.step("replicas.placed")
            if entry.kind != "volume" or entry.name != name or not entry.legs:
                raise errors.exists(f"volume {name!r} exists as another object or as a plain volume "
                                    f"({caps.PARAM_REPLICAS}: 1)")
            if entry.source != source:
                raise errors.exists(f"volume {name!r} exists with another content source")
            size = max([required + MD_RESERVE] + [leg.get("size", 0) for leg in entry.legs])
            vols = []
            for leg in legs_of(entry):
                try:
                    vols.append(svc.agents.get(leg.node).call("CreateVolume", apb.CreateVolumeRequest(
                        name=name, pool=leg.pool, size_bytes=size, attributes=leg_attributes(attributes, leg.index),
                        source=self.sources.volume_source(seed) if seed and leg.index == seed_index(entry)
                        else None)))
                except errors.CsiError as exc:
                    if entry.state == "placing" and exc.code in _NOTHING_MADE:
                        # This node made nothing (its pool filled up since the poll, say): undo the legs made,
                        # so the retry places the volume afresh instead of insisting on this pair.
                        self._undo(key, entry)
                    raise
                faults.step(f"replicas.leg{leg.index}-made")
            self._made(entry, vols)
            capacity = usable(min(v.size_bytes for v in vols), limit)
            if capacity < required:
                raise errors.exists(f"volume {name!r} exists with size {capacity}, outside the range asked")
            log.info("volume %s is replicated on %s (%d bytes)", name,
                     ", ".join(f"{leg.node}/{leg.vg}" for leg in legs_of(entry)), capacity)
            volume = self._volume(ids.replicated_volume_id(key), entry, vols[0], capacity)
            return csi.CreateVolumeResponse(volume=volume)

    def _made(self, entry: Entry, vols: list[apb.Volume]) -> None:
        """Records that every leg exists (ready), with the VG each agent answered."""
        if entry.state == "ready" and all(leg.get("vg") == v.vg for leg, v in zip(entry.legs, vols)):
            return
        for leg, v in zip(entry.legs, vols):
            leg["vg"] = v.vg
        entry.state = "ready"
        try:
            self.svc.placement.journal.update(entry)
        except Conflict:
            pass   # another controller wrote it since; it says at least as much

    def _undo(self, key: str, entry: Entry) -> None:
        """Deletes the legs a placement may have made, then its record; a leg that cannot be deleted now keeps
        the record (the next call tries again)."""
        self._delete_legs(key, entry, f"volume {entry.name!r}")
        self.svc.placement.forget("volume", key)

    def _drop_replaced(self, key: str, entry: Entry) -> None:
        """Deletes the LVs of replaced legs whose nodes answer (or are retired) and forgets them."""
        kept = []
        for d in entry.replaced:
            node = d.get("node", "")
            try:
                if not self.svc._gone_with_node(node, f"replaced leg of volume {entry.name!r}"):
                    self.svc.agents.get(node).call("DeleteVolume", apb.DeleteVolumeRequest(vg=d.get("vg", ""), lv=key))
                log.info("volume %s: the replaced leg on %s is deleted", entry.name, node)
            except errors.CsiError as exc:
                if exc.code != errors.Code.NOT_FOUND:
                    kept.append(d)
        if kept != entry.replaced:
            entry.replaced = kept
            try:
                entry.version = self.svc.placement.journal.update(entry).version
            except Conflict:
                pass     # changed meanwhile: the next call looks again

    def _delete_legs(self, key: str, entry: Entry, what: str) -> None:
        if entry.replaced:
            self._drop_replaced(key, entry)
            if entry.replaced:
                raise errors.unavailable(f"{what}: a replaced leg on {entry.replaced[0].get('node')} cannot be "
                                         "deleted now (its node does not answer; retire it if it is gone)")
        for leg in legs_of(entry):
            if self.svc._gone_with_node(leg.node, f"leg {leg.index} of {what}"):
                continue
            vg = leg.vg or self._vg_of(leg.node, leg.pool)
            if not vg:
                # Placed, never answered, and the node's pools are not known now: ask by name.
                try:
                    vg = self.svc.agents.get(leg.node).call("GetVolume", apb.GetVolumeRequest(name=entry.name)).vg
                except errors.CsiError as exc:
                    if exc.code != errors.Code.NOT_FOUND:
                        raise
                    continue
            try:
                self.svc.agents.get(leg.node).call("DeleteVolume", apb.DeleteVolumeRequest(vg=vg, lv=key))
            except errors.CsiError as exc:
                if exc.code != errors.Code.NOT_FOUND:
                    raise
            faults.step(f"replicas.leg{leg.index}-deleted")

    def delete(self, key: str, volume_id: str) -> csi.DeleteVolumeResponse:
        with self.svc.locks.hold(volume_id):
            entry = self.svc.placement.journal.get(key)
            if entry is None or not entry.legs:
                return csi.DeleteVolumeResponse()   # never made, or deleted: success, as the spec says
            self._undo(key, entry)
        return csi.DeleteVolumeResponse()

    # ------------------------------------------------------------------------------------ publish

    def publish(self, request, key: str, access: caps.Access, node_id: str, node_name: str
                ) -> csi.ControllerPublishVolumeResponse:
        """Grants the node both legs. A leg whose agent does not answer is named in the context without a grant:
        the node decides whether the leg it can reach is provably current (csi/node/replicated.py). It is not
        marked outdated here: the record cannot tell whether the leg that answers went on alone or was itself
        left behind by a worker that wrote alone to the one that does not answer; unless the volume was detached
        cleanly since its last publish (Entry.clean: ReplicaSources.spend_clean_stamp). A publish that could
        reach only legs recorded outdated is refused: it would serve old data."""
        caps.check_replicated(access)
        svc = self.svc
        with svc.locks.hold(request.volume_id):
            entry = self._entry(key, request.volume_id)
            vols, missing = self._get_legs(key, entry)
            if not vols:
                raise errors.unavailable(f"no leg of volume {request.volume_id} can be reached: "
                                         + "; ".join(missing.values()))
            if entry.replaced:
                self._drop_replaced(key, entry)
            if len(vols) == len(entry.legs) and any(d.get("state") == OUTDATED for d in entry.legs):
                self.sources.take_back_rebuilt(key, entry, self.sources.examine(key, entry, vols))
            legs = {leg.index: leg for leg in legs_of(entry)}
            any_vol = next(iter(vols.values()))
            svc._check_compatible(any_vol, access)
            initiators = [i for v in vols.values() for i in v.initiators]
            others = sorted({i.iqn for i in initiators if i.iqn != node_id})
            if others and svc._single_node(any_vol):
                raise errors.precondition(f"volume {request.volume_id} is published to {others[0]} and its access "
                                          "mode allows one node only")
            read_only = request.readonly or access.read_only
            mine = [i for i in initiators if i.iqn == node_id]
            if mine and any(i.read_only != read_only for i in mine):
                raise errors.exists(f"volume {request.volume_id} is already published to {node_id} "
                                    f"{'read-only' if mine[0].read_only else 'read-write'}; unpublish it first")
            if entry.clean is not None:
                self.sources.spend_clean_stamp(key, entry, vols)
                legs = {leg.index: leg for leg in legs_of(entry)}
            current = [i for i in vols if legs[i].state == IN_SYNC]
            if not current:
                raise errors.unavailable(
                    f"volume {request.volume_id}: the legs that answer are outdated and the leg(s) holding the "
                    f"newest data do not answer ({'; '.join(missing.values())}); serving it would serve old data")
            grants, failed = {}, dict(missing)
            for i in sorted(vols):
                try:
                    grants[i] = svc.agents.get(legs[i].node).call("GrantAccess", apb.GrantAccessRequest(
                        vg=legs[i].vg, lv=key, initiator_iqn=node_id, read_only=read_only, node_name=node_name,
                        mutual_chap=vols[i].attributes.get("mutualChap") == "true"))
                except errors.CsiError as exc:
                    if exc.code not in DOWN:
                        raise
                    failed[i] = f"leg {i} on {legs[i].node}: {exc.message}"
            if not any(legs[i].state == IN_SYNC for i in grants):
                raise errors.unavailable(f"volume {request.volume_id}: no in-sync leg could be granted: "
                                         + "; ".join(failed.values()))
            if failed:
                log.warning("volume %s published to %s on %d leg(s) of %d: %s", request.volume_id, node_id,
                            len(grants), len(legs), "; ".join(failed.values()))
            # The legs left out are granted once their nodes answer (late_grants.py): the pod may run long.
            late_grants.record(svc.placement.journal, entry, node_id, node_name, read_only,
                               [i for i in failed if i in legs])
            if failed:
                self.late.note(key)
            outdated = {leg.index for leg in legs_of(entry) if leg.state == OUTDATED}
        # No secret: publish_context ends up in the VolumeAttachment (csi/contract.py). Every leg, the ones not
        # granted without a target: the node must know they exist.
        return csi.ControllerPublishVolumeResponse(publish_context=contract.replicated_publish_context([
            (contract.publish_context(grants[i].target_iqn, grants[i].portals, grants[i].lun, legs[i].node,
                                      svc.agents.node(legs[i].node).address) if i in grants else None,
             legs[i].node, legs[i].vg, i in outdated)
            for i in sorted(legs)], seed=seed_index(entry)))

    def _mark(self, entry: Entry, indexes: list[int], state: str) -> None:
        mark_legs(self.svc.placement.journal, entry, indexes, state)

    def set_leg_state(self, key: str, node: str, state: str) -> None:
        """Marks the leg of volume `key` on storage node `node` in-sync or outdated (the seam for whoever learns
        it: a resync finished, a leg dropped out of an array)."""
        if state not in (IN_SYNC, OUTDATED):
            raise errors.invalid(f"leg state must be {IN_SYNC} or {OUTDATED}")
        entry = self._entry(key, ids.replicated_volume_id(key))
        indexes = [leg.index for leg in legs_of(entry) if leg.node == node]
        if not indexes:
            raise errors.not_found(f"volume {ids.replicated_volume_id(key)} has no leg on {node}")
        self._mark(entry, indexes, state)

    def unpublish(self, request, key: str) -> csi.ControllerUnpublishVolumeResponse:
        """Revokes the node on every leg (fencing holds on both). A leg whose agent does not answer fails the
        call after the others are revoked: an OK would let the attacher believe the node fenced from it; unless
        the leg is recorded outdated, so that nothing it holds is read again."""
        svc = self.svc
        with svc.locks.hold(request.volume_id):
            entry = svc.placement.journal.get(key)
            if entry is None or not entry.legs:
                return csi.ControllerUnpublishVolumeResponse()
            problems = []
            for leg in legs_of(entry):
                try:
                    # In the try: a leg on a node not known at all must not keep the other leg from its revoke.
                    if svc._gone_with_node(leg.node, f"leg {leg.index} of volume {request.volume_id}"):
                        continue
                    client = svc.agents.get(leg.node)
                    if request.node_id:
                        targets = [request.node_id]
                    else:
                        vol = client.call("GetVolume", apb.GetVolumeRequest(vg=leg.vg, lv=key, brief=True))
                        targets = [i.iqn for i in vol.initiators]
                    for iqn in filter(None, map(ids.normalize_iqn, targets)):
                        r = client.call("RevokeAccess", apb.RevokeAccessRequest(vg=leg.vg, lv=key, initiator_iqn=iqn))
                        log.info("revoked %s on leg %d of %s (%d live session(s) ended)", iqn, leg.index,
                                 request.volume_id, r.sessions_ended)
                except errors.CsiError as exc:
                    if exc.code == errors.Code.NOT_FOUND:
                        continue
                    if leg.state == OUTDATED and exc.code in DOWN:
                        # Nothing on an outdated leg is ever read again (it is cleared and copied over in full
                        # when it is back), so its revoke may wait: the volume can move on (mark-replica-leg).
                        log.warning("leg %d of %s on %s is outdated and does not answer: its grant to %s stays "
                                    "until a later unpublish (%s)", leg.index, request.volume_id, leg.node,
                                    request.node_id or "every node", exc.message)
                        continue
                    problems.append(exc)
            if problems:
                raise problems[0]
            late_grants.forget(svc.placement.journal, entry, ids.normalize_iqn(request.node_id) or request.node_id)
            self.sources.stamp_clean(key, entry)
        return csi.ControllerUnpublishVolumeResponse()

    # ------------------------------------------------------------------------------------ look at it

    def get_volume(self, key: str, volume_id: str) -> csi.ControllerGetVolumeResponse:
        entry = self._entry(key, volume_id)
        vols, missing = self._get_legs(key, entry)
        if not vols:
            raise errors.unavailable(f"no leg of volume {volume_id} answers: " + "; ".join(missing.values()))
        published = sorted({i.iqn for v in vols.values() for i in v.initiators})
        return csi.ControllerGetVolumeResponse(
            volume=self._volume(volume_id, entry, next(iter(vols.values())),
                                usable(min(v.size_bytes for v in vols.values()))),
            status=csi.ControllerGetVolumeResponse.VolumeStatus(published_node_ids=published))

    def validate(self, request, key: str) -> csi.ValidateVolumeCapabilitiesResponse:
        entry = self._entry(key, request.volume_id)
        vols, missing = self._get_legs(key, entry)
        if not vols:
            raise errors.unavailable(f"no leg of volume {request.volume_id} answers: " + "; ".join(missing.values()))
        return self.svc._validated(request, next(iter(vols.values())), caps.check_replicated)

    def health(self, key: str, volume_id: str) -> csi.ControllerGetVolumeHealthResponse:
        """DEGRADED per leg that is missing, unhealthy, outdated or, as the legs' superblocks show, out of the
        worker's array; INACCESSIBLE when no in-sync leg is usable."""
        entry = self._entry(key, volume_id)
        vols, missing = self._get_legs(key, entry, brief=False)
        if entry.replaced:
            self._drop_replaced(key, entry)
        examined = self.sources.examine(key, entry, vols)
        self.sources.take_back_rebuilt(key, entry, examined)
        behind = self.sources.behind(key, entry, examined)
        statuses, usable = [], 0
        for leg in legs_of(entry):
            vol = vols.get(leg.index)
            if vol is None:
                statuses.append(health.Entry(status=csi.DEGRADED, reason="ReplicaLegUnreachable",
                                             message=missing[leg.index]))
            elif not vol.healthy:
                statuses += [health.Entry(status=csi.DEGRADED, reason=e.reason, message=f"leg {leg.index}: "
                                          + e.message) for e in health.of_volume(leg.node, vol)]
            elif leg.state == OUTDATED:
                statuses.append(health.Entry(status=csi.DEGRADED, reason="ReplicaLegOutdated", message=(
                    f"leg {leg.index} on {leg.node} missed writes the other leg holds; the node resyncs it")))
            elif leg.index in behind:
                statuses.append(health.Entry(status=csi.DEGRADED, reason="ReplicaLegOutOfArray",
                                             message=behind[leg.index]))
            else:
                usable += 1
        if not usable:
            statuses.insert(0, health.Entry(status=csi.INACCESSIBLE, reason="NoReplicaLegInSync",
                                            message="no leg holding the newest data is usable"))
        return csi.ControllerGetVolumeHealthResponse(volume_health=csi.VolumeHealth(
            volume_id=volume_id, health_statuses=statuses))

    # ------------------------------------------------------------------------------------ expand

    def expand(self, request, key: str, required: int, limit: int) -> csi.ControllerExpandVolumeResponse:
        """Grows both legs (every leg must answer: a leg left smaller could not rejoin the array); the node
        grows the array, then the filesystem."""
        with self.svc.locks.hold(request.volume_id):
            entry = self._entry(key, request.volume_id)
            sizes = []
            for leg in legs_of(entry):
                if not self.svc._serves(leg.node):
                    raise errors.precondition(f"leg {leg.index} of volume {request.volume_id} is on {leg.node}, "
                                              "which is retired or not known: replace the leg first")
                vol = self.svc.agents.get(leg.node).call("ExpandVolume", apb.ExpandVolumeRequest(
                    vg=leg.vg, lv=key, size_bytes=(required or limit) + MD_RESERVE))
                sizes.append(vol.size_bytes)
        return csi.ControllerExpandVolumeResponse(capacity_bytes=usable(min(sizes), limit),
                                                  node_expansion_required=True)

    # ------------------------------------------------------------------------------------ listing

    def listed(self, node: str, vol: apb.Volume) -> csi.ListVolumesResponse.Entry:
        """A replicated volume as ListVolumes shows it: once, from its leg 0 (listing.keep_volume drops the
        other legs), published where leg 0 is granted."""
        return csi.ListVolumesResponse.Entry(
            volume=csi.Volume(volume_id=ids.replicated_volume_id(vol.lv), capacity_bytes=usable(vol.size_bytes),
                              volume_context=volume_context(vol), accessible_topology=self.svc._topology(node)),
            status=csi.ListVolumesResponse.VolumeStatus(published_node_ids=[i.iqn for i in vol.initiators]))
