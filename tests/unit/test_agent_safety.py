"""The agent's data-safety rules (issue 12), against the real AgentService: the simulated LVM of
test_hostile.py behind FakeRunner (every argv recorded) and the in-memory LIO."""

from __future__ import annotations

import logging

import pytest

from csi import capabilities as caps
from csi import faults, ids
from csi.controller.service import volume_attributes
from csi.storage import orphans, wipe
from csi.storage.tags import attributes_digest
from csi.config import AgentConfig
from csi.proto import agent_pb2 as apb
from csi.storage.lio import Portal
from csi.storage.lvm import Lvm
from csi.storage.records import RecordStore
from csi.storage.service import AgentService
from tests.unit.test_hostile import (ATTRIBUTES, BLOCK_ATTRIBUTES, CLUSTER, POOLS, WORKER, WORKER2, FakeLio, LvmSim, mount_cap,
                                     node_responses)

MiB = 1 << 20


@pytest.fixture
def sim():
    return LvmSim()


def make_agent(fake_run, sim, state, cluster: str = CLUSTER, lio: FakeLio | None = None,
               **config) -> AgentService:
    fake_run.responses = node_responses(sim)
    cfg = AgentConfig("s1", "unused", (Portal("10.0.0.1"),), state, cluster, state / "tls", POOLS, ("/dev/sdb",),
                      **config)
    return AgentService(cfg, Lvm(state / "lvm-system"), lio or FakeLio(), RecordStore(state / "volumes"),
                        sim.device_node_exists)


@pytest.fixture
def agent(fake_run, sim, tmp_path):
    return make_agent(fake_run, sim, tmp_path)


def create(agent, name: str, pool: str = "thin", size: int = 64 * MiB, attributes=None) -> apb.Volume:
    return agent.CreateVolume(apb.CreateVolumeRequest(name=name, pool=pool, size_bytes=size,
                                                      attributes=attributes or ATTRIBUTES), None)


# ---------------------------------------------------------------------------------------------- defect 6

def test_delete_of_a_granted_volume_revokes_every_grant_first_and_says_so(agent, caplog):
    """A grant seen at DeleteVolume is stale (Kubernetes deletes only after every VolumeAttachment is gone):
    each is revoked, so the kernel ends its sessions, before the target and the LV go; a warning names
    the nodes."""
    # a raw block volume for several writers: the one kind two nodes may hold grants of at once
    vol = create(agent, "pvc-granted", attributes=BLOCK_ATTRIBUTES)
    for who in (WORKER, WORKER2):
        agent.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=who), None)
    agent.lio.changes.clear()
    with caplog.at_level(logging.WARNING):
        agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    changes = agent.lio.changes
    assert changes[:2] == [("ACL deleted", vol.target_iqn, WORKER), ("ACL deleted", vol.target_iqn, WORKER2)], \
        changes
    assert ("target deleted", vol.target_iqn) in changes[2:]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(WORKER in m and WORKER2 in m and vol.lv in m for m in warnings), warnings
    assert agent.lio.targets == {} and agent.records.load(vol.vg, vol.lv) is None


# ---------------------------------------------------------------------------------------------- defect 2

INTRUDER = "iqn.2026-11.test.intruder:x"


@pytest.fixture
def two_clusters(fake_run, sim, tmp_path):
    """Agents of clusters prod and prod-eu on one storage node: one VG, one LIO, two state directories. Each
    has a volume granted to WORKER, an intruder ACL on it, and an exported LV of its own with no record."""
    lio = FakeLio()
    agents = {cid: make_agent(fake_run, sim, tmp_path / cid, cluster=cid, lio=lio) for cid in ("prod", "prod-eu")}
    made = {}
    for cid, a in agents.items():
        vol = create(a, "vol", attributes=BLOCK_ATTRIBUTES)   # two grants at once: several writers
        a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER), None)
        lio.grant(vol.target_iqn, lio.targets[vol.target_iqn]["acls"][WORKER].__class__(INTRUDER, False, "u", "s"))
        orphan = f"{cid}-orphan-0123456789"
        sim.add("vg", orphan, 8 * MiB, tags=(f"dev.csi.lvm-iscsi/cluster={cid}", "dev.csi.lvm-iscsi/kind=volume"),
                pool="tp", attr="Vwi-a-tz--")
        lio.export(ids.target_iqn("vg", orphan), orphan, f"/dev/vg/{orphan}", True)
        made[cid] = (vol, orphan)
    return agents, made, lio


