"""Attachments of the version before node-bound grants: their grant bound to the attachment's node, the CHAP
secrets out of the VolumeAttachment (csi/controller/migration.py)."""

from __future__ import annotations

from types import SimpleNamespace

from csi import contract, ids
from csi.controller import migration
from csi.proto import csi_pb2 as csi
from tests.unit.test_controller import WORKER, cap, create, svc  # noqa: F401 - svc is a fixture


class FakeStorageApi:
    def __init__(self, attachments):
        self.attachments = attachments
        self.patches = []

    def list_volume_attachment(self, _request_timeout=None):
        return SimpleNamespace(items=self.attachments)

    def patch_volume_attachment_status(self, name, body, _request_timeout=None):
        self.patches.append((name, body))


class FakeCoreApi:
    def __init__(self, pvs):
        self.pvs = pvs

    def read_persistent_volume(self, name, _request_timeout=None):
        return SimpleNamespace(spec=SimpleNamespace(csi=SimpleNamespace(volume_handle=self.pvs[name])))


def attachment(name, pv, node, meta, attacher="lvm-iscsi.csi.dev"):
    return SimpleNamespace(metadata=SimpleNamespace(name=name),
                           spec=SimpleNamespace(attacher=attacher, node_name=node,
                                                source=SimpleNamespace(persistent_volume_name=pv)),
                           status=SimpleNamespace(attached=True, attachment_metadata=meta))


def test_old_attachments_lose_their_secrets_and_their_grant_names_its_node(svc):  # noqa: F811
    v = create(svc)
    svc.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER,
                                                                   volume_capability=cap()), None)
    agent = svc.agents.get(ids.parse_id(v.volume_id).node)
    agent.granted_to = ""                       # as the previous version granted: no node
    old = {"targetIqn": ids.parse_id(v.volume_id).iqn, "portals": "10.0.0.1:3260", "lun": "0",
           "chapUser": "u1", "chapSecret": "s" * 24}
    storage = FakeStorageApi([attachment("va-old", "pv-1", "worker-1", old),
                              attachment("va-new", "pv-1", "worker-1", {"targetIqn": "x", "agent": "a:1"}),
                              attachment("va-other", "pv-1", "worker-1", old, attacher="other.csi")])
    counts = migration.migrate(svc, storage, FakeCoreApi({"pv-1": v.volume_id}), "lvm-iscsi.csi.dev")
    assert counts == {"rebound": 1, "skipped": 0, "failed": 0}
    assert agent.granted_to == "worker-1"
    (name, body), = storage.patches
    meta = body["status"]["attachmentMetadata"]
    assert name == "va-old" and meta["chapSecret"] is None and meta["chapUser"] is None
    assert {k: v for k, v in meta.items() if v is not None} == {
        contract.TARGET_IQN: old["targetIqn"], contract.PORTALS: "10.0.0.1:3260", contract.LUN: "0",
        contract.STORAGE_NODE: "s2", contract.AGENT: "10.0.0.12:7600"}
