"""Warning events for what an operator must act on, on the storage node's Node object, where `kubectl describe
node` and `kubectl get events` show them: a pool at or above its warn level, and a storage node whose agent
stopped answering. A full pool and a failed copy already reach the claim itself: the provisioner turns the
failed CreateVolume into a ProvisioningFailed event with the driver's message.

One event object per node, reason and pool (a fixed name), raised when a pool crosses its warn level or a node
goes down and raised again (its count and last time) at the next crossing, after the pool was back below or
the node up. Both controller replicas poll: the second to see a crossing within RECENT_S of the first leaves
the event alone, and a controller that restarts while the condition holds raises it again. Events are posted
in the `default` namespace with the node's name as its UID, as kubelet posts its own node events (kubectl
matches them that way), by a thread of their own: the poller, and the CSI calls that refresh a node's health,
never wait on the API server. The controller's account creates, lists and patches them through the
provisioner's events rule (the same service account). A failed post is logged, never raised.

A node going down also raises events on the volumes it holds data of (volume_events.py), from the same thread.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import queue
import threading

log = logging.getLogger(__name__)

COMPONENT = "lvm-iscsi-csi-controller"
NAMESPACE = "default"
RECENT_S = 60.0


def event_name(node: str, reason: str, subject: str) -> str:
    """A fixed name per node, reason and pool ("" for the node itself): a DNS subdomain, as names must be."""
    return f"{node}.{reason.lower()}.{hashlib.sha256(subject.encode()).hexdigest()[:10]}"


class NodeEvents:
    def __init__(self, api=None, volumes=None):
        """`api`: a kubernetes CoreV1Api (in a cluster); None posts nothing and only logs. `volumes`: a
        volume_events.VolumeEvents, told when a node goes down."""
        self.api = api
        self.volumes = volumes
        self._mutex = threading.Lock()
        self._above: set[tuple[str, str]] = set()
        self._down: set[str] = set()
        self._todo: queue.Queue = queue.Queue()
        if api is not None:
            threading.Thread(target=self._drain, name="node-events", daemon=True).start()

    def observe(self, node: str, up: bool, info, error: str = "") -> None:
        """The poller's view of one storage node after a probe: `info` its AgentInfo when up."""
        with self._mutex:
            if not up:
                if node in self._down:
                    return
                self._down.add(node)
                todo = [("StorageNodeDown", "", f"the storage agent on {node} does not answer ({error}): its "
                                                "volumes cannot be created, attached or detached until it is back, "
                                                "and it gets no new volumes")]
            else:
                self._down.discard(node)
                todo = [(reason, pool.name, message) for pool in (info.pools if info is not None else ())
                        for reason, message in self._pool(node, pool)]
        for reason, subject, message in todo:
            log.warning("%s: %s", reason, message)
            if self.api is not None:
                self._todo.put(lambda r=reason, m=message, n=event_name(node, reason, subject): self._try_post(
                    NAMESPACE, n, _node_ref(node), r, m))
        if not up and self.api is not None and self.volumes is not None:   # after the node's own event
            self._todo.put(lambda: self._volumes_down(node, error))

    def _pool(self, node: str, pool) -> list[tuple[str, str]]:
        key, warn = (node, pool.name), pool.warn_fill_percent
        fill = max(pool.data_percent, pool.metadata_percent)
        if not warn or fill < warn:
            self._above.discard(key)
            return []
        if key in self._above:
            return []
        self._above.add(key)
        if pool.thin_pool:
            what = (f"thin pool {pool.name} on {node} is {pool.data_percent:.0f}% full (metadata "
                    f"{pool.metadata_percent:.0f}%), at or above its warn level of {warn:.0f}%: extend its volume "
                    f"group or thin pool, or delete volumes; at {pool.max_fill_percent:.0f}% it takes no new "
                    "volumes")
        else:
            what = (f"pool {pool.name} on {node} has {pool.data_percent:.0f}% of its volume group in use, at or "
                    f"above its warn level of {warn:.0f}%: extend the volume group, or delete volumes")
        return [("PoolAboveWarnLevel", what)]

    def flush(self) -> None:
        """Waits until every event observed so far was posted (tests)."""
        self._todo.join()

    def _drain(self) -> None:
        while True:
            job = self._todo.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - an event is not worth the thread
                log.exception("could not post events")
            finally:
                self._todo.task_done()

    def _volumes_down(self, node: str, error: str) -> None:
        """The volumes' events as things stand when the posting thread gets to it (it may run well after the
        probe, behind slow posts): nothing when the node is back by then, and every node down now counted. A
        replicated volume made after a probe saw its other leg's node down, while that node was back, once got
        VolumeInaccessible from the probe's stale view of which nodes were down."""
        with self._mutex:
            if node not in self._down:
                log.info("storage node %s is back: no events on its volumes", node)
                return
            down = set(self._down)
        count = self.volumes.node_down(node, error, down, self._try_post)
        log.warning("storage node %s is down: %d volume(s) of this driver have data on it", node, count)

    def _try_post(self, namespace: str, name: str, involved, reason: str, message: str) -> None:
        try:
            self._post(namespace, name, involved, reason, message)
        except Exception as exc:  # noqa: BLE001 - an event is not worth the thread, nor the other events
            log.warning("could not post the %s event on %s %s: %s", reason, involved.kind, involved.name, exc)

    def _post(self, namespace: str, name: str, involved, reason: str, message: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException
        now = datetime.datetime.now(datetime.timezone.utc)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace), involved_object=involved,
            reason=reason, message=message, type="Warning", count=1, first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component=COMPONENT), reporting_component=COMPONENT)
        try:
            self.api.create_namespaced_event(namespace, body, _request_timeout=10)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        found = self.api.list_namespaced_event(namespace, field_selector=f"metadata.name={name}",
                                               _request_timeout=10).items
        if not found:
            return                          # deleted meanwhile (events expire): the next crossing makes it anew
        old = found[0]
        if old.last_timestamp and (now - old.last_timestamp).total_seconds() < RECENT_S:
            return                          # the other controller replica raised this crossing already
        self.api.patch_namespaced_event(name, namespace, {"count": (old.count or 1) + 1, "message": message,
                                                          "lastTimestamp": now.isoformat()}, _request_timeout=10)


def _node_ref(node: str):
    from kubernetes import client
    return client.V1ObjectReference(api_version="v1", kind="Node", name=node, uid=node)
