"""The controller's signer of CertificateSigningRequests (csi/certsigner.py) and the pods' side of it
(csi/certrequest.py, csi/certkeeper.py), against a fake of the API calls (csi/kubecsr.py's seam) that holds
the JSON documents the API server returns, filling spec.username and spec.extra as the API server does from
the requester's bound token. The real API server's part is in the Kubernetes tier (tests/e2e/k8s)."""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import itertools

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from csi import certsigner, peers, pki
from csi.certkeeper import CertKeeper, Refused, read_bundle
from csi.certrequest import CsrClient, certificate_of
from csi.certsigner import CsrSigner, SignerConfig
from csi.kubecsr import Conflict
from csi.server import TlsFiles
from csi.tls import TestPki

NS = "csi"
SIGNER = certsigner.signer_name("lvm-iscsi.csi.dev")
AGENT_SA, NODE_SA = "rel-agent", "rel-node"


class FakeApi:
    """CSRs and Pods as JSON, resourceVersions checked on update (Conflict), who asks set per call."""

    def __init__(self):
        self.csrs: dict[str, dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.versions = itertools.count(1)
        self.names = itertools.count(1)
        self.requester: dict = {}

    def as_pod(self, account: str, pod: str, node: str, uid: str | None = None, namespace: str = NS):
        """Later creates are made with this pod's bound token (the API server fills username and extra)."""
        self.requester = {"username": f"system:serviceaccount:{namespace}:{account}",
                          "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                     "system:authenticated"],
                          "extra": {certsigner.NODE_NAME: [node], certsigner.POD_NAME: [pod],
                                    certsigner.POD_UID: [uid or f"uid-{pod}"],
                                    "authentication.kubernetes.io/credential-id": ["JTI=x"]}}

    def add_pod(self, name: str, node: str, account: str, daemonset: str, uid: str | None = None,
                namespace: str = NS, phase: str = "Running") -> dict:
        pod = {"metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}",
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": daemonset,
                                                 "uid": "ds-uid", "controller": True}]},
               "spec": {"nodeName": node, "serviceAccountName": account}, "status": {"phase": phase}}
        self.pods[namespace, name] = pod
        return pod

    # --- kubecsr.CsrApi's calls

    def create(self, body: dict) -> dict:
        csr = copy.deepcopy(body)
        name = body["metadata"].get("name") or body["metadata"]["generateName"] + f"{next(self.names):05d}"
        csr["metadata"].update(name=name, uid=f"csr-uid-{name}", resourceVersion=str(next(self.versions)))
        csr["spec"].update(copy.deepcopy(self.requester), uid="user-uid")
        csr["status"] = {}
        self.csrs[name] = csr
        return copy.deepcopy(csr)

    def get(self, name: str) -> dict | None:
        return copy.deepcopy(self.csrs.get(name))

    def list(self, signer: str) -> dict:
        return {"metadata": {"resourceVersion": str(next(self.versions))},
                "items": [copy.deepcopy(c) for c in self.csrs.values() if c["spec"]["signerName"] == signer]}

    def _update(self, csr: dict, part: str) -> dict:
        stored = self.csrs[csr["metadata"]["name"]]
        if stored["metadata"]["resourceVersion"] != csr["metadata"]["resourceVersion"]:
            raise Conflict("the object has been modified")
        if part == "approval":
            stored["status"]["conditions"] = copy.deepcopy(csr["status"]["conditions"])
        else:
            stored["status"] = copy.deepcopy(csr["status"])
        stored["metadata"]["resourceVersion"] = str(next(self.versions))
        return copy.deepcopy(stored)

    def update_approval(self, csr: dict) -> dict:
        return self._update(csr, "approval")

    def update_status(self, csr: dict) -> dict:
        return self._update(csr, "status")

    def pod(self, namespace: str, name: str) -> dict | None:
        return copy.deepcopy(self.pods.get((namespace, name)))


@pytest.fixture
def ca(tmp_path):
    return TestPki(tmp_path / "pki")


@pytest.fixture
def config(ca):
    return SignerConfig(SIGNER, NS, AGENT_SA, "rel-agent", NODE_SA, "rel-node", ca.ca_dir, datetime.timedelta(days=7))


@pytest.fixture
def api():
    a = FakeApi()
    a.add_pod("rel-agent-aaaaa", "storage-1", AGENT_SA, "rel-agent")
    a.add_pod("rel-node-bbbbb", "worker-1", NODE_SA, "rel-node")
    a.add_pod("rel-node-ccccc", "worker-2", NODE_SA, "rel-node")
    return a