def names(found) -> set[str]:
    return {o.name for o in found}


def test_each_cluster_finds_and_removes_only_its_own_orphans(two_clusters):
    agents, made, lio = two_clusters
    (prod_vol, prod_orphan), (eu_vol, eu_orphan) = made["prod"], made["prod-eu"]
    prod_own = {f"vg/{prod_orphan}", ids.target_iqn("vg", prod_orphan), f"{prod_vol.target_iqn} {INTRUDER}"}
    eu_own = {f"vg/{eu_orphan}", ids.target_iqn("vg", eu_orphan), f"{eu_vol.target_iqn} {INTRUDER}"}
    assert names(orphans.find(agents["prod"], 0, remove=False)) == prod_own
    assert names(orphans.find(agents["prod-eu"], 0, remove=False)) == eu_own
    found = orphans.find(agents["prod"], 0, remove=True)
    assert names(found) == prod_own and all(o.removed for o in found)
    # prod-eu's live volume, its grant, and even its orphans are all still there
    assert set(lio.targets) == {prod_vol.target_iqn, eu_vol.target_iqn, ids.target_iqn("vg", eu_orphan)}
    assert set(lio.targets[eu_vol.target_iqn]["acls"]) == {WORKER, INTRUDER}
    assert set(lio.targets[prod_vol.target_iqn]["acls"]) == {WORKER}
    assert names(orphans.find(agents["prod-eu"], 0, remove=False)) == eu_own


def test_targets_and_acls_have_a_minimum_age_too(two_clusters, monkeypatch, fake_run, sim, tmp_path):
    """LIO keeps no creation time: the agent persists when it first saw each candidate, across restarts."""
    agents, made, lio = two_clusters
    vol, orphan = made["prod"]
    now = [orphans.time.time()]
    monkeypatch.setattr(orphans.time, "time", lambda: now[0])
    # The orphan LV is old by LVM's clock; its target and the intruder ACL are new to this agent.
    assert names(orphans.find(agents["prod"], 600, remove=True)) == {f"vg/{orphan}"}
    assert INTRUDER in lio.targets[vol.target_iqn]["acls"]
    lio.export(ids.target_iqn("vg", orphan), orphan, f"/dev/vg/{orphan}", True)   # exported by hand again
    sim.add("vg", orphan, 8 * MiB, tags=("dev.csi.lvm-iscsi/cluster=prod", "dev.csi.lvm-iscsi/kind=volume"),
            pool="tp", attr="Vwi-a-tz--")
    now[0] += 300
    assert names(orphans.find(agents["prod"], 600, remove=True)) == {f"vg/{orphan}"}
    lio.export(ids.target_iqn("vg", orphan), orphan, f"/dev/vg/{orphan}", True)
    sim.add("vg", orphan, 8 * MiB, tags=("dev.csi.lvm-iscsi/cluster=prod", "dev.csi.lvm-iscsi/kind=volume"),
            pool="tp", attr="Vwi-a-tz--")
    now[0] += 301
    restarted = make_agent(fake_run, sim, tmp_path / "prod", cluster="prod", lio=lio)
    assert names(orphans.find(restarted, 600, remove=True)) == {
        f"vg/{orphan}", ids.target_iqn("vg", orphan), f"{vol.target_iqn} {INTRUDER}"}
    assert INTRUDER not in lio.targets[vol.target_iqn]["acls"]


def test_a_grant_made_during_a_sweep_survives_it(two_clusters, monkeypatch):
    """The sweep pauses after listing (faults.pause): a GrantAccess then is not taken for an orphan ACL."""
    agents, made, lio = two_clusters
    prod = agents["prod"]
    vol, _ = made["prod"]
    late = "iqn.2026-11.test.late:granted-during-the-sweep"

    def grant_now(point: str) -> None:
        if point == "orphans.listed":
            prod.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=late), None)

    monkeypatch.setattr(faults, "pause", grant_now)
    found = orphans.find(prod, 0, remove=True)
    assert f"{vol.target_iqn} {INTRUDER}" in names(found)     # the sweep swept
    assert set(lio.targets[vol.target_iqn]["acls"]) == {WORKER, late}


