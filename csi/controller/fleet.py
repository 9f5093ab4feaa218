"""The controller's runtime from its configuration: the placement journal and the storage nodes it knows.

Shared by the controller and the operator's commands (status, cleanup, retire-storage-node), so that they see
the same storage nodes from the same source.
"""

from __future__ import annotations

import logging
import os

from csi.config import ControllerConfig, StorageNode
from csi.controller.agents import Agents
from csi.controller.events import NodeEvents
from csi.controller.journal import FileJournal, Journal
from csi.controller.volume_events import VolumeEvents

log = logging.getLogger(__name__)


def open_journal(config: ControllerConfig) -> Journal:
    if config.journal_dir is not None:
        return FileJournal(config.journal_dir)
    from csi.controller.kubejournal import KubeJournal
    return KubeJournal(config.journal_namespace, config.cluster_id, api=_core_api())


def storage_nodes(config: ControllerConfig, journal: Journal, poll: bool, watch: bool = False) -> Agents:
    """The storage nodes: every one the journal remembers (a node that left the source stays known until
    retired), then the source's current list (the static file, or the labelled Nodes, watched if asked)."""
    remembered = [StorageNode(n, a, z) for n, a, z in journal.known_nodes()]
    # The controller (the one that polls) posts Warning events on the storage nodes' Nodes in a cluster.
    events = None
    if poll:
        api = _core_api() if config.journal_dir is None else None
        events = NodeEvents(api, VolumeEvents(api, journal, config.driver_name) if api is not None else None)
    agents = Agents(config.tls_dir, nodes=remembered, retired=journal.retired,
                    remember=lambda nodes: journal.remember_nodes([(n.name, n.address, n.zone) for n in nodes]),
                    poll=poll, observe=events.observe if events else None)
    if config.storage_node_label:
        from csi.controller.discovery import KubeStorageNodes
        source = KubeStorageNodes(agents.update, config.storage_node_label, config.agent_port, api=_core_api())
        source.load()
        if watch:
            source.start()
    else:
        agents.update(config.storage_nodes)
    return agents


def _load_kube_config() -> None:
    from kubernetes import config as kconfig
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kconfig.load_incluster_config()
    else:
        kconfig.load_kube_config()   # an operator's shell: ~/.kube/config or $KUBECONFIG


def _core_api():
    from kubernetes import client
    _load_kube_config()
    return client.CoreV1Api()


def storage_api():
    from kubernetes import client
    _load_kube_config()
    return client.StorageV1Api()
