"""`lvm-iscsi-csi retire-storage-node`, run as an operator runs it (the CLI's argv): a dry run by default, the
node retired in the placement journal with --yes, and a node whose agent still answers (a real gRPC agent over
mutual TLS) refused. The command was once lost in a merge (an ImportError at the first use): this runs it."""

from __future__ import annotations

import contextlib
import socket
from concurrent import futures

from typing import Iterator

import grpc
import pytest

from csi import cli, peers
from csi.controller.journal import Entry, FileJournal
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.server import TlsFiles
from csi.tls import TestPki


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def operator_fleet(tmp_path, command: str, entries: list[Entry]):
    """(argv prefix of `command`, journal, pki, write_nodes): storage nodes s1 (a closed port) and s2 (a closed
    port until write_nodes(port) names a real agent), the entries journaled."""
    pki = TestPki(tmp_path / "pki")
    journal = FileJournal(tmp_path / "journal")
    for entry in entries:
        journal.claim(entry)
    nodes = tmp_path / "nodes.yaml"

    def write_nodes(s2_port: int):
        nodes.write_text("storageNodes:\n"
                         f"  - {{name: s1, address: '127.0.0.1:{closed_port()}', zone: a}}\n"
                         f"  - {{name: s2, address: '127.0.0.1:{s2_port}', zone: a}}\n")
    write_nodes(closed_port())
    argv = [command, "--storage-nodes", str(nodes), "--journal-dir", str(tmp_path / "journal"),
            "--tls-dir", str(pki.issue(peers.CONTROLLER)), "--cluster-id", "c1"]
    return argv, journal, pki, write_nodes


@contextlib.contextmanager
def answering_agent(pki, node: str) -> Iterator[int]:
    """A real gRPC agent of `node` over mutual TLS that answers GetInfo, for the block; yields its port."""
    class Agent(agent_pb2_grpc.AgentServicer):
        def GetInfo(self, request, context):
            return pb.AgentInfo(node_name=node)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    agent_pb2_grpc.add_AgentServicer_to_server(Agent(), server)
    port = server.add_secure_port("127.0.0.1:0", TlsFiles(pki.issue(peers.AGENT, node)).server_credentials())
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


@pytest.fixture
def fleet(tmp_path):
    """storage nodes s1 and s2, s2's volume and snapshot journaled (operator_fleet)."""
    return operator_fleet(tmp_path, "retire-storage-node", [
        Entry("k-vol", "volume", "pvc-1", "s2"), Entry("k-snap", "snapshot", "snap-1", "s2"),
        Entry("k-other", "volume", "pvc-2", "s1")])


def test_a_dry_run_lists_what_the_node_held_and_changes_nothing(fleet, capsys):
    argv, journal, _, _ = fleet
    assert cli.main(argv + ["s2"]) == 0
    out = capsys.readouterr().out
    assert "s2: 2 volume(s) and snapshot(s)" in out and "volume pvc-1" in out and "snapshot snap-1" in out
    assert "pvc-2" not in out and "dry run" in out
    assert journal.retired() == set()


def test_yes_retires_the_node_once(fleet, capsys):
    argv, journal, _, _ = fleet
    assert cli.main(argv + ["s2", "--yes"]) == 0
    assert journal.retired() == {"s2"}
    assert "is retired" in capsys.readouterr().out
    assert cli.main(argv + ["s2", "--yes"]) == 0
    assert "already retired" in capsys.readouterr().out


def test_a_node_whose_agent_answers_is_not_retired(fleet, capsys):
    argv, journal, pki, write_nodes = fleet
    with answering_agent(pki, "s2") as port:
        write_nodes(port)
        assert cli.main(argv + ["s2", "--yes"]) == 1
    assert "answers" in capsys.readouterr().out
    assert journal.retired() == set()
