"""What one CreateVolume + ControllerPublishVolume costs a storage node in LVM commands, at 10 and at 300
volumes.

Each LVM command costs most of a second on a storage node, more as the VG grows, so the count is most of
the agent's latency; and one listing of every LV per create or publish would make it grow with the number
of volumes (DESIGN.md: the driver adds no per-volume cost). The real AgentService runs against the simulated
LVM of test_hostile.py; FakeRunner records every argv. The calls are the ones the controller makes.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import pytest

from csi import errors, ids
from csi.config import AgentConfig
from csi.proto import agent_pb2 as apb
from csi.storage import capacity as agent_capacity
from csi.storage import snapshots
from csi.storage.lio import Portal
from csi.storage.lvm import Lvm
from csi.storage.records import RecordStore
from csi.storage.service import AgentService
from tests.unit.test_hostile import ATTRIBUTES, BLOCK_ATTRIBUTES, CLUSTER, GiB, POOLS, WORKER, FakeLio, LvmSim, node_responses

MiB = 1 << 20
SIZE = 64 << 20   # 300 of them fit the simulated thin pool (20 GiB, overprovisioned 2x)
LVM_COMMANDS = ("lvs", "vgs", "lvcreate", "lvremove", "lvextend", "lvchange")


@pytest.fixture
def agent(fake_run, tmp_path):
    sim = LvmSim()
    fake_run.responses = node_responses(sim)
    a = AgentService(AgentConfig("s1", "unused", (Portal("10.0.0.1"),), tmp_path, CLUSTER, tmp_path / "tls",
                                 POOLS, ("/dev/sdb",)),
                     Lvm(tmp_path / "lvm-system"), FakeLio(), RecordStore(tmp_path / "volumes"),
                     sim.device_node_exists)
    return a, fake_run, sim


def create_and_publish(a: AgentService, name: str) -> None:
    """The agent calls behind one CreateVolume + ControllerPublishVolume of the controller."""
    a.GetInfo(apb.GetInfoRequest(), None)
    try:
        a.GetVolume(apb.GetVolumeRequest(name=name), None)
        raise AssertionError(f"{name} exists before its creation")
    except Exception as exc:  # noqa: BLE001 - NOT_FOUND is the expected answer
        assert "no volume named" in str(exc), exc
    vol = a.CreateVolume(apb.CreateVolumeRequest(name=name, pool="thin", size_bytes=SIZE, attributes=ATTRIBUTES),
                         None)
    a.GetVolume(apb.GetVolumeRequest(vg=vol.vg, lv=vol.lv, brief=True), None)
    a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER), None)


def lvm_calls(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if c[0] in LVM_COMMANDS]


def is_listing(argv: list[str]) -> bool:
    """An lvs of a whole VG (its last argument names no LV): its cost grows with the number of LVs."""
    return argv[0] == "lvs" and "/" not in argv[-1]


@pytest.mark.parametrize("existing", [10, 300])
def test_create_and_publish_cost_one_lvm_command_at_any_count(agent, existing):
    a, run, sim = agent
    for i in range(existing):
        create_and_publish(a, f"pvc-{i}")
    run.calls.clear()
    create_and_publish(a, "pvc-measured")
    calls = lvm_calls(run.calls)
    kinds = Counter(c[0] for c in calls)
    # lvcreate only: neither a record nor a device node says the new name exists, so neither the controller's
    # look-up by name nor CreateVolume's own check asks LVM (lvcreate is the atomic check). The thin pool
    # report is reused for a few seconds; publishing reads only the record.
    assert kinds == Counter({"lvcreate": 1}), calls
    lv = ids.lv_name(CLUSTER, "pvc-measured")
    # And the description built from lvcreate's arguments is what LVM itself reports.
    vol = a.GetVolume(apb.GetVolumeRequest(vg="vg", lv=lv), None)
    assert vol.size_bytes == SIZE and vol.healthy and vol.exported, vol


def test_capacity_report_is_reused_for_a_few_seconds_then_read_from_the_kernel(agent, monkeypatch):
    a, run, sim = agent
    now = [1000.0]
    monkeypatch.setattr(agent_capacity.time, "monotonic", lambda: now[0])
    a.GetInfo(apb.GetInfoRequest(), None)
    lvm_reports = lambda: [c for c in run.calls if c[0] == "lvs" and c[-1] == "vg/tp"]  # noqa: E731
    kernel_reports = lambda: [c for c in run.calls if c[:2] == ["dmsetup", "status"]]  # noqa: E731
    assert len(lvm_reports()) == 1 and kernel_reports() == []
    a.GetInfo(apb.GetInfoRequest(), None)
    assert len(lvm_reports()) == 1 and kernel_reports() == []
    # After the TTL the fill comes from the kernel's thin-pool status (the same cost at any count of LVs),
    # and it is the fill LVM reports.
    sim.lvs[("vg", "tp")]["data_percent"] = "42.50"
    now[0] += agent_capacity.POOL_REPORT_TTL + 0.1
    thin = {p.name: p for p in a.GetInfo(apb.GetInfoRequest(), None).pools}["thin"]
    assert len(lvm_reports()) == 1 and kernel_reports() == [["dmsetup", "status", "vg-tp-tpool"]]
    assert round(thin.data_percent) == 42 and thin.physical_total_bytes == 20 * GiB
    # An inactive pool has no kernel device: the LVM report again.
    _deactivate(sim, "vg", "tp")
    now[0] += agent_capacity.POOL_REPORT_TTL + 0.1
    a.GetInfo(apb.GetInfoRequest(), None)
    assert len(lvm_reports()) == 2 and len(kernel_reports()) == 2


def test_grant_activates_an_inactive_volume(agent):
    # The device node is missing while the LV is inactive: then (and only then) the agent asks LVM.
    a, run, sim = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-x", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    row = sim.lvs[("vg", vol.lv)]
    row["lv_attr"] = row["lv_attr"][:4] + "-" + row["lv_attr"][5:]
    run.calls.clear()
    a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER), None)
    assert [c[0] for c in lvm_calls(run.calls)] == ["lvs", "lvchange"], run.calls
    assert sim.lvs[("vg", vol.lv)]["lv_attr"][4] == "a"


def test_brief_get_volume_runs_no_command(agent):
    a, run, _ = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-y", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    a.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER), None)
    run.calls.clear()
    brief = a.GetVolume(apb.GetVolumeRequest(vg=vol.vg, lv=vol.lv, brief=True), None)
    assert run.calls == []
    assert [i.iqn for i in brief.initiators] == [WORKER] and brief.size_bytes == GiB
    assert dict(brief.attributes) == ATTRIBUTES and brief.ready


def test_thick_changes_are_seen_at_once(agent):
    # A thick LV takes VG space when created: the VG report must not be reused after that.
    a, _, _ = agent

    def thick_available():
        return {p.name: p.available_bytes for p in a.GetInfo(apb.GetInfoRequest(), None).pools}["thick"]

    before = thick_available()
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-thick-1", pool="thick", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    assert thick_available() == before - GiB
    a.ExpandVolume(apb.ExpandVolumeRequest(vg=vol.vg, lv=vol.lv, size_bytes=2 * GiB), None)
    assert thick_available() == before - 2 * GiB
    a.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    # its space counts as used until the LV is zeroed and removed (wipe.py), then at once
    assert thick_available() == before - 2 * GiB
    for pending in a.wiper.pending():
        assert a.wiper.run_one(pending)
    assert thick_available() == before


def test_capacity_of_a_thin_and_a_thick_pool_in_one_vg_is_one_report(agent):
    # The thin pool's report carries the VG's size and free space: the thick pool beside it reuses them.
    a, run, _ = agent
    info = a.GetInfo(apb.GetInfoRequest(), None)
    # the thin pool's report, and one count of the LVs of both pools (kept up to date from then on)
    assert [c[0] for c in lvm_calls(run.calls)] == ["lvs", "lvs"], run.calls
    assert sum(1 for c in run.calls if is_listing(c)) == 1
    thick = {p.name: p for p in info.pools}["thick"]
    assert thick.physical_total_bytes == LvmSim.VG_SIZE and thick.available_bytes > 0


def _deactivate(sim, vg: str, lv: str) -> None:
    row = sim.lvs[(vg, lv)]
    row["lv_attr"] = row["lv_attr"][:4] + "-" + row["lv_attr"][5:]


def _cut_short(a: AgentService, sim, name: str) -> str:
    """A CreateVolume that died after lvcreate, before its record; then a reboot (the LV is inactive). The
    agent had started before (restore), as it always has before it serves: its state directory is intact, so
    the LV is a creation cut short, not a volume whose record was lost with the directory (rebuild.py)."""
    a.restore()
    vol = a.CreateVolume(apb.CreateVolumeRequest(name=name, pool="thin", size_bytes=GiB, attributes=ATTRIBUTES),
                         None)
    a.records.path(vol.vg, vol.lv).unlink()
    _deactivate(sim, vol.vg, vol.lv)
    return vol.lv


def test_restore_activates_an_lv_whose_creation_was_cut_short(agent):
    # Then its device node tells the look-up by name that it exists, and the controller's retry lands on
    # this node again instead of making a second volume elsewhere.
    a, _, sim = agent
    lv = _cut_short(a, sim, "pvc-cut")
    with pytest.raises(Exception, match="no volume named"):
        a.GetVolume(apb.GetVolumeRequest(name="pvc-cut"), None)
    _deactivate(sim, "vg", "tp")  # a thin pool itself is never ours to activate
    counts = a.restore()
    assert counts["activated_unrecorded"] == 1 and counts["failed"] == 0, counts
    assert sim.lvs[("vg", lv)]["lv_attr"][4] == "a" and sim.lvs[("vg", "tp")]["lv_attr"][4] == "-"
    found = a.GetVolume(apb.GetVolumeRequest(name="pvc-cut"), None)
    assert (found.lv, found.healthy, found.condition) == (lv, False, "creation not finished")


def test_create_finishes_an_lv_it_could_not_see(agent):
    # No record and no device node (deactivated by hand): lvcreate refuses the name, and the agent compares
    # the LV it finds like any existing one: the same request is finished, another one is refused.
    a, _, sim = agent
    lv = _cut_short(a, sim, "pvc-hidden")
    with pytest.raises(Exception, match="exists with another"):
        a.CreateVolume(apb.CreateVolumeRequest(name="pvc-hidden", pool="thin", size_bytes=GiB,
                                                 attributes=BLOCK_ATTRIBUTES),
                       None)
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-hidden", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    assert vol.lv == lv and vol.exported and vol.ready
    assert sim.lvs[("vg", lv)]["lv_attr"][4] == "a" and a.records.load("vg", lv) is not None


def test_snapshot_and_restore_cost_no_lvm_report_before_their_lvcreate(agent):
    # CreateSnapshot: the source's record says where and how big; lvcreate checks the name; no read-back (the
    # creation time is the agent's, in a tag). A restore in the same pool from a snapshot this agent made or read:
    # one lvcreate (and the lvextend asked for), no report of the source.
    a, run, sim = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-src", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    a.GetInfo(apb.GetInfoRequest(), None)   # the pool report, fresh for a few seconds
    run.calls.clear()
    snap = a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-1", source_vg=vol.vg, source_lv=vol.lv), None)
    assert [c[0] for c in lvm_calls(run.calls)] == ["lvcreate"], run.calls
    assert (snap.size_bytes, snap.source_lv, snap.ready) == (GiB, vol.lv, True)
    assert a.GetSnapshot(apb.GetSnapshotRequest(vg=snap.vg, lv=snap.lv), None) == snap   # tagged time, LVM's size
    run.calls.clear()
    source = apb.VolumeSource(node="s1", vg=snap.vg, lv=snap.lv, snapshot=True, size_bytes=snap.size_bytes)
    restored = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-restored", pool="thin", size_bytes=2 * GiB,
                                                      attributes=ATTRIBUTES, source=source), None)
    assert [c[0] for c in lvm_calls(run.calls)] == ["lvcreate", "lvextend"], run.calls
    assert restored.size_bytes == 2 * GiB and restored.exported
    row = sim.lvs[("vg", restored.lv)]
    assert int(row["lv_size"]) == 2 * GiB and row["lv_attr"][4] == "a"
    # An agent that did not make it (restarted since) reads the source once, then knows it.
    a.known_snapshots = snapshots.known()
    for name, reads in (("pvc-restored-2", ["lvs", "lvcreate"]), ("pvc-restored-3", ["lvcreate"])):
        run.calls.clear()
        a.CreateVolume(apb.CreateVolumeRequest(name=name, pool="thin", size_bytes=GiB, attributes=ATTRIBUTES,
                                               source=source), None)
        assert [c[0] for c in lvm_calls(run.calls)] == reads, run.calls


def test_a_restore_from_a_snapshot_removed_behind_the_agents_back_is_not_found(agent):
    a, run, sim = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-src2", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    snap = a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-gone", source_vg=vol.vg, source_lv=vol.lv), None)
    del sim.lvs[("vg", snap.lv)]      # an administrator's lvremove: the agent still remembers the snapshot
    source = apb.VolumeSource(node="s1", vg=snap.vg, lv=snap.lv, snapshot=True, size_bytes=snap.size_bytes)
    request = apb.CreateVolumeRequest(name="pvc-from-gone", pool="thin", size_bytes=GiB, attributes=ATTRIBUTES,
                                      source=source)
    for _ in range(2):     # the second time from an LVM report: forgotten after the first
        with pytest.raises(errors.CsiError) as failed:
            a.CreateVolume(request, None)
        assert failed.value.code == errors.Code.NOT_FOUND, failed.value
    assert not [k for k in sim.lvs if "from-gone" in k[1]]


def test_a_retried_snapshot_is_found_even_after_its_source_went(agent):
    a, _, _ = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-gone", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    req = apb.CreateSnapshotRequest(name="snap-keep", source_vg=vol.vg, source_lv=vol.lv)
    first = a.CreateSnapshot(req, None)
    assert a.CreateSnapshot(req, None) == first
    other = apb.CreateSnapshotRequest(name="snap-keep", source_vg=vol.vg, source_lv="c1-pvc-other-0123456789")
    with pytest.raises(Exception, match="exists with another source"):
        a.CreateSnapshot(other, None)
    a.DeleteVolume(apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv), None)
    assert a.CreateSnapshot(req, None) == first
    with pytest.raises(Exception, match="no volume"):
        a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-new", source_vg=vol.vg, source_lv=vol.lv), None)


def test_a_snapshot_of_a_replicated_volumes_leg_says_so(agent):
    # Its data starts 1 MiB in (md's superblock and bitmap first): the controller must know, from the snapshot
    # alone (the source may be gone), that it restores only into a replicated volume.
    a, run, sim = agent
    attributes = dict(ATTRIBUTES, replicas="2", replicaLeg="0")
    leg = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-leg", pool="thin", size_bytes=GiB,
                                                 attributes=attributes), None)
    plain = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-plain", pool="thin", size_bytes=GiB,
                                                   attributes=ATTRIBUTES), None)
    snap = a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-leg", source_vg=leg.vg, source_lv=leg.lv), None)
    assert snap.source_replicated
    assert a.GetSnapshot(apb.GetSnapshotRequest(vg=snap.vg, lv=snap.lv), None).source_replicated
    a.DeleteVolume(apb.DeleteVolumeRequest(vg=leg.vg, lv=leg.lv), None)
    assert a.GetSnapshot(apb.GetSnapshotRequest(vg=snap.vg, lv=snap.lv), None).source_replicated
    other = a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-plain", source_vg=plain.vg, source_lv=plain.lv),
                             None)
    assert not other.source_replicated


def test_a_snapshot_of_a_volume_whose_lv_vanished_is_not_found(agent):
    # The record alone does not make a source: lvcreate's "origin not found" (recorded) is NOT_FOUND.
    a, _, sim = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-vanished", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    del sim.lvs[("vg", vol.lv)]
    with pytest.raises(Exception, match="no volume"):
        a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-x", source_vg=vol.vg, source_lv=vol.lv), None)


def test_a_pool_this_node_lacks_is_absent_not_the_node_down(fake_run, tmp_path):
    """Every agent gets the same pool definitions (one chart); a node without one of the VGs answers GetInfo
    with its other pools. Before, GetInfo failed as a whole, and the controller took the node for down."""
    from csi.config import PoolConfig
    sim = LvmSim()
    fake_run.responses = node_responses(sim)
    pools = POOLS + (PoolConfig("elsewhere", "vg-not-here", "tp"), PoolConfig("elsewhere-thick", "vg-not-here"))
    a = AgentService(AgentConfig("s1", "unused", (Portal("10.0.0.1"),), tmp_path, CLUSTER, tmp_path / "tls",
                                 pools, ("/dev/sdb",)),
                     Lvm(tmp_path / "lvm-system"), FakeLio(), RecordStore(tmp_path / "volumes"),
                     sim.device_node_exists)
    info = a.GetInfo(apb.GetInfoRequest(), None)
    assert sorted(p.name for p in info.pools) == sorted(p.name for p in POOLS)
    # and it is not looked for again on every GetInfo (an LVM command each time: seconds on a loaded node),
    # only after ABSENT_TTL
    looked = lambda: [c for c in fake_run.calls if "vg-not-here" in " ".join(c)]  # noqa: E731
    assert looked()
    before = len(looked())
    a.GetInfo(apb.GetInfoRequest(), None)
    assert len(looked()) == before


def test_a_late_lvm_report_is_replaced_by_the_last_one_for_a_while(agent, monkeypatch):
    """On a loaded storage node `dmsetup status` / `vgs` can outlast GetInfo's deadline (seen in the Kubernetes
    tier, where GetInfo then failed and the controller counted the node down). The last report serves for up to
    STALE_REPORT_MAX seconds; after that the error is GetInfo's again."""
    from csi import errors
    a, run, sim = agent
    now = [1000.0]
    monkeypatch.setattr(agent_capacity.time, "monotonic", lambda: now[0])
    before = {p.name: p for p in a.GetInfo(apb.GetInfoRequest(), None).pools}

    def late(*args, **kwargs):
        raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED, "dmsetup status vg-tp-tpool: timed out after 2.0s")
    monkeypatch.setattr(a.lvm, "thin_pool_fill", late)
    monkeypatch.setattr(a.lvm, "vg", late)
    now[0] += agent_capacity.VG_REPORT_TTL + 0.1
    after = {p.name: p for p in a.GetInfo(apb.GetInfoRequest(), None).pools}
    assert after["thin"].data_percent == before["thin"].data_percent
    assert after["thick"].available_bytes == before["thick"].available_bytes
    now[0] += agent_capacity.STALE_REPORT_MAX
    with pytest.raises(errors.CsiError) as e:
        a.GetInfo(apb.GetInfoRequest(), None)
    assert e.value.code == errors.Code.DEADLINE_EXCEEDED


