"""The placement journal's two stores: create-if-absent, version-guarded updates, state; and discovery's
reading of Node objects."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
from kubernetes.client.rest import ApiException

from csi import errors
from csi.controller.discovery import storage_node_of
from csi.controller.journal import Conflict, Entry, FileJournal
from csi.controller.kubejournal import LABEL, KubeJournal


class FakeCoreV1:
    """The ConfigMap calls of kubernetes.client.CoreV1Api with the API server's answers: 409 on create of an
    existing name and on replace with a stale resourceVersion, 404 for a missing one."""

    def __init__(self):
        self.objects: dict[str, object] = {}
        self.version = 0
        self.mutex = threading.Lock()

    def _stored(self, body):
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.objects[body.metadata.name] = body
        return body

    def create_namespaced_config_map(self, namespace, body, _request_timeout=None):
        with self.mutex:
            if body.metadata.name in self.objects:
                raise ApiException(status=409, reason="AlreadyExists")
            return self._stored(body)

    def read_namespaced_config_map(self, name, namespace, _request_timeout=None):
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        return self.objects[name]

    def replace_namespaced_config_map(self, name, namespace, body, _request_timeout=None):
        with self.mutex:
            current = self.objects.get(name)
            if current is None:
                raise ApiException(status=404, reason="NotFound")
            if body.metadata.resource_version != current.metadata.resource_version:
                raise ApiException(status=409, reason="Conflict")
            return self._stored(body)

    def delete_namespaced_config_map(self, name, namespace, _request_timeout=None):
        if self.objects.pop(name, None) is None:
            raise ApiException(status=404, reason="NotFound")

    def list_namespaced_config_map(self, namespace, limit=None, label_selector="", _continue=None,
                                   _request_timeout=None):
        want = dict(kv.split("=") for kv in label_selector.split(",") if "!=" not in kv)
        items = [o for o in sorted(self.objects.values(), key=lambda o: o.metadata.name)
                 if all(o.metadata.labels.get(k) == v for k, v in want.items())
                 and o.metadata.labels.get("lvm-iscsi.csi.dev/record") != "state"]
        start = int(_continue or 0)
        page = items[start:start + limit]
        more = str(start + limit) if start + limit < len(items) else None
        return SimpleNamespace(items=page, metadata=SimpleNamespace(_continue=more))


@pytest.fixture(params=["file", "kubernetes"])
def journal(request, tmp_path):
    if request.param == "file":
        return FileJournal(tmp_path / "journal")
    return KubeJournal("csi-ns", "c1", api=FakeCoreV1())


def test_claim_is_create_if_absent(journal):
    first = journal.claim(Entry("c1-pvc-1-abc", "volume", "pvc-1", "s1", pool="thin"))
    second = journal.claim(Entry("c1-pvc-1-abc", "volume", "pvc-1", "s2", pool="thin"))
    assert first.node == second.node == "s1" and journal.get("c1-pvc-1-abc").node == "s1"


def test_concurrent_claims_all_see_one_winner(journal):
    seen = []

    def claim(node):
        seen.append(journal.claim(Entry("race", "volume", "race", node)).node)
    threads = [threading.Thread(target=claim, args=(f"s{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and journal.get("race").node == seen[0]


def test_update_is_guarded_by_the_version(journal):
    entry = journal.claim(Entry("k", "volume", "n", "s1"))
    stale = journal.get("k")
    entry.state = "ready"
    journal.update(entry)
    assert journal.get("k").state == "ready"
    stale.pool = "other"
    with pytest.raises(Conflict):
        journal.update(stale)


def test_delete_entries_and_state(journal):
    for i in range(3):
        journal.claim(Entry(f"k{i}", "volume", f"n{i}", "s1"))
    journal.delete("k1")
    journal.delete("k1")
    assert sorted(e.key for e in journal.entries()) == ["k0", "k2"]
    assert not journal.adopted() and journal.retired() == set()
    journal.mark_adopted()
    journal.retire("s9")
    journal.remember_nodes([("s1", "10.0.0.1:7600", "a"), ("s9", "10.0.0.9:7600", "b")])
    assert journal.adopted() and journal.retired() == {"s9"}
    assert journal.known_nodes() == [("s1", "10.0.0.1:7600", "a")]   # retired ones are not offered


def test_a_record_of_another_format_is_refused_not_misread(tmp_path):
    journal = FileJournal(tmp_path / "j")
    journal.claim(Entry("k", "volume", "n", "s1"))
    path = next((tmp_path / "j" / "records").glob("*.json"))
    data = json.loads(path.read_text())
    data["format"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(errors.CsiError) as e:
        journal.get("k")
    assert e.value.code == errors.Code.INTERNAL and "left alone" in e.value.message


def test_file_records_are_private(tmp_path):
    journal = FileJournal(tmp_path / "j")
    journal.claim(Entry("k", "volume", "n", "s1"))
    assert (tmp_path / "j").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "j" / "records").iterdir())


def test_kube_records_are_labelled_per_cluster_and_hold_no_secret():
    api = FakeCoreV1()
    KubeJournal("ns", "c1", api=api).claim(Entry("k", "volume", "n", "s1"))
    KubeJournal("ns", "c2", api=api).claim(Entry("k", "volume", "n", "s2"))
    assert [e.node for e in KubeJournal("ns", "c1", api=api).entries()] == ["s1"]
    cm = next(o for o in api.objects.values() if o.metadata.labels[LABEL] == "c1")
    assert cm.metadata.name.startswith("lvm-iscsi-c1-") and len(cm.metadata.name) <= 253
    assert "secret" not in json.dumps(cm.data).lower()


def test_kube_api_errors_become_unavailable():
    class Broken(FakeCoreV1):
        def read_namespaced_config_map(self, *a, **kw):
            raise ApiException(status=500, reason="Internal")
    with pytest.raises(errors.CsiError) as e:
        KubeJournal("ns", "c1", api=Broken()).get("k")
    assert e.value.code == errors.Code.UNAVAILABLE


def _node(name, labels, addresses):
    return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=labels),
                           status=SimpleNamespace(addresses=[SimpleNamespace(type=t, address=a) for t, a in addresses]))


def test_a_storage_node_from_its_node_object():
    n = storage_node_of(_node("st-1", {"topology.kubernetes.io/zone": "z1"},
                              [("Hostname", "st-1"), ("InternalIP", "10.1.2.3")]), 7600)
    assert (n.name, n.address, n.zone) == ("st-1", "10.1.2.3:7600", "z1")
    v6 = storage_node_of(_node("st-2", {}, [("InternalIP", "fd00::5")]), 7600)
    assert v6.address == "[fd00::5]:7600" and v6.zone == ""
    assert storage_node_of(_node("st-3", {}, []), 7600) is None           # no address yet
    assert storage_node_of(_node("Bad_Name", {}, [("InternalIP", "10.0.0.1")]), 7600) is None
