"""Snapshots and clones of replicated volumes, and replicated volumes made from them
(csi/controller/replica_sources.py), against fake agents that answer ExamineLeg with given superblocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi import capabilities as caps
from csi import contract, errors, ids
from csi.config import ControllerConfig, StorageNode
from csi.controller import replica_sources
from csi.controller.journal import FileJournal
from csi.controller.nodes import StaticNodes
from csi.controller.placement import Placement
from csi.controller.replicas import IN_SYNC, OUTDATED, Leg
from csi.controller.service import ControllerService
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_controller import WORKER, cap, code_of, fake_agents
from tests.unit.test_replicas import R2, Agent, create, key_of, publish

GiB = 1 << 30
KEY = "c1-pvc-0123456789"
NAME = ids.md_name(KEY)


def sb(state="AA", events=10, recovering=False, name=NAME) -> apb.LegSuperblock:
    return apb.LegSuperblock(present=True, name=name, uuid="u", events=events, array_state=state,
                             recovering=recovering)


BLANK = apb.LegSuperblock(present=False)


def legs(*states) -> list[Leg]:
    return [Leg(i, f"s{i + 1}", "thin", "vg", s) for i, s in enumerate(states or (IN_SYNC, IN_SYNC))]


@pytest.mark.parametrize("examined, away, states, seed, expected", [
    ({0: sb(), 1: sb()}, {}, (), None, 0),                                    # in sync: leg 0, the volume's zone
    ({0: sb(events=10), 1: sb(events=12)}, {}, (), None, 1),                 # the superblock written last
    ({0: sb(events=12, recovering=True), 1: sb(events=12)}, {}, (), None, 1),  # leg 0 is being rebuilt
    ({0: sb(events=20), 1: sb("A.", events=14)}, {}, (), None, 1),            # leg 1 went on alone
    ({1: sb(".A")}, {0: "leg 0 on s1: down"}, (), None, 1),                   # ... and leg 0 is away
    ({1: sb()}, {0: "leg 0 on s1: down"}, (OUTDATED, IN_SYNC), None, 1),     # leg 0 recorded outdated
    ({0: sb("A."), 1: sb()}, {}, (OUTDATED, IN_SYNC), None, 1),              # never leg 0, whatever it shows
    ({0: BLANK, 1: BLANK}, {}, (), None, 0),                                  # never written: both blank
    ({0: sb(name="lvmiscsi:ffffffffffffffff"), 1: BLANK}, {}, (), 0, 0),      # a restore not staged yet: its seed
    ({0: sb(name="lvmiscsi:ffffffffffffffff")}, {1: "leg 1 on s2: down"}, (), 0, 0),
])
def test_the_current_leg(examined, away, states, seed, expected):
    assert replica_sources.current_leg(KEY, legs(*states), examined, away, seed) == expected


@pytest.mark.parametrize("examined, away, states, seed, code", [
    ({1: sb()}, {0: "leg 0 on s1: down"}, (), None, errors.Code.UNAVAILABLE),       # may have missed writes
    ({0: BLANK}, {1: "leg 1 on s2: down"}, (), None, errors.Code.UNAVAILABLE),      # blank: cleared for a copy?
    ({0: sb("A."), 1: sb(".A")}, {}, (), None, errors.Code.FAILED_PRECONDITION),   # each went on alone
    ({0: sb(), 1: sb(name="lvmiscsi:ffffffffffffffff")}, {}, (), None, errors.Code.FAILED_PRECONDITION),
    ({0: sb(name="lvmiscsi:ffffffffffffffff"), 1: BLANK}, {}, (), None, errors.Code.FAILED_PRECONDITION),
    ({1: BLANK}, {0: "leg 0 on s1: down"}, (), 0, errors.Code.UNAVAILABLE),         # the seed away
    ({0: sb(recovering=True)}, {1: "leg 1 on s2: down"}, (), None, errors.Code.UNAVAILABLE),
    ({}, {0: "down", 1: "down"}, (), None, errors.Code.UNAVAILABLE),
])
def test_no_leg_proven_current_is_refused(examined, away, states, seed, code):
    with pytest.raises(errors.CsiError) as e:
        replica_sources.current_leg(KEY, legs(*states), examined, away, seed)
    assert e.value.code == code


class LegAgent(Agent):
    """An agent whose snapshots are kept (and whose legs carry md superblocks, as every test Agent's)."""

    def __init__(self, node, available):
        super().__init__(node, available)
        self.snapshots: dict[str, apb.Snapshot] = {}
        self.sources: list[apb.VolumeSource] = []
        self.dropped: list[str] = []

    def call(self, method, request, timeout=None, reconnect=True):
        if self.down:
            return super().call(method, request, timeout, reconnect)
        if method == "CreateSnapshot":
            snap = super().call(method, request, timeout, reconnect)
            snap.source_replicated = caps.is_replica_leg(self.volumes[request.source_lv].attributes)
            return self.snapshots.setdefault(snap.lv, snap)
        if method == "ListSnapshots":
            self.calls.append(method)
            return apb.ListSnapshotsResponse(snapshots=list(self.snapshots.values()))
        if method == "GetSnapshot":
            self.calls.append(method)
            if request.lv not in self.snapshots:
                raise errors.not_found("no such snapshot")
            return self.snapshots[request.lv]
        if method == "CreateVolume" and request.HasField("source"):
            self.sources.append(request.source)
        if method == "DeleteSnapshot":
            self.snapshots.pop(request.lv, None)
            self.dropped.append(request.lv)
        return super().call(method, request, timeout, reconnect)


def build(tmp_path, nodes, available=None) -> ControllerService:
    config = ControllerConfig("lvm-iscsi.csi.dev", "c1", nodes, Path("/nonexistent"))
    journal = FileJournal(tmp_path / "journal")
    journal.mark_adopted()
    agents = fake_agents([LegAgent(n, (available or {}).get(n.name, 10 * GiB)) for n in nodes], journal)
    agents.update(nodes)
    (tmp_path / "nodes.yaml").write_text(f"nodes: [{{name: worker-1, iqn: {WORKER}}}]\n")
    return ControllerService(config, agents, Placement(journal, agents, "c1"), StaticNodes(tmp_path / "nodes.yaml"))


@pytest.fixture
def svc(tmp_path):
    return build(tmp_path, (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "a"),
                            StorageNode("s3", "10.0.0.13:7600", "a")))


