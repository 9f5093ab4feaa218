"""The placement journal in the Kubernetes API: one ConfigMap per record in the driver's namespace.

Why ConfigMaps and not a custom resource: a ConfigMap needs nothing installed beside the chart (a CRD is
cluster-scoped, outlives `helm uninstall`, and `helm upgrade` does not update CRDs), and a namespaced Role is
enough to write it, so the controller needs no cluster-wide write access for its state. The API server gives
both guarantees the journal needs: `create` fails with 409 when the name exists (create-if-absent) and
`replace` with a resourceVersion fails with 409 when the object changed since it was read. A record holds
no secret (CHAP secrets live on the storage nodes only), so a ConfigMap is the right kind of object.

Names: <prefix>-<40 hex of the key's SHA-256>; labels say which cluster id the record belongs to, so two
releases of the driver in one namespace never read each other's records.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Iterator

from csi import errors, runner
from csi.controller.journal import Conflict, Entry, JournalState, _decode, digest

log = logging.getLogger(__name__)

LABEL = "lvm-iscsi.csi.dev/journal"
KIND_LABEL = "lvm-iscsi.csi.dev/record"
PAGE = 500


class KubeJournal(JournalState):
    def __init__(self, namespace: str, cluster_id: str, api=None):
        if api is None:
            from kubernetes import client, config
            config.load_incluster_config()
            api = client.CoreV1Api()
        self.api = api
        self.namespace = namespace
        self.cluster_id = cluster_id
        self.prefix = f"lvm-iscsi-{cluster_id}"

    # ---- plumbing

    def _timeout(self) -> float:
        return min(runner.time_left(), 30.0)

    @staticmethod
    def _status(exc) -> int:
        return int(getattr(exc, "status", 0) or 0)

    def _call(self, fn, *args, **kwargs):
        from kubernetes.client.rest import ApiException
        try:
            return fn(*args, _request_timeout=self._timeout(), **kwargs)
        except ApiException as exc:
            if self._status(exc) in (404, 409):
                raise
            raise errors.unavailable(f"the Kubernetes API did not store the placement journal: "
                                     f"{exc.status} {exc.reason}") from None
        except OSError as exc:   # urllib3's connection errors are OSErrors
            raise errors.unavailable(f"the Kubernetes API is unreachable: {exc}") from None

    def _body(self, name: str, kind: str, data: dict, version: str = ""):
        from kubernetes import client
        meta = client.V1ObjectMeta(name=name, namespace=self.namespace,
                                   labels={LABEL: self.cluster_id, KIND_LABEL: kind,
                                           "app.kubernetes.io/managed-by": "lvm-iscsi-csi"},
                                   resource_version=version or None)
        return client.V1ConfigMap(metadata=meta, data=data)

    def _name(self, key: str) -> str:
        return f"{self.prefix}-{digest(key)}"

    def _entry(self, cm) -> Entry:
        return _decode((cm.data or {}).get("record", ""), cm.metadata.resource_version,
                       f"ConfigMap {self.namespace}/{cm.metadata.name}")

    def _read(self, name: str):
        from kubernetes.client.rest import ApiException
        try:
            return self._call(self.api.read_namespaced_config_map, name, self.namespace)
        except ApiException as exc:
            if self._status(exc) == 404:
                return None
            raise

    # ---- records

    def get(self, key: str) -> Entry | None:
        cm = self._read(self._name(key))
        return self._entry(cm) if cm is not None else None

    def claim(self, entry: Entry) -> Entry:
        from kubernetes.client.rest import ApiException
        body = self._body(self._name(entry.key), entry.kind,
                          {"record": json.dumps(entry.content(), sort_keys=True)})
        try:
            return self._entry(self._call(self.api.create_namespaced_config_map, self.namespace, body))
        except ApiException as exc:
            if self._status(exc) != 409:
                raise
        stored = self.get(entry.key)
        return stored if stored is not None else self.claim(entry)

    def update(self, entry: Entry) -> Entry:
        from kubernetes.client.rest import ApiException
        body = self._body(self._name(entry.key), entry.kind, {"record": json.dumps(entry.content(), sort_keys=True)},
                          entry.version)
        try:
            return self._entry(self._call(self.api.replace_namespaced_config_map, body.metadata.name,
                                          self.namespace, body))
        except ApiException as exc:
            if self._status(exc) in (404, 409):
                raise Conflict(f"journal record of {entry.key} changed since it was read") from None
            raise

    def delete(self, key: str) -> None:
        from kubernetes.client.rest import ApiException
        try:
            self._call(self.api.delete_namespaced_config_map, self._name(key), self.namespace)
        except ApiException as exc:
            if self._status(exc) != 404:
                raise

    def entries(self) -> Iterator[Entry]:
        token = None
        while True:
            page = self._call(self.api.list_namespaced_config_map, self.namespace, limit=PAGE,
                              label_selector=f"{LABEL}={self.cluster_id},{KIND_LABEL}!=state",
                              **({"_continue": token} if token else {}))
            for cm in page.items:
                yield self._entry(cm)
            token = page.metadata._continue
            if not token:
                return

    # ---- state: adoption, storage nodes known and retired, in one more ConfigMap

    def _state(self) -> tuple[dict, str]:
        cm = self._read(f"{self.prefix}-state")
        if cm is None:
            return {}, ""
        return json.loads((cm.data or {}).get("state", "{}")), cm.metadata.resource_version

    def _read_state(self) -> dict:
        return self._state()[0]

    def _change_state(self, change) -> None:
        from kubernetes.client.rest import ApiException
        for _ in range(20):
            state, version = self._state()
            change(state)
            body = self._body(f"{self.prefix}-state", "state", {"state": json.dumps(state, sort_keys=True)},
                              version)
            try:
                if version:
                    self._call(self.api.replace_namespaced_config_map, body.metadata.name, self.namespace, body)
                else:
                    self._call(self.api.create_namespaced_config_map, self.namespace, body)
                return
            except ApiException as exc:
                if self._status(exc) not in (404, 409):
                    raise
            time.sleep(0.1)
        raise errors.aborted("the journal's state changed under 20 attempts in a row; retry")
