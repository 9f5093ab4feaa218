"""The controller's Warning events on storage nodes (csi/controller/events.py) and on the volumes and claims a lost
node holds (csi/controller/volume_events.py): what is posted, where, once per crossing; and the poller tells them
every probe (the Kubernetes tier checks real ones on the API server)."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from types import SimpleNamespace

from csi import errors, ids
from csi.config import StorageNode
from csi.controller.agents import Agents
from csi.controller.events import NodeEvents, event_name
from csi.controller.journal import Entry, FileJournal
from csi.controller.volume_events import VolumeEvents
from csi.proto import agent_pb2 as apb
from tests.unit.test_controller import FakeAgent


class FakeApi:
    """The API server's events in namespace `default`, by name: create (409 when the name exists), list by
    name, patch."""

    def __init__(self, fail: bool = False):
        self.events, self.fail, self.creates, self.patches = {}, fail, 0, 0

    @property
    def posted(self):
        return [(ns, body) for (ns, _), body in self.events.items()]

    def create_namespaced_event(self, namespace, body, _request_timeout=None):
        from kubernetes.client.rest import ApiException
        if self.fail:
            raise RuntimeError("forbidden: events is forbidden")
        self.creates += 1
        if (namespace, body.metadata.name) in self.events:
            raise ApiException(status=409, reason="AlreadyExists")
        self.events[(namespace, body.metadata.name)] = body

    def list_namespaced_event(self, namespace, field_selector="", _request_timeout=None):
        name = field_selector.split("metadata.name=", 1)[1]
        return SimpleNamespace(items=[e for (ns, n), e in self.events.items() if ns == namespace and n == name])

    def patch_namespaced_event(self, name, namespace, patch, _request_timeout=None):
        self.patches += 1
        event = self.events[(namespace, name)]
        event.count, event.message = patch["count"], patch["message"]
        event.last_timestamp = datetime.datetime.fromisoformat(patch["lastTimestamp"])


def info(data: float, meta: float = 1.0, warn: float = 80.0, thin_pool: str = "tp") -> apb.AgentInfo:
    return apb.AgentInfo(pools=[apb.Pool(name="thin", vg="vg", thin_pool=thin_pool, data_percent=data,
                                         metadata_percent=meta, warn_fill_percent=warn, max_fill_percent=95.0)])


def age(api, seconds: float) -> None:
    """Every event's last time `seconds` earlier: a crossing long ago."""
    for event in api.events.values():
        event.last_timestamp -= datetime.timedelta(seconds=seconds)


def test_a_pool_crossing_its_warn_level_raises_one_warning_on_the_node():
    api = FakeApi()
    events = NodeEvents(api)
    events.observe("storage-1", True, info(50.0), "")
    for _ in range(3):                                   # above, polled again and again: one event
        events.observe("storage-1", True, info(85.0), "")
    events.flush()
    (namespace, body), = api.posted
    assert namespace == "default" and body.type == "Warning" and body.reason == "PoolAboveWarnLevel"
    ref = body.involved_object
    assert (ref.kind, ref.name, ref.uid, ref.api_version) == ("Node", "storage-1", "storage-1", "v1")
    assert "thin pool thin on storage-1 is 85% full" in body.message and "warn level of 80%" in body.message
    assert body.metadata.name.startswith("storage-1.poolabovewarnlevel.") and body.count == 1
    # back below, then above again a while later: the same event, raised again
    events.observe("storage-1", True, info(60.0), "")
    age(api, 3600)
    events.observe("storage-1", True, info(90.0, meta=96.0), "")
    events.flush()
    (_, body), = api.posted
    assert body.count == 2 and "metadata 96%" in body.message
    events.observe("storage-1", True, info(99.0, warn=0.0), "")   # no warn level: nothing
    events.flush()
    assert api.creates == 2 and api.patches == 1


def test_the_other_controller_replica_leaves_a_fresh_event_alone():
    api = FakeApi()
    first, second = NodeEvents(api), NodeEvents(api)
    first.observe("storage-1", True, info(85.0), "")
    first.flush()
    second.observe("storage-1", True, info(85.0), "")    # the same crossing, seen by the other replica
    second.flush()
    (_, body), = api.posted
    assert body.count == 1 and api.patches == 0
    age(api, 3600)                                        # a controller restarted an hour later, still above
    restarted = NodeEvents(api)
    restarted.observe("storage-1", True, info(85.0), "")
    restarted.flush()
    assert api.posted[0][1].count == 2


def test_a_thick_pool_is_told_about_its_volume_group():
    api = FakeApi()
    events = NodeEvents(api)
    events.observe("storage-1", True, info(85.0, thin_pool=""), "")
    events.flush()
    (_, body), = api.posted
    assert "85% of its volume group in use" in body.message and "takes no new volumes" not in body.message


def test_a_storage_node_going_down_raises_one_warning_until_it_is_back():
    api = FakeApi()
    events = NodeEvents(api)
    events.observe("storage-2", False, None, "connection refused")
    events.observe("storage-2", False, None, "connection refused")
    events.flush()
    (_, body), = api.posted
    assert body.reason == "StorageNodeDown" and "does not answer (connection refused)" in body.message
    events.observe("storage-2", True, info(10.0), "")
    age(api, 3600)
    events.observe("storage-2", False, None, "deadline exceeded")
    events.flush()
    assert api.posted[0][1].count == 2 and "deadline exceeded" in api.posted[0][1].message