def test_a_volume_busy_with_a_call_is_left_alone(two_clusters):
    agents, made, lio = two_clusters
    prod = agents["prod"]
    vol, orphan = made["prod"]
    with prod.locks.hold(f"{vol.vg}/{vol.lv}"), prod.locks.hold(f"vg/{orphan}"):
        assert names(orphans.find(prod, 0, remove=True)) == set()
    assert INTRUDER in lio.targets[vol.target_iqn]["acls"]


# ---------------------------------------------------------------------------------------------- defect 3

def thick_attributes(**params) -> dict[str, str]:
    return volume_attributes(caps.check_capabilities([mount_cap()]), caps.parse_params({"type": "thick", **params}))


def argv_of(calls, command: str) -> list[list[str]]:
    return [c for c in calls if c[0] == command]


def zeroed(calls) -> list[tuple[int, int]]:
    return [(int(c[c.index("--offset") + 1]), int(c[c.index("--length") + 1])) for c in argv_of(calls, "blkdiscard")]


def test_delete_of_a_thick_volume_takes_it_out_of_the_namespace_and_returns(agent, fake_run, sim):
    """No zeroing inside the RPC: the LV is renamed out of the volume namespace and queued; the name is free
    at once, and a new volume of that name is a new LV, never the half-wiped one."""
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    fake_run.calls.clear()
    agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    assert argv_of(fake_run.calls, "blkdiscard") == [] and argv_of(fake_run.calls, "lvremove") == []
    [renamed] = argv_of(fake_run.calls, "lvrename")
    assert renamed[:3] == ["lvrename", "vg", vol.lv] and ids.is_wipe_lv_name(renamed[3])
    assert ("vg", vol.lv) not in sim.lvs and ("vg", renamed[3]) in sim.lvs
    backlog = agent.wiper.backlog("vg")
    assert (backlog.volumes, backlog.bytes_left, backlog.error) == (1, 64 * MiB, "")
    thick = {p.name: p for p in agent.GetInfo(apb.GetInfoRequest(), None).pools}["thick"]
    assert (thick.wiping_volumes, thick.wiping_bytes) == (1, 64 * MiB)
    assert thick.volume_count == 0                       # no volume any more, but its space is still used
    again = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    assert again.lv == vol.lv and ("vg", renamed[3]) in sim.lvs
    assert agent.GetVolume(apb.GetVolumeRequest(name="pvc-thick"), None).lv == vol.lv


def test_the_wipe_goes_in_steps_and_resumes_where_it_stopped_after_a_restart(fake_run, sim, tmp_path, monkeypatch):
    monkeypatch.setattr(wipe, "STEP", 16 * MiB)
    agent = make_agent(fake_run, sim, tmp_path)
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    [pending] = agent.wiper.pending()
    steps = []

    def blkdiscard(argv):
        steps.append(argv)
        return (1, "", "blkdiscard: Input/output error\n") if len(steps) == 3 else (0, "", "")

    fake_run.on("blkdiscard", fn=blkdiscard)
    fake_run.calls.clear()
    assert agent.wiper.run_one(pending) is False
    assert zeroed(fake_run.calls) == [(0, 16 * MiB), (16 * MiB, 16 * MiB), (32 * MiB, 16 * MiB)]
    assert all(c[-1] == f"/dev/vg/{pending.lv}" for c in argv_of(fake_run.calls, "blkdiscard"))
    assert "Input/output error" in agent.wiper.backlog("vg").error
    assert ("vg", pending.lv) in sim.lvs

    restarted = make_agent(fake_run, sim, tmp_path)      # the agent dies and starts again
    assert restarted.wiper.scan() == 1
    fake_run.calls.clear()
    assert restarted.wiper.run_one(restarted.wiper.pending()[0]) is True
    assert zeroed(fake_run.calls) == [(32 * MiB, 16 * MiB), (48 * MiB, 16 * MiB)]
    assert argv_of(fake_run.calls, "lvremove") == [["lvremove", "--yes", f"vg/{pending.lv}"]]
    assert ("vg", pending.lv) not in sim.lvs and restarted.wiper.backlog("vg") == wipe.Backlog(0, 0, "")
    assert not list((tmp_path / "wipes").rglob("*.json"))


