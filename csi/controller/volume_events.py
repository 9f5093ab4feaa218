"""Warning events on the volumes a storage node's loss touches, where their users look: on each PersistentVolume
of the driver that has data on the node, and on its claim (`kubectl describe pvc` shows them).

- A plain volume on the node: VolumeInaccessible. Nothing on the cluster side says so otherwise: kubelet reports
  the pod's I/O errors or a hung mount, not which storage node to bring back.
- A replicated volume with a leg on the node: ReplicaLegUnreachable. Its pods go on with the other leg; the event
  says the volume is degraded, that the leg comes back by itself, and what to do if the node is lost for good.

Raised once per node-down transition (csi/controller/events.py tells it, from its posting thread, after the node's
own event: listing the PersistentVolumes never holds up the poller). A replicated volume whose legs' nodes are all
down is VolumeInaccessible. Claims get the event while their PV is Bound (a Released PV's claim may be gone). The
event objects have fixed names per object, reason and node, posted as NodeEvents posts its own (the other
controller replica, within RECENT_S, leaves them alone).
"""

from __future__ import annotations

import hashlib
import logging

from csi import ids

log = logging.getLogger(__name__)

INACCESSIBLE = "VolumeInaccessible"
LEG_UNREACHABLE = "ReplicaLegUnreachable"


def _name(kind: str, obj: str, reason: str, node: str) -> str:
    """A fixed event name per object, reason and node: a DNS subdomain of at most 253 characters (the object's name
    cut short, the rest in the hash)."""
    head = obj[:200].rstrip(".-")
    digest = hashlib.sha256(f"{kind}/{obj}/{node}".encode()).hexdigest()[:12]
    return f"{head}.{reason.lower()}.{digest}"


class VolumeEvents:
    def __init__(self, api, journal, driver_name: str):
        """`api`: a kubernetes CoreV1Api; `journal`: the placement journal (a replicated volume's legs)."""
        self.api = api
        self.journal = journal
        self.driver_name = driver_name

    def _legs(self) -> dict[str, set[str]] | None:
        """The storage nodes of each replicated volume's legs, by LV name; None when the journal cannot be read."""
        try:
            return {e.key: {leg.get("node") for leg in e.legs} for e in self.journal.entries()
                    if e.kind == "volume" and e.legs}
        except Exception as exc:  # noqa: BLE001 - the plain volumes' events are still worth posting
            log.warning("cannot read the journal (%s): no events on replicated volumes for this node", exc)
            return None

    @staticmethod
    def affected(node: str, handle: str, down: set[str], legs: dict[str, set[str]] | None) -> str | None:
        """The reason a volume with this handle gets an event when `node` went down (`down`: every node down now,
        `node` too), None when it has nothing there."""
        ref = ids.parse_id(handle)
        if ref is not None:
            return INACCESSIBLE if ref.node == node else None
        key = ids.parse_replicated_id(handle)
        nodes = (legs or {}).get(key) if key else None
        if not nodes or node not in nodes:
            return None
        return INACCESSIBLE if nodes <= down else LEG_UNREACHABLE

    def node_down(self, node: str, error: str, down: set[str], post) -> int:
        """Posts (through `post(namespace, name, involved, reason, message)`) an event on every PV of the driver
        with data on `node` and on its claim (a bound one). Returns how many volumes it was about."""
        legs = self._legs()
        count = 0
        for pv in self.api.list_persistent_volume(_request_timeout=30).items:
            csi = pv.spec.csi if pv.spec else None
            if csi is None or csi.driver != self.driver_name:
                continue
            reason = self.affected(node, csi.volume_handle, down | {node}, legs)
            if reason is None:
                continue
            count += 1
            message = self._message(reason, node, error, replicated=ids.parse_replicated_id(csi.volume_handle) is not None)
            name = pv.metadata.name
            post("default", _name("PersistentVolume", name, reason, node),
                 _ref("PersistentVolume", name, pv.metadata.uid), reason, message)
            claim = pv.spec.claim_ref
            bound = pv.status is not None and pv.status.phase == "Bound"
            if bound and claim is not None and claim.name and claim.namespace:
                post(claim.namespace, _name("PersistentVolumeClaim", claim.name, reason, node),
                     _ref("PersistentVolumeClaim", claim.name, claim.uid, claim.namespace), reason, message)
        return count

    @staticmethod
    def _message(reason: str, node: str, error: str, replicated: bool) -> str:
        if reason == INACCESSIBLE and replicated:
            return (f"storage node {node} does not answer ({error}), and the node of this volume's other leg is "
                    "down too: the volume cannot be read or written until one of them is back")
        if reason == INACCESSIBLE:
            return (f"storage node {node}, which holds this volume, does not answer ({error}): the volume cannot "
                    "be read or written, attached or detached until the node is back")
        return (f"storage node {node}, which holds one of this volume's two legs, does not answer ({error}): the "
                "volume runs degraded on its other leg, and the leg is resynced by itself once the node is back; "
                f"if {node} is lost for good, move the leg with `lvm-iscsi-csi replace-replica-leg`")


def _ref(kind: str, name: str, uid: str | None, namespace: str | None = None):
    from kubernetes import client
    return client.V1ObjectReference(api_version="v1", kind=kind, name=name, uid=uid, namespace=namespace)
