"""An agent's or node plugin's certificate in a cluster: a CertificateSigningRequest to the controller's signer
(certsigner.py), made with the pod's own service-account token.

The pod asks for nothing it could choose: the API server writes into the CSR who asked (the service account)
and, from the token's binding, which pod on which node; the signer checks those against the Pod and the
DaemonSet, and the name asked for against the node. The request itself is pki.request() with pki.kube_usages():
the same rules the signer checks and pki.issue applies. Used as the `obtain` of a certkeeper.CertKeeper, which
calls it at start and again at each renewal, with a new key each time.

A CSR is waited for as long as it stays (the API server's cleaner removes one pending for a day): a
controller that is down or starting signs it when it comes, and meanwhile the wait is logged every minute.
A denied CSR raises certkeeper.Refused with the signer's reason; a CSR that vanished is made again by the
keeper's next attempt. Issued CSRs are left to the cleaner (an hour), which needs no right to delete them.
"""

from __future__ import annotations

import base64
import logging
import time

from csi import peers, pki
from csi.certkeeper import Refused

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
SAY_EVERY = 60.0


def csr_prefix(role: str, node: str) -> str:
    """The CSR's generateName: `kubectl get csr` shows whose it is (the name decides nothing)."""
    return f"lvm-iscsi-{role}-{node}-"[:200]


def certificate_of(csr: dict) -> bytes | None:
    """The issued PEM certificate; Refused when the CSR was denied or failed; None while pending."""
    status = csr.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("Denied", "Failed") and cond.get("status", "True") == "True":
            raise Refused(f"CertificateSigningRequest {csr['metadata']['name']} {cond['type'].lower()}: "
                          f"{cond.get('reason', '')}: {cond.get('message', '')}")
    cert = status.get("certificate")
    return base64.b64decode(cert) if cert else None


class CsrClient:
    """obtain(key) for a certkeeper.CertKeeper: one CSR per call, waited for until issued."""

    def __init__(self, api, signer: str, role: str, node: str, clock=time.monotonic, sleep=time.sleep):
        self.api = api   # kubecsr.CsrApi, or the unit tests' fake
        self.signer = signer
        self.identity = peers.Peer(role, node)
        peers.dns_name(role, node)   # a node name that cannot be in a certificate fails here, at start
        self._clock, self._sleep = clock, sleep

    def __call__(self, key) -> bytes:
        role, node = self.identity.role, self.identity.node
        body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "metadata": {"generateName": csr_prefix(role, node)},
                "spec": {"request": base64.b64encode(pki.request(key, role, node)).decode(),
                         "signerName": self.signer, "usages": pki.kube_usages(role)}}
        name = self.api.create(body)["metadata"]["name"]
        log.info("asked %s for the certificate of %s: CertificateSigningRequest %s", self.signer, self.identity,
                 name)
        started = said = self._clock()
        while True:
            csr = self.api.get(name)
            if csr is None:
                raise ValueError(f"CertificateSigningRequest {name} is gone before it was signed")
            cert = certificate_of(csr)
            if cert is not None:
                log.info("CertificateSigningRequest %s signed after %.1f s", name, self._clock() - started)
                return cert
            if self._clock() - said >= SAY_EVERY:
                said = self._clock()
                log.warning("CertificateSigningRequest %s not signed after %.0f s: is the controller (the signer "
                            "%s) running? `kubectl describe csr %s` shows its state", name, said - started,
                            self.signer, name)
            self._sleep(POLL_SECONDS)
