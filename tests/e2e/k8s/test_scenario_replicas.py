"""A replicated claim on the real cluster (issue 15): a pod writing to a `replicas: 2` volume goes on through a
storage node's power cut, and the leg resyncs once the node is back in the cluster, with nobody acting; the
controller says so on the claim (and on a plain claim of that node, which cannot go on) with Warning events.

The two storage nodes: storage-1, and worker-1 made a storage node for this test (a VG of pool "extra" on each);
the pod runs on worker-1, so the leg it loses is storage-1's. storage-1 also runs a controller replica and a node
plugin: the power cut takes them too. Runs after the other scenario modules (file order): storage-1 comes back
with a rebooted kernel."""

from __future__ import annotations

import time

import pytest

from csi import ids
from csi.controller import events
from csi.lab.common import LabError
from tests.e2e.arrays import array_line, mdstat, synced
from tests.e2e.cluster import PREFIX
from tests.e2e.k8s import driver as drv
from tests.e2e.k8s.driver import NAMESPACE, STATE, STORAGE_LABEL, TIMINGS
from tests.e2e.k8s.test_scenario import iscsiadm_list, pvc, wait_phase
from tests.e2e.test_replicas import WRITER, writer_log

pytestmark = pytest.mark.e2e
CLAIM, POD, PLAIN = "replicated", "replicated-writer", "plain-on-storage-1"
LOG, STOP, DATA = "/tmp/records.log", "/tmp/stop", "/data/records.bin"


def writer_pod(node: str) -> dict:
    """The tests' fsync'ing record writer (tests/e2e/test_replicas.py) in a pod of the driver's image (it has
    Python), then idle, so that its log and data can be read after it stopped."""
    script = WRITER + "\ntime.sleep(3600)\n"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "terminationGracePeriodSeconds": 1,
                     "restartPolicy": "Never",
                     "containers": [{"name": "main", "image": STATE["driver_image"], "imagePullPolicy": "Never",
                                     "securityContext": {"runAsUser": 0},
                                     "command": ["python3", "-c", script, DATA, LOG, STOP],
                                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}}]}}


def records(k8s) -> tuple[list[tuple[int, float]], list[str]]:
    return writer_log(k8s.kubectl(["exec", POD, "--", "cat", LOG], timeout=60).stdout)


def ready_agents(k8s) -> list[str]:
    return sorted(p["spec"]["nodeName"] for p in drv.driver_pods(k8s).get("agent", [])
                  if all(drv.container_ready(p).values() or [False]))


def all_warnings(k8s) -> list[tuple[str, str, str, str]]:
    """(kind, name, reason, source) of every Warning event in namespace default: the claims' and the cluster's."""
    return sorted((e["involvedObject"]["kind"], e["involvedObject"]["name"], e["reason"],
                   (e.get("source") or {}).get("component", "")) for e in k8s.get("events", "-n", "default")["items"]
                  if e["type"] == "Warning")


def warnings_about(k8s, kind: str, name: str) -> list[str]:
    """Reasons of the controller's Warning events on the object. Not the sidecars': a provisioner's
    ProvisioningFailed from a first attempt (a storage node the controller had not polled yet) is about the
    claim's creation, not about storage-1."""
    return [r for k, n, r, source in all_warnings(k8s) if (k, n, source) == (kind, name, events.COMPONENT)]


def extra_lvs(node) -> list[str]:
    out = node.run(["lvs", "--noheadings", "-o", "lv_name", drv.EXTRA_VG], timeout=60, check=True).stdout
    return sorted(set(out.split()) - {"thinpool2"})


