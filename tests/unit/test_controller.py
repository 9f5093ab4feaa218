"""ControllerService against fake agents: validation, routing by ID, idempotency, error codes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from csi import errors, ids
from csi.config import ControllerConfig, StorageNode
from csi.controller.agents import Agents
from csi.controller.journal import FileJournal
from csi.controller.nodes import StaticNodes
from csi.controller.placement import Placement
from csi.controller.journal import Entry
from csi.controller.service import ControllerService, volume_attributes
from csi import capabilities as caps
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from csi.storage import listing

GiB = 1 << 30
M = csi.VolumeCapability.AccessMode
WORKER = "iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1"


class FakeAgent:
    def __init__(self, node: StorageNode, available: int):
        self.node = node
        self.available = available
        self.volumes: dict[str, apb.Volume] = {}
        self.calls: list[str] = []
        self.snapshots: dict[str, apb.Snapshot] = {}
        self.down = False
        self.pages_ignored = False
        self.copies_allowed: list[tuple[str, str]] = []
        self.features = ["source-offset"]

    def info(self, timeout=None, reconnect=True):
        return self.call("GetInfo", apb.GetInfoRequest())

    def call(self, method, request, timeout=None, reconnect=True):
        self.calls.append(method)
        if self.down:
            raise errors.unavailable(f"storage node {self.node.name} is unreachable")
        if method == "GetInfo":
            return apb.AgentInfo(node_name=self.node.name, features=self.features, pools=[
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
                vol.initiators.add(iqn=request.initiator_iqn, read_only=request.read_only, node=request.node_name)
            self.granted_to = request.node_name
            return apb.GrantAccessResponse(target_iqn=ids.target_iqn("vg", request.lv), portals=["10.0.0.1:3260"],
                                           lun=0)
        if method == "RevokeAccess":
            vol = self.volumes.get(request.lv)
            if vol:
                keep = [i for i in vol.initiators if i.iqn != request.initiator_iqn]
                del vol.initiators[:]
                vol.initiators.extend(keep)
            return apb.RevokeAccessResponse()
        if method == "ListVolumes":
            if self.pages_ignored:   # an agent of the version before paging: everything, no token
                return apb.ListVolumesResponse(volumes=list(self.volumes.values()))
            keys, token = listing.page([("vg", lv) for lv in self.volumes], request.max_entries,
                                       request.starting_token)
            return apb.ListVolumesResponse(volumes=[self.volumes[lv] for _, lv in keys], next_token=token)
        if method == "ListSnapshots":
            return apb.ListSnapshotsResponse()
        if method == "CreateSnapshot":
            lv = ids.lv_name("c1", request.name, kind="snapshot")
            self.snapshots[lv] = apb.Snapshot(name=request.name, vg="vg", lv=lv, source_vg=request.source_vg,
                                              source_lv=request.source_lv, ready=True,
                                              size_bytes=self.volumes[request.source_lv].size_bytes)
            return self.snapshots[lv]
        if method == "GetSnapshot":
            if request.lv not in self.snapshots:
                raise errors.not_found("no such snapshot")
            return self.snapshots[request.lv]
        if method == "DeleteSnapshot":
            self.snapshots.pop(request.lv, None)
            return apb.DeleteSnapshotResponse()
        if method == "AllowCopy":
            self.copies_allowed.append((request.lv, request.destination_node))
            return apb.AllowCopyResponse()
        raise AssertionError(method)


class _Channel:
    def close(self):
        pass


def fake_agents(fakes, journal=None):
    """The real Agents (membership, health, retirement) over fake clients."""
    by_name = {f.node.name: f for f in fakes}

    def factory(node, health):
        fake = by_name[node.name]
        fake.health, fake.channel = health, _Channel()
        return fake
    return Agents(Path("/nonexistent"), nodes=[f.node for f in fakes],
                  retired=journal.retired if journal else set, client_factory=factory)


@pytest.fixture
def svc(tmp_path):
    nodes = (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "b"))
    config = ControllerConfig("lvm-iscsi.csi.dev", "c1", nodes, Path("/nonexistent"))
    journal = FileJournal(tmp_path / "journal")
    journal.mark_adopted()
    agents = fake_agents([FakeAgent(nodes[0], 10 * GiB), FakeAgent(nodes[1], 20 * GiB)], journal)
    agents.update(nodes)
    (tmp_path / "nodes.yaml").write_text(f"nodes: [{{name: worker-1, iqn: {WORKER}}}, "
                                         f"{{name: worker-2, iqn: {WORKER}x}}]\n")
    return ControllerService(config, agents, Placement(journal, agents, "c1"), StaticNodes(tmp_path / "nodes.yaml"))


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


def test_a_burst_between_two_polls_spreads_by_space_not_onto_one_node(svc):
    # The agents' space as last polled does not change during a burst of claims: without counting its own
    # placements, the controller put every one of them on the node that had the most at the last poll
    # (seen in bench/scale: 0 to 662 volumes per simulated agent).
    svc.agents.get("s1").available = svc.agents.get("s2").available = 10 * GiB
    nodes = [create(svc, f"pvc-burst-{i}").volume_id.split(":")[1] for i in range(4)]
    assert sorted(nodes) == ["s1", "s1", "s2", "s2"]
    assert svc.GetCapacity(csi.GetCapacityRequest(), None).available_capacity == 16 * GiB
    svc.agents.poll_once()    # the agents' own answer replaces the controller's count
    assert svc.GetCapacity(csi.GetCapacityRequest(), None).available_capacity == 20 * GiB


def test_pools_are_converted_once_per_answer_and_follow_every_new_one(svc):
    s1 = svc.agents.get("s1")
    svc.agents.poll_once()
    node, health = svc.agents.node("s1"), svc.agents.health("s1")
    first = health.candidates(node)
    assert health.candidates(node) is first                     # the same answer: no second conversion
    assert [(c.pool, c.available) for c in first] == [("thin", 10 * GiB), ("thick", 5 * GiB)]
    s1.available = 40 * GiB
    svc.agents.poll_once()
    assert [(c.pool, c.available) for c in health.candidates(node)] == [("thin", 40 * GiB), ("thick", 20 * GiB)]
    moved = StorageNode("s1", "10.0.0.99:7600", "c")            # same node, new address and zone: same health
    svc.agents.update([moved, svc.agents.node("s2")])
    assert {c.zone for c in svc.agents.health("s1").candidates(svc.agents.node("s1"))} == {"c"}
    assert create(svc, "pvc-big", 30 * GiB).volume_id.startswith("v1:s1:")   # placed by the new answer


class SlowInfoAgent(FakeAgent):
    """Answers GetInfo after a moment (or never, while `hangs`), counting how many are asked at once."""
    lock = threading.Lock()
    asking = 0
    most = 0

    def __init__(self, node, available, hangs=False):
        super().__init__(node, available)
        self.hangs = hangs
        self.asked: list[float] = []

    def call(self, method, request, timeout=None, reconnect=True):
        if method != "GetInfo":
            return super().call(method, request, timeout)
        cls = SlowInfoAgent
        with cls.lock:
            cls.asking += 1
            cls.most = max(cls.most, cls.asking)
            self.asked.append(time.monotonic())
        try:
            time.sleep(min(timeout or 1, 1.0) if self.hangs else 0.05)
            if self.hangs:
                raise errors.unavailable("no answer")
            return super().call(method, request, timeout)
        finally:
            with cls.lock:
                cls.asking -= 1


def test_the_poller_spreads_its_questions_and_asks_a_new_node_at_once(monkeypatch):
    # All at once, 100 answers every 3 s held the controller's calls for a moment each time (bench/scale:
    # the p99 of CreateVolume at 100 simulated agents twice that with the poller stopped).
    from csi.controller import agents as agents_module
    monkeypatch.setattr(agents_module, "POLL_SECONDS", 0.6)
    monkeypatch.setattr(agents_module, "PROBE_TIMEOUT", 1.0)
    SlowInfoAgent.asking = SlowInfoAgent.most = 0
    fakes = [SlowInfoAgent(StorageNode(f"s{i:02d}", f"10.0.1.{i}:7600", ""), GiB, hangs=(i == 0))
             for i in range(30)]
    late = SlowInfoAgent(StorageNode("late", "10.0.2.1:7600", ""), GiB)
    by_name = {f.node.name: f for f in fakes + [late]}

    def factory(node, health):
        fake = by_name[node.name]
        fake.health, fake.channel = health, _Channel()
        return fake

    agents = Agents(Path("/nonexistent"), nodes=[f.node for f in fakes], client_factory=factory, poll=True)
    try:
        time.sleep(0.7)              # the nodes known at start are asked at once, all of them
        assert SlowInfoAgent.most > agents_module.POLL_SLICE + 1
        SlowInfoAgent.most = 0
        time.sleep(1.2)              # then in slices, two rounds
        assert SlowInfoAgent.most <= agents_module.POLL_SLICE + 1     # + the node that hangs
        # every node asked in every round, the one that hangs included, and it held up nobody
        assert all(len(f.asked) >= 2 for f in fakes)
        assert all(f.health.up for f in fakes[1:]) and not fakes[0].health.up
        monkeypatch.setattr(agents_module, "POLL_SECONDS", 30.0)   # the next round is far away now
        joined = time.monotonic()
        agents.update([f.node for f in fakes] + [late.node])
        time.sleep(1.0)
        assert late.asked and late.asked[0] - joined < 1.0 and late.health.info is not None
    finally:
        agents.close()


def test_retry_finds_the_volume_even_if_placement_would_change(svc):
    v = create(svc)
    svc.agents.get("s1").available = 100 * GiB
    assert create(svc).volume_id == v.volume_id


def test_same_name_other_size_is_already_exists(svc):
    create(svc)
    req = csi.CreateVolumeRequest(name="pvc-1", volume_capabilities=[cap()],
                                  capacity_range=csi.CapacityRange(required_bytes=2 * GiB))
    assert code_of(svc.CreateVolume, req) == errors.Code.ALREADY_EXISTS


def test_a_storage_node_down_stops_nothing_on_the_others(svc):
    svc.agents.get("s2").down = True
    svc.agents.poll_once()
    v = create(svc, "pvc-x")
    assert v.volume_id.startswith("v1:s1:")
    assert "CreateVolume" not in svc.agents.get("s2").calls and "GetVolume" not in svc.agents.get("s2").calls
    # s1's 10 GiB less the volume just placed there (counted until s1's next answer); nothing of s2's
    assert svc.GetCapacity(csi.GetCapacityRequest(), None).available_capacity == 9 * GiB


def test_a_node_down_at_the_last_poll_is_asked_again_before_a_refusal(svc):
    s1 = svc.agents.get("s1")
    s1.down = True
    svc.agents.poll_once()
    s1.down = False          # its agent restarted a moment ago; the poller has not seen it yet
    zone_a = csi.TopologyRequirement(requisite=[csi.Topology(segments={"topology.lvm-iscsi.csi.dev/zone": "a"})])
    assert create(svc, "after-restart", accessibility_requirements=zone_a).volume_id.startswith("v1:s1:")
    s1.down = True
    svc.agents.poll_once()
    with pytest.raises(errors.CsiError) as e:
        create(svc, "still-down", accessibility_requirements=zone_a)
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED and "s1" in e.value.message


def test_a_name_placed_on_a_node_that_went_down_waits_for_it(svc):
    v = create(svc, "pvc-y")                                   # on s2, the most free
    svc.agents.get("s2").down = True
    svc.agents.poll_once()
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(
        name="pvc-y", volume_capabilities=[cap()],
        capacity_range=csi.CapacityRange(required_bytes=GiB))) == errors.Code.UNAVAILABLE
    assert create(svc, "pvc-z").volume_id.startswith("v1:s1:")  # other names are placed elsewhere
    assert not svc.agents.get("s1").volumes.get(ids.lv_name("c1", "pvc-y"))
    svc.agents.get("s2").down = False
    svc.agents.poll_once()
    assert create(svc, "pvc-y").volume_id == v.volume_id


def test_before_adoption_a_missing_name_needs_every_agent(tmp_path):
    nodes = (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "b"))
    fakes = [FakeAgent(nodes[0], 10 * GiB), FakeAgent(nodes[1], 20 * GiB)]
    journal = FileJournal(tmp_path / "journal")
    agents = fake_agents(fakes, journal)
    agents.update(nodes)
    placement = Placement(journal, agents, "c1")
    (tmp_path / "nodes.yaml").write_text(f"nodes: [{{name: worker-1, iqn: {WORKER}}}]\n")
    svc = ControllerService(ControllerConfig("lvm-iscsi.csi.dev", "c1", nodes, Path("/x")), agents, placement,
                            StaticNodes(tmp_path / "nodes.yaml"))
    # A volume made before the journal existed, on s1 (the less free node), is found and recorded.
    old = fakes[0].call("CreateVolume", apb.CreateVolumeRequest(name="old", pool="thin", size_bytes=GiB,
                                                                attributes=volume_attributes_of(svc, "old")))
    assert create(svc, "old").volume_id == f"v1:s1:vg:{old.lv}"
    assert journal.get(old.lv).node == "s1"
    fakes[1].down = True
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(name="new", volume_capabilities=[cap()])) == \
        errors.Code.UNAVAILABLE
    fakes[1].down = False
    assert placement.scan() == 1 and not journal.adopted()
    placement._adopt_until_done()
    assert journal.adopted()
    fakes[1].down = True
    agents.poll_once()
    assert create(svc, "new").volume_id.startswith("v1:s1:")


def volume_attributes_of(svc, name):
    req = csi.CreateVolumeRequest(name=name, volume_capabilities=[cap()])
    access = caps.check_capabilities(req.volume_capabilities, "ext4")
    return volume_attributes(access, caps.parse_params({}))


def test_two_controllers_place_a_name_once(svc, tmp_path):
    # Another controller (same journal) claimed the name for s1 first: this one goes there too.
    svc.placement.claim(Entry(ids.lv_name("c1", "race"), "volume", "race", "s1", pool="thin"))
    assert create(svc, "race").volume_id.startswith("v1:s1:")
    assert not svc.agents.get("s2").volumes


def test_a_full_pool_lets_the_retry_place_again(svc):
    svc.agents.poll_once()
    s2 = svc.agents.get("s2")
    print("DBG", s2.health, svc.agents.health("s2") is s2.health)
    real = s2.call

    def full(method, request, timeout=None):
        if method == "CreateVolume":
            raise errors.exhausted("pool filled up since")
        return real(method, request, timeout)
    s2.call = full
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(name="full", volume_capabilities=[cap()])) == \
        errors.Code.RESOURCE_EXHAUSTED
    assert svc.placement.journal.get(ids.lv_name("c1", "full")) is None
    s2.available = 0
    svc.agents.poll_once()
    s2.call = real
    assert create(svc, "full").volume_id.startswith("v1:s1:")


def test_journal_record_goes_with_the_volume(svc):
    v = create(svc, "gone")
    key = ids.parse_id(v.volume_id).lv
    assert svc.placement.journal.get(key).state == "ready"
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    assert svc.placement.journal.get(key) is None


def test_a_retired_node_releases_its_volumes(svc):
    v = create(svc, "lost")
    svc.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER,
                                                                   volume_capability=cap()), None)
    svc.agents.get("s2").down = True
    svc.agents.poll_once()
    unpub = csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER)
    assert code_of(svc.ControllerUnpublishVolume, unpub) == errors.Code.UNAVAILABLE
    svc.placement.journal.retire("s2")
    svc.agents.refresh_retired()
    svc.ControllerUnpublishVolume(unpub, None)
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    assert svc.placement.journal.get(ids.parse_id(v.volume_id).lv) is None
    assert create(svc, "after").volume_id.startswith("v1:s1:")


def test_snapshot_needs_only_the_source_agent(svc):
    v = create(svc, "snapsrc")
    svc.agents.get("s1").down = True
    svc.agents.poll_once()
    s = svc.CreateSnapshot(csi.CreateSnapshotRequest(name="snap-1", source_volume_id=v.volume_id), None).snapshot
    assert s.snapshot_id.startswith("v1:s2:".replace("v1", "s1")) and "GetSnapshot" not in svc.agents.get("s1").calls
    other = create(svc, "other")
    assert code_of(svc.CreateSnapshot, csi.CreateSnapshotRequest(name="snap-1", source_volume_id=other.volume_id)) \
        == errors.Code.ALREADY_EXISTS


def test_a_restore_asks_no_agent_about_a_snapshot_it_made_and_forgets_a_deleted_one(svc):
    v = create(svc, "snapsrc")
    s = svc.CreateSnapshot(csi.CreateSnapshotRequest(name="snap-r", source_volume_id=v.volume_id), None).snapshot
    agent = svc.agents.get(v.volume_id.split(":")[1])
    agent.calls.clear()
    req = csi.CreateVolumeRequest(name="restored", volume_capabilities=[cap()],
                                  capacity_range=csi.CapacityRange(required_bytes=GiB))
    req.volume_content_source.snapshot.snapshot_id = s.snapshot_id
    svc.CreateVolume(req, None)
    assert "GetSnapshot" not in agent.calls, agent.calls   # its size is known from CreateSnapshot
    svc.DeleteSnapshot(csi.DeleteSnapshotRequest(snapshot_id=s.snapshot_id), None)
    req.name = "restored-after"
    assert code_of(svc.CreateVolume, req) == errors.Code.NOT_FOUND and "GetSnapshot" in agent.calls


def test_list_volumes_with_an_agent_down_is_an_error_never_a_partial_page(svc):
    create(svc, "a1")
    svc.agents.get("s1").down = True
    svc.agents.poll_once()
    assert code_of(svc.ListVolumes, csi.ListVolumesRequest()) == errors.Code.UNAVAILABLE


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


def test_delete_on_an_unknown_node_is_refused_not_faked(svc):
    req = csi.DeleteVolumeRequest(volume_id="v1:s9:vg:" + ids.lv_name("c1", "x"))
    assert code_of(svc.DeleteVolume, req) == errors.Code.FAILED_PRECONDITION


def test_an_initiator_no_node_claims_is_not_found(svc):
    v = create(svc)
    req = csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id="iqn.2026-11.dev.nowhere:x",
                                             volume_capability=cap())
    assert code_of(svc.ControllerPublishVolume, req) == errors.Code.NOT_FOUND


def test_publish_context_and_single_node_rule(svc):
    v = create(svc)
    req = csi.ControllerPublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER, volume_capability=cap())
    ctx = svc.ControllerPublishVolume(req, None).publish_context
    # Where to log in and whom to ask for the credentials; no secret (it lands in the VolumeAttachment).
    assert dict(ctx) == {"targetIqn": ids.parse_id(v.volume_id).iqn, "portals": "10.0.0.1:3260", "lun": "0",
                         "storageNode": "s2", "agent": "10.0.0.12:7600"}
    assert svc.agents.get("s2").granted_to == "worker-1"   # the node the initiator belongs to
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


def test_unpublish_on_unconfigured_node_is_refused_not_faked(svc):
    """Issue 12, defect 5: an OK here would tell the attacher that the node is fenced while its ACL and
    session stay on a storage node the controller no longer knows."""
    vid = "v1:s9:vg:" + ids.lv_name("c1", "x")
    for node_id in (WORKER, ""):
        with pytest.raises(errors.CsiError) as e:
            svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=node_id),
                                          None)
        assert e.value.code == errors.Code.FAILED_PRECONDITION and "s9" in e.value.message
    # IDs this driver and cluster never made are still "gone": success
    svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id="v1:s9:vg:other-lv",
                                                                       node_id=WORKER), None)


@pytest.mark.parametrize("old_agents", [False, True])
def test_list_volumes_pages_in_stable_order(svc, old_agents):
    for a in svc.agents.all():
        a.pages_ignored = old_agents
    made = {create(svc, f"pvc-{i}").volume_id for i in range(5)}
    made |= {create(svc, f"pvc-a{i}", accessibility_requirements=csi.TopologyRequirement(requisite=[csi.Topology(
        segments={"topology.lvm-iscsi.csi.dev/zone": "a"})])).volume_id for i in range(3)}
    assert {v.split(":")[1] for v in made} == {"s1", "s2"}
    seen, token = [], ""
    while True:
        r = svc.ListVolumes(csi.ListVolumesRequest(max_entries=2, starting_token=token), None)
        assert len(r.entries) <= 2
        seen += [e.volume.volume_id for e in r.entries]
        token = r.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made) and len(seen) == len(made)
    everything = svc.ListVolumes(csi.ListVolumesRequest(), None)
    assert {e.volume.volume_id for e in everything.entries} == made and not everything.next_token
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


@pytest.mark.parametrize("pool,zone,transient", [
    ("thick", "b", True),    # the source's own thick pool: the live LV would be copied (issue 12, defect 4)
    ("thick", "a", True),    # another node
    ("thin", "b", False)])   # the source's own thin pool: a thin snapshot of it is the point in time already
def test_a_clone_always_copies_a_point_in_time(svc, pool, zone, transient):
    src = create(svc, "src", parameters={"type": pool})
    assert src.volume_id.startswith("v1:s2:")
    req = csi.CreateVolumeRequest(name="clone", volume_capabilities=[cap()], parameters={"type": pool},
                                  capacity_range=csi.CapacityRange(required_bytes=GiB),
                                  accessibility_requirements=csi.TopologyRequirement(requisite=[csi.Topology(
                                      segments={"topology.lvm-iscsi.csi.dev/zone": zone})]))
    req.volume_content_source.volume.volume_id = src.volume_id
    clone = svc.CreateVolume(req, None).volume
    calls = svc.agents.get("s2").calls
    assert ("CreateSnapshot" in calls) == transient and ("DeleteSnapshot" in calls) == transient
    # Another node's agent reads the source only with the source agent's allowance, for that destination.
    across = not clone.volume_id.startswith("v1:s2:")
    assert [d for _, d in svc.agents.get("s2").copies_allowed] == (["s1"] if across else [])


def test_a_late_answer_is_not_a_node_down_until_it_repeats(svc, monkeypatch):
    """A storage node whose GetInfo is late (its LVM slow on a loaded node: seen in the Kubernetes tier) stays
    up until SLOW_PROBES_DOWN probes in a row failed; before, one late answer made every CreateVolume for that
    node UNAVAILABLE until the next probe. Unreachable (UNAVAILABLE) is still down at once."""
    from csi.controller import agents as agents_module
    svc.agents.poll_once()
    s2 = svc.agents.get("s2")
    real = s2.call

    def late(method, request, timeout=None):
        if method == "GetInfo":
            raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED, "storage node s2 did not answer in time")
        return real(method, request, timeout)
    monkeypatch.setattr(s2, "call", late)
    for _ in range(agents_module.SLOW_PROBES_DOWN - 1):
        svc.agents.poll_once()
        assert s2.health.up and s2.health.info is not None
    svc.agents.poll_once()
    assert not s2.health.up and "did not answer in time" in s2.health.error
    monkeypatch.setattr(s2, "call", real)
    svc.agents.poll_once()
    assert s2.health.up and s2.health.failures == 0
    s2.down = True
    svc.agents.poll_once()
    assert not s2.health.up