def test_a_slow_lvm_report_is_waited_for_briefly_and_taken_by_the_next_getinfo(agent, monkeypatch):
    """A report that is slow, not failed: GetInfo waits REPORT_WAIT for it and then serves the last one; the
    read is not killed, one read runs per report however many GetInfo come meanwhile, and the next GetInfo
    after it finished takes its result."""
    import threading
    a, run, sim = agent
    monkeypatch.setattr(agent_capacity, "REPORT_WAIT", 0.3)
    monkeypatch.setattr(agent_capacity, "POOL_REPORT_TTL", 0.0)
    before = {p.name: p for p in a.GetInfo(apb.GetInfoRequest(), None).pools}
    real_fill, reads, go = a.lvm.thin_pool_fill, [], threading.Event()

    def slow(vg, pool):
        reads.append(pool)
        go.wait(10)
        fill = real_fill(vg, pool)
        return dataclasses.replace(fill, data_percent=fill.data_percent + 7.0)
    monkeypatch.setattr(a.lvm, "thin_pool_fill", slow)
    for _ in range(3):
        started = time.monotonic()
        info = {p.name: p for p in a.GetInfo(apb.GetInfoRequest(), None).pools}
        assert time.monotonic() - started < 2.0
        assert info["thin"].data_percent == before["thin"].data_percent
    assert len(reads) == 1
    go.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = {p.name: p for p in a.GetInfo(apb.GetInfoRequest(), None).pools}
        if info["thin"].data_percent != before["thin"].data_percent:
            break
        time.sleep(0.1)
    assert info["thin"].data_percent == pytest.approx(before["thin"].data_percent + 7.0)