def test_start_up_never_waits_for_a_wipe(fake_run, sim, tmp_path):
    """A deletion cut short (record marked deleting) is finished at start by the rename alone."""
    agent = make_agent(fake_run, sim, tmp_path)
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    rec = agent.records.load(vol.vg, vol.lv)
    rec.deleting = True
    agent.records.save(rec)
    restarted = make_agent(fake_run, sim, tmp_path)
    fake_run.calls.clear()
    counts = restarted.restore()
    assert counts["finished_deletes"] == 1
    assert argv_of(fake_run.calls, "blkdiscard") == [] and len(argv_of(fake_run.calls, "lvrename")) == 1
    assert restarted.wiper.backlog("vg").volumes == 1


@pytest.mark.parametrize("params,wipe_thick,wiped", [
    ({}, True, True), ({}, False, False),                       # unset: the agent's wipeThick decides
    ({"wipe": "true"}, False, True), ({"wipe": "true"}, True, True),   # the class turns it on even where off
    ({"wipe": "false"}, True, False)])
def test_the_class_wipe_parameter_overrides_the_agent_default(fake_run, sim, tmp_path, params, wipe_thick, wiped):
    agent = make_agent(fake_run, sim, tmp_path, wipe_thick=wipe_thick)
    vol = create(agent, "pvc-w", pool="thick", attributes=thick_attributes(**params))
    fake_run.calls.clear()
    agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    assert bool(argv_of(fake_run.calls, "lvrename")) == wiped
    assert argv_of(fake_run.calls, "lvremove") == ([] if wiped else [["lvremove", "--yes", f"vg/{vol.lv}"]])


def test_requests_that_do_not_set_wipe_keep_their_digest():
    """The attributes feed the request digest in the LV tag: a changed encoding must not make a retried
    CreateVolume ALREADY_EXISTS. These are the digests of the code before the change."""
    plain = volume_attributes(caps.check_capabilities([mount_cap()]), caps.parse_params({}))
    off = volume_attributes(caps.check_capabilities([mount_cap()]), caps.parse_params({"wipe": "false"}))
    assert attributes_digest(plain) == "f2bb702a6332f1fb"
    assert attributes_digest(off) == "cc7221fdde59f6e8"


def test_a_create_retried_across_the_upgrade_finds_its_volume(agent):
    """Made before the upgrade by a class with wipe: "true", whose attributes then said "wipe": "true" like
    an unset one; retried after it, with the new encoding: the same volume, now wiped as the class asks."""
    before = create(agent, "pvc-up", pool="thick", attributes=dict(thick_attributes(), wipe="true"))
    now = thick_attributes(wipe="true")
    assert now["wipe"] != "true"
    again = create(agent, "pvc-up", pool="thick", attributes=now)
    assert again.lv == before.lv
    assert agent.records.load(again.vg, again.lv).attributes == now


# ---------------------------------------------------------------------------------------------- defect 4

def transient(agent, vol, name: str = "transfer/clone-1"):
    return agent.CreateSnapshot(apb.CreateSnapshotRequest(name=name, source_vg=vol.vg, source_lv=vol.lv,
                                                          transient=True), None)


def test_a_thick_volume_gets_a_point_in_time_copy_source(agent, fake_run, sim):
    """A clone of a thick volume in use copies a transient COW snapshot of it (it failed: snapshots need a
    thin pool), sized for a quarter of the volume to change during the copy; a snapshot kept for users is
    still refused."""
    vol = create(agent, "pvc-thick", pool="thick", size=512 * MiB, attributes=thick_attributes())
    fake_run.calls.clear()
    snap = transient(agent, vol)
    [made] = argv_of(fake_run.calls, "lvcreate")
    assert made[:8] == ["lvcreate", "--yes", "--snapshot", "--name", snap.lv, "--size", f"{128 * MiB}b",
                        "--setactivationskip"] and made[-1] == f"vg/{vol.lv}"
    assert "dev.csi.lvm-iscsi/kind=transfer" in made
    assert snap.size_bytes == 512 * MiB and snap.source_lv == vol.lv
    assert transient(agent, vol).lv == snap.lv                     # a retry finds it
    with pytest.raises(Exception) as e:
        agent.CreateSnapshot(apb.CreateSnapshotRequest(name="user-snap", source_vg=vol.vg, source_lv=vol.lv),
                             None)
    assert "thin pool" in str(e.value)


