"""csi/kubecsr.py, the seam between the certificate flow and the Kubernetes API: the kubernetes client's calls
reach the API's paths with the API's verbs, JSON comes back as it was sent, 404 is None and 409 is Conflict.
(A small HTTP server plays the API server; the real one answers in the Kubernetes tier, tests/e2e/k8s.)"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from csi.kubecsr import Conflict, CsrApi

CSRS = "/apis/certificates.k8s.io/v1/certificatesigningrequests"


class ApiServer:
    def __init__(self):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.answers: dict[tuple[str, str], tuple[int, dict]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append((method, self.path, body))
                code, answer = outer.answers.get((method, self.path.split("?")[0]),
                                                 (404, {"kind": "Status", "code": 404, "reason": "NotFound"}))
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def do_PUT(self):
                self._answer("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def api(self) -> CsrApi:
        from kubernetes import client
        conf = client.Configuration()
        conf.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        return CsrApi(client.ApiClient(conf))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = ApiServer()
    yield s
    s.close()


def csr(name="c1", version="7", request="UkVR"):
    return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": name, "resourceVersion": version},
            "spec": {"request": request, "signerName": "lvm-iscsi.csi.dev/identity", "usages": ["client auth"],
                     "extra": {"authentication.kubernetes.io/pod-name": ["p"]}},
            "status": {"certificate": "Q0VSVA=="}}


def test_csrs_and_pods_round_trip_as_the_apis_json(server):
    api = server.api()
    server.answers[("POST", CSRS)] = (201, csr())
    server.answers[("GET", f"{CSRS}/c1")] = (200, csr())
    server.answers[("GET", CSRS)] = (200, {"kind": "CertificateSigningRequestList",
                                           "metadata": {"resourceVersion": "9"}, "items": [csr()]})
    server.answers[("PUT", f"{CSRS}/c1/approval")] = (200, csr(version="8"))
    server.answers[("PUT", f"{CSRS}/c1/status")] = (200, csr(version="9"))
    server.answers[("GET", "/api/v1/namespaces/ns/pods/p")] = (200, {"metadata": {"name": "p", "uid": "u"}})
    body = csr()
    assert api.create(body) == csr()           # base64 stays base64: nothing decoded on the way
    assert api.get("c1")["status"]["certificate"] == "Q0VSVA=="
    assert api.list("lvm-iscsi.csi.dev/identity")["metadata"]["resourceVersion"] == "9"
    assert api.update_approval(body)["metadata"]["resourceVersion"] == "8"
    assert api.update_status(body)["metadata"]["resourceVersion"] == "9"
    assert api.pod("ns", "p")["metadata"]["uid"] == "u"
    assert api.get("missing") is None and api.pod("ns", "missing") is None
    methods = [(m, p.split("?")[0]) for m, p, _ in server.requests]
    assert methods == [("POST", CSRS), ("GET", f"{CSRS}/c1"), ("GET", CSRS), ("PUT", f"{CSRS}/c1/approval"),
                       ("PUT", f"{CSRS}/c1/status"), ("GET", "/api/v1/namespaces/ns/pods/p"),
                       ("GET", f"{CSRS}/missing"), ("GET", "/api/v1/namespaces/ns/pods/missing")]
    from urllib.parse import parse_qs, urlparse
    query = parse_qs(urlparse(server.requests[2][1]).query)
    assert query["fieldSelector"] == ["spec.signerName=lvm-iscsi.csi.dev/identity"]
    assert server.requests[0][2] == body and server.requests[3][2] == body   # sent as given, resourceVersion too


def test_a_conflict_is_conflict_and_other_errors_are_raised(server):
    from kubernetes.client.rest import ApiException
    api = server.api()
    server.answers[("PUT", f"{CSRS}/c1/approval")] = (409, {"kind": "Status", "code": 409, "reason": "Conflict"})
    server.answers[("GET", "/api/v1/namespaces/ns/pods/p")] = (403, {"kind": "Status", "code": 403})
    with pytest.raises(Conflict):
        api.update_approval(csr())
    with pytest.raises(ApiException) as e:
        api.pod("ns", "p")
    assert e.value.status == 403
