"""Warning events for what an operator must act on, on the storage node's Node object, where `kubectl describe
node` and `kubectl get events` show them: a pool at or above its warn level, and a storage node whose agent
stopped answering. A full pool and a failed copy already reach the claim itself: the provisioner turns the
failed CreateVolume into a ProvisioningFailed event with the driver's message.

Edge-triggered: one event when a pool crosses its warn level or a node goes down, the next only after it was
back below the level, or up. Events are posted in the `default` namespace with the node's name as its UID, as
kubelet posts its own node events (kubectl matches them that way). The controller's account may create them
through the provisioner's cluster role (the same service account). A failed post is logged, never raised:
events inform, the poller must go on.
"""

from __future__ import annotations

import datetime
import logging
import threading

log = logging.getLogger(__name__)

COMPONENT = "lvm-iscsi-csi-controller"
NAMESPACE = "default"


class NodeEvents:
    def __init__(self, api=None):
        """`api`: a kubernetes CoreV1Api (in a cluster); None posts nothing and only logs."""
        self.api = api
        self._mutex = threading.Lock()
        self._above: set[tuple[str, str]] = set()
        self._down: set[str] = set()

    def observe(self, node: str, up: bool, info, error: str = "") -> None:
        """The poller's view of one storage node after a probe: `info` its AgentInfo when up."""
        with self._mutex:
            if not up:
                if node in self._down:
                    return
                self._down.add(node)
                todo = [("StorageNodeDown", f"the storage agent on {node} does not answer ({error}): its volumes "
                                            "cannot be created, attached or detached until it is back, and it gets "
                                            "no new volumes")]
            else:
                self._down.discard(node)
                todo = []
                for pool in info.pools if info is not None else ():
                    key, warn = (node, pool.name), pool.warn_fill_percent
                    fill = max(pool.data_percent, pool.metadata_percent)
                    if not warn or fill < warn:
                        self._above.discard(key)
                        continue
                    if key in self._above:
                        continue
                    self._above.add(key)
                    todo.append(("PoolAboveWarnLevel",
                                 f"pool {pool.name} on {node} is {pool.data_percent:.0f}% full (metadata "
                                 f"{pool.metadata_percent:.0f}%), at or above its warn level of {warn:.0f}%: "
                                 f"extend its volume group or thin pool, or delete volumes; at "
                                 f"{pool.max_fill_percent:.0f}% it takes no new volumes"))
        for reason, message in todo:
            log.warning("%s: %s", reason, message)
            self._post(node, reason, message)

    def _post(self, node: str, reason: str, message: str) -> None:
        if self.api is None:
            return
        from kubernetes import client
        now = datetime.datetime.now(datetime.timezone.utc)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{node}.", namespace=NAMESPACE),
            involved_object=client.V1ObjectReference(api_version="v1", kind="Node", name=node, uid=node),
            reason=reason, message=message, type="Warning", count=1, first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component=COMPONENT), reporting_component=COMPONENT)
        try:
            self.api.create_namespaced_event(NAMESPACE, body, _request_timeout=10)
        except Exception as exc:  # noqa: BLE001 - an event is not worth a poller's round
            log.warning("could not post the %s event for %s: %s", reason, node, exc)
