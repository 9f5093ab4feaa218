"""How the controller tells a storage node that is gone from one that is slow (issue 14), over real gRPC
channels on loopback: a refusal that lasts is UNAVAILABLE (the node is down at once), an accepted connection
that answers nothing in time is DEADLINE_EXCEEDED (counted, down only after SLOW_PROBES_DOWN); a probe never
waits for a refused channel to come back, and a placement never waits for a probe that already runs."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi import errors, runner
from csi.config import StorageNode
from csi.controller import agents as agents_module
from csi.controller.agents import AgentClient, Agents, Health
from csi.proto import agent_pb2 as apb
from tests.unit.test_controller import _Channel


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts connections and never says a word: a node whose kernel answers, its agent not."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for s in held:
        s.close()
    srv.close()


def _client(port: int) -> AgentClient:
    address = f"127.0.0.1:{port}"
    return AgentClient(StorageNode("s1", address, ""), grpc.insecure_channel(address), Health())


def _code(fn) -> tuple[errors.Code, str, float]:
    started = time.monotonic()
    with pytest.raises(errors.CsiError) as e:
        fn()
    return e.value.code, e.value.message, time.monotonic() - started


def test_a_refusal_that_outlasts_the_reconnect_wait_is_unreachable_not_slow():
    client = _client(_closed_port())
    try:
        with runner.deadline(30):
            code, message, took = _code(lambda: client.call("GetInfo", apb.GetInfoRequest(), timeout=3))
        assert code == errors.Code.UNAVAILABLE and "unreachable" in message, message
        assert 2.0 < took < 6.0, took          # it did wait for the channel, once, within the call's time
    finally:
        client.channel.close()


def test_a_probe_does_not_wait_for_a_refused_channel():
    client = _client(_closed_port())
    try:
        with runner.deadline(30):
            code, _, took = _code(lambda: client.info(timeout=10, reconnect=False))
        assert code == errors.Code.UNAVAILABLE and took < 2.0, took
    finally:
        client.channel.close()


def test_a_connection_that_answers_nothing_is_slow_not_down(silent_port):
    client = _client(silent_port)
    try:
        with runner.deadline(30):
            code, message, took = _code(lambda: client.info(timeout=2, reconnect=False))
        assert code == errors.Code.DEADLINE_EXCEEDED and "did not answer in time" in message, message
        assert took >= 1.5
    finally:
        client.channel.close()


class _Hanging:
    """A node whose GetInfo hangs after its first answer, as a storage node's LVM reports on a loaded node."""

    def __init__(self, node: StorageNode):
        self.node, self.channel, self.health = node, _Channel(), Health()
        self.answered = 0
        self.release = threading.Event()

    def info(self, timeout=None, reconnect=True):
        if self.answered:
            self.release.wait(timeout)
            raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED, f"storage node {self.node.name} did not answer")
        self.answered += 1
        return apb.AgentInfo(node_name=self.node.name, pools=[apb.Pool(name="thin", vg="vg", thin_pool="tp",
                                                                     available_bytes=1 << 30)])

    def call(self, method, request, timeout=None, reconnect=True):
        return self.info(timeout, reconnect)


def test_a_placement_does_not_wait_for_a_probe_already_running(monkeypatch):
    monkeypatch.setattr(agents_module, "POLL_SECONDS", 0.2)
    monkeypatch.setattr(agents_module, "PROBE_TIMEOUT", 5.0)
    fake = _Hanging(StorageNode("s1", "10.0.0.1:7600", ""))

    def factory(node, health):
        fake.health = health
        return fake

    agents = Agents(Path("/nonexistent"), nodes=[fake.node], client_factory=factory, poll=True)
    try:
        time.sleep(0.5)                     # answered once, then its next probe hangs
        assert fake.answered == 1
        time.sleep(0.5)
        started = time.monotonic()
        infos = agents.infos(max_age=0.1)   # older than max_age, but the poller is on it: the last answer
        assert time.monotonic() - started < 0.5
        assert infos["s1"].pools[0].name == "thin"
        assert fake.health.up               # one late answer is not a node down
    finally:
        fake.release.set()
        agents.close()


def test_a_recheck_waits_for_an_agent_that_just_restarted():
    """An agent restarted a moment ago: the controller's channel refused and now backs off. The poller's probe
    reports the node down at once; the recheck before a placement gives up waits for the channel and finds it
    up (a test that restarted an agent and at once asked for a volume of its zone got RESOURCE_EXHAUSTED)."""
    from csi.server import make_server
    from csi.proto import agent_pb2_grpc

    class Info(agent_pb2_grpc.AgentServicer):
        def GetInfo(self, request, context):
            return apb.AgentInfo(node_name="s1")

    port = _closed_port()
    node = StorageNode("s1", f"127.0.0.1:{port}", "")
    agents = Agents(Path("/nonexistent"), nodes=[node], client_factory=lambda n, h: AgentClient(
        n, grpc.insecure_channel(n.address), h))
    server = None
    try:
        agents.poll_once()
        assert not agents.health("s1").up                  # refused: down at once
        server = make_server(max_workers=2)
        agent_pb2_grpc.add_AgentServicer_to_server(Info(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        agents.recheck(["s1"])
        assert agents.health("s1").up
    finally:
        if server is not None:
            server.stop(0)
        agents.close()
