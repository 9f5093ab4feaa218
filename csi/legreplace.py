"""`lvm-iscsi-csi replace-replica-leg <volume_id> <lost node> --to <storage node>`: a replicated volume's leg on
a storage node lost for good is replaced by a new, blank leg on another one; the volume_id stays (it names no
node: the legs are in the controller's record of the volume, csi/controller/replicas.py).

- Refused while the lost node answers (its leg comes back and resyncs by itself), when the other leg is recorded
  outdated, and unless the other leg provably holds the newest writes: its md superblock shows the lost leg
  failed, or the lost leg is recorded outdated (`mark-replica-leg ... outdated` first: that gives up whatever
  only the lost leg holds, which is the operator's decision, not this command's).
- The record names the new leg before its LV is made, and keeps the old one under `replaced`, so a crash
  leaves a record naming every LV that may exist; running the command again finishes it. The controller
  deletes the old leg once its node answers again (publish, health, delete), or with it when it is retired.
- The new leg is blank: the node adds it to the array for a full copy of the other leg. A worker that has the
  volume staged keeps running: Kubernetes keeps the publish_context it has, so the command grants the new leg to
  every node the other leg is granted to and tells the other leg's agent where the new leg is (SetPeerLeg); the
  node plugin asks it (csi/node/replica_join.py) and adds the new leg to the running array. A worker that
  stages the volume later is told by its publish_context.
- A window: an unpublish running at the very moment the command grants the new leg to that node may miss the
  new grant. The command reads the grants again afterwards and revokes the new leg's grant of a node no longer
  granted the other leg; an unpublish between that check and its own revoke of the other leg still leaves the
  grant (on the new leg only) until that node's next unpublish.

A dry run unless --yes.
"""

from __future__ import annotations

from typing import TextIO

from csi import errors, ids
from csi.config import ControllerConfig
from csi.controller import fleet, late_grants, replicas
from csi.controller.journal import Conflict
from csi.legmark import ANSWER_WAIT, answers
from csi.node import raid
from csi.proto import agent_pb2 as apb


def replace(config: ControllerConfig, volume_id: str, node: str, to: str, out: TextIO, yes: bool) -> int:
    journal = fleet.open_journal(config)
    return replace_with(journal, fleet.storage_nodes(config, journal, poll=False), volume_id, node, to, out, yes)


def replace_with(journal, agents, volume_id: str, node: str, to: str, out: TextIO, yes: bool) -> int:
    key = ids.parse_replicated_id(volume_id)
    if key is None:
        out.write(f"{volume_id!r} is not the ID of a replicated volume (r1:<name>)\n")
        return 2
    entry = journal.get(key)
    if entry is None or not entry.legs:
        out.write(f"volume {volume_id} has no record in the controller's journal\n")
        return 1
    legs = replicas.legs_of(entry)
    if any(leg.node == to for leg in legs) and any(r.get("node") == node for r in entry.replaced):
        out.write(f"the leg of {volume_id} on {node} was replaced by one on {to} already: making sure it exists\n")
        return _make(agents, entry, [leg for leg in legs if leg.node == to][0], node, out, yes)
    mine = [leg for leg in legs if leg.node == node]
    others = [leg for leg in legs if leg.node != node]
    if not mine:
        out.write(f"volume {volume_id} has no leg on {node}; its legs: "
                  + ", ".join(f"{leg.index} on {leg.node} ({leg.state})" for leg in legs) + "\n")
        return 1
    lost, other = mine[0], others[0]
    if to in (lost.node, other.node):
        out.write(f"{to} holds a leg of {volume_id} already: the new leg goes to a third storage node\n")
        return 1
    if answers(agents, node):
        out.write(f"storage node {node} answers: its leg comes back and resyncs by itself; replace a leg only "
                  "when its node is lost\n")
        return 1
    if other.state == replicas.OUTDATED:
        out.write(f"the other leg of {volume_id} (on {other.node}) is recorded outdated: it cannot be the source "
                  "of the new leg's copy\n")
        return 1
    try:
        sb = agents.get(other.node).call("ExamineLeg", apb.ExamineLegRequest(vg=other.vg, lv=key),
                                         timeout=ANSWER_WAIT)
        vol = agents.get(other.node).call("GetVolume", apb.GetVolumeRequest(vg=other.vg, lv=key, brief=True),
                                          timeout=ANSWER_WAIT)
        info = agents.get(to).info(timeout=ANSWER_WAIT)
    except errors.CsiError as exc:
        out.write(f"cannot go on: {exc.message}\n")
        return 1
    went_alone = sb.present and sb.name == ids.md_name(key) and raid.went_on_alone(sb)
    if lost.state != replicas.OUTDATED and not went_alone:
        out.write(f"nothing proves the leg on {other.node} holds the newest writes (its superblock shows "
                  f"{sb.array_state or 'no array'}): the leg on {node} may hold writes it lacks. If {node} is lost "
                  f"for good, give those up first: mark-replica-leg {volume_id} {node} outdated --yes\n")
        return 1
    pool = next((p for p in info.pools if p.name == lost.pool), None)
    size = max(d.get("size", 0) for d in entry.legs) or vol.size_bytes
    if pool is None or pool.available_bytes < size:
        out.write(f"storage node {to} has no pool {lost.pool!r} with {size} bytes free\n")
        return 1
    out.write(f"leg {lost.index} of {volume_id}: {node} -> {to} (pool {lost.pool}, {size} bytes, blank). The "
              f"worker running the volume (or the next to stage it) copies the leg on {other.node} to it in full; "
              f"the LV on {node} is deleted once that node answers again.\n")
    if not yes:
        out.write("dry run: nothing changed; run again with --yes\n")
        return 0
    new = {"node": to, "pool": lost.pool, "vg": pool.vg, "state": replicas.IN_SYNC, "size": size}
    for _ in range(5):
        entry.replaced = entry.replaced + [entry.legs[lost.index]]
        entry.legs[lost.index] = new
        try:
            entry.version = journal.update(entry).version
            break
        except Conflict:
            entry = journal.get(key)
            if entry is None or not any(d["node"] == node for d in entry.legs):
                out.write("the volume's record changed meanwhile; run the command again\n")
                return 1
    else:
        out.write("the volume's record keeps changing; run the command again\n")
        return 1
    return _make(agents, entry, replicas.legs_of(entry)[lost.index], node, out, yes, dict(vol.attributes))