def agent(svc, name) -> LegAgent:
    return svc.agents.get(name)


def leg_nodes(svc, volume) -> list[str]:
    return [d["node"] for d in svc.placement.journal.get(key_of(volume)).legs]


def written(svc, volume, states=("AA", "AA"), events=(10, 10)):
    """The worker's md wrote these superblocks on the volume's legs."""
    key = key_of(volume)
    for node, state, ev in zip(leg_nodes(svc, volume), states, events):
        agent(svc, node).superblocks[key] = sb(state, ev, name=ids.md_name(key))


def snapshot(svc, volume, name="snap"):
    return svc.CreateSnapshot(csi.CreateSnapshotRequest(name=name, source_volume_id=volume.volume_id), None).snapshot


def from_snapshot(snap_id):
    return csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id=snap_id))


def test_a_snapshot_is_of_the_current_leg_and_names_the_replicated_volume(svc):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    written(svc, v, ("A.", "AA"), (10, 12))      # the second leg fell out: the first went on alone
    s = snapshot(svc, v)
    assert ids.parse_id(s.snapshot_id, kind="snapshot").node == first and s.source_volume_id == v.volume_id
    assert snapshot(svc, v) == s                                              # a retry: the same answer
    written(svc, v, ("AA", "AA"), (10, 12))
    other = snapshot(svc, v, "snap-2")                                        # now the second's is the newest
    assert ids.parse_id(other.snapshot_id, kind="snapshot").node == second
    plain = create(svc, "plain", params={})
    svc.CreateSnapshot(csi.CreateSnapshotRequest(name="plain-snap", source_volume_id=plain.volume_id), None)
    listed = svc.ListSnapshots(csi.ListSnapshotsRequest(source_volume_id=v.volume_id), None).entries
    assert sorted(e.snapshot.snapshot_id for e in listed) == sorted([s.snapshot_id, other.snapshot_id])
    assert {e.snapshot.source_volume_id for e in svc.ListSnapshots(csi.ListSnapshotsRequest(), None).entries} == \
        {v.volume_id, plain.volume_id}


def test_a_snapshot_of_a_leg_that_cannot_be_proven_current_is_refused_and_leaves_nothing(svc):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    written(svc, v)
    agent(svc, first).down = True
    with pytest.raises(errors.CsiError) as e:
        snapshot(svc, v)
    assert e.value.code == errors.Code.UNAVAILABLE and first in e.value.message
    assert "CreateSnapshot" not in agent(svc, second).calls
    assert svc.placement.find("snapshot", "snap") is None