def test_a_refused_post_is_logged_and_nothing_waits_for_it(caplog):
    events = NodeEvents(FakeApi(fail=True))
    events.observe("storage-1", False, None, "gone")
    events.flush()
    assert "could not post the StorageNodeDown event on Node storage-1: forbidden" in caplog.text
    NodeEvents(None).observe("storage-1", False, None, "gone")   # outside a cluster: the log line only


def test_the_poller_tells_the_observer_every_probe():
    seen = []

    class Down(FakeAgent):
        def info(self, timeout=None, reconnect=True):
            raise errors.unavailable("connection refused")

    fakes = [FakeAgent(StorageNode("s1", "10.0.0.11:7600", "a"), 10 << 30),
             Down(StorageNode("s2", "10.0.0.12:7600", "a"), 10 << 30)]
    by_name = {f.node.name: f for f in fakes}

    def factory(node, health):
        by_name[node.name].health = health
        return by_name[node.name]
    agents = Agents(Path("/nonexistent"), nodes=[f.node for f in fakes], client_factory=factory,
                    observe=lambda node, up, agent_info, error: seen.append((node, up, agent_info is not None,
                                                                             bool(error))))
    agents.poll_once()
    assert sorted(seen) == [("s1", True, True, False), ("s2", False, False, True)]


class FakeVolumesApi(FakeApi):
    """FakeApi with PersistentVolumes to list."""

    def __init__(self, pvs):
        super().__init__()
        self.pvs = pvs

    def list_persistent_volume(self, _request_timeout=None):
        return SimpleNamespace(items=self.pvs)


def pv(name: str, handle: str, driver: str = "lvm-iscsi.csi.dev", claim: tuple[str, str] | None = None,
       phase: str = "Bound"):
    ref = SimpleNamespace(name=claim[1], namespace=claim[0], uid=f"uid-{claim[1]}") if claim else None
    return SimpleNamespace(metadata=SimpleNamespace(name=name, uid=f"uid-{name}"),
                           spec=SimpleNamespace(csi=SimpleNamespace(driver=driver, volume_handle=handle),
                                                claim_ref=ref), status=SimpleNamespace(phase=phase))


def test_a_storage_node_going_down_warns_on_the_volumes_and_claims_with_data_on_it(tmp_path):
    journal = FileJournal(tmp_path / "journal")
    for key, nodes in (("lv-rep", ("storage-1", "storage-2")), ("lv-far", ("storage-2", "storage-3"))):
        journal.claim(Entry(key=key, kind="volume", name=key, node=nodes[0],
                            legs=[{"node": n, "pool": "thin", "vg": "vg", "state": "in-sync"} for n in nodes]))
    api = FakeVolumesApi([
        pv("pv-plain", "v1:storage-1:vg:lv-plain", claim=("apps", "data")),
        pv("pv-rep", ids.replicated_volume_id("lv-rep"), claim=("apps", "mirrored")),
        pv("pv-other-node", "v1:storage-2:vg:lv-other"),
        pv("pv-far", ids.replicated_volume_id("lv-far")),                    # no leg on storage-1
        pv("pv-unknown", ids.replicated_volume_id("lv-gone")),               # no record: nothing to say
        pv("pv-other-driver", "v1:storage-1:vg:lv-x", driver="other.csi.dev"),
        pv("pv-released", "v1:storage-1:vg:lv-old", claim=("gone", "deleted-claim"), phase="Released"),
        SimpleNamespace(metadata=SimpleNamespace(name="pv-nfs", uid="u"), spec=SimpleNamespace(csi=None)),
    ])
    events = NodeEvents(api, VolumeEvents(api, journal, "lvm-iscsi.csi.dev"))
    events.observe("storage-1", False, None, "connection refused")
    events.observe("storage-1", False, None, "connection refused")          # still down: nothing more
    events.flush()
    about = {(ns, b.involved_object.kind, b.involved_object.name): b for ns, b in api.posted}
    assert sorted(about) == [("apps", "PersistentVolumeClaim", "data"), ("apps", "PersistentVolumeClaim", "mirrored"),
                             ("default", "Node", "storage-1"), ("default", "PersistentVolume", "pv-plain"),
                             ("default", "PersistentVolume", "pv-released"), ("default", "PersistentVolume", "pv-rep")]
    # the node's own event first; a Released PV's claim (maybe gone with its namespace) gets none
    plain, claim = about[("default", "PersistentVolume", "pv-plain")], about[("apps", "PersistentVolumeClaim", "data")]
    assert plain.reason == claim.reason == "VolumeInaccessible" and plain.type == "Warning"
    assert "storage node storage-1, which holds this volume, does not answer (connection refused)" in plain.message
    assert plain.involved_object.uid == "uid-pv-plain" and claim.involved_object.uid == "uid-data"
    assert claim.involved_object.namespace == "apps" and claim.metadata.namespace == "apps"
    rep = about[("default", "PersistentVolume", "pv-rep")]
    assert rep.reason == "ReplicaLegUnreachable" and "runs degraded on its other leg" in rep.message
    assert "replace-replica-leg" in rep.message
    # The other controller replica sees the same transition: the fresh events are left alone.
    other = NodeEvents(api, VolumeEvents(api, journal, "lvm-iscsi.csi.dev"))
    other.observe("storage-1", False, None, "connection refused")
    other.flush()
    assert api.patches == 0 and len(api.posted) == 6
    assert list(api.events)[0] == ("default", event_name("storage-1", "StorageNodeDown", ""))
    # storage-2 goes down too: lv-rep has no leg left (inaccessible), lv-far one (degraded)
    events.observe("storage-2", False, None, "no route to host")
    events.flush()
    rep = [b for _, b in api.posted if b.involved_object.name == "pv-rep" and "storage-2" in b.message]
    assert [b.reason for b in rep] == ["VolumeInaccessible"] and "other leg is down too" in rep[0].message
    far = [b for _, b in api.posted if b.involved_object.name == "pv-far"]
    assert [b.reason for b in far] == ["ReplicaLegUnreachable"]