def _make(agents, entry, leg: replicas.Leg, lost: str, out: TextIO, yes: bool, attributes: dict | None = None
          ) -> int:
    if not yes:
        out.write("dry run: nothing changed; run again with --yes\n")
        return 0
    try:
        if attributes is None:
            other = [d for i, d in enumerate(entry.legs) if i != leg.index][0]
            attributes = dict(agents.get(other["node"]).call("GetVolume", apb.GetVolumeRequest(
                vg=other["vg"], lv=entry.key, brief=True), timeout=ANSWER_WAIT).attributes)
        agents.get(leg.node).call("CreateVolume", apb.CreateVolumeRequest(
            name=entry.name, pool=leg.pool, size_bytes=entry.legs[leg.index]["size"],
            attributes=replicas.leg_attributes(attributes, leg.index)))
        workers = _tell_workers(agents, entry, leg, lost)
    except errors.CsiError as exc:
        out.write(f"the record names the new leg on {leg.node}, but making it or granting it failed: "
                  f"{exc.message}. Run the command again to finish it.\n")
        return 1
    volume_id = ids.replicated_volume_id(entry.key)
    if workers:
        out.write(f"replaced: leg {leg.index} of {volume_id} is on {leg.node}. {', '.join(workers)} add(s) it to "
                  "the running array within seconds and copy the other leg to it in full (`status` shows the "
                  "resync).\n")
    else:
        out.write(f"replaced: leg {leg.index} of {volume_id} is on {leg.node}. No node has the volume now: the "
                  "next to stage it copies the other leg to it in full.\n")
    return 0


def _tell_workers(agents, entry, leg: replicas.Leg, lost: str) -> list[str]:
    """Grants the new leg to every node the other leg is granted to (the workers running the volume) and tells
    the other leg's agent where the new leg is, in place of `lost`'s, for their node plugins (GetPeerLeg). The
    nodes told."""
    other = [x for x in replicas.legs_of(entry) if x.index != leg.index][0]
    peer, key = agents.get(other.node), entry.key

    def grants():
        return peer.call("GetVolume", apb.GetVolumeRequest(vg=other.vg, lv=key, brief=True), timeout=ANSWER_WAIT)
    vol, made, g = grants(), [], None
    for init in vol.initiators:
        g = agents.get(leg.node).call("GrantAccess", apb.GrantAccessRequest(
            vg=leg.vg, lv=key, initiator_iqn=init.iqn, read_only=init.read_only, node_name=init.node,
            mutual_chap=vol.attributes.get("mutualChap") == "true"), timeout=ANSWER_WAIT)
        made.append(init)
    if g is None:
        return []
    late_grants.tell(agents, key, [other], leg, g, outdated=False, replaced=lost)
    still = {i.iqn for i in grants().initiators}
    for init in made:
        if init.iqn not in still:   # unpublished meanwhile: fenced from the new leg too
            agents.get(leg.node).call("RevokeAccess", apb.RevokeAccessRequest(vg=leg.vg, lv=key,
                                                                              initiator_iqn=init.iqn))
    return sorted({init.node or init.iqn for init in made if init.iqn in still})
