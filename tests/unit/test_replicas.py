"""Replicated volumes, the controller's side (csi/controller/replicas.py), against fake agents: placement of two
legs in one zone, the journal record, publish of both legs (and of one, when the other's agent is down), fencing
on both, deletion of both, legs never seen as plain volumes; and the ids / contract functions the node uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi import capabilities as caps
from csi import contract, errors, ids
from csi.config import ControllerConfig, StorageNode
from csi.controller import replica_capacity, replicas
from csi.controller.journal import Entry, FileJournal
from csi.controller.nodes import StaticNodes
from csi.controller.placement import Placement
from csi.controller.service import ControllerService
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_controller import WORKER, FakeAgent, cap, code_of, fake_agents

GiB, MiB = 1 << 30, 1 << 20
M = csi.VolumeCapability.AccessMode
ZONE_KEY = "topology.lvm-iscsi.csi.dev/zone"
R2 = {"replicas": "2"}


class Agent(FakeAgent):
    """FakeAgent plus what replicated volumes ask of an agent beyond it."""

    def __init__(self, node, available):
        super().__init__(node, available)
        self.full = False
        self.superblocks: dict[str, apb.LegSuperblock] = {}     # what the worker's md wrote on each leg
        self.peer_legs: dict[str, apb.LegLocation] = {}         # SetPeerLeg

    def call(self, method, request, timeout=None, reconnect=True):
        if method == "ExamineLeg" and not self.down:
            self.calls.append(method)
            if request.lv not in self.volumes:
                raise errors.not_found("no such volume")
            return self.superblocks.get(request.lv, apb.LegSuperblock(present=False))
        if method == "GetPeerLeg" and not self.down:
            self.calls.append(method)
            found = self.peer_legs.get(request.lv)
            return apb.PeerLeg(present=True, peer=found) if found is not None else apb.PeerLeg(present=False)
        if method == "SetPeerLeg" and not self.down:
            self.calls.append(method)
            self.peer_legs[request.lv] = request.peer
            return apb.SetPeerLegResponse()
        if method == "CreateVolume" and self.full and not self.down:
            self.calls.append(method)
            raise errors.exhausted("pool full")
        if method == "ExpandVolume" and not self.down:
            self.calls.append(method)
            vol = self.volumes[request.lv]
            vol.size_bytes = max(vol.size_bytes, request.size_bytes)
            return vol
        return super().call(method, request, timeout, reconnect)


def build(tmp_path, nodes, available=None):
    config = ControllerConfig("lvm-iscsi.csi.dev", "c1", tuple(nodes), Path("/nonexistent"))
    journal = FileJournal(tmp_path / "journal")
    journal.mark_adopted()
    fakes = [Agent(n, (available or {}).get(n.name, 10 * GiB)) for n in nodes]
    agents = fake_agents(fakes, journal)
    agents.update(nodes)
    (tmp_path / "nodes.yaml").write_text(f"nodes: [{{name: worker-1, iqn: {WORKER}}}, "
                                         f"{{name: worker-2, iqn: {WORKER}x}}]\n")
    return ControllerService(config, agents, Placement(journal, agents, "c1"), StaticNodes(tmp_path / "nodes.yaml"))


@pytest.fixture
def svc(tmp_path):
    """s1 and s2 in zone a (s2 with the most space), s3 alone in zone b with more space than either."""
    return build(tmp_path, (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "a"),
                            StorageNode("s3", "10.0.0.13:7600", "b")),
                 {"s1": 10 * GiB, "s2": 20 * GiB, "s3": 40 * GiB})


def create(svc, name="pvc-r", size=GiB, params=R2, mode=M.SINGLE_NODE_WRITER, **kw):
    req = csi.CreateVolumeRequest(name=name, volume_capabilities=[cap(mode)], parameters=params,
                                  capacity_range=csi.CapacityRange(required_bytes=size), **kw)
    return svc.CreateVolume(req, None).volume


def key_of(volume):
    return ids.parse_replicated_id(volume.volume_id)


def publish(svc, volume, node_id=WORKER, mode=M.SINGLE_NODE_WRITER, readonly=False):
    return dict(svc.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=volume.volume_id, node_id=node_id, volume_capability=cap(mode), readonly=readonly),
        None).publish_context)


def agent(svc, name):
    return svc.agents.get(name)


# ---------------------------------------------------------------------------------------------- create


def test_create_places_two_legs_on_two_nodes_of_one_zone(svc):
    v = create(svc)
    key = key_of(v)
    assert v.volume_id == f"r1:{key}" and key == ids.lv_name("c1", "pvc-r")
    # s3 has the most space but is alone in zone b: the pair is s1 + s2, in zone a.
    assert [dict(t.segments) for t in v.accessible_topology] == [{ZONE_KEY: "a"}]
    # Each leg holds md's metadata at its end besides the volume: 1 MiB more, rounded up to the 4 MiB extent;
    # the capacity reported is what the array holds at least.
    assert v.capacity_bytes == GiB + 4 * MiB - replicas.MD_RESERVE
    for i, name in enumerate(("s2", "s1")):    # leg 0 where a plain volume would go: the most space
        vol = agent(svc, name).volumes[key]
        assert vol.size_bytes == GiB + 4 * MiB
        assert vol.attributes["replicas"] == "2" and vol.attributes["replicaLeg"] == str(i)
        assert vol.attributes["accessModes"] == "SINGLE_NODE_WRITER"
    assert not agent(svc, "s3").volumes
    entry = svc.placement.journal.get(key)
    assert entry.state == "ready" and entry.node == "s2"
    assert [(leg["node"], leg["vg"], leg["state"]) for leg in entry.legs] == [("s2", "vg", "in-sync"),
                                                                            ("s1", "vg", "in-sync")]


def test_retry_is_idempotent_and_goes_to_the_same_nodes(svc):
    v = create(svc)
    agent(svc, "s1").available = agent(svc, "s3").available = 100 * GiB   # placement would change now
    svc.agents.poll_once()
    assert create(svc) == v
    assert sum(len(agent(svc, n).volumes) for n in ("s1", "s2", "s3")) == 2


def test_the_record_names_both_legs_before_any_agent_is_asked(svc, monkeypatch):
    seen = []
    real = Agent.call

    def spy(self, method, request, timeout=None, reconnect=True):
        if method == "CreateVolume":
            seen.append([leg["node"] for leg in svc.placement.journal.get(ids.lv_name("c1", "pvc-r")).legs])
        return real(self, method, request, timeout, reconnect)
    monkeypatch.setattr(Agent, "call", spy)
    create(svc)
    assert seen == [["s2", "s1"], ["s2", "s1"]]


def test_refused_when_no_zone_has_two_nodes_with_room(tmp_path):
    svc = build(tmp_path, (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s3", "10.0.0.13:7600", "b")))
    with pytest.raises(errors.CsiError) as e:
        create(svc)
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED
    assert "two storage nodes" in e.value.message and "zone a only s1" in e.value.message
    assert not any(a.volumes for a in svc.agents.all())
    assert not list(svc.placement.journal.entries())


def test_a_zone_requirement_limits_both_legs(svc):
    req = csi.TopologyRequirement(requisite=[csi.Topology(segments={ZONE_KEY: "b"})])
    with pytest.raises(errors.CsiError) as e:
        create(svc, accessibility_requirements=req)
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED and "zone b only s3" in e.value.message


def test_a_full_second_leg_undoes_the_first_so_the_retry_places_afresh(svc):
    agent(svc, "s1").full = True
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(name="pvc-r", volume_capabilities=[cap()],
                                                             parameters=R2)) == errors.Code.RESOURCE_EXHAUSTED
    assert not agent(svc, "s2").volumes and not list(svc.placement.journal.entries())


@pytest.mark.parametrize("params,mode,code", [
    ({"replicas": "3"}, M.SINGLE_NODE_WRITER, errors.Code.INVALID_ARGUMENT),
    ({"replicas": "two"}, M.SINGLE_NODE_WRITER, errors.Code.INVALID_ARGUMENT),
    (R2, M.MULTI_NODE_MULTI_WRITER, errors.Code.INVALID_ARGUMENT),
])
def test_bad_replicated_requests_change_nothing(svc, params, mode, code):
    block = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=M(mode=mode))
    req = csi.CreateVolumeRequest(name="x", volume_capabilities=[block], parameters=params)
    with pytest.raises(errors.CsiError) as e:
        svc.CreateVolume(req, None)
    assert e.value.code == code and "replica" in e.value.message
    assert not any(a.volumes for a in svc.agents.all())


def test_read_only_multi_node_is_fine_and_replicas_1_is_plain(svc):
    assert create(svc, "ro", mode=M.MULTI_NODE_READER_ONLY).volume_id.startswith("r1:")
    assert create(svc, "plain", params={"replicas": "1"}).volume_id.startswith("v1:")


def test_same_name_as_a_plain_volume_or_with_a_source_is_refused(svc):
    create(svc, "p", params={})
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(name="p", volume_capabilities=[cap()],
                                                             parameters=R2)) == errors.Code.ALREADY_EXISTS
    create(svc, "r")
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(name="r", volume_capabilities=[cap()])) \
        == errors.Code.ALREADY_EXISTS
    src = csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=ids.LvRef(
        "s9", "vg", "x", "snapshot").encode()))     # on a storage node nobody knows
    assert code_of(svc.CreateVolume, csi.CreateVolumeRequest(name="c", volume_capabilities=[cap()], parameters=R2,
                                                             volume_content_source=src)) == errors.Code.NOT_FOUND


# ---------------------------------------------------------------------------------------------- publish


def test_publish_grants_both_legs_and_the_context_parses_back(svc):
    v = create(svc)
    ctx = publish(svc, v)
    assert "chapSecret" not in ctx and ctx["replicas"] == "2"
    legs = contract.parse_replicated(ctx, key_of(v))
    assert [(leg.storage_node, leg.vg, leg.outdated) for leg in legs] == [("s2", "vg", False), ("s1", "vg", False)]
    assert all(leg.attachment.storage_node == leg.storage_node for leg in legs)
    assert [leg.attachment.agent for leg in legs] == ["10.0.0.12:7600", "10.0.0.11:7600"]
    assert all(leg.attachment.iqn == leg.ref.iqn for leg in legs)
    for name in ("s1", "s2"):
        assert [i.iqn for i in agent(svc, name).volumes[key_of(v)].initiators] == [WORKER]
        assert agent(svc, name).granted_to == "worker-1"
    assert publish(svc, v) == ctx                                   # idempotent
    assert code_of(svc.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=WORKER + "x", volume_capability=cap())) == errors.Code.FAILED_PRECONDITION
    assert code_of(svc.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=WORKER, volume_capability=cap(), readonly=True)) == errors.Code.ALREADY_EXISTS


def test_publish_with_a_leg_down_names_it_without_a_grant_and_marks_nothing(svc):
    v = create(svc)
    agent(svc, "s2").down = True                                    # leg 0's agent
    ctx = publish(svc, v)
    legs = contract.parse_replicated(ctx, key_of(v))
    # The node learns that leg 0 exists and was not granted: it decides whether s1's leg alone is provably current.
    assert [(leg.storage_node, leg.outdated, leg.attachment is None) for leg in legs] == [("s2", False, True),
                                                                                          ("s1", False, False)]
    # Nothing marked: the record cannot tell whether s1's leg went on alone or was left behind by a worker that
    # wrote alone to s2's.
    assert [leg["state"] for leg in svc.placement.journal.get(key_of(v)).legs] == ["in-sync", "in-sync"]
    health = svc.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id), None)
    assert [(s.status, s.reason) for s in health.volume_health.health_statuses] == [
        (csi.DEGRADED, "ReplicaLegUnreachable")]
    # A leg recorded outdated (by hand, or the node's record later) that alone answers: refused, never old data.
    svc.replicas.set_leg_state(key_of(v), "s1", "outdated")
    with pytest.raises(errors.CsiError) as e:
        publish(svc, v, node_id=WORKER)
    assert e.value.code == errors.Code.UNAVAILABLE and "outdated" in e.value.message
    # Both back: both legs published, the outdated one said so (the node resyncs it).
    agent(svc, "s2").down = False
    legs = contract.parse_replicated(publish(svc, v), key_of(v))
    assert [(leg.storage_node, leg.outdated, leg.attachment is None) for leg in legs] == [("s2", False, False),
                                                                                          ("s1", True, False)]
    svc.replicas.set_leg_state(key_of(v), "s1", "in-sync")
    assert not svc.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id),
                                             None).volume_health.health_statuses


def test_publish_with_every_leg_down_is_unavailable(svc):
    v = create(svc)
    agent(svc, "s1").down = agent(svc, "s2").down = True
    assert code_of(svc.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
        volume_id=v.volume_id, node_id=WORKER, volume_capability=cap())) == errors.Code.UNAVAILABLE
    assert [leg["state"] for leg in svc.placement.journal.get(key_of(v)).legs] == ["in-sync", "in-sync"]


def test_publish_of_unknown_or_foreign_replicated_ids(svc):
    for vid in ("r1:" + ids.lv_name("c1", "never"), "r1:other-cluster-x"):
        assert code_of(svc.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=WORKER, volume_capability=cap())) == errors.Code.NOT_FOUND


def test_unpublish_revokes_on_both_legs_and_fails_while_a_leg_cannot_be_fenced(svc):
    v = create(svc)
    publish(svc, v)
    agent(svc, "s1").down = True
    with pytest.raises(errors.CsiError) as e:
        svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER),
                                      None)
    assert e.value.code == errors.Code.UNAVAILABLE
    assert not agent(svc, "s2").volumes[key_of(v)].initiators      # the leg that answers is fenced already
    agent(svc, "s1").down = False
    for _ in range(2):
        svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER),
                                      None)
    assert not agent(svc, "s1").volumes[key_of(v)].initiators
    assert "RevokeAccess" in agent(svc, "s1").calls and "RevokeAccess" in agent(svc, "s2").calls


# ---------------------------------------------------------------------------------------------- delete


def test_delete_deletes_both_legs_and_forgets(svc):
    v = create(svc)
    agent(svc, "s1").down = True
    assert code_of(svc.DeleteVolume, csi.DeleteVolumeRequest(volume_id=v.volume_id)) == errors.Code.UNAVAILABLE
    assert svc.placement.journal.get(key_of(v)) is not None        # kept: the retry finishes
    agent(svc, "s1").down = False
    for _ in range(2):
        svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    assert not agent(svc, "s1").volumes and not agent(svc, "s2").volumes
    assert svc.placement.journal.get(key_of(v)) is None
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id="r1:" + ids.lv_name("c1", "never")), None)
    create(svc)      # the name can be made again


def test_a_leg_on_a_retired_node_is_gone_with_it(svc):
    v = create(svc)
    svc.placement.journal.retire("s1")
    svc.agents.refresh_retired()
    svc.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), None)
    assert not agent(svc, "s2").volumes and svc.placement.journal.get(key_of(v)) is None


# ---------------------------------------------------------------------------------------------- look at it


def test_legs_are_listed_once_as_their_replicated_volume(svc):
    r = create(svc)
    p = create(svc, "plain", params={})
    publish(svc, r)
    seen, token = [], ""
    while True:
        resp = svc.ListVolumes(csi.ListVolumesRequest(max_entries=1, starting_token=token), None)
        seen += resp.entries
        token = resp.next_token
        if not token:
            break
    assert sorted(e.volume.volume_id for e in seen) == sorted([r.volume_id, p.volume_id])
    listed = next(e for e in seen if e.volume.volume_id == r.volume_id)
    assert list(listed.status.published_node_ids) == [WORKER]
    assert [dict(t.segments) for t in listed.volume.accessible_topology] == [{ZONE_KEY: "a"}]


def test_get_validate_expand_and_health(svc):
    v = create(svc)
    publish(svc, v)
    got = svc.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=v.volume_id), None)
    assert got.volume.volume_id == v.volume_id and list(got.status.published_node_ids) == [WORKER]
    ok = svc.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[cap(M.MULTI_NODE_READER_ONLY)]), None)
    assert ok.HasField("confirmed")
    block_mw = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                    access_mode=M(mode=M.MULTI_NODE_MULTI_WRITER))
    no = svc.ValidateVolumeCapabilities(csi.ValidateVolumeCapabilitiesRequest(
        volume_id=v.volume_id, volume_capabilities=[block_mw]), None)
    assert not no.HasField("confirmed") and "replicated" in no.message
    grown = svc.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(
        volume_id=v.volume_id, capacity_range=csi.CapacityRange(required_bytes=2 * GiB)), None)
    assert grown.capacity_bytes == 2 * GiB and grown.node_expansion_required     # the fake agent does not round
    assert all(agent(svc, n).volumes[key_of(v)].size_bytes == 2 * GiB + replicas.MD_RESERVE for n in ("s1", "s2"))
    capped = svc.ControllerExpandVolume(csi.ControllerExpandVolumeRequest(volume_id=v.volume_id, capacity_range=
                                        csi.CapacityRange(required_bytes=3 * GiB, limit_bytes=3 * GiB)), None)
    assert capped.capacity_bytes == 3 * GiB
    agent(svc, "s1").volumes[key_of(v)].healthy = False
    agent(svc, "s1").volumes[key_of(v)].condition_reason = "TargetNotExported"
    health = svc.ControllerListVolumeHealth(csi.ControllerListVolumeHealthRequest(), None)
    assert [(h.volume_id, [s.status for s in h.health_statuses]) for h in health.entries] == [
        (v.volume_id, [csi.DEGRADED])]
    assert code_of(svc.ControllerGetVolume, csi.ControllerGetVolumeRequest(
        volume_id="r1:" + ids.lv_name("c1", "never"))) == errors.Code.NOT_FOUND


def test_adoption_never_takes_a_leg_for_a_plain_volume(svc):
    v = create(svc)
    svc.placement.journal.delete(key_of(v))          # as if the record were lost
    svc.placement.scan()
    assert svc.placement.journal.get(key_of(v)) is None
    # Before adoption, a look-up by name finds both legs and records them as the replicated volume they are.
    svc.placement._adopted = False
    svc.placement.journal._change_state(lambda s: s.pop("adopted", None))
    entry = svc.placement.find("volume", "pvc-r")
    assert [leg["node"] for leg in entry.legs] == ["s2", "s1"]
    assert create(svc) == v


# ---------------------------------------------------------------------------------------------- pure parts


def test_replica_zones_let_the_second_leg_go_to_another_zone(tmp_path):
    svc = build(tmp_path, (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s3", "10.0.0.13:7600", "b")))
    req = csi.TopologyRequirement(requisite=[csi.Topology(segments={ZONE_KEY: "a"})])
    vol = create(svc, params={**R2, "replicaZones": "b"}, accessibility_requirements=req)
    entry = svc.placement.journal.get(key_of(vol))
    assert [leg["node"] for leg in entry.legs] == ["s1", "s3"]
    assert [dict(t.segments) for t in vol.accessible_topology] == [{ZONE_KEY: "a"}]   # where leg 0 is


@pytest.mark.parametrize("params", [{"replicaZones": "b"}, {"replicas": "2", "replicaZones": "b,not a zone"}])
def test_replica_zones_need_replicas_2_and_zone_names(params):
    with pytest.raises(errors.CsiError) as e:
        caps.parse_params(params)
    assert e.value.code == errors.Code.INVALID_ARGUMENT and "replicaZones" in e.value.message


def test_journal_records_without_legs_still_load():
    entry = Entry.from_content({"key": "k", "kind": "volume", "name": "n", "node": "s1", "format": 1}, "v1")
    assert entry.legs == []


def test_replicas_parameter():
    assert caps.parse_params({}).replicas == 1
    assert caps.parse_params({"replicas": "2"}).replicas == 2
    with pytest.raises(errors.CsiError) as e:
        caps.parse_params({"replicas": "0"})
    assert e.value.code == errors.Code.INVALID_ARGUMENT and "replicas='0'" in e.value.message


def test_replicated_ids():
    key = ids.lv_name("c1", "pvc-1")
    assert ids.parse_replicated_id(ids.replicated_volume_id(key)) == key
    for bad in ("", "r1:", "v1:s1:vg:lv", "r1:snapshot-x", "r1:a b", "r1:..", "r1:" + "a" * 200, "r2:" + key):
        assert ids.parse_replicated_id(bad) is None
    assert ids.parse_id(ids.replicated_volume_id(key)) is None
    name = ids.md_name(key)
    assert name.startswith(ids.MD_HOMEHOST + ":") and len(name) <= 32 and name != ids.md_name(key + "x")


def _ctx(key, nodes=("s1", "s2"), granted=(True, True)):
    return contract.replicated_publish_context([
        (contract.publish_context(ids.target_iqn("vg", key), ["10.0.0.1:3260"], 0, n, "10.0.0.9:7600")
         if granted[i] else None, n, "vg", i == 1) for i, n in enumerate(nodes)])


def test_replicated_context_round_trip_and_parse_errors():
    key = ids.lv_name("c1", "pvc-1")
    legs = contract.parse_replicated(_ctx(key), key)
    assert [(leg.index, leg.storage_node, leg.outdated, leg.ref) for leg in legs] == [
        (0, "s1", False, ids.LvRef("s1", "vg", key)), (1, "s2", True, ids.LvRef("s2", "vg", key))]
    legs = contract.parse_replicated(_ctx(key, granted=(False, True)), key)
    assert [(leg.storage_node, leg.attachment is None) for leg in legs] == [("s1", True), ("s2", False)]
    bad = [
        dict(_ctx(key), replicas="3"),
        dict(_ctx(key), replicas="0"),
        dict(_ctx(key), replicas="1"),     # every leg, always: one leg must not pass for the whole volume
        {k: v for k, v in _ctx(key).items() if k != "replicas"},
        {k: v for k, v in _ctx(key).items() if k != "leg1.vg"},
        {k: v for k, v in _ctx(key).items() if k != "leg0.storageNode"},
        dict(_ctx(key), **{"leg0.outdated": "maybe"}),
        dict(_ctx(key), **{"leg0.granted": "maybe"}),
        dict(_ctx(key), **{"leg1.vg": "bad vg"}),
        dict(_ctx(key), **{"leg1.targetIqn": ids.target_iqn("vg", "other")}),
        _ctx(key, nodes=("s1", "s1")),
    ]
    for ctx in bad:
        with pytest.raises(errors.CsiError) as e:
            contract.parse_replicated(ctx, key)
        assert e.value.code == errors.Code.INVALID_ARGUMENT, ctx
    with pytest.raises(errors.CsiError):
        contract.parse_replicated(_ctx(key), ids.lv_name("c1", "another"))


def test_the_agent_attributes_mark_legs():
    assert caps.is_replica_leg({"replicas": "2", "replicaLeg": "1"}) and caps.replica_leg({"replicaLeg": "1"}) == 1
    assert not caps.is_replica_leg({"fsType": "ext4"}) and not caps.is_replica_leg({"replicas": "1"})
    assert apb.Volume(attributes={"replicas": "2"}).attributes["replicas"] == "2"


def test_status_shows_each_leg_under_its_volume():
    import io

    from csi import status
    from tests.unit.test_status import Agent as StatusAgent, Agents as StatusAgents
    a, b = StatusAgent("s1"), StatusAgent("s2")
    key = "c1-pvc-1-0123456789"
    for i, s in enumerate((a, b)):
        s.volumes[0].attributes.update({"replicas": "2", "replicaLeg": str(i)})
    out = io.StringIO()
    assert status.report(StatusAgents(a, b), out, min_age=600) == 0      # agents from before ExamineLeg: "ok"
    assert f"r1:{key} leg 0 (v1:s1:vg:{key})" in out.getvalue()
    assert f"r1:{key} leg 1 (v1:s2:vg:{key})" in out.getvalue()

    def examined(agent, state, recovering=False):
        def call(method, request, timeout=None, reconnect=True, _orig=agent.call):
            if method == "ExamineLeg":
                return apb.LegSuperblock(present=True, name=ids.md_name(key), array_state=state, recovering=recovering)
            return _orig(method, request, timeout, reconnect)
        agent.call = call
    examined(a, "A.")
    examined(b, "AA")
    out = io.StringIO()
    assert status.report(StatusAgents(a, b), out, min_age=600) == 1      # md failed leg 1: it missed writes
    rows = {line.split()[2]: line for line in out.getvalue().splitlines() if line.startswith(f"r1:{key}")}
    assert "ok, the other leg out of the array" in rows["0"] and "OUT OF ARRAY: missed writes" in rows["1"]
    examined(b, "AA", recovering=True)
    out = io.StringIO()
    assert status.report(StatusAgents(a, b), out, min_age=600) == 0
    assert "resyncing" in out.getvalue() and "OUT OF ARRAY" not in out.getvalue()


def test_every_replica_kill_point_is_listed():
    import re

    from csi import faults
    text = (Path(__file__).parents[2] / "csi/controller/replicas.py").read_text()
    named = set(re.findall(r'faults\.step\(f?"([^"]+)"\)', text))
    expanded = {n.replace("{leg.index}", str(i)) for n in named for i in (0, 1)}
    assert expanded == set(faults.REPLICA_STEPS)
    node_text = (Path(__file__).parents[2] / "csi/node/replicated.py").read_text()
    node = set(re.findall(r'faults\.step\("([^"]+)"\)', node_text))
    assert node == set(faults.REPLICA_NODE_STEPS) | {"stage.record", "stage.login", "stage.mount", "unstage.umount",
                                                      "unstage.logout", "expand.rescan"}
    assert set(faults.REPLICA_NODE_STEPS).isdisjoint(faults.NODE_STEPS)


def test_get_capacity_counts_two_legs_on_two_nodes(svc):
    """CSIStorageCapacity for a replicated class: a volume takes its size (and md's 1 MiB) on two storage
    nodes, one of them in its own zone, the other there or in the class's replicaZones."""
    reserve = replicas.MD_RESERVE

    def capacity(params, zone):
        got = svc.GetCapacity(csi.GetCapacityRequest(parameters=params, accessible_topology=csi.Topology(
            segments={ZONE_KEY: zone})), None)
        return got.available_capacity, got.maximum_volume_size.value

    # zone a: s1 (10 GiB) and s2 (20 GiB): every volume has a leg on s1, whose space bounds both figures
    assert capacity(R2, "a") == (10 * GiB - reserve, 10 * GiB - reserve)
    # with s3 (40 GiB, zone b) for second legs: the best pair is s2 + s3; s3 cannot pair with itself, and every
    # volume still needs a leg in zone a (30 GiB there)
    assert capacity({**R2, "replicaZones": "b"}, "a") == (30 * GiB - reserve, 20 * GiB - reserve)
    assert capacity(R2, "b") == (0, 0)                           # one storage node: no pair at all
    assert capacity({}, "a") == (30 * GiB, 20 * GiB)             # a plain class, as before
    # asked without a topology: pairs only within a zone (s1 + s2) unless replicaZones allows zone b
    anywhere = svc.GetCapacity(csi.GetCapacityRequest(parameters=R2), None)
    assert (anywhere.available_capacity, anywhere.maximum_volume_size.value) == (10 * GiB - reserve,
                                                                                 10 * GiB - reserve)
    anywhere = svc.GetCapacity(csi.GetCapacityRequest(parameters={**R2, "replicaZones": "b"}), None)
    assert (anywhere.available_capacity, anywhere.maximum_volume_size.value) == (30 * GiB - reserve,
                                                                                 20 * GiB - reserve)


def test_replicated_capacity_without_a_topology_never_pairs_two_other_zones():
    reserve = replicas.MD_RESERVE
    a = {"s1": (10 * GiB, 10 * GiB)}
    b = {"s2": (10 * GiB, 10 * GiB)}
    c = {"s3": (10 * GiB, 10 * GiB), "s4": (4 * GiB, 4 * GiB)}
    # one node in each of zones a and b: no pair in either; zone c pairs s3 with s4
    assert replica_capacity.capacity_any_zone({"a": a, "b": b, "c": c}, ()) == (4 * GiB - reserve, 4 * GiB - reserve)
    # replicaZones b: zone a pairs with s2, zone c may too; all four nodes hold 34 GiB, 17 GiB twice at most
    total, largest = replica_capacity.capacity_any_zone({"a": a, "b": b, "c": c}, ("b",))
    assert largest == 10 * GiB - reserve and total == 17 * GiB - reserve


def test_replicated_capacity_bounds():
    assert replica_capacity.capacity({}, {}) == (0, 0)
    assert replica_capacity.capacity({"s1": (8 * GiB, 8 * GiB)}, {}) == (0, 0)
    # three equal nodes: every byte twice, on any two of them
    three = {n: (6 * GiB, 6 * GiB) for n in ("s1", "s2", "s3")}
    assert replica_capacity.capacity(three, {}) == (9 * GiB - replicas.MD_RESERVE, 6 * GiB - replicas.MD_RESERVE)
    # one node with most of the space: what the others hold bounds it
    lopsided = {"s1": (100 * GiB, 100 * GiB), "s2": (2 * GiB, GiB), "s3": (GiB, GiB)}
    assert replica_capacity.capacity(lopsided, {}) == (3 * GiB - replicas.MD_RESERVE, GiB - replicas.MD_RESERVE)
