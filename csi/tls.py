"""A throw-away PKI for the lab, the demo and the tests: a CA and one certificate per process, as csi/pki.py
issues them (the role and node in the certificate's DNS name). A cluster gets its certificates from the chart's
CA through the controller's signer instead."""

from __future__ import annotations

import datetime
from pathlib import Path

from csi import peers, pki
from csi.fsutil import write_atomic

LIFETIME = datetime.timedelta(days=365)


class TestPki:
    """out/ca/{ca.crt,ca.key}, and per identity out/<role>[-<node>]/{ca.crt,tls.crt,tls.key} (the layout of a
    Kubernetes TLS secret plus its CA), made on first use."""

    __test__ = False   # not a pytest class

    def __init__(self, out: Path):
        self.out = Path(out)
        ca_dir = self.ca_dir
        if (ca_dir / "ca.key").exists():
            self.ca_key, self.ca = pki.load_ca(ca_dir)
        else:
            self.ca_key, self.ca = pki.new_ca("lvm-iscsi-csi test CA", LIFETIME)
            write_atomic(ca_dir / "ca.key", pki.key_pem(self.ca_key), mode=0o600)
            write_atomic(ca_dir / "ca.crt", pki.cert_pem(self.ca), mode=0o644)

    @property
    def ca_dir(self) -> Path:
        """ca.crt and ca.key: the layout the controller's --ca-dir reads (csi/pki.py load_ca)."""
        return self.out / "ca"

    def dir(self, role: str, node: str = "") -> Path:
        return self.out / (f"{role}-{node}" if node else role)

    def issue(self, role: str, node: str = "", lifetime: datetime.timedelta = LIFETIME) -> Path:
        """The directory with this identity's files; a fresh certificate (and key) when asked again."""
        d = self.dir(role, node)
        key = pki.new_key()
        cert = pki.issue(self.ca_key, self.ca, key.public_key(), role, node, lifetime)
        write_atomic(d / "ca.crt", pki.cert_pem(self.ca), mode=0o644)
        write_atomic(d / "tls.key", pki.key_pem(key), mode=0o600)
        write_atomic(d / "tls.crt", pki.cert_pem(cert), mode=0o644)
        return d

    def ensure(self, role: str, node: str = "") -> Path:
        d = self.dir(role, node)
        return d if (d / "tls.crt").exists() else self.issue(role, node)

    def rogue(self) -> Path:
        """A controller certificate from another CA (the test that agents refuse it), trusting ours."""
        d = self.out / "rogue"
        if not (d / "tls.crt").exists():
            key_ca, ca = pki.new_ca("rogue CA", LIFETIME)
            key = pki.new_key()
            write_atomic(d / "ca.crt", pki.cert_pem(self.ca), mode=0o644)
            write_atomic(d / "tls.key", pki.key_pem(key), mode=0o600)
            write_atomic(d / "tls.crt", pki.cert_pem(pki.issue(key_ca, ca, key.public_key(), peers.CONTROLLER)),
                         mode=0o644)
        return d
