"""A leg of a replicated volume as its own storage node sees it: the md superblock the worker wrote through the
target (csi/node/raid.py reads and parses it, as the node plugin does at stage).

LIO writes to the LV beside the page cache, so what a buffered read of the LV here would return can be older
than the disk: the LV's buffers are dropped (`blockdev --flushbufs`) before mdadm reads the superblock. The
controller asks before it snapshots or clones a replicated volume (csi/controller/replica_sources.py): the
snapshot must be of a leg that holds every write the array acknowledged.
"""

from __future__ import annotations

from pathlib import Path

from csi import capabilities as caps
from csi import errors, ids, runner
from csi.node import raid
from csi.proto import agent_pb2 as pb

FLUSH_TIMEOUT = 30.0


def examine(service, request) -> pb.LegSuperblock:
    vg, lv = ids.check_lvm_name(request.vg, "vg"), ids.check_lvm_name(request.lv, "lv")
    rec = service.records.load(vg, lv)
    if rec is None or rec.deleting:
        raise errors.not_found(f"no volume {vg}/{lv} on {service.config.node_name}")
    if not caps.is_replica_leg(rec.attributes):
        raise errors.invalid(f"{vg}/{lv} is a plain volume, not a leg of a replicated one")
    device = Path("/dev") / vg / lv
    runner.run(["blockdev", "--flushbufs", str(device)], timeout=FLUSH_TIMEOUT)
    sb = raid.examine(device)
    if sb is None:
        return pb.LegSuperblock(present=False)
    return pb.LegSuperblock(present=True, name=sb.name, uuid=sb.uuid, events=sb.events,
                            array_state=sb.array_state, recovering=sb.recovering)
