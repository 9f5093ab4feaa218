"""Certificates replaced on disk are used without a restart: a real gRPC server over mutual TLS (server.TlsFiles)
serves the new certificate from the next connection on, and reads the server's certificate the way any TLS
client does (Python's ssl module, presenting a valid client certificate)."""

from __future__ import annotations

import socket
import ssl
import threading
from concurrent import futures

import grpc
import pytest
from cryptography import x509

from csi import peers
from csi.fsutil import write_atomic
from csi.server import TlsFiles
from csi.tls import TestPki

AGENT = peers.dns_name(peers.AGENT, "storage-1")


def served_certificate(port: int, client_dir, name: str = AGENT) -> x509.Certificate:
    """The certificate the server presents to a new connection (ssl, with a client certificate of the CA),
    verified against the CA and the name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(client_dir / "ca.crt"))
    ctx.load_cert_chain(str(client_dir / "tls.crt"), str(client_dir / "tls.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


@pytest.fixture
def served(tmp_path):
    """A gRPC server with TlsFiles(<agent dir>).server_credentials(): (pki, port, identities of callers)."""
    pki = TestPki(tmp_path / "pki")
    agent_dir = pki.issue(peers.AGENT, "storage-1")
    callers = []

    def who(request, context):
        callers.append(peers.peer_of(context))
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
        "Who": grpc.unary_unary_rpc_method_handler(who)}),))
    port = server.add_secure_port("127.0.0.1:0", TlsFiles(agent_dir).server_credentials())
    server.start()
    yield pki, port, callers
    server.stop(None)


def test_a_certificate_replaced_on_disk_is_served_to_the_next_connection(served):
    pki, port, _ = served
    controller = pki.issue(peers.CONTROLLER)
    first = served_certificate(port, controller)
    assert first.subject.rfc4514_string() == f"CN={AGENT}"
    assert served_certificate(port, controller).serial_number == first.serial_number
    renewed = x509.load_pem_x509_certificate((pki.issue(peers.AGENT, "storage-1") / "tls.crt").read_bytes())
    assert renewed.serial_number != first.serial_number
    assert served_certificate(port, controller).serial_number == renewed.serial_number


def test_a_key_that_does_not_match_its_certificate_is_not_used(served):
    """Between two renamed files (the key replaced, the certificate not yet): the old pair stays in use."""
    pki, port, _ = served
    controller = pki.issue(peers.CONTROLLER)
    before = served_certificate(port, controller).serial_number
    other = pki.issue(peers.AGENT, "storage-2")
    write_atomic(pki.dir(peers.AGENT, "storage-1") / "tls.key", (other / "tls.key").read_bytes())
    assert served_certificate(port, controller).serial_number == before
    write_atomic(pki.dir(peers.AGENT, "storage-1") / "tls.crt", (other / "tls.crt").read_bytes())
    storage2 = peers.dns_name(peers.AGENT, "storage-2")
    assert served_certificate(port, controller, storage2).subject.rfc4514_string() == f"CN={storage2}"


def test_the_reloaded_server_still_requires_a_client_certificate_of_its_ca(served):
    pki, port, callers = served
    pki.issue(peers.AGENT, "storage-1")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca_dir / "ca.crt"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=AGENT) as conn:
                # TLS 1.3: the server's refusal of the missing certificate arrives after the client's handshake
                refused = conn.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            refused = True
    assert refused
    creds = TlsFiles(pki.issue(peers.NODE, "worker-1")).channel_credentials()
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", AGENT)]) as ch:
        ch.unary_unary("/t.T/Who")(b"", timeout=10)
    assert callers == [peers.Peer(peers.NODE, "worker-1")]


def test_version_changes_when_any_file_is_replaced(tmp_path):
    pki = TestPki(tmp_path)
    files = TlsFiles(pki.issue(peers.CONTROLLER))
    v1 = files.version()
    assert files.version() == v1 and None not in v1
    pki.issue(peers.CONTROLLER)
    assert files.version() != v1
    assert TlsFiles(tmp_path / "nowhere").version() == (None, None, None)
    with pytest.raises(ValueError, match="No such file"):
        TlsFiles(tmp_path / "nowhere").read()


def test_server_credentials_follow_the_files_under_concurrent_renewals(served):
    """Connections made while the files are replaced over and over all succeed, each with a whole pair."""
    pki, port, _ = served
    controller = pki.issue(peers.CONTROLLER)
    stop = threading.Event()

    def renew():
        while not stop.is_set():
            pki.issue(peers.AGENT, "storage-1")

    t = threading.Thread(target=renew)
    t.start()
    try:
        for _ in range(20):
            assert served_certificate(port, controller).subject.rfc4514_string() == f"CN={AGENT}"
    finally:
        stop.set()
        t.join()


def test_the_controller_uses_its_renewed_certificate_for_the_next_connection_to_an_agent(tmp_path):
    """agents.Agents makes a new channel once its TLS files changed: the agent (a real gRPC server over mutual
    TLS) sees the renewed certificate on the next call, while a call on the old channel is not cut off."""
    from csi.config import StorageNode
    from csi.controller.agents import Agents
    from csi.proto import agent_pb2 as pb
    from csi.proto import agent_pb2_grpc

    pki = TestPki(tmp_path / "pki")
    seen = []

    class Agent(agent_pb2_grpc.AgentServicer):
        def GetInfo(self, request, context):
            pem = context.auth_context()["x509_pem_cert"][0]
            seen.append(x509.load_pem_x509_certificate(pem).serial_number)
            return pb.AgentInfo(node_name="storage-1")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    agent_pb2_grpc.add_AgentServicer_to_server(Agent(), server)
    port = server.add_secure_port("127.0.0.1:0", TlsFiles(pki.issue(peers.AGENT, "storage-1")).server_credentials())
    server.start()

    def serial(d) -> int:
        return x509.load_pem_x509_certificate((d / "tls.crt").read_bytes()).serial_number

    tls_dir = pki.issue(peers.CONTROLLER)
    first = serial(tls_dir)
    agents = Agents(tls_dir, nodes=[StorageNode("storage-1", f"127.0.0.1:{port}", "")])
    try:
        old = agents.get("storage-1")
        assert old.info().node_name == "storage-1" and agents.get("storage-1").info()
        assert seen == [first] * 2
        renewed = serial(pki.issue(peers.CONTROLLER))
        assert agents.get("storage-1").info().node_name == "storage-1"
        assert seen[-1] == renewed != first
        assert old.info().node_name == "storage-1"   # a client taken before the change still works meanwhile
        assert seen[-1] == first
    finally:
        agents.close()
        server.stop(None)
