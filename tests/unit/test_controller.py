"""ControllerService against fake agents: validation, routing by ID, idempotency, error codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi import errors, ids
from csi.config import ControllerConfig, StorageNode
from csi.controller.service import ControllerService
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi

GiB = 1 << 30
M = csi.VolumeCapability.AccessMode
WORKER = "iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1"


class FakeAgent:
    def __init__(self, node: StorageNode, available: int):
        self.node = node
        self.available = available
        self.volumes: dict[str, apb.Volume] = {}
        self.calls: list[str] = []
        self.down = False

    def info(self, timeout=None):
        return self.call("GetInfo", apb.GetInfoRequest())

    def call(self, method, request, timeout=None):
        self.calls.append(method)
        if self.down:
            raise errors.unavailable(f"storage node {self.node.name} is unreachable")
        if method == "GetInfo":
            return apb.AgentInfo(node_name=self.node.name, pools=[
                apb.Pool(name="thin", vg="vg", thin_pool="tp", extent_bytes=4 << 20, available_bytes=self.available),
                apb.Pool(name="thick", vg="vg", extent_bytes=4 << 20, available_bytes=self.available // 2)])
        if method == "GetVolume":
            lv = ids.lv_name("c1", request.name) if request.name else request.lv
            if lv not in self.volumes:
                raise errors.not_found("no such volume")
            return self.volumes[lv]
        if method == "CreateVolume":
            lv = ids.lv_name("c1", request.name)
            vol = self.volumes.get(lv)
            if vol and (vol.size_bytes != request.size_bytes or dict(vol.attributes) != dict(request.attributes)):
                raise errors.exists("other attributes")
            vol = vol or apb.Volume(name=request.name, pool=request.pool, vg="vg", lv=lv,
                                    size_bytes=request.size_bytes, attributes=request.attributes, healthy=True)
            self.volumes[lv] = vol
            return vol
        if method == "DeleteVolume":
            self.volumes.pop(request.lv, None)
            return apb.DeleteVolumeResponse()
        if method == "GrantAccess":
            vol = self.volumes[request.lv]
            if request.initiator_iqn not in [i.iqn for i in vol.initiators]:
                vol.initiators.add(iqn=request.initiator_iqn, read_only=request.read_only)
            return apb.GrantAccessResponse(target_iqn=ids.target_iqn("vg", request.lv), portals=["10.0.0.1:3260"],
                                           lun=0, chap_user="u", chap_secret="s" * 24)
        if method == "RevokeAccess":
            vol = self.volumes.get(request.lv)
            if vol:
                keep = [i for i in vol.initiators if i.iqn != request.initiator_iqn]
                del vol.initiators[:]
                vol.initiators.extend(keep)
            return apb.RevokeAccessResponse()
        if method == "ListVolumes":
            return apb.ListVolumesResponse(volumes=list(self.volumes.values()))
        raise AssertionError(method)


class FakeAgents:
    def __init__(self, agents):
        self._agents = {a.node.name: a for a in agents}

    def get(self, name):
        if name not in self._agents:
            raise errors.not_found(name)
        return self._agents[name]

    def all(self):
        return [self._agents[n] for n in sorted(self._agents)]

    def each(self, fn):
        out = {}
        for a in self.all():
            try:
                out[a.node.name] = fn(a)
            except errors.CsiError as exc:
                out[a.node.name] = exc
        return out


@pytest.fixture
def svc():
    nodes = (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "b"))
    config = ControllerConfig("lvm-iscsi.csi.dev", "c1", nodes, Path("/nonexistent"))
    agents = FakeAgents([FakeAgent(nodes[0], 10 * GiB), FakeAgent(nodes[1], 20 * GiB)])
    return ControllerService(config, agents)


def cap(mode=M.SINGLE_NODE_WRITER, fs="ext4"):
    return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs), access_mode=M(mode=mode))


def create(svc, name="pvc-1", size=GiB, **kw):
    req = csi.CreateVolumeRequest(name=name, volume_capabilities=[cap()],
                                  capacity_range=csi.CapacityRange(required_bytes=size), **kw)
    return svc.CreateVolume(req, None).volume


def code_of(fn, *args):
    with pytest.raises(errors.CsiError) as e:
        fn(*args, None)
    return e.value.code


def test_create_places_on_most_free_and_is_idempotent(svc):
    v = create(svc)
    assert v.volume_id.startswith("v1:s2:vg:c1-pvc-1-")
    assert v.capacity_bytes == GiB
    assert v.accessible_topology[0].segments == {"topology.lvm-iscsi.csi.dev/zone": "b"}
    assert create(svc).volume_id == v.volume_id
    assert len(svc.agents.get("s2").volumes) == 1 and not svc.agents.get("s1").volumes


def test_retry_finds_the_volume_even_if_placement_would_change(svc):
    v = create(svc)
    svc.agents.get("s1").available = 100 * GiB
    assert create(svc).volume_id == v.volume_id


def test_same_name_other_size_is_already_exists(svc):
    create(svc)
    req = csi.CreateVolumeRequest(name="pvc-1", volume_capabilities=[cap()],
                                  capacity_range=csi.CapacityRange(required_bytes=2 * GiB))
    assert code_of(svc.CreateVolume, req) == errors.Code.ALREADY_EXISTS


def test_create_refuses_when_an_agent_is_down(svc):
    svc.agents.get("s1").down = True
    req = csi.CreateVolumeRequest(name="pvc-x", volume_capabilities=[cap()])
    assert code_of(svc.CreateVolume, req) == errors.Code.UNAVAILABLE
    assert "CreateVolume" not in svc.agents.get("s2").calls


@pytest.mark.parametrize("req,code", [
    (csi.CreateVolumeRequest(volume_capabilities=[cap()]), errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x"), errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()], parameters={"bogus": "1"}),
     errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()],
                             capacity_range=csi.CapacityRange(required_bytes=-1)), errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()], capacity_range=csi.CapacityRange()),
     errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()],
                             capacity_range=csi.CapacityRange(required_bytes=2, limit_bytes=1)),
     errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()],
                             capacity_range=csi.CapacityRange(required_bytes=1 << 50)),
     errors.Code.RESOURCE_EXHAUSTED),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap(M.MULTI_NODE_MULTI_WRITER)]),
     errors.Code.INVALID_ARGUMENT),
    (csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()], accessibility_requirements=
                             csi.TopologyRequirement(requisite=[csi.Topology(segments={"other/key": "a"})])),
     errors.Code.INVALID_ARGUMENT),
])
def test_bad_create_requests_change_nothing(svc, req, code):
    assert code_of(svc.CreateVolume, req) == code
    assert not any(a.volumes for a in svc.agents.all())


def test_zone_requirement_is_honoured(svc):
    req = csi.CreateVolumeRequest(name="z", volume_capabilities=[cap()], accessibility_requirements=
                                  csi.TopologyRequirement(requisite=[csi.Topology(
                                      segments={"topology.lvm-iscsi.csi.dev/zone": "a"})]))
    assert svc.CreateVolume(req, None).volume.volume_id.startswith("v1:s1:")


def test_default_size_when_no_range(svc):
    v = svc.CreateVolume(csi.CreateVolumeRequest(name="d", volume_capabilities=[cap()]), None).volume
    assert v.capacity_bytes == 1 << 30


def test_delete_is_idempotent_and_ignores_foreign_ids(svc):
    v = create(svc)
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id="fake-volume-id"), None)
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id="v1:s1:vg:other-cluster-lv"), None)
    assert "DeleteVolume" in svc.agents.get("s2").calls
    assert code_of(svc.DeleteVolume, csi.DeleteVolumeRequest()) == errors.Code.INVALID_ARGUMENT


def test_delete_on_unconfigured_node_is_refused_not_faked(svc):
    req = csi.DeleteVolumeRequest(volume_id="v1:s9:vg:" + ids.lv_name("c1", "x"))
    assert code_of(svc.DeleteVolume, req) == errors.Code.FAILED_PRECONDITION


def test_publish_context_and_single_node_rule(svc):
    v = create(svc)
    req = csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER, volume_capability=cap())
    ctx = svc.ControllerPublishVolume(req, None).publish_context
    assert ctx["targetIqn"] == ids.parse_id(v.volume_id).iqn and ctx["portals"] == "10.0.0.1:3260"
    assert ctx["lun"] == "0" and ctx["chapUser"] == "u" and len(ctx["chapSecret"]) >= 12
    assert svc.ControllerPublishVolume(req, None).publish_context == ctx
    other = csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER + "x", volume_capability=cap())
    assert code_of(svc.ControllerPublishVolume, other) == errors.Code.FAILED_PRECONDITION


@pytest.mark.parametrize("volume_id,node_id,code", [
    ("", WORKER, errors.Code.INVALID_ARGUMENT), ("fake", WORKER, errors.Code.NOT_FOUND),
    (None, "", errors.Code.INVALID_ARGUMENT), (None, "some-fake-node-id", errors.Code.NOT_FOUND)])
def test_publish_errors(svc, volume_id, node_id, code):
    v = create(svc)
    req = csi.ControllerPublishVolumeRequest(volume_id=v.volume_id if volume_id is None else volume_id,
                                             node_id=node_id, volume_capability=cap())
    assert code_of(svc.ControllerPublishVolume, req) == code


def test_unpublish_is_idempotent(svc):
    v = create(svc)
    svc.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER,
                                                                   volume_capability=cap()), None)
    for _ in range(2):
        svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER),
                                      None)
    assert not svc.agents.get("s2").volumes[ids.parse_id(v.volume_id).lv].initiators
    svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id="gone", node_id=WORKER), None)


def test_list_volumes_pages_in_stable_order(svc):
    made = sorted(create(svc, f"pvc-{i}").volume_id for i in range(5))
    seen, token = [], ""
    while True:
        r = svc.ListVolumes(csi.ListVolumesRequest(max_entries=2, starting_token=token), None)
        seen += [e.volume.volume_id for e in r.entries]
        token = r.next_token
        if not token:
            break
    assert seen == made
    assert code_of(svc.ListVolumes, csi.ListVolumesRequest(starting_token="garbage")) == errors.Code.ABORTED
    assert code_of(svc.ListVolumes, csi.ListVolumesRequest(max_entries=-1)) == errors.Code.INVALID_ARGUMENT


def test_get_capacity_by_zone_and_type(svc):
    total = svc.GetCapacity(csi.GetCapacityRequest(), None)
    assert total.available_capacity == 30 * GiB and total.maximum_volume_size.value == 20 * GiB
    zone_a = svc.GetCapacity(csi.GetCapacityRequest(accessible_topology=csi.Topology(
        segments={"topology.lvm-iscsi.csi.dev/zone": "a"})), None)
    assert zone_a.available_capacity == 10 * GiB
    thick = svc.GetCapacity(csi.GetCapacityRequest(parameters={"type": "thick"}), None)
    assert thick.available_capacity == 15 * GiB


def test_validate_capabilities(svc):
    v = create(svc)
    ok = svc.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[cap()]), None)
    assert ok.confirmed.volume_capabilities
    blk = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=M(mode=M.SINGLE_NODE_WRITER))
    no = svc.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[blk]), None)
    assert not no.HasField("confirmed") and "mount" in no.message
    assert code_of(svc.ValidateVolumeCapabilities, csi.ValidateVolumeCapabilitiesRequest(
        volume_id="nope", volume_capabilities=[cap()])) == errors.Code.NOT_FOUND
