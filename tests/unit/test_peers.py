"""The identity of a caller, read from its client certificate over a real mutual-TLS gRPC connection."""

from __future__ import annotations

import datetime
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi import peers


def _cert(cn: str, key, issuer_key, issuer: x509.Name | None, sans: list[str], ca: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _cert("test CA", key, key, None, [], ca=True)


def _issue(ca, sans):
    key = ec.generate_private_key(ec.SECP256R1())
    return _pem(key), _pem(_cert("x", key, ca[0], ca[1].subject, sans))


@pytest.fixture(scope="module")
def server(ca):
    seen = []

    def whoami(request, context):
        seen.append(peers.peer_of(context))
        return b""
    handler = grpc.method_handlers_generic_handler("t.T", {"Who": grpc.unary_unary_rpc_method_handler(
        whoami, request_deserializer=lambda b: b, response_serializer=lambda b: b)})
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers((handler,))
    key, cert = _issue(ca, [peers.dns_name(peers.AGENT, "storage-1")])
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=_pem(ca[1]), require_client_auth=True))
    srv.start()
    yield port, seen
    srv.stop(None)


def _who(server, ca, sans) -> peers.Peer:
    port, seen = server
    key, cert = _issue(ca, sans)
    creds = grpc.ssl_channel_credentials(root_certificates=_pem(ca[1]), private_key=key, certificate_chain=cert)
    name = peers.dns_name(peers.AGENT, "storage-1")
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", name)]) as ch:
        ch.unary_unary("/t.T/Who")(b"", timeout=10)
    return seen[-1]


@pytest.mark.parametrize("sans,expected", [
    (["controller.lvm-iscsi.internal"], peers.Peer("controller")),
    (["storage-2.agent.lvm-iscsi.internal"], peers.Peer("agent", "storage-2")),
    (["worker-1.node.lvm-iscsi.internal"], peers.Peer("node", "worker-1")),
    (["a.b.node.lvm-iscsi.internal"], peers.Peer("node", "a.b")),
    (["lvm-iscsi-agent"], peers.NOBODY),                                   # the old shared agent name
    ([], peers.NOBODY),
    (["Bad_Name.node.lvm-iscsi.internal"], peers.NOBODY),
    (["w1.node.lvm-iscsi.internal", "w2.node.lvm-iscsi.internal"], peers.NOBODY),   # two identities: none
])
def test_the_caller_is_who_its_certificate_names(server, ca, sans, expected):
    assert _who(server, ca, sans) == expected


def test_names_round_trip():
    for role, node in (("agent", "storage-1"), ("node", "worker.example.com")):
        assert peers.parse_name(peers.dns_name(role, node)) == peers.Peer(role, node)
    assert peers.parse_name(peers.dns_name("controller")) == peers.Peer("controller")
    with pytest.raises(ValueError):
        peers.dns_name("agent", "../x")


def test_no_identity_without_tls():
    class Plain:
        def auth_context(self):
            return {}
    assert peers.peer_of(Plain()) == peers.NOBODY
