"""Legs a publish could not grant (their storage node did not answer), granted once that node is back.

ControllerPublishVolume of a replicated volume grants every leg whose agent answers and names the others in
publish_context without a target; the worker runs the array on the legs it got. Kubernetes publishes again only
when the pod moves, so without this the volume would run on one leg until then. The publish records each leg it
left ungranted in the volume's journal record (Entry.ungranted: leg, initiator, node, read-only): durable, so a
controller that takes over (HA) finds them too. A loop in the controller grants each such leg once its agent
answers, and tells the other leg's agent where it is (SetPeerLeg, as replace-replica-leg does): the worker's node
plugin asks it (csi/node/replica_join.py), logs in and re-adds the leg. An item goes once its grant is made, or
once its node no longer holds the volume on the other leg (unpublished meanwhile: nothing to grant), or when the
volume is unpublished from that node. The grant is made under the volume's lock, as an unpublish runs, so an
unpublish by this controller cannot slip between the check and the grant; the loop runs in every controller
replica (the lock is per process), so the grants are read again after the grant and a grant whose node was
unpublished meanwhile is revoked. What is left: an unpublish by another replica that revokes this leg before
the grant and the other leg after that second look; the grant (on this leg only) then stays until the node's
next unpublish of the volume. The leg's outdated mark goes with it (LegLocation.outdated): the node copies an
outdated leg in full.
"""

from __future__ import annotations

import logging
import threading

from csi import errors, ids
from csi.controller.journal import Conflict, Entry
from csi.proto import agent_pb2 as apb

log = logging.getLogger(__name__)

RETRY_S = 10.0
CALL_TIMEOUT = 10.0     # per agent call, under the volume's lock: publish and unpublish wait for none longer
DOWN = (errors.Code.UNAVAILABLE, errors.Code.DEADLINE_EXCEEDED)


def tell(agents, key: str, holders, leg, grant, outdated: bool, replaced: str = "") -> None:
    """SetPeerLeg on the agent of each leg in `holders`: `leg` (index, node, vg) is where `grant` (its
    GrantAccessResponse) says, in place of `replaced`'s leg ("": the same leg, granted late). The nodes an earlier
    location of that index replaced stay named, so a worker whose publish_context names any of them (a pod that
    ran through two replacements) still finds this leg; a worker naming another node ignores it."""
    for x in holders:
        client = agents.get(x.node)
        before = client.call("GetPeerLeg", apb.GetPeerLegRequest(vg=x.vg, lv=key), timeout=CALL_TIMEOUT)
        chain = list(before.peer.replaces) + [before.peer.storage_node] \
            if before.present and before.peer.index == leg.index else []
        replaces = [n for n in dict.fromkeys(chain + ([replaced] if replaced else [])) if n and n != leg.node]
        client.call("SetPeerLeg", apb.SetPeerLegRequest(vg=x.vg, lv=key, peer=apb.LegLocation(
            index=leg.index, storage_node=leg.node, vg=leg.vg, agent=agents.node(leg.node).address,
            target_iqn=grant.target_iqn, portals=list(grant.portals), lun=grant.lun, replaces=replaces,
            outdated=outdated)), timeout=CALL_TIMEOUT)


def update(journal, entry: Entry, change) -> None:
    """entry.ungranted = change(entry.ungranted), stored (a concurrent change of the record read again), when it
    changes anything."""
    for _ in range(5):
        new = change(list(entry.ungranted))
        if new == entry.ungranted:
            return
        entry.ungranted = new
        try:
            entry.version = journal.update(entry).version
            return
        except Conflict:
            fresh = journal.get(entry.key)
            if fresh is None:
                return
            entry.__dict__.update(fresh.__dict__)
    raise errors.aborted(f"the journal record of volume {entry.name!r} keeps changing; try again")


def record(journal, entry: Entry, initiator: str, node_name: str, read_only: bool, ungranted: list[int]) -> None:
    """A publish to `initiator` that granted every leg but `ungranted`."""
    update(journal, entry, lambda items: [x for x in items if x["initiator"] != initiator] + [
        {"leg": i, "initiator": initiator, "node": node_name, "read_only": read_only} for i in sorted(ungranted)])