@pytest.mark.parametrize("volume,cow", [(16 * MiB, 16 * MiB), (128 * MiB, 64 * MiB), (1 << 30, 256 * MiB)])
def test_copy_on_write_space_is_a_quarter_of_the_volume(volume, cow):
    from csi.storage import snapshots
    assert snapshots.cow_size(volume, 4 * MiB) == cow


def test_its_copy_on_write_space_is_wiped_before_it_is_freed(agent, fake_run, sim):
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    snap = transient(agent, vol)
    fake_run.calls.clear()
    agent.DeleteSnapshot(apb.DeleteSnapshotRequest(vg=snap.vg, lv=snap.lv), None)
    assert argv_of(fake_run.calls, "lvconvert") == [["lvconvert", "--yes", "--splitsnapshot", f"vg/{snap.lv}"]]
    [renamed] = argv_of(fake_run.calls, "lvrename")
    assert renamed[2] == snap.lv and argv_of(fake_run.calls, "lvremove") == []
    [pending] = agent.wiper.pending()
    assert agent.wiper.run_one(pending)
    assert zeroed(fake_run.calls) == [(0, 64 * MiB)]
    assert argv_of(fake_run.calls, "lvremove") == [["lvremove", "--yes", f"vg/{renamed[3]}"]]
    assert sim.lvs[("vg", vol.lv)]["lv_attr"].startswith("-")        # no origin of anything any more


def test_a_thick_volume_deleted_under_a_clone_takes_its_snapshot_through_the_wipe(agent, fake_run, sim):
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    snap = transient(agent, vol)
    fake_run.calls.clear()
    agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    assert argv_of(fake_run.calls, "lvconvert") == [["lvconvert", "--yes", "--splitsnapshot", f"vg/{snap.lv}"]]
    assert len(argv_of(fake_run.calls, "lvrename")) == 2 and argv_of(fake_run.calls, "lvremove") == []


def test_a_copy_from_a_snapshot_that_overflowed_fails_cleanly(agent, sim):
    """The point in time is gone once the COW space is full: the copy ends with RESOURCE_EXHAUSTED (the
    controller then drops the snapshot, and the retry copies from a new one), never with torn data."""
    from csi import errors
    from csi.storage import transfer
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    snap = transient(agent, vol)
    lv = agent.lvm.lv(snap.vg, snap.lv)

    def stream():
        yield 0, b"x" * 4096, ""
        sim.lvs[("vg", snap.lv)]["lv_attr"] = "swi-I-s---"          # the kernel invalidated it meanwhile
        raise OSError(5, "Input/output error")

    with pytest.raises(errors.CsiError) as e:
        list(transfer._while_intact(agent, lv, stream()))
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED and "overflowed" in e.value.message

    def complete():
        yield 0, b"x" * 4096, ""
        yield 4096, None, "digest"

    sim.lvs[("vg", snap.lv)]["lv_attr"] = "swi-I-s---"
    with pytest.raises(errors.CsiError):
        list(transfer._while_intact(agent, lv, complete()))              # checked before the last message
    sim.lvs[("vg", snap.lv)]["lv_attr"] = "swi-a-s---"
    assert list(transfer._while_intact(agent, lv, complete()))[-1] == (4096, None, "digest")


def test_a_drop_cut_short_after_the_split_is_never_copied_from(agent, fake_run, sim):
    """Killed between the split and the rename (snapshot.split), the LV under the snapshot's name holds COW
    data, not the volume: a retried CreateSnapshot finishes that drop and makes a new point in time; the
    copy refuses such an LV as a source."""
    from csi import errors
    from csi.storage import transfer
    vol = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    snap = transient(agent, vol)
    agent.lvm.split_snapshot(snap.vg, snap.lv)
    split = agent.lvm.lv(snap.vg, snap.lv)
    with pytest.raises(errors.CsiError) as e:
        list(transfer.read_data(agent, apb.ReadDataRequest(vg=snap.vg, lv=snap.lv)))
    assert e.value.code == errors.Code.ABORTED
    again = transient(agent, vol)
    assert again.lv == snap.lv and sim.lvs[("vg", snap.lv)]["origin"] == vol.lv      # a new COW snapshot
    [pending] = agent.wiper.pending()
    assert pending.size == split.size and ids.is_wipe_lv_name(pending.lv)            # the old one is wiped


