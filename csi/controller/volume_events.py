"""Warning events on the volumes a storage node's loss touches, where their users look: on each PersistentVolume
of the driver that has data on the node, and on its claim (`kubectl describe pvc` shows them).

- A plain volume on the node: VolumeInaccessible. Nothing on the cluster side says so otherwise: kubelet reports
  the pod's I/O errors or a hung mount, not which storage node to bring back.
- A replicated volume with a leg on the node: ReplicaLegUnreachable. Its pods go on with the other leg; the event
  says the volume is degraded, that the leg comes back by itself, and what to do if the node is lost for good.

Raised once per node-down transition (csi/controller/events.py tells it, from its posting thread: listing the
PersistentVolumes never holds up the poller). The event objects have fixed names per object, reason and node,
posted as NodeEvents posts its own (the other controller replica, within RECENT_S, leaves them alone).
"""

from __future__ import annotations

import hashlib
import logging

from csi import ids

log = logging.getLogger(__name__)

INACCESSIBLE = "VolumeInaccessible"
LEG_UNREACHABLE = "ReplicaLegUnreachable"


def _name(obj: str, reason: str, node: str) -> str:
    return f"{obj}.{reason.lower()}.{hashlib.sha256(node.encode()).hexdigest()[:10]}"


class VolumeEvents:
    def __init__(self, api, journal, driver_name: str):
        """`api`: a kubernetes CoreV1Api; `journal`: the placement journal (a replicated volume's legs)."""
        self.api = api
        self.journal = journal
        self.driver_name = driver_name

    def affected(self, node: str, handle: str) -> str | None:
        """The reason a volume with this handle gets an event when `node` is down, None when it has nothing there."""
        ref = ids.parse_id(handle)
        if ref is not None:
            return INACCESSIBLE if ref.node == node else None
        key = ids.parse_replicated_id(handle)
        if key is None:
            return None
        entry = self.journal.get(key)
        if entry is not None and any(leg.get("node") == node for leg in entry.legs):
            return LEG_UNREACHABLE
        return None

    def node_down(self, node: str, error: str, post) -> int:
        """Posts (through `post(namespace, name, involved, reason, message)`) an event on every PV of the driver
        with data on `node` and on its claim. Returns how many volumes it was about."""
        count = 0
        for pv in self.api.list_persistent_volume(_request_timeout=30).items:
            csi = pv.spec.csi if pv.spec else None
            if csi is None or csi.driver != self.driver_name:
                continue
            reason = self.affected(node, csi.volume_handle)
            if reason is None:
                continue
            count += 1
            message = self._message(reason, node, error)
            name = pv.metadata.name
            post("default", _name(name, reason, node), _ref("PersistentVolume", name, pv.metadata.uid), reason,
                 message)
            claim = pv.spec.claim_ref
            if claim is not None and claim.name and claim.namespace:
                post(claim.namespace, _name(claim.name, reason, node),
                     _ref("PersistentVolumeClaim", claim.name, claim.uid, claim.namespace), reason, message)
        return count

    @staticmethod
    def _message(reason: str, node: str, error: str) -> str:
        if reason == INACCESSIBLE:
            return (f"storage node {node}, which holds this volume, does not answer ({error}): the volume cannot "
                    "be read or written, attached or detached until the node is back")
        return (f"storage node {node}, which holds one of this volume's two legs, does not answer ({error}): the "
                "volume runs degraded on its other leg, and the leg is resynced by itself once the node is back; "
                f"if {node} is lost for good, move the leg with `lvm-iscsi-csi replace-replica-leg`")


def _ref(kind: str, name: str, uid: str | None, namespace: str | None = None):
    from kubernetes import client
    return client.V1ObjectReference(api_version="v1", kind=kind, name=name, uid=uid, namespace=namespace)
