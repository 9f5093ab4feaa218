"""csi/pki.py: what each role's certificate holds, the request a process sends for it, and the CA it is issued
from. The signer of CertificateSigningRequests (csi/certsigner.py) checks requests against these same rules."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi import peers, pki
from csi.fsutil import write_atomic


@pytest.fixture(scope="module")
def ca():
    return pki.new_ca("test CA", datetime.timedelta(days=10))


@pytest.mark.parametrize("role,node,eku", [
    (peers.AGENT, "storage-1", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    (peers.NODE, "worker-1", [ExtendedKeyUsageOID.CLIENT_AUTH]),
    (peers.CONTROLLER, "", [ExtendedKeyUsageOID.CLIENT_AUTH]),
])
def test_each_role_gets_its_one_name_and_its_usages(ca, role, node, eku):
    key = pki.new_key()
    cert = pki.issue(*ca, key.public_key(), role, node, datetime.timedelta(hours=1))
    name = peers.dns_name(role, node)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == [name]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == eku
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert pki.identity(cert) == peers.Peer(role, node)
    assert pki.matches(key, cert) and not pki.matches(pki.new_key(), cert)
    # what a CSR for this role asks for is what the certificate holds
    names = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}
    asked = pki.kube_usages(role)
    assert asked[0] == "digital signature" and [names[u] for u in asked[1:]] == eku


def test_the_lifetime_never_outlasts_the_ca(ca):
    cert = pki.issue(*ca, pki.new_key().public_key(), peers.CONTROLLER, lifetime=datetime.timedelta(days=400))
    assert cert.not_valid_after_utc == ca[1].not_valid_after_utc


def test_only_ec_p256_keys_are_certified(ca):
    with pytest.raises(ValueError, match="EC P-256"):
        pki.issue(*ca, rsa.generate_private_key(65537, 2048).public_key(), peers.CONTROLLER)


def test_a_request_names_one_identity_and_nothing_else():
    key = pki.new_key()
    csr = x509.load_pem_x509_csr(pki.request(key, peers.AGENT, "storage-1"))
    assert csr.is_signature_valid
    assert [type(e.value) for e in csr.extensions] == [x509.SubjectAlternativeName]
    assert csr.extensions[0].value.get_values_for_type(x509.DNSName) == ["storage-1.agent.lvm-iscsi.internal"]
    assert csr.subject.rfc4514_string() == "CN=storage-1.agent.lvm-iscsi.internal"
    with pytest.raises(ValueError):
        pki.request(key, peers.AGENT, "not a node name")


def test_load_ca_reads_the_ca_and_says_what_is_wrong(tmp_path, ca):
    key, cert = ca
    write_atomic(tmp_path / "ca.crt", pki.cert_pem(cert))
    write_atomic(tmp_path / "ca.key", pki.key_pem(key))
    loaded_key, loaded = pki.load_ca(tmp_path)
    assert loaded == cert and pki.matches(loaded_key, cert)
    write_atomic(tmp_path / "ca.key", pki.key_pem(pki.new_key()))
    with pytest.raises(ValueError, match="not the key of ca.crt"):
        pki.load_ca(tmp_path)
    leaf_key = pki.new_key()
    write_atomic(tmp_path / "ca.crt", pki.cert_pem(pki.issue(key, cert, leaf_key.public_key(), peers.CONTROLLER)))
    write_atomic(tmp_path / "ca.key", pki.key_pem(leaf_key))
    with pytest.raises(ValueError, match="not a CA certificate"):
        pki.load_ca(tmp_path)
    with pytest.raises(ValueError, match="No such file"):
        pki.load_ca(tmp_path / "missing")
