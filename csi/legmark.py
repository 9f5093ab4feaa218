"""`lvm-iscsi-csi mark-replica-leg <volume_id> <storage node> outdated|in-sync`: an operator's decision about one
leg of a replicated volume, written to the controller's record of the volume (the placement journal).

`outdated` is the way out when a stage refuses because nothing proves the one reachable leg current (its peer
went down after the worker that wrote alone to it stopped): the operator gives up whatever only the unreachable
leg holds, and the volume is served from the other. Refused while that leg's storage node answers (then bring
the volume up normally: both legs are there and md picks the newest), and when the other leg is outdated too.
The node plugin never assembles from a leg recorded outdated and puts it back with a full recovery once its
storage node returns.

`in-sync` takes the mark back once that full recovery has finished (the node plugin's NodeGetVolumeHealth and
/proc/mdstat on the worker say so); until then every stage copies the leg in full again and refuses to serve
from it alone. Refused while the leg's storage node does not answer.

A dry run unless --yes. Kubernetes keeps the publish_context of the VolumeAttachment it has: the mark reaches a
node with the volume's next ControllerPublishVolume (delete the pod, or let it move).
"""

from __future__ import annotations

from typing import TextIO

from csi import errors, ids
from csi.config import ControllerConfig
from csi.controller import fleet, replicas

STATES = (replicas.OUTDATED, replicas.IN_SYNC)
# How long a storage node has to answer before it counts as down: an agent restarting a moment ago (its
# channel refused, reconnecting) answers within it and is not mistaken for a lost one.
ANSWER_WAIT = 8.0


def mark(config: ControllerConfig, volume_id: str, node: str, state: str, out: TextIO, yes: bool) -> int:
    key = ids.parse_replicated_id(volume_id)
    if key is None:
        out.write(f"{volume_id!r} is not the ID of a replicated volume (r1:<name>)\n")
        return 2
    if state not in STATES:
        out.write(f"state must be one of {', '.join(STATES)}, not {state!r}\n")
        return 2
    journal = fleet.open_journal(config)
    entry = journal.get(key)
    if entry is None or not entry.legs:
        out.write(f"volume {volume_id} has no record in the controller's journal\n")
        return 1
    legs = replicas.legs_of(entry)
    mine = [leg for leg in legs if leg.node == node]
    others = [leg for leg in legs if leg.node != node]
    if not mine:
        out.write(f"volume {volume_id} has no leg on {node}; its legs: "
                  + ", ".join(f"{leg.index} on {leg.node} ({leg.state})" for leg in legs) + "\n")
        return 1
    if all(leg.state == state for leg in mine):
        out.write(f"leg {mine[0].index} of {volume_id} on {node} is already recorded {state}\n")
        return 0
    if state == replicas.OUTDATED:
        if all(leg.state == replicas.OUTDATED for leg in others):
            out.write(f"the other leg of {volume_id} is recorded outdated already: marking this one too would leave "
                      "no leg to serve it\n")
            return 1
        if answers(fleet.storage_nodes(config, journal, poll=False), node):
            out.write(f"storage node {node} answers: stage the volume as it is (md picks the newest leg); mark a "
                      "leg outdated only while its node is down or lost\n")
            return 1
        out.write(f"leg {mine[0].index} of {volume_id} on {node}: in-sync -> outdated. The volume is then served "
                  f"from the leg on {', '.join(leg.node for leg in others)} alone; writes that only the leg on "
                  f"{node} holds are given up, and that leg is copied over in full once {node} is back.\n")
    else:
        if not answers(fleet.storage_nodes(config, journal, poll=False), node):
            out.write(f"storage node {node} does not answer: its leg cannot have been resynced\n")
            return 1
        out.write(f"leg {mine[0].index} of {volume_id} on {node}: outdated -> in-sync. Only after the worker's "
                  "array shows it in sync (NodeGetVolumeHealth, /proc/mdstat): it may then serve the volume "
                  "alone.\n")
    if not yes:
        out.write("dry run: nothing changed; run again with --yes\n")
        return 0
    replicas.mark_legs(journal, entry, [leg.index for leg in mine], state)
    out.write(f"recorded. It reaches a worker with the volume's next ControllerPublishVolume (delete the pod using "
              f"{volume_id}, or let it move)\n")
    return 0


def answers(agents, node: str) -> bool:
    """Whether the storage node's agent answers within ANSWER_WAIT (one shared by the operator commands)."""
    try:
        agents.get(node).info(timeout=ANSWER_WAIT)
    except errors.CsiError:
        return False
    return True
