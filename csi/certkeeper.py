"""A process's own certificate, kept current: obtained at start, renewed at 2/3 of its lifetime, written into
the process's TLS directory (ca.crt, tls.crt, tls.key: server.TlsFiles' layout), whose servers and clients
follow the files without a restart (server.TlsFiles, controller/agents.py).

Where a certificate comes from is the caller's choice of `obtain`: the controller issues its own from the CA
it holds (from_ca); agents and node plugins ask the controller's signer through the Kubernetes API
(certrequest.py). Every renewal makes a new key, so a key never outlives its certificate. What the process
trusts (ca.crt) is written anew with each renewal from `trust`, so a CA bundle that changed (a CA being
rotated: old and new in one bundle) reaches the process too.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from csi import peers, pki
from csi.fsutil import write_atomic

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3          # of the certificate's remaining lifetime when it was obtained
RETRY_MIN = 5.0           # seconds between attempts when obtaining fails...
RETRY_MAX = 300.0         # ...doubling up to this
MIN_LIFETIME_LEFT = 1.0   # never renew more often than this, whatever a signer returns


class Refused(Exception):
    """The issuer said no (a denied request): asking again the same way will not help."""


def from_ca(ca_dir: Path, role: str, node: str = "",
            lifetime: datetime.timedelta = datetime.timedelta(days=7)) -> Callable:
    """An `obtain` that issues in-process from the CA in ca_dir (ca.crt, ca.key), read again each time: the
    controller, which holds the CA key anyway."""
    def obtain(key) -> bytes:
        ca_key, ca_cert = pki.load_ca(ca_dir)
        return pki.cert_pem(pki.issue(ca_key, ca_cert, key.public_key(), role, node, lifetime))
    return obtain


def read_bundle(path: Path) -> Callable[[], bytes]:
    """A `trust` that reads a CA bundle file (a mounted ConfigMap) each time."""
    def trust() -> bytes:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"the CA bundle {path}: {exc}") from None
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ValueError(f"the CA bundle {path} holds no PEM certificate")
        return data
    return trust


class CertKeeper:
    def __init__(self, tls_dir: Path, identity: peers.Peer, obtain: Callable[[object], bytes],
                 trust: Callable[[], bytes], clock: Callable[[], float] = time.time):
        """obtain(key) -> the PEM certificate of `identity` for that key (raises Refused when the issuer said
        no); trust() -> the PEM CA bundle this process trusts."""
        self.tls_dir = Path(tls_dir)
        self.identity = identity
        self._obtain = obtain
        self._trust = trust
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.certificate: x509.Certificate | None = None
        self.due = 0.0   # wall-clock time of the next renewal

    def renew(self) -> x509.Certificate:
        """Obtains a certificate for a new key and writes the three files; ValueError or Refused when it cannot,
        and then nothing is written."""
        key = pki.new_key()
        pem = self._obtain(key)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise ValueError(f"the issuer returned no certificate: {exc}") from None
        if not pki.matches(key, cert):
            raise ValueError("the issuer returned a certificate for another key")
        if pki.identity(cert) != self.identity:
            raise ValueError(f"the issuer returned a certificate of {pki.identity(cert)}, not of {self.identity}")
        bundle = self._trust()
        if not _issued_by_one_of(cert, bundle):
            raise ValueError(f"the certificate's issuer ({cert.issuer.rfc4514_string()}) is not in the CA bundle: "
                             "no peer would trust it")
        obtained = self._clock()
        # ca.crt first: a reader that sees the new pair trusts what it needs. The key before its certificate: a
        # reader between the two sees a mismatch and keeps the old pair (server.TlsFiles.read).
        write_atomic(self.tls_dir / "ca.crt", bundle, mode=0o644)
        write_atomic(self.tls_dir / "tls.key", pki.key_pem(key), mode=0o600)
        write_atomic(self.tls_dir / "tls.crt", pem, mode=0o644)
        left = cert.not_valid_after_utc.timestamp() - obtained
        self.certificate = cert
        self.due = obtained + max(MIN_LIFETIME_LEFT, RENEW_AT * left)
        log.info("certificate of %s (serial %x) in %s, valid until %s; renewed from %s", self.identity,
                 cert.serial_number, self.tls_dir, cert.not_valid_after_utc.isoformat(timespec="seconds"),
                 datetime.datetime.fromtimestamp(self.due, datetime.timezone.utc).isoformat(timespec="seconds"))
        return cert

    def first(self, patience: float | None = None) -> x509.Certificate:
        """The first certificate, at start: tried until it is obtained (an issuer not up yet is waited for,
        saying so), for at most `patience` seconds (None: as long as it takes). Refused is raised at once."""
        deadline = None if patience is None else time.monotonic() + patience
        wait = RETRY_MIN
        while True:
            try:
                return self.renew()
            except Refused:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to obtain is retried, and said
                if self._stop.is_set() or (deadline is not None and time.monotonic() + wait > deadline):
                    raise
                log.warning("no certificate for %s yet (%s); trying again in %.0f s", self.identity, exc, wait)
                self._stop.wait(wait)
                wait = min(RETRY_MAX, wait * 2)

    def start(self, first: bool = False) -> None:
        """Renews in the background from now on (after first()); first=True obtains the first one in the
        background too, trying again every RETRY_MAX seconds even after a refusal (a node plugin: it serves
        kubelet, unmounts above all, whether it has a certificate or not)."""
        self._thread = threading.Thread(target=self._first_then_run if first else self._run,
                                        name="certificate-renewal", daemon=True)
        self._thread.start()

    def _first_then_run(self) -> None:
        while not self._stop.is_set():
            try:
                self.first()
                break
            except Exception as exc:  # noqa: BLE001 - Refused included: said, and tried again later
                log.error("no certificate for %s: %s; trying again in %.0f s", self.identity, exc, RETRY_MAX)
                self._stop.wait(RETRY_MAX)
        self._run()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        wait = RETRY_MIN
        while not self._stop.wait(max(0.0, self.due - self._clock())):
            try:
                self.renew()
                wait = RETRY_MIN
            except Exception as exc:  # noqa: BLE001 - the current certificate serves on; try again soon
                expired = self.certificate is not None and \
                    self._clock() >= self.certificate.not_valid_after_utc.timestamp()
                log.log(logging.ERROR if expired else logging.WARNING,
                        "renewing the certificate of %s failed (%s%s); trying again in %.0f s", self.identity, exc,
                        "; the current one has EXPIRED: peers refuse this process" if expired else "", wait)
                self.due = self._clock() + wait
                wait = min(RETRY_MAX, wait * 2)


def _issued_by_one_of(cert: x509.Certificate, bundle: bytes) -> bool:
    try:
        cas = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):   # another issuer, another key type, another key
            continue
    return False
