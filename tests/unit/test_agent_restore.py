"""The agent's start while it serves (restore.start): every volume of its records is held in its key locks
from before it listens until that volume is back, so a call on one gets ABORTED with the reason meanwhile (the
sidecars retry) while calls on the volumes already back, on new volumes and GetInfo are served."""

from __future__ import annotations

import threading

import pytest

from csi import errors, metrics
from csi.proto import agent_pb2 as apb
from csi.server import KeyLocks
from csi.storage import restore
from csi.storage.service import AgentService
from tests.unit.test_agent_cost import ATTRIBUTES, SIZE, WORKER, _deactivate, agent  # noqa: F401 - fixture

WAIT = 10


def restarted(a: AgentService, sim) -> AgentService:
    """The same storage node after a reboot: LIO empty, every LV inactive, a new agent process."""
    a.lio.reset()
    for (vg, lv), row in list(sim.lvs.items()):
        if row["lv_attr"].startswith("V"):     # the volumes, not their thin pool
            _deactivate(sim, vg, lv)
    return AgentService(a.config, a.lvm, a.lio, a.records, sim.device_node_exists)


def left(service) -> float:
    """The agent's restore_volumes_left gauge, as a scrape reads it."""
    family, = [f for f in metrics.AgentCollector(service).collect() if f.name == "lvm_iscsi_csi_restore_volumes_left"]
    return family.samples[0].value


def test_a_volume_is_served_once_it_is_back_while_the_others_still_come_back(agent):
    a, run, sim = agent
    a.restore()
    vols = [a.CreateVolume(apb.CreateVolumeRequest(name=f"pvc-{i}", pool="thin", size_bytes=SIZE,
                                                   attributes=ATTRIBUTES), None) for i in range(2)]
    for v in vols:
        a.GrantAccess(apb.GrantAccessRequest(vg=v.vg, lv=v.lv, initiator_iqn=WORKER), None)
    b = restarted(a, sim)
    assert not b.lio.targets and all(sim.lvs[(v.vg, v.lv)]["lv_attr"][4] == "-" for v in vols)
    exported, reached, go, then_ran = [], threading.Event(), threading.Event(), threading.Event()
    export = b.lio.export

    def second_waits(iqn, backstore, device, thin):
        if threading.current_thread().name == "restore":
            exported.append(backstore)
            if len(exported) == 2:
                reached.set()
                assert go.wait(WAIT)
        return export(iqn, backstore, device, thin)
    b.lio.export = second_waits
    thread = b.start_restore(then=(then_ran.set,))
    assert reached.wait(WAIT)
    back, coming = (next(v for v in vols if v.lv == exported[i]) for i in (0, 1))

    assert left(b) == 1
    info = b.GetInfo(apb.GetInfoRequest(), None)
    assert not info.ready and info.not_ready_reason == "restoring exports after the agent's start: 1 of 2 volumes left"
    b.GrantAccess(apb.GrantAccessRequest(vg=back.vg, lv=back.lv, initiator_iqn=WORKER), None)   # served
    assert b.GetVolume(apb.GetVolumeRequest(vg=back.vg, lv=back.lv), None).healthy
    with pytest.raises(errors.CsiError) as refused:
        b.GrantAccess(apb.GrantAccessRequest(vg=coming.vg, lv=coming.lv, initiator_iqn=WORKER), None)
    assert refused.value.code == errors.Code.ABORTED
    assert refused.value.message == f"{coming.vg}/{coming.lv} is being brought back after the agent's start: retry"
    got = b.GetVolume(apb.GetVolumeRequest(vg=coming.vg, lv=coming.lv), None)
    assert (got.healthy, got.condition_reason) == (False, "ExportBeingRestored")
    made = b.CreateVolume(apb.CreateVolumeRequest(name="pvc-new", pool="thin", size_bytes=SIZE,
                                                  attributes=ATTRIBUTES), None)   # a new volume meanwhile
    assert made.exported and not then_ran.is_set()

    go.set()
    thread.join(WAIT)
    assert not thread.is_alive() and then_ran.is_set()
    info = b.GetInfo(apb.GetInfoRequest(), None)
    assert info.ready and info.not_ready_reason == "" and left(b) == 0
    b.GrantAccess(apb.GrantAccessRequest(vg=coming.vg, lv=coming.lv, initiator_iqn=WORKER), None)
    got = b.GetVolume(apb.GetVolumeRequest(vg=coming.vg, lv=coming.lv), None)
    assert got.healthy and got.exported
    assert set(b.lio.targets) == {v.target_iqn for v in (*vols, made)}


def test_a_start_that_fails_unexpectedly_frees_every_volume_and_calls_fatal(agent, monkeypatch):
    a, run, sim = agent
    a.restore()
    vol = a.CreateVolume(apb.CreateVolumeRequest(name="pvc-0", pool="thin", size_bytes=SIZE,
                                                 attributes=ATTRIBUTES), None)
    b = restarted(a, sim)

    def broken(lvm, wanted):
        raise RuntimeError("a bug")
    monkeypatch.setattr(restore, "_activate", broken)
    fatal, then_ran = threading.Event(), threading.Event()
    b.start_restore(then=(then_ran.set,), fatal=fatal.set).join(WAIT)
    assert fatal.is_set() and not then_ran.is_set()
    assert b.GetInfo(apb.GetInfoRequest(), None).ready
    assert not b.locks.reserved(f"{vol.vg}/{vol.lv}")
    with b.locks.hold(f"{vol.vg}/{vol.lv}"):
        pass


def test_reserved_keys_refuse_with_their_reason_until_released():
    locks = KeyLocks()
    locks.reserve(["vg/a", "vg/b", ""], "being brought back")
    with pytest.raises(errors.CsiError, match="^ABORTED: vg/a is being brought back: retry$"):
        with locks.hold("vg/a"):
            pass
    with locks.hold("vg/c"):
        with pytest.raises(errors.CsiError, match="already in progress"):
            with locks.hold("vg/c"):
                pass
        with pytest.raises(RuntimeError, match="vg/c"):
            locks.reserve(["vg/c"], "x")
    locks.release("vg/a")
    locks.release("vg/c")          # never reserved: a release leaves a held key alone
    assert not locks.reserved("vg/a") and locks.reserved("vg/b")
    with locks.hold("vg/a"):
        pass
