"""Snapshots and clones of replicated volumes, and the replicated volumes made from them.

- Which leg: a snapshot (or a clone) of a replicated volume is taken of one leg, the one proven to hold every
  write the array acknowledged. The worker's md is the only one that knows, and it writes what it knows into
  the legs' superblocks: a leg it failed is marked so in the other leg's superblock before any write that leg
  missed completes, and a leg being rebuilt carries its recovery offset. So the controller reads each reachable
  leg's superblock on its storage node (the agent's ExamineLeg) and picks by `current_leg`. A leg that went on
  alone wins; otherwise, with every leg reachable, a leg that is not being rebuilt and whose superblock is the
  most recent (its event count); with a leg unreachable, only a leg that shows it failed, or one whose peer the
  record holds outdated. Anything else is UNAVAILABLE: a snapshot of a leg that may have missed writes would
  be old data under a new name.
- The snapshot is that leg's thin snapshot, with the leg's md superblock and bitmap in its first MiB (agent
  tag `leg`, Snapshot.source_replicated): its source_volume_id is the replicated volume's.
- A replicated volume made from it (a restore) or from a replicated volume (a clone): its leg 0, the seed, is
  made from the snapshot (or the chosen leg) in the same thin pool on the same storage node, a thin snapshot
  (instant); its leg 1 is new and empty, on another storage node. The node creates the new volume's own array
  (its own name and UUID) from the seed at its first stage and md copies it to leg 1 in full
  (csi/node/replicated.py); contract.SEED names the seed leg.
- A plain volume from a replicated snapshot or volume is the plain path's (csi/controller/service.py): a copy
  from md's data offset in the leg (VolumeSource.offset_bytes), never a thin snapshot of the leg.
- Not yet: a replicated volume from a plain source (its data would have to move 1 MiB in), and a seed anywhere
  but in the source's own thin pool: INVALID_ARGUMENT / RESOURCE_EXHAUSTED saying so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from csi import errors, faults, ids
from csi.controller import replicas
from csi.controller.journal import Conflict, Entry
from csi.controller.replicas import IN_SYNC, OUTDATED, Leg, legs_of
from csi.node import raid
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi

log = logging.getLogger(__name__)

DEFAULT_EXTENT = 4 << 20      # LVM's, for a node whose pools are not known now
REREAD_DELAY = 0.5            # md's clean/dirty superblock updates are done well within it
# Agent answers after which its CreateSnapshot made nothing (as the plain CreateSnapshot's in service.py).
_NOTHING_MADE = (errors.Code.RESOURCE_EXHAUSTED, errors.Code.INVALID_ARGUMENT, errors.Code.FAILED_PRECONDITION,
                 errors.Code.NOT_FOUND)


def current_leg(key: str, legs: list[Leg], examined: dict[int, apb.LegSuperblock], away: dict[int, str],
                seed: int | None = None) -> int:
    """The index of a leg that holds every write the array of volume `key` acknowledged (examined: the
    superblock of each reachable leg; away: why the others could not be read; seed: the seed leg of a volume
    made from a source, whose array may not exist yet)."""
    name = ids.md_name(key)
    ours = {i: sb for i, sb in examined.items() if sb.present and sb.name == name}
    outdated = {leg.index for leg in legs if leg.state == OUTDATED}
    why_away = "; ".join(away.values())
    foreign = sorted(i for i, sb in examined.items() if sb.present and sb.name != name and i != seed)
    if foreign:
        raise errors.precondition(f"replicated volume {key}: leg {foreign[0]} carries the superblock of another "
                                  f"array ({examined[foreign[0]].name!r})")
    if not ours:
        if seed is not None and seed in examined and seed not in outdated:
            return seed      # the array was never created: the seed holds the volume's data, the others nothing
        if seed is None and len(examined) == len(legs) and not any(sb.present for sb in examined.values()):
            return min(examined)    # a volume no pod has written: its array was never created, every leg blank
        raise errors.unavailable(f"replicated volume {key}: no leg that can be read holds its array ("
                                 + (why_away or "the legs carry no superblock of it") + ")")
    usable = {i: sb for i, sb in ours.items() if i not in outdated and not sb.recovering}
    alone = sorted(i for i, sb in usable.items() if raid.went_on_alone(sb))
    if len(alone) > 1:
        raise errors.precondition(f"replicated volume {key}: legs {alone} each went on without the other; "
                                  "which holds the newest data cannot be told (mark one outdated)")
    if alone:
        return alone[0]
    others_away = [leg.index for leg in legs if leg.index not in examined]
    if usable and all(i in outdated for i in others_away):
        # Every leg is here (or the absent ones are recorded outdated): the superblock written last is the
        # newest; a leg that missed writes was never written after it fell out, so its count is the lower.
        return max(sorted(usable), key=lambda i: usable[i].events)
    raise errors.unavailable(f"replicated volume {key}: nothing proves a reachable leg holds the newest writes ("
                             + (why_away or "every reachable leg is outdated or being rebuilt") + ")")


def mid_update(key: str, count: int, examined: dict[int, apb.LegSuperblock]) -> bool:
    """Every leg in sync by its superblock, but their event counts differ: md writes them together, so the
    legs were most likely read during one of its superblock updates (a write after a pause marks the array
    dirty, and clean again a moment later). Read again, the counts agree, and leg 0 (in the volume's zone) is
    taken; a leg that really missed an update stays behind and is passed over."""
    sbs = list(examined.values())
    return len(sbs) == count and all(_in_sync(key, sb) for sb in sbs) and len({sb.events for sb in sbs}) > 1


def _in_sync(key: str, sb: apb.LegSuperblock) -> bool:
    return sb.present and sb.name == ids.md_name(key) and not sb.recovering and "." not in sb.array_state


def out_of_array(key: str, legs: list[Leg], examined: dict[int, apb.LegSuperblock]) -> dict[int, str]:
    """The legs the superblocks show out of the worker's array (failed, or being rebuilt) -> why: what the
    worker's md knows and the journal may not (no node tells the controller)."""
    ours = {i: sb for i, sb in examined.items() if sb.present and sb.name == ids.md_name(key)}
    out = {}
    for i, sb in ours.items():
        if sb.recovering:
            out[i] = f"leg {i} on {legs[i].node} is being rebuilt from the other leg"
        elif raid.went_on_alone(sb):
            for leg in legs:
                if leg.index != i and leg.index not in out:
                    out[leg.index] = (f"leg {leg.index} on {leg.node} missed writes: the superblock of leg {i} "
                                      "shows it failed (the worker puts it back once it answers)")
    return out


def rebuilt(key: str, legs: list[Leg], examined: dict[int, apb.LegSuperblock]) -> list[int]:
    """The legs recorded outdated that the worker has copied over in full since: every leg's superblock is
    this array's, shows every member active, none being rebuilt, all written together (one event count). An
    outdated leg is only ever put back cleared, as a new member (csi/node/raid.py readd), so in sync means
    rebuilt from the others."""
    outdated = [leg.index for leg in legs if leg.state == OUTDATED]
    sbs = [examined.get(leg.index) for leg in legs]
    if not outdated or any(sb is None or not sb.present or sb.name != ids.md_name(key) or sb.recovering or
                           "." in sb.array_state for sb in sbs):
        return []
    return outdated if len({sb.events for sb in sbs}) == 1 else []


@dataclass(frozen=True)
class Seed:
    """Where a replicated volume made from a source takes its leg 0 from."""
    node: str
    vg: str
    lv: str
    pool: str
    snapshot: bool
    size: int
    text: str         # "snapshot:<id>" / "volume:<id>": part of the request's identity


class ReplicaSources:
    """The snapshot and clone half of replicated volumes: `replicas` lends the journal, agents and locks (its
    `svc`, the ControllerService)."""

    def __init__(self, replicas):
        self.replicas = replicas
        self.svc = replicas.svc

    # ------------------------------------------------------------------------------------ which leg

    def current(self, key: str, entry: Entry) -> Leg:
        for attempt in range(2):
            try:
                examined, away = self.replicas._ask(entry, lambda leg, a: a.call(
                    "ExamineLeg", apb.ExamineLegRequest(vg=leg.vg, lv=key)))
            except errors.CsiError as exc:
                if exc.code != errors.Code.UNIMPLEMENTED:
                    raise
                raise errors.precondition("a storage node's agent is older than this controller and cannot "
                                          "examine a leg (ExamineLeg): finish upgrading the agents first") from None
            if attempt or not mid_update(key, len(entry.legs), examined):
                break
            time.sleep(REREAD_DELAY)
        return legs_of(entry)[current_leg(key, legs_of(entry), examined, away, replicas.seed_index(entry))]

    def examine(self, key: str, entry: Entry, reachable) -> dict[int, apb.LegSuperblock]:
        """The superblocks of the legs in `reachable` that can be examined now (best effort: for health and
        for taking an outdated mark back; a leg that cannot be examined is left out)."""
        examined = {}
        for leg in legs_of(entry):
            if leg.index in reachable:
                try:
                    examined[leg.index] = self.svc.agents.get(leg.node).call("ExamineLeg", apb.ExamineLegRequest(
                        vg=leg.vg, lv=key))
                except errors.CsiError as exc:
                    log.debug("leg %d of %s on %s not examined: %s", leg.index, key, leg.node, exc.message)
        return examined

    @staticmethod
    def behind(key: str, entry: Entry, examined: dict[int, apb.LegSuperblock]) -> dict[int, str]:
        return out_of_array(key, legs_of(entry), examined)

    def take_back_rebuilt(self, key: str, entry: Entry, examined: dict[int, apb.LegSuperblock]) -> None:
        """Records in sync the outdated legs the worker has copied over in full (`rebuilt`): the mark an
        operator set (mark-replica-leg) is taken back without anyone acting."""
        if mid_update(key, len(entry.legs), examined):
            examined = self.examine(key, entry, set(examined))    # read during md's superblock update: again
        done = rebuilt(key, legs_of(entry), examined)
        if not done:
            return
        for i in done:
            entry.legs[i]["state"] = IN_SYNC
        try:
            entry.version = self.svc.placement.journal.update(entry).version
        except Conflict:
            # Changed meanwhile (an operator's new mark, say): not applied over it; the next look tries again.
            fresh = self.svc.placement.journal.get(key)
            if fresh is not None:
                entry.legs, entry.version, entry.replaced = fresh.legs, fresh.version, fresh.replaced
            return
        log.info("volume %s: leg(s) %s, recorded outdated, are rebuilt and in sync: recorded so",
                 ids.replicated_volume_id(key), done)

    # ------------------------------------------------------------------------------------ a clean detach

    def stamp_clean(self, key: str, entry: Entry) -> None:
        """After an unpublish: when no node holds a grant on any leg any more and every leg's superblock shows
        the array in sync at one event count, records that count (Entry.clean). Best effort."""
        try:
            for leg in legs_of(entry):
                vol = self.svc.agents.get(leg.node).call("GetVolume", apb.GetVolumeRequest(vg=leg.vg, lv=key,
                                                                                           brief=True))
                if vol.initiators or leg.state == OUTDATED:
                    return
            examined = self.examine(key, entry, {leg.index for leg in legs_of(entry)})
        except errors.CsiError:
            return
        events = {sb.events for sb in examined.values() if _in_sync(key, sb)}
        if len(examined) != len(entry.legs) or len(events) != 1 or \
                not all(_in_sync(key, sb) for sb in examined.values()):
            return
        entry.clean = events.pop()
        try:
            entry.version = self.svc.placement.journal.update(entry).version
        except Conflict:
            entry.clean = None

    def spend_clean_stamp(self, key: str, entry: Entry, reachable) -> None:
        """Before a publish grants anything: the stamp of a clean detach is cleared (writes may follow), and
        used first. A leg whose node does not answer now is recorded outdated when every leg that answers still
        shows the stamped event count, in sync: nothing was written since the detach (no grant since, and md
        counts every change), so those legs hold everything, and the volume stages from them without anyone
        acting. The absent leg is copied over in full once it is back."""
        stamp, entry.clean = entry.clean, None
        away = [leg for leg in legs_of(entry) if leg.index not in reachable and leg.state != OUTDATED]
        if away:
            examined = self.examine(key, entry, reachable)
            if len(examined) == len(reachable) and all(_in_sync(key, sb) and sb.events == stamp
                                                       for sb in examined.values()):
                for leg in away:
                    entry.legs[leg.index]["state"] = OUTDATED
                log.warning("volume %s: leg(s) on %s do not answer; nothing was written since the volume was "
                            "detached with every leg in sync: recorded outdated, served from the others",
                            ids.replicated_volume_id(key), ", ".join(leg.node for leg in away))
        try:
            entry.version = self.svc.placement.journal.update(entry).version
        except Conflict:
            raise errors.aborted(f"the record of volume {ids.replicated_volume_id(key)} changed meanwhile; "
                                 "try again") from None

    # ------------------------------------------------------------------------------------ snapshots

    def snapshot(self, request, name: str, key: str) -> csi.CreateSnapshotResponse:
        svc = self.svc
        source = "volume:" + request.source_volume_id
        with svc.locks.hold("snapshot:" + name):
            entry = svc.placement.find("snapshot", name)
            if entry is not None and (entry.kind != "snapshot" or entry.name != name or entry.source != source):
                raise errors.exists(f"snapshot {name!r} exists for another volume")
            if entry is not None and entry.state == "placing" and not self._snapshot_exists(entry):
                # Placed on a leg, never made: that leg may not be the current one any more. Deleted there first
                # (ABORTED while the first call still runs on that agent), so a late lvcreate leaves no orphan.
                svc.agents.get(entry.node).call("DeleteSnapshot", apb.DeleteSnapshotRequest(vg=entry.vg,
                                                                                         lv=entry.key))
                svc.placement.forget("snapshot", entry.key)
                entry = None
            if entry is None:
                leg = self.current(key, self.replicas._entry(key, request.source_volume_id))
                entry = svc.placement.claim(Entry(ids.lv_name(svc.config.cluster_id, name, kind="snapshot"),
                                                  "snapshot", name, leg.node, vg=leg.vg, source=source))
                faults.step("snapshot.placed")
                log.info("snapshot %s of %s is taken of its leg on %s", name, request.source_volume_id, leg.node)
            try:
                snap = svc.agents.get(entry.node).call("CreateSnapshot", apb.CreateSnapshotRequest(
                    name=name, source_vg=entry.vg, source_lv=key))
            except errors.CsiError as exc:
                if entry.state == "placing" and exc.code in _NOTHING_MADE:
                    svc.placement.forget("snapshot", entry.key)
                raise
            svc.placement.made(entry)
            return csi.CreateSnapshotResponse(snapshot=svc._to_snapshot(entry.node, snap))

    def _snapshot_exists(self, entry: Entry) -> bool:
        try:
            self.svc.agents.get(entry.node).call("GetSnapshot", apb.GetSnapshotRequest(vg=entry.vg, lv=entry.key))
            return True
        except errors.CsiError as exc:
            if exc.code == errors.Code.NOT_FOUND:
                return False
            raise

    # ------------------------------------------------------------------------------------ seeds

    @staticmethod
    def source_text(request) -> str:
        """"snapshot:<id>" / "volume:<id>" of request.volume_content_source ("" without one): part of the
        request's identity, compared with the record's on a retry before anything is looked up."""
        if not request.HasField("volume_content_source"):
            return ""
        src = request.volume_content_source
        if src.HasField("snapshot") and src.snapshot.snapshot_id:
            return "snapshot:" + src.snapshot.snapshot_id
        if src.HasField("volume") and src.volume.volume_id:
            return "volume:" + src.volume.volume_id
        raise errors.invalid("volume_content_source names no snapshot_id or volume_id")

    @staticmethod
    def recorded_seed(entry: Entry) -> Seed:
        recorded = entry.legs[replicas.seed_index(entry) or 0].get("seed")
        if not isinstance(recorded, dict):
            raise errors.precondition(f"the record of volume {entry.name!r} names no seed for its source")
        return Seed(**recorded)

    def seed(self, request) -> Seed:
        """The seed of a replicated volume made from request.volume_content_source: a snapshot of a replicated
        volume, or a replicated volume (its current leg)."""
        svc, src = self.svc, request.volume_content_source
        if src.HasField("snapshot"):
            sid = src.snapshot.snapshot_id
            ref = ids.parse_id(sid, kind="snapshot") if sid else None
            if ref is None or not svc._serves(ref.node):
                raise errors.not_found(f"snapshot {sid!r} does not exist")
            snap = svc.agents.get(ref.node).call("GetSnapshot", apb.GetSnapshotRequest(vg=ref.vg, lv=ref.lv))
            if not snap.source_replicated:
                raise errors.invalid(f"snapshot {sid} is of a plain volume: a replicated volume (replicas: 2) is "
                                     "made only from a snapshot of a replicated volume for now; restore it into "
                                     "a plain volume")
            return Seed(ref.node, ref.vg, ref.lv, self._thin_pool(ref.node, ref.vg), True, snap.size_bytes,
                        "snapshot:" + sid)
        if src.HasField("volume"):
            vid = src.volume.volume_id
            key = self.replicas.key_of(vid) if vid else None
            if key is None:
                if vid and svc._ref(vid) is not None:
                    raise errors.invalid(f"volume {vid} is a plain volume: a replicated volume is cloned only from "
                                         "a replicated volume for now")
                raise errors.not_found(f"volume {vid!r} does not exist")
            leg = self.current(key, self.replicas._entry(key, vid))
            vol = svc.agents.get(leg.node).call("GetVolume", apb.GetVolumeRequest(vg=leg.vg, lv=key, brief=True))
            return Seed(leg.node, leg.vg, key, leg.pool, False, vol.size_bytes, "volume:" + vid)
        raise errors.invalid("volume_content_source names neither a snapshot nor a volume")

    def restore_size(self, node: str, snap: apb.Snapshot) -> int:
        """A replicated snapshot's size_bytes (Kubernetes' restoreSize): its array's size rounded down to the
        pool's extent, which is the source claim's own size when that was a whole number of extents. Not the
        array's exact size (a leg is its volume plus md's reserve, rounded up to an extent): external-provisioner
        refuses a restore claim smaller than restoreSize, and a claim of the source's size must be accepted; the
        restore is made at least as large as the source's array whatever it asks (Replicas.create)."""
        h = self.svc.agents.health(node)
        extent = next((p.extent_bytes for p in (h.info.pools if h is not None and h.info is not None else ())
                       if p.vg == snap.vg and p.extent_bytes), DEFAULT_EXTENT)
        return max(0, replicas.usable(snap.size_bytes)) // extent * extent

    def _thin_pool(self, node: str, vg: str) -> str:
        h = self.svc.agents.health(node)
        for p in (h.info.pools if h is not None and h.info is not None else ()):
            if p.vg == vg and p.thin_pool:
                return p.name
        raise errors.unavailable(f"storage node {node} does not report the thin pool of VG {vg} now")

    def volume_source(self, seed: Seed) -> apb.VolumeSource:
        return apb.VolumeSource(node=seed.node, vg=seed.vg, lv=seed.lv, snapshot=seed.snapshot,
                                size_bytes=seed.size)
