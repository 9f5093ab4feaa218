"""The worker's zone: the Node object's topology.kubernetes.io/zone label, read through the Kubernetes API."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ZONE_LABEL = "topology.kubernetes.io/zone"

# A worker without a zone reports no topology segment in NodeGetInfo. Every volume carries its storage node's
# zone, so the scheduler never finds this worker eligible for a pod that uses one ("volume node affinity
# conflict"), and a WaitForFirstConsumer claim of a pod placed here cannot be provisioned: in both cases the
# pod stays Pending, and nothing else says why. Hence a warning that names the effect and the fix.
NO_ZONE = ("node %s has no %s label and the node plugin got no --zone (chart value node.zone), so it reports no "
           "zone (%s): pods that use this driver's volumes (each lives in its storage node's zone) cannot be "
           "scheduled or provisioned on this node and stay Pending. Fix: label the node with the zone of the "
           "storage nodes it should use (kubectl label node %s %s=<zone>) and restart this pod (it reads the "
           "label at start), or set node.zone for every worker")


def node_zone(node_name: str, topology_key: str = "topology.<driver>/zone") -> str:
    """The zone label of this node, or "" when the node has none or this is not inside a cluster."""
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning("not running in a Kubernetes pod and no --zone given: no zone topology")
        return ""
    from kubernetes import client, config

    config.load_incluster_config()
    node = client.CoreV1Api().read_node(node_name)
    zone = (node.metadata.labels or {}).get(ZONE_LABEL, "")
    if not zone:
        log.warning(NO_ZONE, node_name, ZONE_LABEL, topology_key, node_name, ZONE_LABEL)
    return zone