def test_a_late_read_started_before_a_change_or_long_ago_is_not_served_as_new(monkeypatch):
    """A VG report begun before this agent's own thick create answers for the VG before it: after forget() it
    is not taken; nor is a finished read nobody took for longer than the report's TTL."""
    import threading
    monkeypatch.setattr(agent_capacity, "REPORT_WAIT", 0.2)
    late = agent_capacity.LateReads()
    go, answers = threading.Event(), iter(["before the create", "after the create", "later"])

    def slow():
        go.wait(5)
        return next(answers)
    assert late.read("vg", slow, "last", max_age=60) == "last"     # still running: the last one serves
    late.forget("vg")                                                # this agent created a thick LV meanwhile
    go.set()
    time.sleep(0.3)
    assert late.read("vg", slow, "last", max_age=60) == "after the create"
    assert late.read("vg", lambda: "fresh", "last", max_age=60) == "fresh"
    go.clear()
    assert late.read("vg", slow, "last", max_age=0.1) == "last"     # runs; nobody takes it in time
    go.set()
    time.sleep(0.4)                                                  # finished, but started > max_age ago
    assert late.read("vg", lambda: "newer", "last", max_age=0.1) == "newer"


def test_a_restore_from_an_offset_in_the_same_pool_is_a_copy_never_a_thin_snapshot(agent, monkeypatch):
    """A plain volume from a replicated volume's leg: the leg's first MiB is md's, so a thin snapshot of it
    would not be the volume's content: a new LV, and the copy reads from the offset."""
    from csi.storage import transfer
    a, run, sim = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-leg", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    snap = a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-leg", source_vg=vol.vg, source_lv=vol.lv), None)
    copied = []

    def fake_copy(service, rec, lv, pool, progress):
        copied.append(dict(rec.source))
        rec.state = "ready"
        service.records.save(rec)
    monkeypatch.setattr(transfer, "_copy", fake_copy)
    run.calls.clear()
    source = apb.VolumeSource(node="s1", vg=snap.vg, lv=snap.lv, snapshot=True, size_bytes=GiB - MiB,
                              offset_bytes=MiB)
    restored = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-plain", pool="thin", size_bytes=GiB - MiB,
                                                      attributes=ATTRIBUTES, source=source), None)
    lvcreate = [c for c in lvm_calls(run.calls) if c[0] == "lvcreate"]
    assert len(lvcreate) == 1 and "--snapshot" not in lvcreate[0] and "-s" not in lvcreate[0], lvcreate
    assert [(c["lv"], c["offset"], c["size"]) for c in copied] == [(snap.lv, MiB, GiB - MiB)]
    assert restored.exported and restored.ready
    with pytest.raises(Exception, match="multiple of 4096"):
        a.CreateVolume(apb.CreateVolumeRequest(name="pvc-odd", pool="thin", size_bytes=GiB, attributes=ATTRIBUTES,
                                               source=apb.VolumeSource(node="s1", vg=snap.vg, lv=snap.lv,
                                                                       size_bytes=GiB, offset_bytes=100)), None)


