"""The controller's Warning events on storage nodes (csi/controller/events.py): what is posted, where, once per
crossing; and the poller tells them every probe (the Kubernetes tier checks a real one on the API server)."""

from __future__ import annotations

from pathlib import Path

from csi import errors
from csi.config import StorageNode
from csi.controller.agents import Agents
from csi.controller.events import NodeEvents
from csi.proto import agent_pb2 as apb
from tests.unit.test_controller import FakeAgent


class FakeApi:
    def __init__(self, fail: bool = False):
        self.posted, self.fail = [], fail

    def create_namespaced_event(self, namespace, body, _request_timeout=None):
        if self.fail:
            raise RuntimeError("forbidden: events is forbidden")
        self.posted.append((namespace, body))


def info(data: float, meta: float = 1.0, warn: float = 80.0) -> apb.AgentInfo:
    return apb.AgentInfo(pools=[apb.Pool(name="thin", vg="vg", thin_pool="tp", data_percent=data,
                                         metadata_percent=meta, warn_fill_percent=warn, max_fill_percent=95.0)])


def test_a_pool_crossing_its_warn_level_posts_one_warning_on_the_node():
    api = FakeApi()
    events = NodeEvents(api)
    events.observe("storage-1", True, info(50.0), "")
    assert api.posted == []
    for _ in range(3):                                   # above, polled again and again: one event
        events.observe("storage-1", True, info(85.0), "")
    (namespace, body), = api.posted
    assert namespace == "default" and body.type == "Warning" and body.reason == "PoolAboveWarnLevel"
    ref = body.involved_object
    assert (ref.kind, ref.name, ref.uid, ref.api_version) == ("Node", "storage-1", "storage-1", "v1")
    assert "pool thin on storage-1 is 85% full" in body.message and "warn level of 80%" in body.message
    events.observe("storage-1", True, info(60.0), "")   # back below, then above again: a second event
    events.observe("storage-1", True, info(90.0, meta=96.0), "")
    assert len(api.posted) == 2 and "metadata 96%" in api.posted[1][1].message
    events.observe("storage-1", True, info(99.0, warn=0.0), "")   # no warn level: nothing
    assert len(api.posted) == 2


def test_a_storage_node_going_down_posts_one_warning_until_it_is_back():
    api = FakeApi()
    events = NodeEvents(api)
    events.observe("storage-2", False, None, "connection refused")
    events.observe("storage-2", False, None, "connection refused")
    assert [b.reason for _, b in api.posted] == ["StorageNodeDown"]
    assert "does not answer (connection refused)" in api.posted[0][1].message
    events.observe("storage-2", True, info(10.0), "")
    events.observe("storage-2", False, None, "deadline exceeded")
    assert [b.reason for _, b in api.posted] == ["StorageNodeDown", "StorageNodeDown"]


def test_a_refused_post_is_logged_and_the_poller_goes_on(caplog):
    events = NodeEvents(FakeApi(fail=True))
    events.observe("storage-1", False, None, "gone")
    assert "could not post the StorageNodeDown event for storage-1: forbidden" in caplog.text
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
