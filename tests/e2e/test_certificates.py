"""Certificates rotate without a restart, on a real agent in the lab: its certificate files replaced on disk (as
the agent's own renewal or a kubelet-updated Secret replaces them), the next connection is served with the new
certificate, by the same agent process, while a connection made before goes on working."""

from __future__ import annotations

import socket
import ssl

import grpc
import pytest
from cryptography import x509

from csi import peers
from csi.lab.deploy import AGENT_PORT, Deployment
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.server import TlsFiles

pytestmark = pytest.mark.e2e
NAME = peers.dns_name(peers.AGENT, "storage-1")


def served(port: int, client_dir) -> x509.Certificate:
    """The certificate the agent presents to a new TLS connection, verified against the CA and storage-1's
    agent name, as a client with a valid certificate (Python's ssl module: no gRPC in the way)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(client_dir / "ca.crt"))
    ctx.load_cert_chain(str(client_dir / "tls.crt"), str(client_dir / "tls.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME) as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))


def test_an_agents_certificate_replaced_on_disk_serves_the_next_connection(lab):
    storage = lab.node("storage-1")
    d = Deployment(lab)
    d.start_agent(storage)
    try:
        port = lab.expose(storage.ip, AGENT_PORT)
        controller = d.pki.ensure(peers.CONTROLLER)
        pid = storage.status("agent")["pid"]
        first = served(port, controller)
        assert first.subject.rfc4514_string() == f"CN={NAME}"
        opts = [("grpc.ssl_target_name_override", NAME)]
        with grpc.secure_channel(f"127.0.0.1:{port}", TlsFiles(controller).channel_credentials(), opts) as before:
            stub = agent_pb2_grpc.AgentStub(before)
            assert stub.GetInfo(apb.GetInfoRequest(), timeout=30).node_name == "storage-1"
            d.pki.issue(peers.AGENT, "storage-1")      # a new key and certificate, written on the host
            renewed = served(port, controller)
            assert renewed.serial_number != first.serial_number
            assert renewed == x509.load_pem_x509_certificate(
                (d.pki.dir(peers.AGENT, "storage-1") / "tls.crt").read_bytes())
            assert stub.GetInfo(apb.GetInfoRequest(), timeout=30).node_name == "storage-1"   # the old connection
        with grpc.secure_channel(f"127.0.0.1:{port}", TlsFiles(controller).channel_credentials(), opts) as after:
            assert agent_pb2_grpc.AgentStub(after).GetInfo(apb.GetInfoRequest(), timeout=30).node_name == \
                "storage-1"
        assert storage.status("agent")["pid"] == pid and storage.status("agent")["running"]   # no restart
        assert "the TLS files in" in d.lab.node("storage-1").log_path("agent").read_text()
    finally:
        d.stop_agent(storage)
