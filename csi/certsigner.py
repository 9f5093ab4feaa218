"""The controller's signer of CertificateSigningRequests: how every agent and node plugin of a cluster gets a
certificate naming its node, without a person making one per node.

A pod asks (certrequest.py) with its own bound service-account token. The API server then writes into the CSR
who asked: spec.username (the service account) and, in spec.extra, the pod's name and uid and its node's name,
taken from the token's binding (Kubernetes 1.32 and later always binds the node), not from anything the pod
says. The signer approves and signs only when all of this holds:
  - spec.username is the agent's or the node plugin's service account in the driver's namespace: that decides
    the role;
  - the pod named in spec.extra exists with that uid, runs on that node under that service account, and is
    owned by the driver's DaemonSet of that role;
  - the request names exactly one thing, the DNS name peers.dns_name(role, node) (as its one subject
    alternative name; its subject that name or empty), asks for no other extension, and its key is one that
    pki certifies;
  - its usages are exactly pki.kube_usages(role).
Anything else is Denied, with the reason in the CSR's condition and in the log. A CSR someone else approved is
checked all the same: one that fails gets the Failed condition, never a certificate. The certificate is
pki.issue's (the one place that decides what a certificate holds), from the CA key mounted into the
controller only, for at most the configured lifetime (less when the CSR asks for less).

Every controller replica runs the signer: two that decide the same CSR race on its resourceVersion, and the
loser's conflict only means that the other did it.
"""

from __future__ import annotations

import base64
import datetime
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509

from csi import ids, peers, pki
from csi.kubecsr import Conflict

log = logging.getLogger(__name__)

SA_PREFIX = "system:serviceaccount:"
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
CONDITION_REASON = {True: "LvmIscsiCsiIdentityVerified", False: "LvmIscsiCsiIdentityRefused"}
RELIST_SECONDS = 300


def signer_name(driver_name: str) -> str:
    """The default signerName of a driver: unique per cluster, as the driver name (a CSIDriver) is."""
    return f"{driver_name}/identity"


@dataclass(frozen=True)
class SignerConfig:
    signer_name: str
    namespace: str             # the driver's, where its service accounts, DaemonSets and pods are
    agent_account: str
    agent_daemonset: str
    node_account: str
    node_daemonset: str
    ca_dir: Path               # ca.crt, ca.key: the CA Secret, mounted into the controller only
    lifetime: datetime.timedelta

    def roles(self) -> dict[str, tuple[str, str]]:
        """service account -> (role, DaemonSet)."""
        return {self.agent_account: (peers.AGENT, self.agent_daemonset),
                self.node_account: (peers.NODE, self.node_daemonset)}


@dataclass(frozen=True)
class Verdict:
    role: str = ""
    node: str = ""
    pod: str = ""
    refused: str = ""          # why not; empty: approve and sign

    @property
    def ok(self) -> bool:
        return not self.refused


def _one(extra: dict, key: str) -> str:
    values = extra.get(key) or []
    if len(values) != 1 or not values[0]:
        raise ValueError(f"spec.extra[{key}] is {values!r}, not one value: the request was not made with a "
                         "pod's bound service-account token")
    return values[0]


