"""A storage node down stops nothing else (issue 14), on real nodes: three storage nodes, one agent stopped and
one node powered off; volumes placed on the others are created at their usual latency, the name whose first
attempt reached the stopped node waits for it (UNAVAILABLE, never a duplicate elsewhere), listings refuse to
answer partially, and each node is used again within seconds of coming back."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest

from csi import faults, ids
from csi.controller.journal import FileJournal
from csi.proto import csi_pb2 as csi
from tests.e2e.cluster import MOUNT, MiB, ZONE_KEY

pytestmark = pytest.mark.e2e


def _req(name: str, zone: str) -> csi.CreateVolumeRequest:
    req = csi.CreateVolumeRequest(name=name, capacity_range=csi.CapacityRange(required_bytes=16 * MiB),
                                  volume_capabilities=[MOUNT])
    req.accessibility_requirements.requisite.add(segments={ZONE_KEY: zone})
    return req


def _timed_create(cluster, name: str, zone: str) -> tuple[float, csi.Volume]:
    started = time.monotonic()
    vol = cluster.ctrl.CreateVolume(_req(name, zone), timeout=120, wait_for_ready=True).volume
    return time.monotonic() - started, vol


def _until(what: str, fn, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = fn()
            if result:
                return result
            last = "not yet"
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s ({last})")
        time.sleep(0.5)


NAMES = [("avail-up-0", "zone-a"), ("avail-up-1", "zone-a"), ("avail-up-2", "zone-a"), ("avail-stuck", "zone-b"),
         ("avail-down-0", "zone-a"), ("avail-down-1", "zone-a"), ("avail-down-2", "zone-a"),
         ("avail-zone-c", "zone-c")]


def _leave_as_found(cluster) -> None:
    """After a failure part-way: every node and agent back (restarted) and this test's volumes gone (made once more where
    only placed, then deleted), so that the tests after it, which share the cluster, start from a clean one."""
    if not cluster.s3.running:
        cluster.s3.boot(timeout=180)
    for node in (cluster.s2, cluster.s3):
        cluster.d.start_agent(node)    # without the fault the test may have started it with
    for name, zone in NAMES:
        try:
            vol = _until(f"{name} answers again", lambda: cluster.ctrl.CreateVolume(
                _req(name, zone), timeout=30).volume, timeout=60)
            cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=120)
        except (grpc.RpcError, pytest.fail.Exception) as exc:
            print(f"cleaning up {name} failed: {exc}")


def test_a_storage_node_down_stops_nothing_else(cluster, record_property):
    try:
        s1, s2, s3 = cluster.s1, cluster.s2, cluster.s3
        storage = [s1, s2, s3]
        cluster.d.start_controller(storage)
        made = []

        # Latency with every storage node up.
        up = []
        for i in range(3):
            took, vol = _timed_create(cluster, f"avail-up-{i}", "zone-a")
            up.append(took)
            made.append(vol.volume_id)

        # The first attempt of one name reaches storage-2, whose agent dies in it and stays stopped.
        stuck = _req("avail-stuck", "zone-b")
        cluster.d.start_agent(s2, env={faults.ENV: "create.lv"})
        with pytest.raises(grpc.RpcError):
            cluster.ctrl.CreateVolume(stuck, timeout=120)
        assert s2.wait_exit("agent", timeout=60) == -9
        stuck_lv = ids.lv_name(cluster.d.cluster_id, "avail-stuck")
        assert FileJournal(cluster.d.journal_dir).get(stuck_lv).node == "storage-2"

        # storage-3 loses its power: no answer at all, not even a refused connection.
        s3.kill()
        try:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                cluster.ctrl.CreateVolume(stuck, timeout=120)
            refused_in = time.monotonic() - started
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "storage-2" in e.value.details()
            assert refused_in < 15, f"a down node cost {refused_in:.1f}s, not seconds"
            assert stuck_lv not in s1.run(["lvs", "--noheadings", "-o", "lv_name", "csi-vg"], timeout=30).stdout, \
                "the stuck name was placed a second time elsewhere"

            # Every other name: placed on what is up, at the usual latency.
            down = []
            for i in range(3):
                took, vol = _timed_create(cluster, f"avail-down-{i}", "zone-a")
                down.append(took)
                made.append(vol.volume_id)
                assert vol.volume_id.startswith("v1:storage-1:")
            # No node of zone-c answers: refused at once, not at the deadline.
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                cluster.ctrl.CreateVolume(_req("avail-zone-c", "zone-c"), timeout=120)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 15
            assert "storage-3" in e.value.details() and "down" in e.value.details()
            # Listings never answer a partial page; capacity answers for the nodes that answer.
            with pytest.raises(grpc.RpcError) as e:
                cluster.ctrl.ListVolumes(csi.ListVolumesRequest(), timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            cap = cluster.ctrl.GetCapacity(csi.GetCapacityRequest(), timeout=30)
            assert cap.available_capacity > 0
            record_property("create_seconds_all_up", [round(t, 2) for t in up])
            record_property("create_seconds_two_down", [round(t, 2) for t in down])
            print(f"CreateVolume seconds, all up: {up}; storage-2's agent stopped and storage-3 off: {down}")
            assert statistics.median(down) < 2 * statistics.median(up) + 1.0

            # storage-2's agent back: the stuck name is made where it was placed, within seconds.
            cluster.d.start_agent(s2)
            started = time.monotonic()
            vol = _until("the stuck name is created on storage-2",
                         lambda: cluster.ctrl.CreateVolume(stuck, timeout=30).volume, timeout=30)
            record_property("stuck_name_created_after_agent_start_s", round(time.monotonic() - started, 1))
            assert vol.volume_id.startswith("v1:storage-2:")
            made.append(vol.volume_id)
        finally:
            if not s3.running:
                s3.boot(timeout=180)
            cluster.d.start_agent(s3)
        # storage-3 back after its outage: used again within seconds.
        started = time.monotonic()
        vol = _until("storage-3 receives volumes again",
                     lambda: cluster.ctrl.CreateVolume(_req("avail-zone-c", "zone-c"), timeout=30).volume, timeout=30)
        record_property("node_used_again_after_agent_start_s", round(time.monotonic() - started, 1))
        assert vol.volume_id.startswith("v1:storage-3:")
        made.append(vol.volume_id)

        listed = {e.volume.volume_id for e in cluster.ctrl.ListVolumes(csi.ListVolumesRequest(), timeout=60).entries}
        assert set(made) <= listed
        for vid in made:
            cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120)
        assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}
        assert not [e for e in FileJournal(cluster.d.journal_dir).entries()]
    except BaseException:
        _leave_as_found(cluster)
        raise
