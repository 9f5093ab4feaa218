"""Volume health from the controller's side (CSI v1.13 ControllerGetVolumeHealth / ControllerListVolumeHealth).

The controller sees what the volume's storage node sees: its agent looks at the LV (LVM report) and at the
export (LIO) and says why a volume is not healthy (agent Volume.condition_reason / condition). Every adverse
condition it can report makes the volume INACCESSIBLE from every node: no LV, an inactive LV, no export, a
copy into it not done. A storage node whose agent does not answer is reported the same way for the one volume
asked for (ControllerGetVolumeHealth): the controller cannot tell whether the target still serves, and a
storage node that is down is the usual cause; the message says which it cannot tell. Listing needs every
agent's answer (as ListVolumes does), so there an agent that does not answer fails the call with UNAVAILABLE.
"""

from __future__ import annotations

from csi import capabilities, errors, ids
from csi.controller import listing
from csi.controller.agents import Agents
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi

Entry = csi.VolumeHealth.VolumeHealthEntry

# What a person can do about each condition the agent reports (agent Volume.condition_reason).
_ADVICE = {
    "LogicalVolumeMissing": "its data is not on the storage node any more: the LV was removed outside the driver "
                            "(restore it from LVM's metadata backup or the volume from a snapshot)",
    "LogicalVolumeInactive": "restarting the agent on {node} activates it and exports it again",
    "TargetNotExported": "nodes cannot log in to it; restarting the agent on {node} exports it again from its "
                         "record",
    "ContentBeingCopied": "it is not usable until the copy of its source is done",
    "CopyNotFinished": "the copy of its source stopped before the end; the CreateVolume that made it finishes "
                       "it when retried",
    "CreationNotFinished": "its CreateVolume was cut short; a retry of the same CreateVolume finishes it",
}


def of_volume(node: str, vol: apb.Volume) -> list[Entry]:
    """The adverse conditions of one volume as its agent reported it (empty when healthy)."""
    if vol.healthy:
        return []
    reason = vol.condition_reason or "StorageNodeReportsUnhealthy"   # an agent from before condition_reason
    condition = vol.condition or "not healthy"
    advice = _ADVICE.get(vol.condition_reason, "").format(node=node)
    message = f"{condition} on storage node {node}" + (f": {advice}" if advice else "")
    return [Entry(status=csi.INACCESSIBLE, reason=reason, message=message)]


def unreachable(node: str, exc: errors.CsiError) -> list[Entry]:
    return [Entry(status=csi.INACCESSIBLE, reason="StorageNodeUnreachable",
                  message=f"the agent of storage node {node} does not answer ({exc.message}); the storage node "
                          "is down or cut off from the controller, or only its agent is: whether nodes can still "
                          "reach the volume's target cannot be checked from here")]


def get(agents: Agents, ref: ids.LvRef, volume_id: str) -> csi.VolumeHealth:
    """Health of one volume. NOT_FOUND when its agent says it does not exist."""
    try:
        vol = agents.get(ref.node).call("GetVolume", apb.GetVolumeRequest(vg=ref.vg, lv=ref.lv, brief=False))
    except errors.CsiError as exc:
        if exc.code not in (errors.Code.UNAVAILABLE, errors.Code.DEADLINE_EXCEEDED):
            raise
        return csi.VolumeHealth(volume_id=volume_id, health_statuses=unreachable(ref.node, exc))
    return csi.VolumeHealth(volume_id=volume_id, health_statuses=of_volume(ref.node, vol))


def list_page(agents: Agents, max_entries: int, token: str, default_page: int
              ) -> tuple[list[csi.VolumeHealth], str]:
    """One page of the volumes with an adverse condition, in ListVolumes' order and with its tokens."""
    page, next_token = listing.walk(agents, "volume", max_entries, token, default_page,
                                    keep=lambda node, vol: not vol.healthy)
    out: dict[str, list[Entry]] = {}
    for node, vol in page:
        if capabilities.is_replica_leg(vol.attributes):
            # A leg is never a volume of its own: its trouble degrades its replicated volume (which the other
            # leg may still serve). Whether that leg is outdated, and whether any leg is still usable, only
            # ControllerGetVolumeHealth tells: it reads the volume's journal record.
            leg = capabilities.replica_leg(vol.attributes)
            out.setdefault(ids.replicated_volume_id(vol.lv), []).extend(
                Entry(status=csi.DEGRADED, reason=e.reason, message=f"leg {leg}: {e.message}")
                for e in of_volume(node, vol))
        else:
            out[ids.LvRef(node, vol.vg, vol.lv).encode()] = of_volume(node, vol)
    return [csi.VolumeHealth(volume_id=v, health_statuses=e) for v, e in out.items()], next_token
