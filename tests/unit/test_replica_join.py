"""A leg replaced on another storage node while the worker runs the array (csi/node/replica_join.py, through the
reconciler of csi/node/replicated.py): the record names the new leg before anything changes, the old leg leaves
the array and is logged out, the new one is logged in and added, and only a blank disk (or one of this array)
is ever added."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from csi import ids
from csi.node import credentials, health, mount, raid, replicated
from csi.node.iscsi import Session
from csi.node.ledger import LoginLedger
from csi.proto import agent_pb2 as apb
from csi.server import KeyLocks

KEY = "c1-pvc-0123456789abcdef"
VOLUME_ID = ids.replicated_volume_id(KEY)


# Every storage node has a VG of one name, as a chart installs them: the legs share a target IQN and only their
# portals tell them apart.
VG = "csi-vg"
IQN = ids.target_iqn(VG, KEY)


def portal(n):
    return f"10.0.0.{n}:3260"


def leg(n):
    return {"node": f"storage-{n}", "vg": VG, "outdated": False, "iqn": IQN, "portals": [portal(n)], "lun": 0,
            "agent": f"10.0.0.{n}:7600"}


NEW = apb.LegLocation(index=0, storage_node="storage-3", vg=VG, agent="10.0.0.3:7600", target_iqn=IQN,
                      portals=[portal(3)], lun=0, replaces=["storage-1"])


class World:
    """storage-1's leg (/dev/sdc) failed out of the array, storage-2's (/dev/sdb) running it; storage-2's
    agent names `peer` for leg 0. iscsi, md and blkid are recorded, not run."""

    def __init__(self, tmp_path, monkeypatch, peer=NEW, blank=True, superblock=None):
        self.done, self.logged_in, self.peer = [], {portal(1): "FAILED", portal(2): "LOGGED_IN"}, peer
        self.devices = {portal(1): "/dev/sdc", portal(2): "/dev/sdb"}
        state = tmp_path / "state"
        state.mkdir()
        self.ledger = LoginLedger(state / "logins")
        self.ledger.add(IQN)
        iscsi = SimpleNamespace(
            sessions=lambda: [Session(n, p, IQN) for n, p in enumerate(self.logged_in)],
            session_state=lambda s: self.logged_in[s.portal],
            find_device=lambda t: Path(self.devices[t.portals[0]]) if t.portals[0] in self.devices else None,
            login=self._login, logout_portals=self._logout)
        self.svc = SimpleNamespace(config=SimpleNamespace(state_dir=state, tls_dir=Path("/tls")), iscsi=iscsi,
                                   ledger=self.ledger, locks=KeyLocks(), _with_credentials=lambda t, a, r: t)
        self.svc._record_path = lambda v: state / (hashlib.sha256(v.encode()).hexdigest()[:32] + ".json")
        self.svc._record = lambda v: json.loads(self.svc._record_path(v).read_text())
        self.svc._record_path(VOLUME_ID).write_text(json.dumps(
            {"volume_id": VOLUME_ID, "replicated": True, "key": KEY, "staging": "/s", "block": True,
             "read_only": False, "legs": [leg(1), leg(2)]}))
        self.members = {"/dev/sdb": "in_sync", "/dev/sdc": "faulty"}
        monkeypatch.setattr(raid, "status", lambda key: raid.Array(
            Path("/dev/md127"), tuple(raid.Member(d, st) for d, st in self.members.items()), 1, "idle", "none"))
        monkeypatch.setattr(raid, "examine", lambda dev: superblock)
        monkeypatch.setattr(mount, "probe", lambda dev: mount.Signatures() if blank
                            else mount.Signatures("ext4", "filesystem"))
        for name in ("add", "readd", "drop_failed"):
            monkeypatch.setattr(raid, name, lambda *a, _n=name, **kw: self._md(_n, *a, **kw))
        monkeypatch.setattr(health, "connects", lambda address: address != "10.0.0.1:7600")
        monkeypatch.setattr(credentials, "peer_leg", self._peer_leg)
        self.rep = replicated.Replicated(self.svc)

    def _md(self, change, key, device=None, **kw):
        self.done.append((change,) + ((device,) if device else ()) + tuple(kw.values()))
        if device is not None:
            self.members[str(device)] = "in_sync"

    def _peer_leg(self, tls_dir, att, vg, key, timeout):
        self.done.append(("ask", att.storage_node))
        return apb.PeerLeg(present=True, peer=self.peer) if self.peer else apb.PeerLeg(present=False)

    def _login(self, target):
        self.done.append(("login", target.portals[0]))
        self.logged_in[target.portals[0]] = "LOGGED_IN"
        self.devices[target.portals[0]] = "/dev/sdd"

    def _logout(self, iqn, portals):
        assert iqn == IQN
        for p in portals:
            self.done.append(("logout", p))
            self.logged_in.pop(p, None)
            self.devices.pop(p, None)

    def record(self):
        return self.svc._record(VOLUME_ID)


def test_a_replaced_leg_is_swapped_in_and_added_for_a_full_copy(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    w.rep.reconcile()
    rec = w.record()
    assert [(x["node"], x.get("joining", False)) for x in rec["legs"]] == [("storage-3", True), ("storage-2", False)]
    assert rec["legs"][0]["portals"] == [portal(3)] and rec["retired"] == [{"iqn": IQN, "portals": [portal(1)]}]
    assert w.done == [("ask", "storage-2"), ("drop_failed",), ("login", portal(3))]
    assert w.ledger.targets() == {IQN}          # storage-2's and storage-3's legs use it
    w.done.clear()
    w.rep.reconcile()                  # its session carries I/O now: the blank disk is added
    assert w.done == [("drop_failed",), ("add", Path("/dev/sdd"))]
    assert [x.get("joining", False) for x in w.record()["legs"]] == [False, False]
    w.done.clear()
    w.rep.reconcile()                  # in the array: only now is storage-1's portal logged out of
    assert w.done == [("logout", portal(1))] and w.record()["retired"] == []


def test_a_crash_after_the_record_named_the_new_leg_finishes_on_the_next_round(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    monkeypatch.setattr(raid, "drop_failed", lambda key: (_ for _ in ()).throw(OSError("killed")))
    w.rep.reconcile()
    assert w.record()["retired"] == [{"iqn": IQN, "portals": [portal(1)]}]
    assert w.record()["legs"][0]["node"] == "storage-3"
    monkeypatch.setattr(raid, "drop_failed", lambda key: w.done.append(("drop_failed",)))
    for _ in range(3):                 # no answer needed again: the record knows
        w.rep.reconcile()
    assert [d for d in w.done if d[0] in ("login", "add", "logout")] == [
        ("login", portal(3)), ("add", Path("/dev/sdd")), ("logout", portal(1))]
    assert w.record()["retired"] == []


@pytest.mark.parametrize("blank, superblock, added", [
    (False, None, None),                                                        # data on it: never added
    (True, raid.Superblock("u", "lvmiscsi:ffffffffffffffff", 3, "AA"), None),   # another array's
    (True, raid.Superblock("u", ids.md_name(KEY), 3, "AA"), "readd"),           # ours: a crash after the add
])
def test_only_a_blank_disk_or_one_of_this_array_joins(tmp_path, monkeypatch, blank, superblock, added):
    w = World(tmp_path, monkeypatch, blank=blank, superblock=superblock)
    w.rep.reconcile()
    w.done.clear()
    w.rep.reconcile()
    assert [d[0] for d in w.done if d[0] in ("add", "readd")] == ([added] if added else [])
    assert w.record()["legs"][0].get("joining", False) is (added is None)


@pytest.mark.parametrize("peer", [
    None,                                                                        # nothing replaced
    apb.LegLocation(index=0, storage_node="storage-1", vg=VG, agent="10.0.0.1:7600", target_iqn=IQN,
                    portals=[portal(1)]),                                        # where the record says already
    apb.LegLocation(index=0, storage_node="storage-2", vg=VG, agent="10.0.0.2:7600", target_iqn=IQN,
                    portals=[portal(2)], replaces=["storage-1"]),                # the asking leg's own node
    apb.LegLocation(index=0, storage_node="storage-3", vg=VG, agent="10.0.0.3:7600",
                    target_iqn=ids.target_iqn(VG, "c1-another"), portals=[portal(3)],
                    replaces=["storage-1"]),                                     # another LV
    apb.LegLocation(index=1, storage_node="storage-3", vg=VG, agent="10.0.0.3:7600", target_iqn=IQN,
                    portals=[portal(3)], replaces=["storage-2"]),                # the leg in the array
    apb.LegLocation(index=0, storage_node="storage-3", vg=VG, agent="10.0.0.3:7600", target_iqn=IQN,
                    portals=[portal(3)], replaces=["storage-9"]),                # older: replaced again since
])
def test_an_answer_naming_nothing_new_or_not_this_volumes_leg_changes_nothing(tmp_path, monkeypatch, peer):
    w = World(tmp_path, monkeypatch, peer=peer)
    before = w.record()
    w.rep.reconcile()
    assert w.record() == before and not [d for d in w.done if d[0] in ("login", "logout", "add", "drop_failed")]


def test_a_repeated_stage_with_the_old_publish_context_keeps_the_joined_leg(tmp_path, monkeypatch):
    """Kubernetes repeats NodeStageVolume with the publish_context it has, which names the lost leg: the record
    of the running array, which names what is logged in, stays."""
    from csi import contract
    w = World(tmp_path, monkeypatch)
    w.rep.reconcile()
    w.rep.reconcile()
    joined = w.record()
    ctx = contract.replicated_publish_context([
        (contract.publish_context(IQN, [portal(n)], 0, f"storage-{n}", f"10.0.0.{n}:7600"), f"storage-{n}", VG, False)
        for n in (1, 2)])
    w.rep.stage(VOLUME_ID, ctx, Path("/s"), SimpleNamespace(block=True, read_only=False), None)
    assert w.record() == joined


def test_a_leg_granted_after_its_publish_is_logged_in_and_re_added_as_recorded(tmp_path, monkeypatch):
    """The publish left storage-1's leg out (its node did not answer; the record has no target for it), and the
    controller granted it since (csi/controller/late_grants.py): the same leg, so it keeps its outdated mark and
    md re-adds it (the bitmap, or a full copy when outdated); there is nothing to log out of."""
    mine = raid.Superblock("u", ids.md_name(KEY), 3, "AA")
    w = World(tmp_path, monkeypatch, peer=apb.LegLocation(index=0, storage_node="storage-1", vg=VG,
                                                          agent="10.0.0.1:7600", target_iqn=IQN,
                                                          portals=[portal(1)]), superblock=mine)
    rec = w.record()
    rec["legs"][0] = {"node": "storage-1", "vg": VG, "outdated": True}
    w.svc._record_path(VOLUME_ID).write_text(json.dumps(rec))
    del w.logged_in[portal(1)], w.devices[portal(1)]
    monkeypatch.setattr(health, "connects", lambda address: True)
    w.rep.reconcile()
    assert w.done == [("ask", "storage-2"), ("drop_failed",), ("login", portal(1))]
    assert w.record()["legs"][0]["outdated"] is True and w.record()["retired"] == []
    w.done.clear()
    w.rep.reconcile()
    assert w.done == [("readd", Path("/dev/sdd"), True)]    # outdated: a full copy


def test_a_leg_whose_session_is_logged_in_is_not_replaced(tmp_path, monkeypatch):
    """Out of the array but logged in (udev has yet to make its disk's link, or md is about to take it back):
    not a lost leg, whatever an agent says."""
    w = World(tmp_path, monkeypatch)
    w.logged_in[portal(1)] = "LOGGED_IN"
    del w.devices[portal(1)]
    before = w.record()
    w.rep.reconcile()
    assert w.record() == before and not [d for d in w.done if d[0] in ("ask", "logout", "drop_failed")]


def test_a_stage_with_a_publish_context_from_before_a_replacement_takes_the_new_leg(tmp_path, monkeypatch):
    """Kubernetes kept the publish_context of a publish before storage-1's leg was replaced (the pod restarted
    on the same node, or the node rebooted): the stage asks storage-2's agent and assembles from storage-3's leg
    instead of refusing over the lost one."""
    from csi import contract
    w = World(tmp_path, monkeypatch)
    legs = contract.parse_replicated(contract.replicated_publish_context([
        (contract.publish_context(IQN, [portal(n)], 0, f"storage-{n}", f"10.0.0.{n}:7600"), f"storage-{n}", VG, False)
        for n in (1, 2)]), KEY)
    now = w.rep._current_legs(KEY, legs)
    assert [(x.storage_node, x.attachment.portals, x.outdated, x.seed) for x in now] == [
        ("storage-3", (portal(3),), False, False), ("storage-2", (portal(2),), False, False)]
    w.peer = apb.LegLocation(index=0, storage_node="storage-3", vg=VG, agent="10.0.0.3:7600", target_iqn=IQN,
                             portals=[portal(3)], replaces=["storage-9"])
    assert w.rep._current_legs(KEY, legs) == legs                      # an older location: nothing changes


def test_a_worker_with_no_replicated_volume_lists_no_sessions_each_round(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    listed = []
    w.svc.iscsi.sessions = lambda: listed.append(1) or []
    w.svc._record_path(VOLUME_ID).unlink()
    w.rep.reconcile()
    assert listed == [] and w.done == []
    w.svc._record_path(VOLUME_ID).write_text(json.dumps(
        {"volume_id": VOLUME_ID, "replicated": True, "key": KEY, "staging": "/s", "block": True,
         "read_only": False, "legs": [leg(1), leg(2)]}))
    w.rep.reconcile()
    assert listed == [1]