def test_start_activates_its_volumes_in_a_few_commands_whatever_their_number(agent):
    """A storage node booted again: every LV inactive. LVM reads the VG's metadata once per command, so the agent
    activates them with one lvchange per 100 (restore.ACTIVATE_BATCH), not one per volume; a batch LVM fails for
    one broken LV is done again one by one, and only that one stays down."""
    a, run, sim = agent
    a.restore()
    lvs = [a.CreateVolume(apb.CreateVolumeRequest(name=f"pvc-{i}", pool="thin", size_bytes=SIZE,
                                                  attributes=ATTRIBUTES), None).lv for i in range(250)]
    for lv in lvs:
        _deactivate(sim, "vg", lv)
    run.calls.clear()
    counts = a.restore()
    activations = [c for c in run.calls if c[:2] == ["lvchange", "--activate"]]
    assert [len(c) - 4 for c in activations] == [100, 100, 50], [c[:6] for c in activations]
    assert counts["exported"] == 250 and counts["failed"] == 0
    assert all(sim.lvs[("vg", lv)]["lv_attr"][4] == "a" for lv in lvs)

    for lv in lvs:
        _deactivate(sim, "vg", lv)
    broken = lvs[7]
    activate = sim.lvchange

    def refuse_one(argv):
        if argv[-1] == f"vg/{broken}":
            return 5, "", "  device-mapper: reload ioctl on (253:9) failed: No data available\n"
        return activate(argv)
    sim.lvchange = refuse_one
    run.responses = node_responses(sim)
    run.calls.clear()
    counts = a.restore()
    batch, = [c[4:] for c in run.calls if c[:2] == ["lvchange", "--activate"] and len(c) > 5 and f"vg/{broken}" in c]
    singles = [c[4] for c in run.calls if c[:2] == ["lvchange", "--activate"] and len(c) == 5]
    assert sorted(singles) == sorted(batch), "the failed batch, one by one"
    assert counts["exported"] == 249 and counts["failed"] == 1
    assert [lv for lv in lvs if sim.lvs[("vg", lv)]["lv_attr"][4] != "a"] == [broken]


