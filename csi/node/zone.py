"""The worker's zone: the Node object's topology.kubernetes.io/zone label, read through the Kubernetes API."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ZONE_LABEL = "topology.kubernetes.io/zone"


def node_zone(node_name: str) -> str:
    """The zone label of this node, or "" when the node has none or this is not inside a cluster."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning("not running in a Kubernetes pod and no --zone given: no zone topology")
        return ""
    from kubernetes import client, config

    config.load_incluster_config()
    node = client.CoreV1Api().read_node(node_name)
    zone = (node.metadata.labels or {}).get(ZONE_LABEL, "")
    if not zone:
        log.warning("node %s has no %s label: volumes will carry no zone", node_name, ZONE_LABEL)
    return zone