def review(csr: dict, config: SignerConfig, read_pod: Callable[[str, str], dict | None]) -> Verdict:
    """Whether a CSR may be signed, and for whom (see the module's docstring). read_pod(namespace, name) -> the
    Pod, or None when there is none."""
    spec = csr.get("spec") or {}
    if spec.get("signerName") != config.signer_name:
        return Verdict(refused=f"signerName {spec.get('signerName')!r} is not {config.signer_name!r}")
    user = spec.get("username") or ""
    namespace, _, account = user.removeprefix(SA_PREFIX).partition(":")
    roles = config.roles()
    if not user.startswith(SA_PREFIX) or namespace != config.namespace or account not in roles:
        return Verdict(refused=f"requested by {user!r}, not by the service account of the driver's agents "
                               f"or node plugins in namespace {config.namespace}")
    role, daemonset = roles[account]
    try:
        extra = spec.get("extra") or {}
        node, pod_name, pod_uid = _one(extra, NODE_NAME), _one(extra, POD_NAME), _one(extra, POD_UID)
        ids.check_node_name(node)
    except ValueError as exc:
        return Verdict(role=role, refused=str(exc))
    name = peers.dns_name(role, node)
    found = Verdict(role, node, pod_name)
    try:
        _check_request(base64.b64decode(spec.get("request") or ""), name)
    except ValueError as exc:
        return Verdict(role, node, pod_name, f"the request of {peers.Peer(role, node)}: {exc}")
    usages = spec.get("usages") or []
    if sorted(usages) != sorted(pki.kube_usages(role)):
        return Verdict(role, node, pod_name, f"usages {usages} are not {pki.kube_usages(role)}, what the "
                                             f"certificate of {peers.Peer(role, node)} holds")
    pod = read_pod(namespace, pod_name)
    problem = _check_pod(pod, pod_name, pod_uid, node, account, daemonset)
    return Verdict(role, node, pod_name, f"pod {namespace}/{pod_name}: {problem}") if problem else found


def _check_request(pem: bytes, name: str) -> None:
    try:
        request = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate request ({exc})") from None
    if not request.is_signature_valid:
        raise ValueError("its signature does not verify")
    pki.check_public_key(request.public_key())
    try:
        sans = list(request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    if sans != [x509.DNSName(name)]:
        raise ValueError(f"names {[str(getattr(s, 'value', s)) for s in sans]}: only the DNS name {name}")
    subject = request.subject.rfc4514_string()
    if subject not in ("", f"CN={name}"):
        raise ValueError(f"subject {subject!r}: only CN={name}")
    others = [e.oid.dotted_string for e in request.extensions if not isinstance(e.value, x509.SubjectAlternativeName)]
    if others:
        raise ValueError(f"asks for extensions {others}: only a subject alternative name")


def _check_pod(pod: dict | None, name: str, uid: str, node: str, account: str, daemonset: str) -> str:
    if pod is None:
        return "no such pod"
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if meta.get("uid") != uid:
        return f"its uid is {meta.get('uid')}, not {uid} (the token's pod is gone)"
    if spec.get("nodeName") != node:
        return f"runs on {spec.get('nodeName')!r}, not on {node!r}"
    if spec.get("serviceAccountName") != account:
        return f"runs as service account {spec.get('serviceAccountName')!r}, not {account!r}"
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("controller")]
    if [(o.get("apiVersion"), o.get("kind"), o.get("name")) for o in owners] != [("apps/v1", "DaemonSet", daemonset)]:
        return f"is not a pod of DaemonSet {daemonset} (owned by {[o.get('name') for o in owners]})"
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return "has terminated"
    return ""


def _condition(kind: str, message: str) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": kind, "status": "True", "reason": CONDITION_REASON[kind == "Approved"], "message": message,
            "lastUpdateTime": now, "lastTransitionTime": now}