def test_a_restore_seeds_leg_0_from_the_snapshot_in_its_pool_and_the_node_is_told(svc):
    v = create(svc, size=GiB)
    first, _ = leg_nodes(svc, v)
    written(svc, v)
    s = snapshot(svc, v)
    req = csi.CreateVolumeRequest(name="restored", volume_capabilities=[cap()], parameters=R2,
                                  volume_content_source=from_snapshot(s.snapshot_id))
    r = svc.CreateVolume(req, None).volume
    assert r.content_source.snapshot.snapshot_id == s.snapshot_id and r.capacity_bytes >= GiB
    assert svc.CreateVolume(req, None).volume == r                           # a retry: the same volume
    entry = svc.placement.journal.get(key_of(r))
    assert entry.legs[0]["node"] == first and entry.legs[0]["seed"] and not entry.legs[1].get("seed")
    assert entry.legs[1]["node"] != first
    src = agent(svc, first).sources[-1]
    assert (src.node, src.lv, src.snapshot) == (first, ids.parse_id(s.snapshot_id, kind="snapshot").lv, True)
    assert not agent(svc, entry.legs[1]["node"]).sources                     # the other leg starts blank
    ctx = publish(svc, r)
    assert [leg.seed for leg in contract.parse_replicated(ctx, key_of(r))] == [True, False]
    assert contract.SEED not in publish(svc, v)


def test_a_clone_seeds_leg_0_from_the_current_leg(svc):
    v = create(svc, size=GiB)
    _, second = leg_nodes(svc, v)
    written(svc, v, ("AA", "A."), (10, 11))
    c = svc.CreateVolume(csi.CreateVolumeRequest(name="clone", volume_capabilities=[cap()], parameters=R2,
                                                 volume_content_source=csi.VolumeContentSource(
                                                     volume=csi.VolumeContentSource.VolumeSource(
                                                         volume_id=v.volume_id))), None).volume
    assert c.content_source.volume.volume_id == v.volume_id
    entry = svc.placement.journal.get(key_of(c))
    assert entry.legs[0]["node"] == second
    src = agent(svc, second).sources[-1]
    assert (src.lv, src.snapshot) == (key_of(v), False)


def test_what_is_not_made_from_a_replicated_source_yet(svc):
    v = create(svc, size=GiB)
    written(svc, v)
    s = snapshot(svc, v)
    plain = create(svc, "plain", params={})
    plain_snap = svc.CreateSnapshot(csi.CreateSnapshotRequest(name="plain-snap", source_volume_id=plain.volume_id),
                                    None).snapshot
    cases = [
        (R2, from_snapshot(plain_snap.snapshot_id), GiB),                    # a replicated one from a plain
        (R2, csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(volume_id=plain.volume_id)), GiB),
    ]
    for params, source, size in cases:
        req = csi.CreateVolumeRequest(name="x", volume_capabilities=[cap()], parameters=params,
                                      capacity_range=csi.CapacityRange(required_bytes=size),
                                      volume_content_source=source)
        assert code_of(svc.CreateVolume, req) == errors.Code.INVALID_ARGUMENT, (params, source)
    capped = csi.CreateVolumeRequest(name="capped", volume_capabilities=[cap()], parameters=R2,
                                     capacity_range=csi.CapacityRange(required_bytes=GiB // 2, limit_bytes=GiB // 2),
                                     volume_content_source=from_snapshot(s.snapshot_id))
    assert code_of(svc.CreateVolume, capped) == errors.Code.OUT_OF_RANGE
    # restoreSize: the source claim's size (the array, rounded down to the extent), so that a restore claim of
    # that size is accepted; the restore still gets all the source's array held.
    assert (s.size_bytes, v.capacity_bytes) == (GiB, GiB + 3 * (1 << 20))
    small = svc.CreateVolume(csi.CreateVolumeRequest(name="small", volume_capabilities=[cap()], parameters=R2,
                                                     capacity_range=csi.CapacityRange(required_bytes=GiB // 2),
                                                     volume_content_source=from_snapshot(s.snapshot_id)),
                             None).volume
    assert small.capacity_bytes == v.capacity_bytes      # never less: the source's filesystem fills that


def test_an_outdated_leg_that_does_not_answer_does_not_hold_up_unpublish(svc):
    v = create(svc, size=GiB)
    first, _ = leg_nodes(svc, v)
    publish(svc, v)
    agent(svc, first).down = True
    with pytest.raises(errors.CsiError) as e:
        svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER),
                                      None)
    assert e.value.code == errors.Code.UNAVAILABLE
    svc.replicas.set_leg_state(key_of(v), first, OUTDATED)
    svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id, node_id=WORKER), None)