def test_a_snapshot_is_its_origins_size_as_the_device_says_and_waits_for_no_expansion(agent, monkeypatch):
    a, _, _ = agent
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-grown", pool="thin", size_bytes=GiB,
                                                 attributes=ATTRIBUTES), None)
    req = apb.CreateSnapshotRequest(name="snap-grown", source_vg=vol.vg, source_lv=vol.lv)
    with a.locks.hold(f"{vol.vg}/{vol.lv}"):       # an expansion of the source in progress
        with pytest.raises(errors.CsiError) as busy:
            a.CreateSnapshot(req, None)
        assert busy.value.code == errors.Code.ABORTED
    # An expansion cut short after its lvextend: the record says 1 GiB, the origin's device 2 GiB.
    seen = []
    monkeypatch.setattr(snapshots.copy, "device_size", lambda path: seen.append(path) or 2 * GiB)
    snap = a.CreateSnapshot(req, None)
    assert snap.size_bytes == 2 * GiB and seen == [f"/dev/{vol.vg}/{vol.lv}"]


def test_a_start_leaves_the_reports_its_plan_read_for_the_first_getinfo(agent):
    """restore.plan reads each thin pool and lists each VG before the agent serves; GetInfo then needs no LVM
    command of its own (one would wait behind the start's activation of the VG: seen at 500 volumes, the first
    GetInfo calls timed out for 20 s)."""
    from csi.storage import restore
    a, run, _ = agent
    for i in range(3):
        a.CreateVolume(apb.CreateVolumeRequest(name=f"seeded-{i}", pool="thin", size_bytes=SIZE,
                                               attributes=ATTRIBUTES), None)
    counted = {p.name: (p.volume_count, p.available_bytes) for p in a.GetInfo(apb.GetInfoRequest(), None).pools}
    started = AgentService(a.config, a.lvm, FakeLio(), a.records, a.device_node_exists)   # the agent again
    restore.plan(started)
    run.calls.clear()
    info = started.GetInfo(apb.GetInfoRequest(), None)
    assert lvm_calls(run.calls) == [], run.calls
    assert {p.name: (p.volume_count, p.available_bytes) for p in info.pools} == counted