class CsrSigner:
    """Watches the CSRs of its signerName and decides each once (every replica may; see the docstring)."""

    def __init__(self, config: SignerConfig, api):
        self.config = config
        self.api = api   # kubecsr.CsrApi, or the unit tests' fake
        self._stop = threading.Event()
        self._signed: OrderedDict[str, None] = OrderedDict()   # uids just signed: their stale events are skipped

    def handle(self, csr: dict) -> str:
        """Decides one CSR: 'approved', 'denied', 'failed', 'conflict' (another replica was first) or ''
        (nothing to do: decided already)."""
        meta = csr.get("metadata") or {}
        status = csr.get("status") or {}
        conditions = {c.get("type") for c in status.get("conditions") or [] if c.get("status", "True") == "True"}
        if status.get("certificate") or conditions & {"Denied", "Failed"} or meta.get("uid") in self._signed:
            return ""
        verdict = review(csr, self.config, self.api.pod)
        name, who = meta.get("name"), (csr.get("spec") or {}).get("username")
        try:
            if not verdict.ok and "Approved" not in conditions:
                log.warning("denied CertificateSigningRequest %s of %s: %s", name, who, verdict.refused)
                self.api.update_approval(self._with(csr, "Denied", verdict.refused))
                return "denied"
            if not verdict.ok:
                log.error("CertificateSigningRequest %s of %s was approved by someone else, but: %s; not signed",
                          name, who, verdict.refused)
                self.api.update_status(self._with(csr, "Failed", verdict.refused))
                return "failed"
            who_is = peers.Peer(verdict.role, verdict.node)
            if "Approved" not in conditions:
                csr = self.api.update_approval(self._with(csr, "Approved", f"{who_is}: pod {verdict.pod} on node "
                                                                           f"{verdict.node}, checked by the driver"))
            signed = dict(csr)
            signed["status"] = dict(csr.get("status") or {}, certificate=base64.b64encode(self._issue(csr, verdict))
                                    .decode())
            self.api.update_status(signed)
        except Conflict:
            return "conflict"
        self._signed[meta.get("uid")] = None
        while len(self._signed) > 1000:
            self._signed.popitem(last=False)
        log.info("signed the certificate of %s (pod %s), CertificateSigningRequest %s", who_is, verdict.pod, name)
        return "approved"

    @staticmethod
    def _with(csr: dict, kind: str, message: str) -> dict:
        out = dict(csr)
        status = dict(csr.get("status") or {})
        status["conditions"] = list(status.get("conditions") or []) + [_condition(kind, message)]
        out["status"] = status
        return out

    def _issue(self, csr: dict, verdict: Verdict) -> bytes:
        ca_key, ca_cert = pki.load_ca(self.config.ca_dir)
        lifetime = self.config.lifetime
        asked = (csr.get("spec") or {}).get("expirationSeconds")
        if asked:
            lifetime = min(lifetime, datetime.timedelta(seconds=int(asked)))
        request = x509.load_pem_x509_csr(base64.b64decode(csr["spec"]["request"]))
        return pki.cert_pem(pki.issue(ca_key, ca_cert, request.public_key(), verdict.role, verdict.node, lifetime))

    def _handle_logged(self, csr: dict) -> None:
        try:
            self.handle(csr)
        except Exception:  # noqa: BLE001 - one bad CSR (or API error) must not stop the signer
            log.exception("deciding CertificateSigningRequest %s failed; tried again at the next change or "
                          "listing", (csr.get("metadata") or {}).get("name"))

    def run_once(self) -> str:
        """Decides every CSR of the signer listed now; the listing's resourceVersion."""
        listing = self.api.list(self.config.signer_name)
        for csr in listing.get("items") or []:
            self._handle_logged(csr)
        return (listing.get("metadata") or {}).get("resourceVersion", "")

    def run(self) -> None:
        """List, then watch, again and again (a watch ends every RELIST_SECONDS, or on an error)."""
        while not self._stop.is_set():
            try:
                version = self.run_once()
                for kind, csr in self.api.watch(self.config.signer_name, version, RELIST_SECONDS):
                    if kind in ("ADDED", "MODIFIED"):
                        self._handle_logged(csr)
                    if self._stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - an API server restart, an expired resourceVersion
                log.warning("watching CertificateSigningRequests failed (%s); listing again", exc)
                self._stop.wait(2.0)

    def start(self) -> None:
        log.info("signing the certificates of the agents (%s) and node plugins (%s) of namespace %s as %s",
                 self.config.agent_daemonset, self.config.node_daemonset, self.config.namespace,
                 self.config.signer_name)
        threading.Thread(target=self.run, name="csr-signer", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