def test_volume_events_follow_the_nodes_as_they_are_when_posted_not_when_probed(tmp_path):
    """The posting thread may get to a node's volumes well after the probe (behind slow posts): a node back by
    then gets no volume events, and a replicated volume made meanwhile, whose other leg's node is back too, is
    degraded at worst, never inaccessible from the probe's stale view."""
    journal = FileJournal(tmp_path / "journal")
    api = FakeVolumesApi([])
    events = NodeEvents(api, VolumeEvents(api, journal, "lvm-iscsi.csi.dev"))
    held = threading.Event()
    events._todo.put(held.wait)              # a slow post ahead of everything observed below
    events.observe("storage-1", False, None, "connection refused")     # both agents restart at once
    events.observe("storage-2", False, None, "connection refused")
    events.observe("storage-2", True, info(10.0), "")                  # storage-2 back
    journal.claim(Entry(key="lv-rep", kind="volume", name="lv-rep", node="storage-1",
                        legs=[{"node": n, "pool": "thin", "vg": "vg", "state": "in-sync"}
                              for n in ("storage-1", "storage-2")]))
    api.pvs.append(pv("pv-rep", ids.replicated_volume_id("lv-rep"), claim=("apps", "mirrored")))   # made meanwhile
    held.set()
    events.flush()
    about = sorted((b.involved_object.kind, b.involved_object.name, b.reason, "storage-2" in b.message)
                   for _, b in api.posted)
    assert about == [("Node", "storage-1", "StorageNodeDown", False), ("Node", "storage-2", "StorageNodeDown", True),
                     ("PersistentVolume", "pv-rep", "ReplicaLegUnreachable", False),
                     ("PersistentVolumeClaim", "mirrored", "ReplicaLegUnreachable", False)], about
    assert all("storage node storage-1" in b.message for _, b in api.posted if b.reason == "ReplicaLegUnreachable")


def test_volume_event_names_are_fixed_short_and_apart_per_kind():
    from csi.controller.volume_events import _name
    pv_name = _name("PersistentVolume", "data", "VolumeInaccessible", "storage-1")
    assert pv_name != _name("PersistentVolumeClaim", "data", "VolumeInaccessible", "storage-1")
    assert pv_name == _name("PersistentVolume", "data", "VolumeInaccessible", "storage-1")
    long = _name("PersistentVolumeClaim", "a" * 199 + "-" + "b" * 53, "ReplicaLegUnreachable", "storage-1")
    assert len(long) <= 253 and long.startswith("a" * 199 + ".replicalegunreachable.")


def test_an_unreadable_journal_still_lets_the_plain_volumes_be_told(tmp_path):
    class Broken:
        def entries(self):
            raise RuntimeError("the API server timed out")
    api = FakeVolumesApi([pv("pv-plain", "v1:storage-1:vg:a"), pv("pv-rep", ids.replicated_volume_id("lv-rep"))])
    events = NodeEvents(api, VolumeEvents(api, Broken(), "lvm-iscsi.csi.dev"))
    events.observe("storage-1", False, None, "gone")
    events.flush()
    assert sorted(b.involved_object.name for _, b in api.posted) == ["pv-plain", "storage-1"]


def test_a_volume_event_refused_does_not_stop_the_others(tmp_path, caplog):
    api = FakeVolumesApi([pv("pv-a", "v1:storage-1:vg:a"), pv("pv-b", "v1:storage-1:vg:b")])
    api.fail = True
    events = NodeEvents(api, VolumeEvents(api, FileJournal(tmp_path / "journal"), "lvm-iscsi.csi.dev"))
    events.observe("storage-1", False, None, "gone")
    events.flush()
    assert "could not post the VolumeInaccessible event on PersistentVolume pv-a: forbidden" in caplog.text
    assert "could not post the VolumeInaccessible event on PersistentVolume pv-b: forbidden" in caplog.text