def test_health_shows_what_the_superblocks_know_and_the_journal_does_not(svc):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)

    def statuses():
        h = svc.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id), None)
        return [(s.status, s.reason) for s in h.volume_health.health_statuses]
    written(svc, v)
    assert statuses() == []
    written(svc, v, ("A.", "AA"), (12, 10))     # md failed the second leg: only the first's superblock says so
    assert statuses() == [(csi.DEGRADED, "ReplicaLegOutOfArray")]
    written(svc, v, ("AA", "AA"), (12, 12))     # put back: being rebuilt, its own superblock says
    agent(svc, second).superblocks[key_of(v)] = sb("AA", 12, recovering=True, name=ids.md_name(key_of(v)))
    assert statuses() == [(csi.DEGRADED, "ReplicaLegOutOfArray")]
    agent(svc, first).down = True               # the only leg that knew is away: nothing usable is proven
    assert [s for s, _ in statuses()] == [csi.INACCESSIBLE, csi.DEGRADED, csi.DEGRADED]


@pytest.mark.parametrize("examined, expected", [
    ({0: sb(events=30), 1: sb(events=30)}, [0]),                       # copied over in full: in sync again
    ({0: sb(events=30, recovering=True), 1: sb(events=30)}, []),      # still being copied
    ({0: sb("A.", events=31), 1: sb(events=20)}, []),                 # not put back yet: its own old state
    ({0: sb(events=29), 1: sb(events=30)}, []),                       # not written together
    ({1: sb(events=30)}, []),                                         # leg 0 not seen
])
def test_an_outdated_mark_is_taken_back_only_once_the_leg_is_rebuilt(examined, expected):
    assert replica_sources.rebuilt(KEY, legs(OUTDATED, IN_SYNC), examined) == expected


def test_publish_and_health_take_back_the_mark_of_a_rebuilt_leg(svc):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    svc.replicas.set_leg_state(key_of(v), first, OUTDATED)
    written(svc, v, ("A.", "AA"), (31, 20))       # leg 0 went on alone, then was given up by an operator
    publish(svc, v)
    assert svc.placement.journal.get(key_of(v)).legs[0]["state"] == OUTDATED
    written(svc, v, ("AA", "AA"), (40, 40))       # the worker cleared it and copied leg 1 over it
    svc.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id), None)
    assert svc.placement.journal.get(key_of(v)).legs[0]["state"] == IN_SYNC
    svc.replicas.set_leg_state(key_of(v), first, OUTDATED)
    ctx = publish(svc, v)
    assert not any(leg.outdated for leg in contract.parse_replicated(ctx, key_of(v)))


def test_a_mark_read_during_an_md_superblock_update_is_taken_back_on_a_second_read(svc):
    """md writes both legs' superblocks in turn: read between the two writes, the legs show two event counts;
    the controller reads them once more before it leaves the mark."""
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    svc.replicas.set_leg_state(key_of(v), first, OUTDATED)
    written(svc, v, ("AA", "AA"), (34, 35))
    reads = []
    real = svc.replicas.sources.examine

    def examine(key, entry, reachable):
        reads.append(1)
        if len(reads) == 2:
            written(svc, v, ("AA", "AA"), (35, 35))     # the update is over
        return real(key, entry, reachable)
    svc.replicas.sources.examine = examine
    svc.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id), None)
    assert svc.placement.journal.get(key_of(v)).legs[0]["state"] == IN_SYNC and len(reads) == 2


def test_a_retried_clone_makes_its_seed_from_the_leg_chosen_first(svc):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    written(svc, v, ("A.", "AA"), (12, 10))          # the first leg is the current one
    req = csi.CreateVolumeRequest(name="clone", volume_capabilities=[cap()], parameters=R2,
                                  volume_content_source=csi.VolumeContentSource(
                                      volume=csi.VolumeContentSource.VolumeSource(volume_id=v.volume_id)))
    agent(svc, first).full = True                     # the seed's CreateVolume fails after the placement
    assert code_of(svc.CreateVolume, req) == errors.Code.RESOURCE_EXHAUSTED
    assert svc.placement.find("volume", "clone") is None        # nothing made: placed afresh next time
    agent(svc, first).full = False
    c = svc.CreateVolume(req, None).volume
    written(svc, v, ("AA", "A."), (12, 14))          # now the other leg went on alone
    for n in (first, second):
        agent(svc, n).sources.clear()
        agent(svc, n).calls.clear()
    assert svc.CreateVolume(req, None).volume == c   # the retry keeps the recorded seed, asks nothing new
    assert svc.placement.journal.get(key_of(c)).legs[0]["node"] == first
    assert [s.node for s in agent(svc, first).sources] == [first] and not agent(svc, second).sources
    assert "ExamineLeg" not in agent(svc, first).calls + agent(svc, second).calls


