"""The Kubernetes API calls of the certificate flow (certrequest.py asks, certsigner.py decides), as the API's
own JSON: CertificateSigningRequests (certificates.k8s.io/v1) and the Pods the signer checks them against.

Plain JSON rather than the client's models: the request and the certificate are base64 in the API, and the
models would leave it to each caller to know whether a field was decoded; here nothing is, and the unit tests'
fake API (tests/unit/test_certsigner.py) holds the same documents the API server returns.
"""

from __future__ import annotations

import json
import os

TIMEOUT = 30.0


class Conflict(Exception):
    """The object changed since it was read (or exists): someone else, another replica, got there first."""


class CsrApi:
    def __init__(self, api_client=None):
        from kubernetes import client, config
        if api_client is None:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()   # re-reads the pod's rotating token as it expires
            else:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.certificates = client.CertificatesV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    @staticmethod
    def _json(response) -> dict:
        return json.loads(response.data)

    def _call(self, fn, *args, **kwargs) -> dict | None:
        """fn's JSON; None for 404; Conflict for 409."""
        from kubernetes.client.rest import ApiException
        try:
            return self._json(fn(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs))
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 409:
                raise Conflict(exc.reason) from None
            raise

    def create(self, body: dict) -> dict:
        return self._call(self.certificates.create_certificate_signing_request, body)

    def get(self, name: str) -> dict | None:
        return self._call(self.certificates.read_certificate_signing_request, name)

    def list(self, signer: str) -> dict:
        return self._call(self.certificates.list_certificate_signing_request,
                          field_selector=f"spec.signerName={signer}")

    def watch(self, signer: str, resource_version: str, seconds: int = 300):
        """(type, object) of each change to the CSRs of a signer from resource_version on, for about
        `seconds`; an expired resource_version raises (list again)."""
        from kubernetes import watch
        w = watch.Watch()
        for event in w.stream(self.certificates.list_certificate_signing_request,
                              field_selector=f"spec.signerName={signer}", resource_version=resource_version,
                              timeout_seconds=seconds, _request_timeout=seconds + 30):
            if event["type"] == "ERROR":
                raise RuntimeError(f"watching CSRs: {event['raw_object']}")
            yield event["type"], event["raw_object"]

    def update_approval(self, csr: dict) -> dict:
        """Writes csr's conditions (Approved or Denied); Conflict when it changed since it was read."""
        return self._call(self.certificates.replace_certificate_signing_request_approval,
                          csr["metadata"]["name"], csr)

    def update_status(self, csr: dict) -> dict:
        """Writes csr's status (the certificate, or a Failed condition); Conflict as above."""
        return self._call(self.certificates.replace_certificate_signing_request_status,
                          csr["metadata"]["name"], csr)

    def pod(self, namespace: str, name: str) -> dict | None:
        return self._call(self.core.read_namespaced_pod, name, namespace)
