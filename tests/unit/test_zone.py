"""The worker's zone (csi/node/zone.py): read from its Node object; a worker without one must say what breaks."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import kubernetes
import pytest

from csi import ids
from csi.node import zone


class FakeCoreV1:
    labels: dict = {}

    def read_node(self, name):
        self.asked = name
        return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=self.labels))


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", FakeCoreV1)
    return FakeCoreV1


def test_zone_comes_from_the_node_label(api, caplog):
    api.labels = {zone.ZONE_LABEL: "eu-1a", "kubernetes.io/hostname": "worker-1"}
    with caplog.at_level(logging.WARNING, logger="csi.node.zone"):
        assert zone.node_zone("worker-1", ids.topology_key(ids.DRIVER_NAME)) == "eu-1a"
    assert not caplog.records


@pytest.mark.parametrize("labels", [{}, None, {zone.ZONE_LABEL: ""}])
def test_a_worker_without_a_zone_says_what_breaks_and_how_to_fix_it(api, caplog, labels):
    """Without a zone the node plugin registers no topology, and pods with this driver's volumes stay Pending
    on that worker: the log must say so, not only that the label is missing."""
    api.labels = labels
    with caplog.at_level(logging.WARNING, logger="csi.node.zone"):
        assert zone.node_zone("worker-7", ids.topology_key(ids.DRIVER_NAME)) == ""
    [record] = caplog.records
    text = record.getMessage()
    assert record.levelno == logging.WARNING
    for part in ("node worker-7 has no topology.kubernetes.io/zone label", "topology.lvm-iscsi.csi.dev/zone",
                 "cannot be scheduled", "stay Pending",
                 "kubectl label node worker-7 topology.kubernetes.io/zone=<zone>", "node.zone"):
        assert part in text, (part, text)


def test_outside_a_cluster_there_is_no_zone_and_no_api_call(monkeypatch, caplog):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda: pytest.fail("no API call outside a cluster"))
    with caplog.at_level(logging.WARNING, logger="csi.node.zone"):
        assert zone.node_zone("worker-1") == ""
    assert "no zone topology" in caplog.text