# ---------------------------------------------------------------------------------------------- state lost

def test_every_new_volume_carries_its_attributes_in_a_tag(agent, sim):
    from csi.storage import tags
    vol = create(agent, "pvc-attrs", attributes=ATTRIBUTES)
    assert tags.attributes_of(agent.lvm.lv(vol.vg, vol.lv)) == ATTRIBUTES


def test_a_lost_state_directory_is_rebuilt_from_the_lv_tags(fake_run, sim, tmp_path):
    """The state directory is gone (a disk replaced, a wrong host path): the records come back from the LV
    tags, grants from the kernel's ACLs, and no volume is removed for want of its record; a volume that
    cannot be rebuilt is said so, and cleanup never removes it."""
    import shutil

    from csi.storage import rebuild
    lio = FakeLio()
    state = tmp_path / "state"
    agent = make_agent(fake_run, sim, state, lio=lio)
    agent.restore()
    thin = create(agent, "pvc-thin")
    agent.GrantAccess(apb.GrantAccessRequest(vg=thin.vg, lv=thin.lv, initiator_iqn=WORKER, node_name="worker-1"),
                      None)
    granted = agent.records.load(thin.vg, thin.lv).grants[WORKER]
    thick = create(agent, "pvc-thick", pool="thick", attributes=thick_attributes())
    snap = agent.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-1", source_vg=thin.vg, source_lv=thin.lv),
                                None)
    copying = ids.lv_name(CLUSTER, "pvc-copying")     # a copy in progress when the state went
    sim.add("vg", copying, 64 * MiB, tags=(f"dev.csi.lvm-iscsi/cluster={CLUSTER}", "dev.csi.lvm-iscsi/kind=volume",
                                           "dev.csi.lvm-iscsi/content=copy"), pool="tp", attr="Vwi-a-tz--")
    before = {v.lv: v for v in (thin, thick)}
    shutil.rmtree(state)

    restarted = make_agent(fake_run, sim, state, lio=lio)
    counts = restarted.restore()
    assert (counts["rebuilt"], counts["grants_from_lio"], counts["not_rebuilt"]) == (2, 1, 1)
    for lv, vol in before.items():
        got = restarted.GetVolume(apb.GetVolumeRequest(vg=vol.vg, lv=lv), None)
        assert (got.name, got.pool, got.size_bytes, dict(got.attributes)) == \
            (vol.name, vol.pool, vol.size_bytes, dict(vol.attributes))
        assert got.healthy and got.exported
    # Read back from the kernel, the grant no longer knows its node; the next publish names it again and
    # keeps the secret: the node stays logged in.
    assert restarted.records.load(thin.vg, thin.lv).grants[WORKER].node == ""
    restarted.GrantAccess(apb.GrantAccessRequest(vg=thin.vg, lv=thin.lv, initiator_iqn=WORKER, node_name="worker-1"),
                          None)
    again = restarted.records.load(thin.vg, thin.lv).grants[WORKER]
    assert (again.chap_secret, again.node) == (granted.chap_secret, "worker-1")
    assert [s.lv for s in restarted.ListSnapshots(apb.ListSnapshotsRequest(), None).snapshots] == [snap.lv]
    assert rebuild.unrebuilt(restarted) == {f"vg/{copying}"}
    found = orphans.find(restarted, 0, remove=True)
    assert [(o.name, o.removed) for o in found] == [(f"vg/{copying}", False)]
    assert all(("vg", lv) in sim.lvs for lv in (thin.lv, thick.lv, copying, snap.lv))