def forget(journal, entry: Entry, initiator: str) -> None:
    """An unpublish from `initiator` ("" for every node)."""
    update(journal, entry, lambda items: [x for x in items if initiator and x["initiator"] != initiator])


class LateGrants:
    """The loop (start) over the volumes whose record names ungranted legs: `service` lends its journal,
    agents and locks; `legs_of` reads an entry's legs (csi/controller/replicas.py)."""

    def __init__(self, service, legs_of):
        self.svc = service
        self.legs_of = legs_of
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        # The keys to look at: from this controller's publishes, and from one scan of the journal at the first
        # round (a record a controller before this one wrote). Not a scan per round: the journal may be large.
        self._pending: set[str] = set()
        self._scanned = False

    def note(self, key: str) -> None:
        with self._mutex:
            self._pending.add(key)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="late-grants", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(RETRY_S):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("granting legs left out of a publish failed")

    def run_once(self) -> int:
        """Tries every ungranted leg once; the number of grants made."""
        if not self._scanned:
            found = {e.key for e in self.svc.placement.journal.entries() if e.ungranted}
            with self._mutex:
                self._pending |= found
            self._scanned = True
        with self._mutex:
            keys = sorted(self._pending)
        made = 0
        for key in keys:
            try:
                got, done = self.grant(key)
                made += got
            except errors.CsiError as exc:   # ABORTED: a call on the volume runs; next round
                log.info("granting the legs of %s left out of a publish: %s", key, exc.message)
                continue
            except Exception:  # noqa: BLE001 - one volume's trouble must not keep the others waiting
                log.exception("granting the legs of %s left out of a publish", key)
                continue
            if done:
                with self._mutex:
                    self._pending.discard(key)
        return made

    def grant(self, key: str) -> tuple[int, bool]:
        """The ungranted legs of volume `key` whose agents answer: (grants made, nothing left to grant)."""
        journal = self.svc.placement.journal
        volume_id = ids.replicated_volume_id(key)
        made = 0
        with self.svc.locks.hold(volume_id):
            entry = journal.get(key)
            if entry is None or not entry.ungranted:
                return 0, True
            legs, left = self.legs_of(entry), []
            for item in entry.ungranted:
                try:
                    if self._grant_one(key, legs, item):
                        made += 1
                    # else: its node no longer holds the volume: nothing to grant
                except errors.CsiError as exc:
                    if exc.code not in DOWN + (errors.Code.NOT_FOUND,):
                        raise
                    left.append(item)
            update(journal, entry, lambda items: [x for x in items if x in left])
        return made, not left

    def _grant_one(self, key: str, legs, item: dict) -> bool:
        agents = self.svc.agents
        leg = legs[item["leg"]]
        granted = [x for x in legs if x.index != leg.index]

        def holders():
            vols = {x.index: agents.get(x.node).call("GetVolume", apb.GetVolumeRequest(vg=x.vg, lv=key, brief=True),
                                                     timeout=CALL_TIMEOUT) for x in granted}
            return [x for x in granted if item["initiator"] in {i.iqn for i in vols[x.index].initiators}], vols
        have, vols = holders()
        if not have:
            return False
        g = agents.get(leg.node).call("GrantAccess", apb.GrantAccessRequest(
            vg=leg.vg, lv=key, initiator_iqn=item["initiator"], read_only=item["read_only"],
            node_name=item["node"], mutual_chap=vols[have[0].index].attributes.get("mutualChap") == "true"),
            timeout=CALL_TIMEOUT)
        # Another controller (HA: the loop runs in every replica, the lock is per process) may have unpublished
        # the node between the look and the grant: its revoke of this leg came first. Looked at again after.
        if not holders()[0]:
            agents.get(leg.node).call("RevokeAccess", apb.RevokeAccessRequest(
                vg=leg.vg, lv=key, initiator_iqn=item["initiator"]), timeout=CALL_TIMEOUT)
            return False
        tell(agents, key, have, leg, g, outdated=leg.state == "outdated")
        log.info("granted leg %d of %s on %s to %s, left out of its publish (its node did not answer then)",
                 leg.index, ids.replicated_volume_id(key), leg.node, item["node"] or item["initiator"])
        return True
