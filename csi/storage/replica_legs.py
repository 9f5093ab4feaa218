"""A leg of a replicated volume as its own storage node sees it: the md superblock the worker wrote through the
target (csi/node/raid.py reads and parses it, as the node plugin does at stage).

LIO writes to the LV beside the page cache, so what a buffered read of the LV here would return can be older
than the disk: the LV's buffers are dropped (`blockdev --flushbufs`) before mdadm reads the superblock. The
controller asks before it snapshots or clones a replicated volume (csi/controller/replica_sources.py): the
snapshot must be of a leg that holds every write the array acknowledged.

And where the other leg is now, after an operator replaced it (csi/legreplace.py): a worker running the volume's
array learns the new leg from here (csi/node/replica_join.py), since Kubernetes never changes the publish_context
it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.json_format import MessageToDict, ParseDict

from csi import capabilities as caps
from csi import contract, errors, ids, peers, runner
from csi.fsutil import remove, write_atomic
from csi.node import raid
from csi.proto import agent_pb2 as pb

FLUSH_TIMEOUT = 30.0
PEER_VERSION = 1


def examine(service, request) -> pb.LegSuperblock:
    rec = _leg_record(service, request)
    device = Path("/dev") / rec.vg / rec.lv
    runner.run(["blockdev", "--flushbufs", str(device)], timeout=FLUSH_TIMEOUT)
    sb = raid.examine(device)
    if sb is None:
        return pb.LegSuperblock(present=False)
    return pb.LegSuperblock(present=True, name=sb.name, uuid=sb.uuid, events=sb.events,
                            array_state=sb.array_state, recovering=sb.recovering)


class PeerLegs:
    """Where the other leg of each replicated volume is now, when an operator replaced it: one small JSON file
    per leg, beside the volume records (not in them: an agent of an earlier release reading a record with a
    field it does not know would skip the volume's export), 0600, written atomically, removed with the volume."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, vg: str, lv: str) -> Path:
        return self.directory / vg / f"{lv}.json"

    def save(self, vg: str, lv: str, peer: pb.LegLocation) -> None:
        write_atomic(self._path(vg, lv), json.dumps({"version": PEER_VERSION, "peer": MessageToDict(
            peer, preserving_proto_field_name=True)}), mode=0o600)

    def load(self, vg: str, lv: str) -> pb.LegLocation | None:
        try:
            data = json.loads(self._path(vg, lv).read_text())
        except FileNotFoundError:
            return None
        if data.get("version") != PEER_VERSION:
            raise errors.internal(f"peer-leg file of {vg}/{lv}: version {data.get('version')} is not "
                                  f"{PEER_VERSION} (written by a newer agent?)")
        return ParseDict(data["peer"], pb.LegLocation())

    def delete(self, vg: str, lv: str) -> None:
        remove(self._path(vg, lv))


def _leg_record(service, request):
    vg, lv = ids.check_lvm_name(request.vg, "vg"), ids.check_lvm_name(request.lv, "lv")
    rec = service.records.load(vg, lv)
    if rec is None or rec.deleting:
        raise errors.not_found(f"no volume {vg}/{lv} on {service.config.node_name}")
    if not caps.is_replica_leg(rec.attributes):
        raise errors.invalid(f"{vg}/{lv} is a plain volume, not a leg of a replicated one")
    return rec


def set_peer(service, request) -> pb.SetPeerLegResponse:
    """Controller only (authz.py): records where the other leg of this leg's volume is now."""
    with service.locks.hold(f"{request.vg}/{request.lv}"):
        rec = _leg_record(service, request)
        leg = contract.peer_leg(request.peer, rec.lv)
        if leg.storage_node == service.config.node_name:
            raise errors.invalid("the peer of a leg is on another storage node than the leg")
        service.peer_legs.save(rec.vg, rec.lv, request.peer)
    return pb.SetPeerLegResponse()


def peer(service, request, caller: peers.Peer) -> pb.PeerLeg:
    """The other leg's location, for the controller or the node plugin of a node this leg is granted to (the
    node it is staged on): nobody else learns where a volume's data is."""
    # No lock: two files read, each written atomically; a worker asks every few seconds while its volume runs
    # degraded, and a lock would turn the controller's grants and revokes of the leg meanwhile into ABORTED.
    rec = _leg_record(service, request)
    if caller.role != peers.CONTROLLER and not any(g.node and g.node == caller.node for g in rec.grants.values()):
        raise errors.CsiError(errors.Code.PERMISSION_DENIED, f"{caller} may not ask where the other leg of "
                              f"{rec.vg}/{rec.lv} is: the leg is not granted to its node")
    found = service.peer_legs.load(rec.vg, rec.lv)
    return pb.PeerLeg(present=True, peer=found) if found is not None else pb.PeerLeg(present=False)