def test_volumes_made_before_the_attributes_tag_get_it_at_start(fake_run, sim, tmp_path):
    from csi.storage import tags
    agent = make_agent(fake_run, sim, tmp_path)
    vol = create(agent, "pvc-old")
    row = sim.lvs[("vg", vol.lv)]
    row["lv_tags"] = ",".join(t for t in row["lv_tags"].split(",") if "/attrs=" not in t)
    assert tags.attributes_of(agent.lvm.lv(vol.vg, vol.lv)) is None
    make_agent(fake_run, sim, tmp_path).restore()
    assert tags.attributes_of(agent.lvm.lv(vol.vg, vol.lv)) == ATTRIBUTES


def test_an_intact_state_directory_is_not_rebuilt(fake_run, sim, tmp_path):
    """An LV without a record beside other records is a creation cut short, not a lost record: it stays an
    orphan for cleanup (after its minimum age), never turned into a volume."""
    agent = make_agent(fake_run, sim, tmp_path)
    create(agent, "pvc-kept")
    cut_short = ids.lv_name(CLUSTER, "pvc-cut-short")
    sim.add("vg", cut_short, 64 * MiB, tags=(f"dev.csi.lvm-iscsi/cluster={CLUSTER}", "dev.csi.lvm-iscsi/kind=volume"),
            pool="tp", attr="Vwi-a-tz--")
    counts = make_agent(fake_run, sim, tmp_path).restore()
    assert counts["rebuilt"] == 0 and agent.records.load("vg", cut_short) is None


def test_a_wipe_that_fails_does_not_hold_up_the_others(agent, fake_run, sim, monkeypatch):
    import time as _time
    a = create(agent, "pvc-a", pool="thick", attributes=thick_attributes())
    b = create(agent, "pvc-b", pool="thick", attributes=thick_attributes())
    for vol in (a, b):
        agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    first, second = agent.wiper.pending()
    fake_run.on("blkdiscard", fn=lambda argv: (1, "", "blkdiscard: Input/output error\n")
                if argv[-1].endswith(first.lv) else (0, "", ""))
    agent.wiper.start()
    try:
        deadline = _time.monotonic() + 10
        while ("vg", second.lv) in sim.lvs and _time.monotonic() < deadline:
            _time.sleep(0.05)
    finally:
        agent.wiper.stop()
    assert ("vg", second.lv) not in sim.lvs and ("vg", first.lv) in sim.lvs
    assert "Input/output error" in agent.wiper.backlog("vg").error


def test_the_wiper_looks_for_wipes_cut_short_until_lvm_answers(agent, fake_run, sim, monkeypatch):
    import time as _time
    vol = create(agent, "pvc-a", pool="thick", attributes=thick_attributes())
    agent.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    [pending] = agent.wiper.pending()
    restarted = make_agent(fake_run, sim, agent.config.state_dir)     # the agent restarts; LVM fails at first
    answers = iter([(5, "", "  Failed to read metadata of VG vg.\n")])
    real = sim.lvs_cmd
    fake_run.on("lvs", fn=lambda argv: next(answers, None) or real(argv))
    monkeypatch.setattr(wipe, "RETRY_AFTER", 0.2)
    restarted.wiper.start()
    try:
        deadline = _time.monotonic() + 10
        while ("vg", pending.lv) in sim.lvs and _time.monotonic() < deadline:
            _time.sleep(0.05)
    finally:
        restarted.wiper.stop()
    assert ("vg", pending.lv) not in sim.lvs


def test_a_thin_pool_that_queues_writes_when_full_is_made_to_fail_them_at_start(agent, sim, fake_run, caplog):
    """Nothing extends a pool (monitoring off): a full pool that queues I/O only hangs every writer for 60 s.
    The agent sets --errorwhenfull y at start where the pool lacks it, says so, and leaves a pool alone that
    already has it."""
    sim.when_full = "queue"
    with caplog.at_level(logging.WARNING):
        agent.restore()
    changed = [c for c in fake_run.calls if c[:2] == ["lvchange", "--errorwhenfull"]]
    assert changed == [["lvchange", "--errorwhenfull", "y", "vg/tp"]], changed
    assert sim.when_full == "error" and "queued writes when full" in caplog.text
    fake_run.calls.clear()
    agent.restore()
    assert not [c for c in fake_run.calls if "--errorwhenfull" in c]
