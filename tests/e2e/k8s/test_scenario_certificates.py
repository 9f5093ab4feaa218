"""Issue 13's certificates on the real cluster (after test_scenario.py, same installed chart): every agent and
node plugin got its certificate through the controller's signer, with a CSR the API server tied to its pod and
node; a CSR for another node's name made with a node plugin's own token is denied; each agent serves the
certificate of its own node, which the controller's certificate and CA bundle verify."""

from __future__ import annotations

import time

import pytest

from tests.e2e.k8s import driver as drv
from tests.e2e.k8s.driver import NAMESPACE, RELEASE, STATE

pytestmark = pytest.mark.e2e
SIGNER = "lvm-iscsi.csi.dev/identity"
NODE_KEY = "authentication.kubernetes.io/node-name"
POD_KEY = "authentication.kubernetes.io/pod-name"
TLS_DIR = "/run/lvm-iscsi-csi/tls"

# Run in a driver container: a CSR for (role, node) made with the pod's own token, waited for like the driver's.
ASK = """
import sys
from csi import pki
from csi.certkeeper import Refused
from csi.certrequest import CsrClient
from csi.kubecsr import CsrApi
try:
    CsrClient(CsrApi(), sys.argv[1], sys.argv[2], sys.argv[3])(pki.new_key())
    print("SIGNED")
except Refused as exc:
    print("REFUSED", exc)
"""

# Run in the controller's driver container: the certificate an agent serves to a new connection, verified with
# the controller's own certificate, key and CA bundle against the name given.
SERVED = """
import socket, ssl, sys
from cryptography import x509
host, port, name, tls = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(tls + "/ca.crt")
ctx.load_cert_chain(tls + "/tls.crt", tls + "/tls.key")
ctx.set_alpn_protocols(["h2"])
try:
    with socket.create_connection((host, port), timeout=20) as raw, ctx.wrap_socket(raw, server_hostname=name) as c:
        cert = x509.load_der_x509_certificate(c.getpeercert(binary_form=True))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        print("SERVED", ",".join(san.get_values_for_type(x509.DNSName)))
except ssl.SSLCertVerificationError as exc:
    print("REFUSED", exc.verify_message)
"""


def csrs(k8s) -> list[dict]:
    return [c for c in k8s.get("csr")["items"] if c["spec"]["signerName"] == SIGNER]


def condition(csr: dict) -> str:
    conds = [c["type"] for c in csr.get("status", {}).get("conditions") or []]
    return ",".join(conds)


def pod_of(k8s, component: str, node: str) -> dict:
    return next(p for p in drv.driver_pods(k8s)[component] if p["spec"]["nodeName"] == node)


def run_in(k8s, pod: str, *argv: str) -> str:
    done = k8s.kubectl(["exec", "-n", NAMESPACE, pod, "-c", "driver", "--", *argv], check=False, timeout=150)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_every_agent_and_node_plugin_got_its_certificate_from_the_signer(installed):
    k8s = installed
    issued = {(c["spec"]["extra"][POD_KEY][0], c["spec"]["extra"][NODE_KEY][0]): c for c in csrs(k8s)
              if c.get("status", {}).get("certificate")}
    pods = drv.driver_pods(k8s)
    for component in ("agent", "node"):
        for p in pods[component]:
            name, node = p["metadata"]["name"], p["spec"]["nodeName"]
            csr = issued.get((name, node))
            assert csr is not None, (name, node, sorted(issued))
            assert csr["spec"]["username"] == f"system:serviceaccount:{NAMESPACE}:{RELEASE}-{component}"
            assert condition(csr) == "Approved"
            assert csr["metadata"]["name"].startswith(f"lvm-iscsi-{component}-{node}-")
    # the controller issued its own: its certificate file names it
    controller = pods["controller"][0]["metadata"]["name"]
    san = run_in(k8s, controller, "python", "-c", "import sys; from cryptography import x509; "
                 "c = x509.load_pem_x509_certificate(open(sys.argv[1], 'rb').read()); "
                 "print(c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value"
                 ".get_values_for_type(x509.DNSName))", f"{TLS_DIR}/tls.crt")
    assert san == "['controller.lvm-iscsi.internal']"


def test_a_csr_for_another_nodes_name_with_a_node_plugins_own_token_is_denied(installed):
    k8s = installed
    worker, storage = STATE["worker"], STATE["storage"]
    node_pod = pod_of(k8s, "node", worker)["metadata"]["name"]
    before = {c["metadata"]["name"] for c in csrs(k8s)}
    t0 = time.monotonic()
    out = run_in(k8s, node_pod, "python", "-c", ASK, SIGNER, "node", storage)
    assert out.startswith("REFUSED") and f"only the DNS name {worker}.node.lvm-iscsi.internal" in out, out
    out = run_in(k8s, node_pod, "python", "-c", ASK, SIGNER, "agent", worker)
    assert out.startswith("REFUSED") and f"only the DNS name {worker}.node.lvm-iscsi.internal" in out, out
    drv.TIMINGS["CSR for another node -> denied (twice)"] = time.monotonic() - t0
    new = [c for c in csrs(k8s) if c["metadata"]["name"] not in before]
    assert len(new) == 2, [c["metadata"]["name"] for c in new]
    for csr in new:
        # what the API server, not the pod, wrote into the request: its account, pod and node
        assert csr["spec"]["username"] == f"system:serviceaccount:{NAMESPACE}:{RELEASE}-node"
        assert csr["spec"]["extra"][NODE_KEY] == [worker] and csr["spec"]["extra"][POD_KEY] == [node_pod]
        assert condition(csr) == "Denied" and not csr["status"].get("certificate")
        deny = csr["status"]["conditions"][0]
        assert deny["reason"] == "LvmIscsiCsiIdentityRefused", deny
    # a pod cannot approve its own request either: its token has no right to. Asked of the API server's
    # authorizer (kubectl's own `certificate approve` refuses a request already denied before asking anyone).
    account = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-node"
    done = k8s.kubectl(["auth", "can-i", "update", "certificatesigningrequests/approval", "--as", account],
                       check=False)
    assert done.returncode != 0 and done.stdout.strip() == "no", done


def test_each_agent_serves_the_certificate_of_its_own_node(installed):
    k8s = installed
    controller = drv.driver_pods(k8s)["controller"][0]["metadata"]["name"]
    agents = drv.driver_pods(k8s)["agent"]
    assert agents
    for agent in agents:
        node, host = agent["spec"]["nodeName"], agent["status"]["hostIP"]
        name = f"{node}.agent.lvm-iscsi.internal"
        out = run_in(k8s, controller, "python", "-c", SERVED, host, str(drv.AGENT_PORT), name, TLS_DIR)
        assert out == f"SERVED {name}", out
        # and it is not the certificate of any other node: the controller would refuse it under another name
        other = f"{STATE['worker'] if node != STATE['worker'] else STATE['storage']}.agent.lvm-iscsi.internal"
        out = run_in(k8s, controller, "python", "-c", SERVED, host, str(drv.AGENT_PORT), other, TLS_DIR)
        assert out.startswith("REFUSED") and "mismatch" in out.lower(), out
    log = k8s.kubectl(["logs", "-n", NAMESPACE, controller, "-c", "driver"], check=False).stdout + \
        k8s.kubectl(["logs", "-n", NAMESPACE, drv.driver_pods(k8s)["controller"][1]["metadata"]["name"], "-c",
                     "driver"], check=False).stdout
    assert "signed the certificate of the agent of" in log and "denied CertificateSigningRequest" in log