def test_an_inactive_thin_pool_is_activated_at_the_start_and_served_with_its_fill(agent):
    """After a reboot the pool is inactive until its first volume is, and LVM reports no fill for it, which must
    not pass for 0 % (the max_fill_percent guard would not hold). The start activates it first."""
    from csi.storage import restore
    a, run, sim = agent
    _deactivate(sim, "vg", "tp")
    sim.lvs[("vg", "tp")].update(data_percent="", metadata_percent="")   # what lvs prints for an inactive pool
    lvchange = sim.lvchange

    def activate_with_fill(argv):   # active again: LVM knows its fill
        if "--activate" in argv and "vg/tp" in argv:
            sim.lvs[("vg", "tp")].update(data_percent="91.00", metadata_percent="2.00")
        return lvchange(argv)
    run.on("lvchange", fn=activate_with_fill)
    started = AgentService(a.config, a.lvm, FakeLio(), a.records, a.device_node_exists)
    restore.plan(started)
    assert [c for c in run.calls if c[0] == "lvchange" and c[-1] == "vg/tp" and "--activate" in c], run.calls
    run.calls.clear()
    thin = {p.name: p for p in started.GetInfo(apb.GetInfoRequest(), None).pools}["thin"]
    assert lvm_calls(run.calls) == [] and round(thin.data_percent) == 91, run.calls