def test_a_pod_writing_to_a_replicated_claim_goes_on_through_a_storage_node_power_cut(
        installed, k8s_images, driver_images, record_property):
    k8s = installed
    storage, worker = k8s.lab.node(STATE["storage"]), k8s.lab.node(STATE["worker"])
    for node in (storage, worker):
        drv.make_extra_vg(node)
    try:
        # The new pool on storage-1 is served once its agent starts again (as after a helm upgrade that adds it);
        # worker-1's agent starts with it.
        k8s.kubectl(["delete", "pod", "-n", NAMESPACE, "--wait=true",
                     *[p["metadata"]["name"] for p in drv.driver_pods(k8s)["agent"]]])
        k8s.kubectl(["label", "node", worker.name, f"{STORAGE_LABEL}=true"])
        k8s.wait_for(lambda: ready_agents(k8s) == sorted([storage.name, worker.name]), 300,
                     "an agent ready on each storage node")
        # What the power cut leaves: a controller replica on worker-1 (the chart spreads them over the nodes).
        k8s.wait_for(lambda: drv.controller_nodes(k8s) == sorted([storage.name, worker.name]), 120,
                     "a controller replica on each node")
        k8s.apply([pvc(CLAIM, size="128Mi", storage_class=drv.REPLICATED_CLASS), writer_pod(worker.name),
                   pvc(PLAIN, size="32Mi", storage_class=drv.IMMEDIATE_CLASS)])   # pool thin: storage-1 only
        wait_phase(k8s, "pod", POD, "Running", timeout=300)
        wait_phase(k8s, "pvc", PLAIN, "Bound", timeout=120)
        plain_pv, replicated_pv = (k8s.get("pvc", c)["spec"]["volumeName"] for c in (PLAIN, CLAIM))
        handle = k8s.get("pv", k8s.get("pvc", CLAIM)["spec"]["volumeName"])["spec"]["csi"]["volumeHandle"]
        key = ids.parse_replicated_id(handle)
        assert extra_lvs(storage) == [key] and extra_lvs(worker) == [key], "one leg on each storage node"
        k8s.wait_for(lambda: synced(worker, key), 120, "the array in sync on worker-1")
        k8s.wait_for(lambda: len(records(k8s)[0]) >= 100, 120, "100 records fsync'ed")

        # storage-1 loses its power: its leg's I/O stops without an answer, its pods with it.
        cut_at = time.monotonic()
        storage.kill()
        k8s.wait_for(lambda: array_line(worker, key) in ("[2/1] [U_]", "[2/1] [_U]"), 60,
                     "the array degraded on worker-1", interval=0.5)
        degraded_after = time.monotonic() - cut_at
        before = len(records(k8s)[0])
        k8s.wait_for(lambda: len(records(k8s)[0]) >= before + 100, 60, "the writer going on with one leg")
        # The controller replica left (on worker-1) tells the claims' users, on the claims and their volumes.
        expect = {("PersistentVolumeClaim", CLAIM): "ReplicaLegUnreachable",
                  ("PersistentVolume", replicated_pv): "ReplicaLegUnreachable",
                  ("PersistentVolumeClaim", PLAIN): "VolumeInaccessible",
                  ("PersistentVolume", plain_pv): "VolumeInaccessible"}
        try:
            k8s.wait_for(lambda: all(warnings_about(k8s, *obj) == [reason] for obj, reason in expect.items()), 120,
                         "Warning events on the claims and volumes with data on storage-1")
        except LabError as exc:
            raise AssertionError(f"{exc}: expected {expect}; the Warning events: {all_warnings(k8s)}; the controller "
                                 f"pods' nodes: {drv.controller_nodes(k8s)}") from None

        storage.boot(timeout=180)
        drv.attach_extra_vg(storage)
        rejoined = k8s.rejoin(storage, [i.archive for i in {**k8s_images, **driver_images}.values()])
        back = time.monotonic()
        # Nothing but the node plugin assembles a leg: the booted node's udev, shown the leg again, leaves it alone.
        assert " : active" not in mdstat(storage), mdstat(storage)
        k8s.wait_for(lambda: synced(worker, key), 300, "the leg re-added and resynced", interval=2)
        resynced_after = time.monotonic() - back
        done = len(records(k8s)[0])
        k8s.wait_for(lambda: len(records(k8s)[0]) >= done + 50, 60, "the writer going on with both legs")
        k8s.kubectl(["exec", POD, "--", "touch", STOP])
        time.sleep(2)
        written, errors = records(k8s)
        assert errors == [], f"the writer saw errors: {errors[:5]}"
        stall = max(b[1] - a[1] for a, b in zip(written, written[1:]))
        readable = int(k8s.kubectl(["exec", POD, "--", "python3", "-c", PREFIX, DATA], timeout=120).stdout)
        assert readable >= len(written)
        TIMINGS["replicated: worst stall between two fsync'ed records"] = stall
        TIMINGS["replicated: storage node power-cut -> array degraded"] = degraded_after
        TIMINGS["replicated: node booted -> back in the cluster (images imported again)"] = rejoined
        TIMINGS["replicated: back in the cluster -> leg resynced"] = resynced_after
        for name, value in (("worst_write_stall_s", stall), ("degraded_after_s", degraded_after),
                            ("rejoined_s", rejoined), ("resynced_after_s", resynced_after)):
            record_property(f"k8s_replica_power_cut_{name}", round(value, 1))
        assert stall < 20, f"a write waited {stall:.1f}s (the bound is 20 s)"

        k8s.kubectl(["delete", "pod", POD, "--wait=true", "--timeout=120s"])
        k8s.kubectl(["delete", "pvc", CLAIM, PLAIN, "--wait=true", "--timeout=180s"])
        k8s.wait_for(lambda: not k8s.get("pv")["items"], 180, "the PVs gone")
        assert extra_lvs(storage) == [] and extra_lvs(worker) == []
        assert " : active" not in mdstat(worker), mdstat(worker)
        assert not [s for s in iscsiadm_list(worker, "session") if key.lower() in s.lower()]
    finally:
        k8s.kubectl(["delete", "pod", POD, "--ignore-not-found", "--wait=true", "--timeout=120s"], check=False)
        k8s.kubectl(["delete", "pvc", CLAIM, PLAIN, "--ignore-not-found", "--wait=true", "--timeout=180s"],
                    check=False)
        k8s.kubectl(["label", "node", worker.name, f"{STORAGE_LABEL}-"], check=False)
        for node in (storage, worker):
            if node.running:
                drv.drop_extra_vg(node)
