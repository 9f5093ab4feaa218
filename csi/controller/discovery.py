"""Where the storage nodes come from: a static file (the lab, the demo), or the Kubernetes API.

In a cluster a storage node is a Node carrying an administrator-only label (by default
`node-restriction.kubernetes.io/lvm-iscsi-storage-node=true`): the NodeRestriction admission plugin keeps
kubelets from setting labels under that prefix, so a compromised worker cannot declare itself a storage node
and receive volumes. Its agent listens on the Node's InternalIP at the agent port (the agent runs on the host
network), and its zone is the Node's topology.kubernetes.io/zone label. The list is watched: a node labelled
while the controller runs starts receiving volumes without a restart or a values change. Whether a node is up
is the agents poller's business (agents.py), not the Node object's.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from csi import ids
from csi.config import StorageNode

log = logging.getLogger(__name__)

DEFAULT_LABEL = "node-restriction.kubernetes.io/lvm-iscsi-storage-node=true"
ZONE_LABEL = "topology.kubernetes.io/zone"


def storage_node_of(node, agent_port: int) -> StorageNode | None:
    """The StorageNode a Node object describes, or None when it has no usable address or name."""
    name = node.metadata.name
    try:
        ids.check_node_name(name)
    except ValueError:
        log.error("node %r cannot be a storage node: its name is not a DNS label of at most 63 characters", name)
        return None
    addresses = {a.type: a.address for a in (node.status.addresses or [])} if node.status else {}
    ip = addresses.get("InternalIP") or addresses.get("ExternalIP")
    if not ip:
        log.warning("storage node %s has no InternalIP yet: not used until it has one", name)
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return StorageNode(name, f"{host}:{agent_port}", (node.metadata.labels or {}).get(ZONE_LABEL, ""))


class KubeStorageNodes:
    """Lists and watches the labelled Nodes; calls on_change with the whole list after every change."""

    def __init__(self, on_change: Callable[[list[StorageNode]], None], label_selector: str = DEFAULT_LABEL,
                 agent_port: int = 7600, api=None):
        if api is None:
            from kubernetes import client, config
            config.load_incluster_config()
            api = client.CoreV1Api()
        self.api = api
        self.selector = label_selector
        self.port = agent_port
        self.on_change = on_change
        self._nodes: dict[str, StorageNode] = {}
        self._stop = threading.Event()

    def load(self) -> list[StorageNode]:
        """One list, synchronously (at start: the controller knows its nodes before it serves)."""
        listing = self.api.list_node(label_selector=self.selector, _request_timeout=30)
        self._nodes = {}
        for node in listing.items:
            sn = storage_node_of(node, self.port)
            if sn is not None:
                self._nodes[sn.name] = sn
        self.on_change(sorted(self._nodes.values(), key=lambda n: n.name))
        return list(self._nodes.values()), listing.metadata.resource_version

    def start(self) -> None:
        threading.Thread(target=self._run, name="storage-node-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from kubernetes import watch
        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    _, version = self.load()
                w = watch.Watch()
                for event in w.stream(self.api.list_node, label_selector=self.selector, resource_version=version,
                                      timeout_seconds=300, _request_timeout=330):
                    node = event["object"]
                    version = node.metadata.resource_version
                    name = node.metadata.name
                    if event["type"] == "DELETED":
                        self._nodes.pop(name, None)
                    else:
                        sn = storage_node_of(node, self.port)
                        if sn is None:
                            self._nodes.pop(name, None)
                        else:
                            self._nodes[name] = sn
                    self.on_change(sorted(self._nodes.values(), key=lambda n: n.name))
                    if self._stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - a broken watch (410 Gone, API restart): list again
                log.warning("watching storage nodes failed (%s); listing again", exc)
                version = None
                self._stop.wait(2.0)
