"""`lvm-iscsi-csi retire-storage-node`: the way out for a storage node lost for good.

Once retired, DeleteVolume, DeleteSnapshot and ControllerUnpublishVolume of what the node held succeed
without it (the data is gone with the node) and no new volume goes there. A dry run unless --yes; a node whose
agent still answers is refused: retiring a live node would orphan its volumes' data.
"""

from __future__ import annotations

from typing import TextIO

from csi import errors
from csi.config import ControllerConfig
from csi.controller import fleet

LISTED = 50   # entries printed; the count says how many there are


def retire(config: ControllerConfig, node: str, out: TextIO, yes: bool) -> int:
    journal = fleet.open_journal(config)
    agents = fleet.storage_nodes(config, journal, poll=False)
    if agents.is_retired(node):
        out.write(f"storage node {node} is already retired\n")
        return 0
    try:
        client = agents.get(node)
    except errors.CsiError:
        client = None   # not listed any more: only the journal knows it
    if client is not None:
        try:
            client.info(timeout=10)
        except errors.CsiError:
            pass
        else:
            out.write(f"storage node {node} answers: retire only a node that is gone for good (move its volumes "
                      "off it, or stop its agent, first)\n")
            return 1
    held = [e for e in journal.entries() if e.node == node or any(leg.get("node") == node for leg in e.legs)]
    out.write(f"storage node {node}: {len(held)} volume(s) and snapshot(s) recorded on it\n")
    for e in held[:LISTED]:
        leg = " (one leg of a replicated volume: the other serves it, degraded)" if e.legs else ""
        out.write(f"  {e.kind} {e.name}{leg}\n")
    if not yes:
        out.write("dry run: nothing changed; run again with --yes to retire it (their PVs, snapshots and "
                  "attachments are then released without it; the data is gone with the node)\n")
        return 0
    journal.retire(node)
    out.write(f"storage node {node} is retired; the controller stops using it within 30 seconds\n")
    return 0
