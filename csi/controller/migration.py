"""Upgrading attachments made before node-bound grants: secrets out of VolumeAttachments, grants bound to nodes.

The driver before this version put each grant's CHAP secrets in publish_context, which Kubernetes keeps in the
VolumeAttachment's status.attachmentMetadata (and kube-state-metrics exports). At start, in a cluster, the
controller walks this driver's attached VolumeAttachments whose metadata holds a secret and, for each:
  1. asks the agent to grant the same access again, now naming the node the attachment is for (its
     spec.nodeName): the agent keeps the secrets while a session uses them, so nothing staged breaks, and
     marks them exposed (storage/access.py replaces them once no session does);
  2. replaces the metadata with this version's publish_context (csi/contract.py), which holds no secret.
A node plugin of this version then stages from the new context, asking the agent for the credentials.
Copies of the old secrets may remain in etcd's history and backups and in Prometheus: the rotation is what
makes those useless, not this cleanup.
"""

from __future__ import annotations

import logging

from csi import contract, errors, ids
from csi.proto import agent_pb2 as apb

log = logging.getLogger(__name__)

LEGACY_KEYS = (contract.LEGACY_CHAP_SECRET, contract.LEGACY_MUTUAL_SECRET)


def migrate(service, storage_api, core_api, driver_name: str) -> dict[str, int]:
    """service: the ControllerService (its agents and node directory). Returns what it did, by kind."""
    counts = {"rebound": 0, "skipped": 0, "failed": 0}
    for va in storage_api.list_volume_attachment(_request_timeout=60).items:
        status = va.status
        meta = dict((status.attachment_metadata or {}) if status else {})
        if va.spec.attacher != driver_name or not status or not status.attached or \
                not any(meta.get(k) for k in LEGACY_KEYS):
            continue
        try:
            _migrate_one(service, storage_api, core_api, va, meta)
            counts["rebound"] += 1
        except errors.CsiError as exc:
            # An agent away, a volume gone: tried again at the next start; the old context still stages.
            counts["failed"] += 1
            log.warning("VolumeAttachment %s keeps its old context for now: %s", va.metadata.name, exc.message)
    if any(counts.values()):
        log.info("attachments of the previous version: %s", counts)
    return counts


def _migrate_one(service, storage_api, core_api, va, meta: dict) -> None:
    pv_name = va.spec.source.persistent_volume_name if va.spec.source else None
    if not pv_name:
        raise errors.precondition("not a PersistentVolume's attachment")
    pv = core_api.read_persistent_volume(pv_name, _request_timeout=30)
    volume_id = pv.spec.csi.volume_handle if pv.spec and pv.spec.csi else ""
    ref = ids.parse_id(volume_id)
    if ref is None or not service._serves(ref.node):
        raise errors.precondition(f"volume {volume_id!r} is not one of a storage node this controller serves")
    node = va.spec.node_name
    agent = service.agents.get(ref.node)
    vol = agent.call("GetVolume", apb.GetVolumeRequest(vg=ref.vg, lv=ref.lv, brief=True))
    iqn = service.nodes.iqn_of(node)
    grants = [i for i in vol.initiators if i.iqn == iqn]
    if not grants:
        raise errors.precondition(f"no grant of {volume_id} for node {node} ({iqn or 'no initiator name known'})")
    grant = agent.call("GrantAccess", apb.GrantAccessRequest(
        vg=ref.vg, lv=ref.lv, initiator_iqn=grants[0].iqn, read_only=grants[0].read_only, node_name=node,
        mutual_chap=vol.attributes.get("mutualChap") == "true"))
    context = contract.publish_context(grant.target_iqn, grant.portals, grant.lun, ref.node,
                                       service.agents.node(ref.node).address)
    # A merge patch leaves keys it does not name: the old ones are set to null to remove them.
    patch = {k: None for k in meta if k not in context}
    patch.update(context)
    storage_api.patch_volume_attachment_status(va.metadata.name, {"status": {"attachmentMetadata": patch}},
                                               _request_timeout=30)
    log.info("VolumeAttachment %s (volume %s, node %s): grant bound to its node, no secret in it any more",
             va.metadata.name, volume_id, node)
