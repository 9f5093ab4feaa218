"""Issuing the driver's certificates: a CA, and one certificate per identity (csi/peers.py names them).

The one place that decides what a certificate of each role holds, so that the lab's throw-away PKI
(csi/tls.py), the controller's own certificate and the signer of certificate signing requests in a cluster
issue the same thing:
  - one DNS name, peers.dns_name(role, node), as the subject alternative name and the common name;
  - key usage digitalSignature; extended key usage: agents both serve (the controller, other agents' copies) and
    call (copies from another agent); the controller and node plugins only call;
  - EC P-256 keys; a lifetime the caller chooses.
The request a process sends for its certificate (a Kubernetes CertificateSigningRequest, csi/certrequest.py) and
the signer's checks of it (csi/certsigner.py) are made from the same rules here: request(), kube_usages().
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi import peers

CLOCK_SKEW = datetime.timedelta(minutes=5)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_ca(common_name: str, lifetime: datetime.timedelta) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def usages(role: str) -> list:
    return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if role == peers.AGENT else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]


# The names the Kubernetes CSR API gives the usages (certificates.k8s.io/v1 KeyUsage).
_KUBE_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "server auth", ExtendedKeyUsageOID.CLIENT_AUTH: "client auth"}


def kube_usages(role: str) -> list[str]:
    """What a CertificateSigningRequest for this role asks for: exactly what issue() puts in the certificate."""
    return ["digital signature"] + [_KUBE_NAMES[u] for u in usages(role)]


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def check_public_key(public_key) -> None:
    """Only the keys new_key() makes are certified: an EC P-256 key (what every process of the driver makes)."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError(f"a {type(public_key).__name__.removeprefix('_')} key: only EC P-256 keys are certified")


def issue(ca_key, ca_cert: x509.Certificate, public_key, role: str, node: str = "",
          lifetime: datetime.timedelta = datetime.timedelta(days=30)) -> x509.Certificate:
    """The certificate of one identity, for a key whose public half is given."""
    name = peers.dns_name(role, node)
    check_public_key(public_key)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    return (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages(role)), critical=False)
            .sign(ca_key, hashes.SHA256()))


def request(key, role: str, node: str = "") -> bytes:
    """The PEM certificate signing request of one identity: its one DNS name (subject and SAN), nothing else."""
    name = peers.dns_name(role, node)
    return (x509.CertificateSigningRequestBuilder().subject_name(_name(name))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def matches(key, cert: x509.Certificate) -> bool:
    """Whether a private key is the key of a certificate."""
    der = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der)


def load_ca(directory) -> tuple:
    """(key, certificate) of the CA that issues, from ca.key and ca.crt in a directory (the chart mounts its
    CA Secret there); ValueError naming what is wrong."""
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"the CA in {directory}: {exc}") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError(f"the CA in {directory}: {directory / 'ca.crt'} is not a CA certificate (basicConstraints "
                         "CA:TRUE)")
    if not matches(key, cert):
        raise ValueError(f"the CA in {directory}: ca.key is not the key of ca.crt")
    return key, cert


def identity(cert: x509.Certificate) -> peers.Peer:
    """Whom a certificate names (as a server or a caller): its one role name, else nobody."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        return peers.NOBODY
    found = {peers.parse_name(n) for n in names} - {peers.NOBODY}
    return found.pop() if len(found) == 1 else peers.NOBODY