def test_a_seed_outside_the_claims_zones_is_leg_1_where_replica_zones_allow(tmp_path):
    svc = build(tmp_path, (StorageNode("s1", "10.0.0.11:7600", "a"), StorageNode("s2", "10.0.0.12:7600", "b")),
                {"s1": 10 * GiB, "s2": 40 * GiB})
    params = dict(R2, replicaZones="b")
    v = create(svc, size=GiB, params=params, accessibility_requirements=csi.TopologyRequirement(
        requisite=[csi.Topology(segments={"topology.lvm-iscsi.csi.dev/zone": "a"})]))
    assert leg_nodes(svc, v) == ["s1", "s2"]
    written(svc, v, ("AA", "A."), (10, 12))         # the leg in zone b went on alone: the snapshot is there
    s = snapshot(svc, v)
    assert ids.parse_id(s.snapshot_id, kind="snapshot").node == "s2"
    in_a = csi.TopologyRequirement(requisite=[csi.Topology(segments={"topology.lvm-iscsi.csi.dev/zone": "a"})])
    r = svc.CreateVolume(csi.CreateVolumeRequest(name="restored", volume_capabilities=[cap()], parameters=params,
                                                 volume_content_source=from_snapshot(s.snapshot_id),
                                                 accessibility_requirements=in_a), None).volume
    entry = svc.placement.journal.get(key_of(r))
    assert [d["node"] for d in entry.legs] == ["s1", "s2"] and entry.legs[1]["seed"] and "seed" not in entry.legs[0]
    assert [t.segments["topology.lvm-iscsi.csi.dev/zone"] for t in r.accessible_topology] == ["a"]
    ctx = publish(svc, r)
    assert [leg.seed for leg in contract.parse_replicated(ctx, key_of(r))] == [False, True]
    no_b = csi.CreateVolumeRequest(name="restored-2", volume_capabilities=[cap()], parameters=R2,
                                   volume_content_source=from_snapshot(s.snapshot_id), accessibility_requirements=in_a)
    assert code_of(svc.CreateVolume, no_b) == errors.Code.RESOURCE_EXHAUSTED


def test_legs_read_during_an_md_superblock_update_are_read_again(svc, monkeypatch):
    monkeypatch.setattr(replica_sources, "REREAD_DELAY", 0)
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    written(svc, v, ("AA", "AA"), (10, 11))         # the second read just after md's update, the first before
    reads = []
    original = agent(svc, first).call

    def call(method, request, timeout=None, reconnect=True):
        if method == "ExamineLeg":
            reads.append(method)
            if len(reads) > 1:                     # read again: the update has reached it too
                agent(svc, first).superblocks[key_of(v)] = sb("AA", 11, name=ids.md_name(key_of(v)))
        return original(method, request, timeout, reconnect)
    monkeypatch.setattr(agent(svc, first), "call", call)
    assert ids.parse_id(snapshot(svc, v).snapshot_id, kind="snapshot").node == first and len(reads) == 2
    written(svc, v, ("AA", "AA"), (10, 11))         # a leg that stays behind is passed over
    monkeypatch.setattr(agent(svc, first), "call", original)
    assert ids.parse_id(snapshot(svc, v, "snap-2").snapshot_id, kind="snapshot").node == second


def unpublish(svc, volume):
    svc.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=WORKER),
                                  None)


def test_a_clean_detach_lets_the_next_publish_outdate_a_leg_that_is_gone(svc):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    publish(svc, v)
    written(svc, v, ("AA", "AA"), (40, 40))          # the worker stopped the array: in sync, one count
    unpublish(svc, v)
    assert svc.placement.journal.get(key_of(v)).clean == 40
    agent(svc, second).down = True                   # then the second leg's node is lost
    ctx = publish(svc, v)
    legs = contract.parse_replicated(ctx, key_of(v))
    assert [(leg.storage_node, leg.outdated) for leg in legs] == [(first, False), (second, True)]
    entry = svc.placement.journal.get(key_of(v))
    assert entry.clean is None and entry.legs[1]["state"] == OUTDATED


