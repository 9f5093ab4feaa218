"""A throw-away PKI for tests and the demo: a CA, an agent certificate naming the fixed service name, and a
controller client certificate. Production installs get theirs from the Helm chart or the user."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from csi.fsutil import write_atomic


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(cn: str, ca_key, ca_name, key, *, ca: bool = False, san: str | None = None, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name or _name(cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    if not ca:
        # Agents serve the controller and also call each other (copies across storage nodes): both uses.
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def write_test_pki(out: Path, agent_name: str, other_ca: bool = False) -> None:
    """out/{agent,controller}/{ca.crt,tls.crt,tls.key}; with other_ca, also out/rogue/: a client signed by
    another CA (for the test that the agent refuses it)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("lvm-iscsi-csi test CA", ca_key, None, ca_key, ca=True)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    roles = {"agent": (agent_name, True), "controller": ("lvm-iscsi-controller", False)}
    for role, (cn, server) in roles.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(cn, ca_key, ca.subject, key, san=cn, server=server)
        d = out / role
        write_atomic(d / "ca.crt", ca_pem, mode=0o644)
        write_atomic(d / "tls.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        write_atomic(d / "tls.key", _pem_key(key), mode=0o600)
    if other_ca:
        rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
        rogue_ca = _issue("rogue CA", rogue_ca_key, None, rogue_ca_key, ca=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue("lvm-iscsi-controller", rogue_ca_key, rogue_ca.subject, key, san="lvm-iscsi-controller")
        write_atomic(out / "rogue" / "ca.crt", ca_pem, mode=0o644)
        write_atomic(out / "rogue" / "tls.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        write_atomic(out / "rogue" / "tls.key", _pem_key(key), mode=0o600)