def request_body(key=None, names=None, subject=None, usages=None, extensions=(), role=peers.NODE,
                 node="worker-1", pem: bytes | None = None) -> dict:
    """A CSR body: pki.request's by default; otherwise built with the given names, subject, extensions."""
    key = key or pki.new_key()
    if pem is None:
        if names is None and subject is None and not extensions:
            pem = pki.request(key, role, node)
        else:
            name = peers.dns_name(role, node)
            b = x509.CertificateSigningRequestBuilder().subject_name(
                subject if subject is not None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            if names is None:
                names = [x509.DNSName(name)]
            if names:
                b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
            for ext, critical in extensions:
                b = b.add_extension(ext, critical=critical)
            pem = b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"generateName": "t-"},
            "spec": {"request": base64.b64encode(pem).decode(), "signerName": SIGNER,
                     "usages": usages if usages is not None else pki.kube_usages(role)}}


def decide(api, config, body) -> tuple[str, dict]:
    created = api.create(body)
    outcome = CsrSigner(config, api).handle(created)
    return outcome, api.get(created["metadata"]["name"])


def condition(csr: dict) -> dict:
    return csr["status"]["conditions"][-1]


# ------------------------------------------------------------------------------------------------ approved

@pytest.mark.parametrize("account,pod,node,role", [
    (AGENT_SA, "rel-agent-aaaaa", "storage-1", peers.AGENT),
    (NODE_SA, "rel-node-bbbbb", "worker-1", peers.NODE),
])
def test_the_pod_of_the_driver_gets_the_certificate_of_its_node(api, config, ca, account, pod, node, role):
    api.as_pod(account, pod, node)
    key = pki.new_key()
    outcome, csr = decide(api, config, request_body(key, role=role, node=node))
    assert outcome == "approved"
    assert condition(csr)["type"] == "Approved" and condition(csr)["status"] == "True"
    assert condition(csr)["reason"] == "LvmIscsiCsiIdentityVerified"
    cert = x509.load_pem_x509_certificate(certificate_of(csr))
    assert pki.identity(cert) == peers.Peer(role, node) and pki.matches(key, cert)
    cert.verify_directly_issued_by(ca.ca)
    # exactly what pki.issue makes for the role: the signer has no rules of its own
    reference = pki.issue(ca.ca_key, ca.ca, key.public_key(), role, node, config.lifetime)
    assert [(e.oid, e.critical, e.value) for e in cert.extensions] == \
        [(e.oid, e.critical, e.value) for e in reference.extensions]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc - pki.CLOCK_SKEW
    assert abs(lifetime - config.lifetime) < datetime.timedelta(minutes=1)
    # decided once: the events of its own updates change nothing more
    assert CsrSigner(config, api).handle(csr) == ""


def test_a_shorter_lifetime_asked_for_is_given(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    body = request_body()
    body["spec"]["expirationSeconds"] = 3600
    _, csr = decide(api, config, body)
    cert = x509.load_pem_x509_certificate(certificate_of(csr))
    assert cert.not_valid_after_utc - cert.not_valid_before_utc - pki.CLOCK_SKEW <= datetime.timedelta(hours=1)


# ------------------------------------------------------------------------------------------------ denied

def _denied(api, config, body) -> str:
    outcome, csr = decide(api, config, body)
    assert outcome == "denied", csr
    assert condition(csr)["type"] == "Denied" and condition(csr)["reason"] == "LvmIscsiCsiIdentityRefused"
    assert not csr["status"].get("certificate")
    with pytest.raises(Refused, match="denied"):
        certificate_of(csr)
    return condition(csr)["message"]


def test_another_nodes_name_is_denied(api, config):
    api.as_pod(NODE_SA, "rel-node-ccccc", "worker-2")
    assert "only the DNS name worker-2.node" in _denied(api, config, request_body(node="worker-1"))


def test_a_node_plugin_cannot_ask_for_an_agents_certificate(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    body = request_body(role=peers.AGENT, node="worker-1")
    body["spec"]["usages"] = pki.kube_usages(peers.NODE)
    assert "only the DNS name worker-1.node" in _denied(api, config, body)


@pytest.mark.parametrize("names,why", [
    ([x509.DNSName("worker-1.node.lvm-iscsi.internal"), x509.DNSName("controller.lvm-iscsi.internal")], "names"),
    ([x509.DNSName("worker-1.node.lvm-iscsi.internal"), x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], "names"),
    ([x509.DNSName("worker-1.node.lvm-iscsi.internal"), x509.UniformResourceIdentifier("spiffe://x/y")], "names"),
    ([x509.DNSName("worker-1.node.lvm-iscsi.internal"), x509.RFC822Name("a@b.c")], "names"),
    ([x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], "names"),
    ([], "names []"),
])
def test_any_other_name_in_the_request_is_denied(api, config, names, why):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    assert why in _denied(api, config, request_body(names=names))


def test_a_subject_other_than_its_name_is_denied(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "worker-1.node.lvm-iscsi.internal")])
    assert "subject" in _denied(api, config, request_body(subject=subject))


