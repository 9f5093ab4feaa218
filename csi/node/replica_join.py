"""A leg replaced on another storage node while this worker runs the volume's array (csi/legreplace.py), or a leg
its publish left out (its node did not answer then) granted since (csi/controller/late_grants.py).

Kubernetes never changes the publish_context it has, so the stage record still names the lost leg. The
reconciler (csi/node/replicated.py) asks the agent of a leg in the array where the other leg is now
(GetPeerLeg: answered only to a node the leg is granted to); when it names another storage node than the record:
  1. the record names the new leg, marked joining, and keeps the old leg's target under "retired", before
     anything else happens: a crash leaves a record naming every session unstage must log out of;
  2. the reconciler's usual rounds log in to the new leg (its credentials from its own agent: the command
     granted it to this node) and add it, only when its disk is blank or carries this array's superblock (a
     crash after the add), never when it holds anything else: md copies the other leg to it in full;
  3. once it is in the array, the old leg's session is logged out (at its portal only).
Only a leg out of the array whose session is not logged in is ever replaced so, and only by a location that
names the leg's node as one it replaced (or the same leg, granted since): an older location (the leg replaced
again since) changes nothing. A stage asks too, before it assembles: a publish_context Kubernetes kept from
before a replacement (a pod restarted on the same node) would name the lost leg.
What an agent says is checked as publish_context is (contract.peer_leg): it can name only an LV of this volume's
name, on another storage node than the asking leg's, that the controller granted to this node.
"""

from __future__ import annotations

import logging
from pathlib import Path

from csi import contract, errors, ids
from csi.node import credentials, mount, raid

log = logging.getLogger(__name__)

ASK_TIMEOUT = 3.0
JOINING = "joining"
RETIRED = "retired"


def supersedes(location, leg: dict) -> bool:
    """Whether the leg an agent names (agent.proto LegLocation, or the contract.Leg made of it) takes the place
    of `leg`, the one at its index
    in a stage record or publish_context: the same leg, granted since the publish left it out (it has no
    target here), or a leg on a node the location says it replaced. A location naming any other node is an
    older one (the leg was replaced again since, with no worker to tell) and changes nothing."""
    if location.storage_node == leg["node"]:
        return not leg.get("iqn")
    return leg["node"] in location.replaces


def ask(tls_dir: Path, key: str, legs: list[dict], candidates: set[int], askers: set[int]
        ) -> tuple[int, contract.Leg] | None:
    """The first leg of `candidates` that the agent of a leg of `askers` (granted legs: they have an agent and
    a target) says is now elsewhere, or granted since: its index and where it is."""
    for j in sorted(askers):
        leg = legs[j]
        if not leg.get("agent") or not leg.get("iqn"):
            continue
        att = contract.Attachment(leg["iqn"], tuple(leg["portals"]), leg["lun"], leg["node"], leg["agent"])
        try:
            answer = credentials.peer_leg(tls_dir, att, leg["vg"], key, ASK_TIMEOUT)
        except errors.CsiError as exc:
            log.debug("asking %s where the other leg of %s is: %s", leg["node"], key, exc.message)
            continue
        i = answer.peer.index
        if not answer.present or i not in candidates or i == j or i >= len(legs) or \
                not supersedes(answer.peer, legs[i]):
            continue
        try:
            new = contract.peer_leg(answer.peer, key)
        except errors.CsiError as exc:
            log.warning("storage node %s names a leg of %s this node does not take: %s", leg["node"], key,
                        exc.message)
            continue
        if new.storage_node in {x["node"] for x in legs if x is not legs[i]}:
            log.warning("storage node %s names %s for leg %d of %s, which holds another leg of it: ignored",
                        leg["node"], new.storage_node, i, key)
            continue
        return i, new
    return None


def switched(rec: dict, index: int, new_leg: dict) -> dict:
    """The stage record with leg `index` replaced by new_leg (joining), the old leg's target and portals kept
    to log out of (legs on storage nodes with one VG name share a target IQN: only their portals differ)."""
    old = rec["legs"][index]
    legs = list(rec["legs"])
    legs[index] = dict(new_leg, **{JOINING: True})
    if old["node"] == new_leg["node"]:     # granted late: the same leg, outdated if either record says so
        legs[index]["outdated"] = bool(old.get("outdated")) or bool(new_leg.get("outdated"))
    retired = list(rec.get(RETIRED, [])) + ([{"iqn": old["iqn"], "portals": old["portals"]}]
                                            if old.get("iqn") else [])
    return dict(rec, legs=legs, **{RETIRED: retired})


def joinable(key: str, device: Path) -> raid.Superblock | None:
    """The superblock of a joining leg's disk (None: blank), or PRECONDITION when it holds anything but this
    array's superblock: a new leg is never a disk with data on it."""
    sb = raid.examine(device)
    if sb is not None:
        raid.refuse_foreign(key, device, sb)
        return sb
    found = mount.probe(device)
    if not found.blank:
        raise errors.precondition(f"the new leg of {ids.replicated_volume_id(key)} ({device}) holds "
                                  f"{found.describe()}: not added")
    return None