@pytest.mark.parametrize("case", ["written since", "still granted", "out of sync", "leg down at detach"])
def test_no_clean_stamp_no_outdating(svc, case):
    v = create(svc, size=GiB)
    first, second = leg_nodes(svc, v)
    publish(svc, v)
    written(svc, v, ("AA", "AA") if case != "out of sync" else ("A.", "AA"), (40, 40))
    if case == "still granted":
        agent(svc, first).volumes[key_of(v)].initiators.add(iqn="iqn.2026-11.dev.other:w9")
    if case == "leg down at detach":
        agent(svc, second).down = True
        with pytest.raises(errors.CsiError):
            unpublish(svc, v)                        # fencing could not hold on it: no clean detach
    else:
        unpublish(svc, v)
    if case == "written since":
        assert svc.placement.journal.get(key_of(v)).clean == 40
        written(svc, v, ("AA", "AA"), (41, 41))      # written after (md counted it): the stamp proves nothing
    else:
        assert svc.placement.journal.get(key_of(v)).clean is None
    if case == "still granted":
        return
    agent(svc, second).down = True
    ctx = publish(svc, v)
    assert [leg.outdated for leg in contract.parse_replicated(ctx, key_of(v))] == [False, False]
    assert svc.placement.journal.get(key_of(v)).clean is None


def test_a_plain_volume_from_a_replicated_snapshot_or_volume_copies_the_leg_past_md_s_reserve(svc):
    """The data of a leg starts 1 MiB in (md's superblock and bitmap before it): a plain volume made from a
    replicated snapshot, or cloned from a replicated volume's current leg, copies from there, the array's whole
    data area (a little more than the claim: the source's filesystem fills it), never as a thin snapshot."""
    v = create(svc, size=GiB)
    written(svc, v)
    s = snapshot(svc, v)
    leg = agent(svc, ids.parse_id(s.snapshot_id, kind="snapshot").node).snapshots
    leg_size = next(iter(leg.values())).size_bytes
    plain = svc.CreateVolume(csi.CreateVolumeRequest(
        name="plain", volume_capabilities=[cap()], capacity_range=csi.CapacityRange(required_bytes=s.size_bytes),
        volume_content_source=from_snapshot(s.snapshot_id)), None).volume
    ref = ids.parse_id(plain.volume_id)
    src = agent(svc, ref.node).sources[-1]
    assert (src.lv, src.snapshot, src.offset_bytes, src.size_bytes) == (
        next(iter(leg)), True, 1 << 20, leg_size - (1 << 20))
    assert plain.capacity_bytes >= leg_size - (1 << 20) > s.size_bytes
    assert plain.content_source.snapshot.snapshot_id == s.snapshot_id
    clone = svc.CreateVolume(csi.CreateVolumeRequest(
        name="plain-clone", volume_capabilities=[cap()], capacity_range=csi.CapacityRange(required_bytes=GiB),
        volume_content_source=csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(
            volume_id=v.volume_id))), None).volume
    src = agent(svc, ids.parse_id(clone.volume_id).node).sources[-1]
    # a point-in-time snapshot of the current leg (leg 0: both in sync), dropped once copied, and the one an
    # earlier attempt may have taken of the other leg (the current leg changed between attempts) too
    assert src.snapshot and "transfer" in src.lv and src.offset_bytes == 1 << 20, src
    assert all(src.lv not in agent(svc, n).snapshots for n in ("s1", "s2", "s3"))
    assert sorted(n for n in leg_nodes(svc, v) if src.lv in agent(svc, n).dropped) == sorted(leg_nodes(svc, v))


def test_an_agent_that_cannot_copy_from_an_offset_is_not_asked_to(svc):
    v = create(svc, size=GiB)
    written(svc, v)
    s = snapshot(svc, v)
    for name in ("s1", "s2", "s3"):
        agent(svc, name).features = []
    svc.agents.recheck(["s1", "s2", "s3"])
    req = csi.CreateVolumeRequest(name="plain", volume_capabilities=[cap()],
                                  capacity_range=csi.CapacityRange(required_bytes=GiB),
                                  volume_content_source=from_snapshot(s.snapshot_id))
    assert code_of(svc.CreateVolume, req) == errors.Code.FAILED_PRECONDITION
    assert not any(src.offset_bytes for n in ("s1", "s2", "s3") for src in agent(svc, n).sources)