def test_an_empty_subject_is_allowed(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    assert decide(api, config, request_body(subject=x509.Name([])))[0] == "approved"


def test_asking_for_a_ca_is_denied(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    body = request_body(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])
    assert "extensions" in _denied(api, config, body)


@pytest.mark.parametrize("usages", [
    ["digital signature", "client auth", "server auth"],      # a node plugin does not serve
    ["client auth"],
    ["digital signature", "client auth", "code signing"],
])
def test_other_usages_are_denied(api, config, usages):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    assert "usages" in _denied(api, config, request_body(usages=usages))


def test_a_key_pki_does_not_certify_is_denied(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    assert "EC P-256" in _denied(api, config, request_body(key=rsa.generate_private_key(65537, 2048), names=None,
                                                           subject=x509.Name([])))
    assert "EC P-256" in _denied(api, config, request_body(key=ec.generate_private_key(ec.SECP384R1()),
                                                           subject=x509.Name([])))


def test_a_request_that_is_not_a_csr_is_denied(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    assert "not a PEM certificate request" in _denied(api, config, request_body(pem=b"junk"))


@pytest.mark.parametrize("account,namespace,why", [
    ("default", NS, "not by the service account"),
    (NODE_SA, "other-ns", "not by the service account"),
    ("rel-controller", NS, "not by the service account"),
])
def test_only_the_driver_s_agent_and_node_accounts_are_heard(api, config, account, namespace, why):
    api.as_pod(account, "rel-node-bbbbb", "worker-1", namespace=namespace)
    assert why in _denied(api, config, request_body())


def test_a_user_or_a_token_bound_to_no_pod_is_denied(api, config):
    api.requester = {"username": "alice", "groups": ["system:authenticated"]}
    assert "not by the service account" in _denied(api, config, request_body())
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    for key in (certsigner.NODE_NAME, certsigner.POD_NAME, certsigner.POD_UID):
        api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
        del api.requester["extra"][key]
        assert "not one value" in _denied(api, config, request_body())


@pytest.mark.parametrize("change,why", [
    (lambda a: a.pods.pop((NS, "rel-node-bbbbb")), "no such pod"),
    (lambda a: a.add_pod("rel-node-bbbbb", "worker-1", NODE_SA, "rel-node", uid="new-uid"), "uid"),
    (lambda a: a.add_pod("rel-node-bbbbb", "worker-2", NODE_SA, "rel-node"), "runs on 'worker-2'"),
    (lambda a: a.add_pod("rel-node-bbbbb", "worker-1", "default", "rel-node"), "service account 'default'"),
    (lambda a: a.add_pod("rel-node-bbbbb", "worker-1", NODE_SA, "rel-agent"), "not a pod of DaemonSet rel-node"),
    (lambda a: a.pods[NS, "rel-node-bbbbb"]["metadata"].pop("ownerReferences"), "not a pod of DaemonSet"),
    (lambda a: a.add_pod("rel-node-bbbbb", "worker-1", NODE_SA, "rel-node", phase="Failed"), "terminated"),
])
def test_the_pod_must_be_the_driver_s_own_on_that_node(api, config, change, why):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    change(api)
    assert why in _denied(api, config, request_body())


def test_approved_by_someone_else_but_not_the_driver_s_pod_is_failed_not_signed(api, config):
    api.as_pod(NODE_SA, "rel-node-ccccc", "worker-2")
    created = api.create(request_body(node="worker-1"))
    created["status"]["conditions"] = [{"type": "Approved", "status": "True", "reason": "KubectlApprove"}]
    created = api.update_approval(created)
    assert CsrSigner(config, api).handle(created) == "failed"
    csr = api.get(created["metadata"]["name"])
    assert condition(csr)["type"] == "Failed" and not csr["status"].get("certificate")


def test_two_replicas_decide_a_csr_once(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    created = api.create(request_body())
    one, other = CsrSigner(config, api), CsrSigner(config, api)
    assert one.handle(created) == "approved"
    assert other.handle(created) == "conflict"   # its copy is stale: the first one's update wins
    csr = api.get(created["metadata"]["name"])
    assert [c["type"] for c in csr["status"]["conditions"]] == ["Approved"] and csr["status"]["certificate"]
    assert other.handle(csr) == ""


def test_run_once_decides_what_is_pending_and_leaves_the_rest(api, config):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    good = api.create(request_body())["metadata"]["name"]
    bad = api.create(request_body(node="worker-2"))["metadata"]["name"]
    other_signer = request_body()
    other_signer["spec"]["signerName"] = "kubernetes.io/kube-apiserver-client"
    foreign = api.create(other_signer)["metadata"]["name"]
    CsrSigner(config, api).run_once()
    assert api.get(good)["status"]["certificate"]
    assert condition(api.get(bad))["type"] == "Denied"
    assert api.get(foreign)["status"] == {}


# ------------------------------------------------------------------------------------------------ the pod's side

def test_a_node_plugin_obtains_and_renews_its_certificate_through_the_signer(api, config, ca, tmp_path):
    """certrequest.CsrClient as the keeper's obtain: the CSR is made, the signer (run here while the client
    waits) signs it, the files are written; a renewal makes a new key and a new CSR."""
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    signer = CsrSigner(config, api)
    client = CsrClient(api, SIGNER, peers.NODE, "worker-1", sleep=lambda _: signer.run_once())
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes((ca.ca_dir / "ca.crt").read_bytes())
    keeper = CertKeeper(tmp_path / "tls", peers.Peer(peers.NODE, "worker-1"), client, read_bundle(bundle))
    first = keeper.first()
    files = TlsFiles(tmp_path / "tls")
    ca_pem, cert_pem, _ = files.read()
    assert ca_pem == bundle.read_bytes() and x509.load_pem_x509_certificate(cert_pem) == first
    assert ((tmp_path / "tls" / "tls.key").stat().st_mode & 0o777) == 0o600
    second = keeper.renew()
    assert second.serial_number != first.serial_number and second.public_key() != first.public_key()
    assert len(api.csrs) == 2 and all(c["status"]["certificate"] for c in api.csrs.values())
    assert all(c["metadata"]["name"].startswith("lvm-iscsi-node-worker-1-") for c in api.csrs.values())


def test_a_denied_request_stops_the_first_attempt_with_the_reason(api, config, ca, tmp_path):
    api.as_pod(NODE_SA, "rel-node-ccccc", "worker-2")   # this pod runs on worker-2, it asks for worker-1
    signer = CsrSigner(config, api)
    client = CsrClient(api, SIGNER, peers.NODE, "worker-1", sleep=lambda _: signer.run_once())
    keeper = CertKeeper(tmp_path / "tls", peers.Peer(peers.NODE, "worker-1"), client,
                        read_bundle(ca.ca_dir / "ca.crt"))
    with pytest.raises(Refused, match="denied.*only the DNS name worker-2.node"):
        keeper.first()
    assert not (tmp_path / "tls").exists()


def test_a_certificate_not_of_the_trusted_ca_is_not_written(api, config, tmp_path):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    signer = CsrSigner(config, api)
    client = CsrClient(api, SIGNER, peers.NODE, "worker-1", sleep=lambda _: signer.run_once())
    other = TestPki(tmp_path / "other")
    keeper = CertKeeper(tmp_path / "tls", peers.Peer(peers.NODE, "worker-1"), client,
                        read_bundle(other.ca_dir / "ca.crt"))
    with pytest.raises(ValueError, match="not in the CA bundle"):
        keeper.renew()
    assert not (tmp_path / "tls").exists()


def test_a_request_that_vanished_is_said(api, tmp_path):
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    client = CsrClient(api, SIGNER, peers.NODE, "worker-1", sleep=lambda _: api.csrs.clear())
    with pytest.raises(ValueError, match="gone before it was signed"):
        client(pki.new_key())


def test_a_csr_approved_but_not_signed_is_signed_at_the_next_look(api, config):
    """A controller that stops between its approval and its signature (or whose CA could not be read then)
    leaves an approved CSR without a certificate: the next listing (any replica's) signs it."""
    api.as_pod(NODE_SA, "rel-node-bbbbb", "worker-1")
    created = api.create(request_body())
    verdict = certsigner.review(created, config, api.pod)
    assert verdict.ok
    api.update_approval(CsrSigner._with(created, "Approved", "checked"))   # ...and then the controller died
    assert not api.get(created["metadata"]["name"])["status"].get("certificate")
    CsrSigner(config, api).run_once()
    csr = api.get(created["metadata"]["name"])
    assert [c["type"] for c in csr["status"]["conditions"]] == ["Approved"]
    assert pki.identity(x509.load_pem_x509_certificate(certificate_of(csr))) == peers.Peer(peers.NODE, "worker-1")
