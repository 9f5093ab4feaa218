"""The driver on real kernels: two storage nodes and one worker as separate UML instances on one virtual switch,
real LVM, LIO and open-iscsi, the controller on the host reaching the agents over mutual TLS.

Covers issue 2's e2e list: placement on both storage nodes, the whole lifecycle with checksums, ACL and
CHAP refusals, fencing by ControllerUnpublishVolume, agent restart (and a lost LIO configuration rebuilt
from the records), bad input against the running driver, `status`, and TLS refusal of a foreign client.
"""

from __future__ import annotations

import re
import sys
import time

import grpc
import pytest

from csi import faults, ids, metrics, peers
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.proto import csi_pb2 as csi
from tests.e2e.cluster import BLOCK, MOUNT, ZONE_KEY, GiB, M, MiB, lio_targets

pytestmark = pytest.mark.e2e


def code(fn, req, timeout=60) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(req, timeout=timeout)
    return e.value.code()


def test_volumes_land_on_both_storage_nodes_by_zone(cluster):
    a = cluster.create("zone-a-vol", zone="zone-a")
    b = cluster.create("zone-b-vol", zone="zone-b")
    assert a.volume_id.startswith("v1:storage-1:") and a.accessible_topology[0].segments[ZONE_KEY] == "zone-a"
    assert b.volume_id.startswith("v1:storage-2:") and b.accessible_topology[0].segments[ZONE_KEY] == "zone-b"
    assert cluster.create("zone-a-vol", zone="zone-a").volume_id == a.volume_id   # idempotent
    lvs = cluster.storage_state()
    assert ids.parse_id(a.volume_id).lv in lvs["storage-1"][0]
    assert ids.parse_id(b.volume_id).lv in lvs["storage-2"][0]
    for v in (a, b):
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def test_lifecycle_across_the_network_with_checksums(cluster):
    v = cluster.create("lifecycle", size=128 * MiB, zone="zone-b")   # storage-2: the worker logs in across the bridge
    ctx = cluster.publish(v.volume_id)
    # where to log in and whom to ask for the credentials, no secret (the context lands in a VolumeAttachment)
    assert ctx["portals"] == f"{cluster.s2.ip}:3260" and ctx["agent"] == f"{cluster.s2.ip}:7600"
    assert not [k for k in ctx if "secret" in k.lower() or "chap" in k.lower()]
    assert len(cluster.chap(v.volume_id)["chapSecret"]) >= 12
    assert cluster.publish(v.volume_id) == ctx
    target = cluster.stage_publish(v.volume_id, ctx)
    digest = cluster.write(target)
    assert cluster.read(target) == digest
    # the worker's iSCSI disk has no I/O scheduler (csi/node/disk_queue.py); the UML worker's only SCSI disks
    # are the driver's
    schedulers = cluster.w.run([sys.executable, "-c", "import glob\nfor f in sorted(glob.glob("
                                "'/sys/block/sd*/queue/scheduler')): print(open(f).read().strip())"],
                               timeout=30, check=True).stdout.split("\n")
    assert [s for s in schedulers if s] and all("[none]" in s for s in schedulers if s), schedulers
    # the settings the plugin writes into the node record file are what open-iscsi reads back
    shown = cluster.w.run(["iscsiadm", "-m", "node", "-T", ctx["targetIqn"], "-p", ctx["portals"]], timeout=30,
                          check=True).stdout
    record = dict(line.split(" = ", 1) for line in shown.splitlines() if " = " in line)
    assert (record["node.startup"], record["node.conn[0].timeo.login_timeout"],
            record["node.session.initial_login_retry_max"], record["node.session.auth.authmethod"]) == (
        "manual", "10", "2", "CHAP"), record
    # and the kernel's sessions as the plugin reads them in sysfs (before a login: logged in already?), and
    # the disk it finds there without waiting for udev: the one udev's by-path link names
    live = cluster.w.run([sys.executable, "-c", "import os, sys\nfrom csi.node.iscsi import Iscsiadm, Target, "
                          "by_path\niqn, portal = sys.argv[1:]\nprint(sorted(Iscsiadm().logged_in_portals(iqn)))\n"
                          "print(Iscsiadm.session_disk(Target(iqn, (portal,), 0)))\n"
                          "print(os.path.realpath(by_path(portal, iqn, 0)))", ctx["targetIqn"], ctx["portals"]],
                         timeout=60, check=True).stdout.split()
    assert live[0] == str([ctx["portals"]]) and live[1].startswith("/dev/sd") and live[1] == live[2], live
    # unstage and stage again: the data came from the storage node, not from a cache
    staging, _ = cluster.paths(v.volume_id)
    cluster.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=v.volume_id, target_path=str(target)))
    cluster.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=v.volume_id,
                                                                staging_target_path=str(staging)))
    assert cluster.w.run(["iscsiadm", "-m", "session"], timeout=30).rc == 21
    target = cluster.stage_publish(v.volume_id, ctx)
    assert cluster.read(target) == digest
    stats = cluster.node.NodeGetVolumeStats(csi.NodeGetVolumeStatsRequest(volume_id=v.volume_id,
                                                                          volume_path=str(target)))
    assert stats.usage[0].used >= 8 * MiB
    health = cluster.node.NodeGetVolumeHealth(csi.NodeGetVolumeHealthRequest(
        volume_id=v.volume_id, volume_publish_path=str(target))).volume_health
    assert not health.health_statuses, health
    got = cluster.ctrl.ControllerGetVolume(csi.ControllerGetVolumeRequest(volume_id=v.volume_id))
    assert list(got.status.published_node_ids) == [cluster.node_id]
    health = cluster.ctrl.ControllerGetVolumeHealth(csi.ControllerGetVolumeHealthRequest(volume_id=v.volume_id))
    assert not health.volume_health.health_statuses, health
    cluster.teardown(v.volume_id)
    assert cluster.w.run(["iscsiadm", "-m", "node"], timeout=30).rc == 21      # no node record left
    assert cluster.storage_state() == {"storage-1": ([], []), "storage-2": ([], [])}


def _login(node, ctx: dict, secret: str | None = None) -> int:
    """A raw login attempt from `node` with the credentials of ctx (or another secret): its exit code."""
    iqn, portal = ctx["targetIqn"], ctx["portals"].split(",")[0]
    base = ["iscsiadm", "-m", "node", "-T", iqn, "-p", portal]
    node.run(base + ["-o", "new"], timeout=30)
    for k, v in (("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", ctx["chapUser"]),
                 ("node.session.auth.password", secret or ctx["chapSecret"]),
                 ("node.session.initial_login_retry_max", "1"), ("node.conn[0].timeo.login_timeout", "5")):
        node.run(base + ["-o", "update", "-n", k, "-v", v], timeout=30, check=True)
    rc = node.run(base + ["--login"], timeout=60).rc
    node.run(base + ["--logout"], timeout=30)
    node.run(base + ["-o", "delete"], timeout=30)
    return rc


def test_acl_refuses_another_initiator_and_chap_refuses_a_wrong_secret(cluster):
    v = cluster.create("acl", zone="zone-a")
    ctx = {**cluster.publish(v.volume_id), **cluster.chap(v.volume_id)}
    assert _login(cluster.s2, ctx) != 0                          # storage-2's initiator has no ACL
    assert _login(cluster.w, ctx, secret="wrong-secret-123456") != 0
    assert _login(cluster.w, ctx) == 0                            # the right one works
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id))


def test_unpublish_fences_a_live_session(cluster):
    v = cluster.create("fence", cap=BLOCK, zone="zone-a")
    ctx = cluster.publish(v.volume_id, cap=BLOCK)
    target = cluster.stage_publish(v.volume_id, ctx, cap=BLOCK)
    assert cluster.w.run(["dd", f"if={target}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                         timeout=30).rc == 0
    # Fail queued I/O after 5 s instead of open-iscsi's 120 s, so the test need not wait that long.
    sessions = cluster.w.run(["sh", "-c", "for s in /sys/class/iscsi_session/session*; do echo 5 > $s/recovery_tmo;"
                                          " done"], timeout=30)
    assert sessions.rc == 0
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                node_id=cluster.node_id))
    r = cluster.w.run(["dd", f"if={target}", "of=/dev/null", "bs=4k", "count=1", "skip=100", "iflag=direct"],
                      timeout=90)
    assert r.rc != 0, "the worker could still read after ControllerUnpublishVolume"
    w = cluster.w.run(["dd", "if=/dev/zero", f"of={target}", "bs=4k", "count=1", "oflag=direct"], timeout=90)
    assert w.rc != 0, "the worker could still write after ControllerUnpublishVolume"
    staging, _ = cluster.paths(v.volume_id)
    cluster.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=v.volume_id, target_path=str(target)))
    cluster.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=v.volume_id,
                                                                staging_target_path=str(staging)), timeout=120)
    assert cluster.w.run(["iscsiadm", "-m", "session"], timeout=30).rc == 21
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id))


def kill_agent_and_clear_lio(node) -> None:
    """The agent killed and LIO's configuration taken away, as after a reboot: the next start must rebuild it
    from the agent's records."""
    node.signal("agent", 9)
    node.wait_exit("agent")
    r = node.run([sys.executable, "-c", "from rtslib_fb import RTSRoot\nRTSRoot().clear_existing(confirm=True)"],
                 timeout=60)
    assert r.rc == 0, r.stderr
    assert not lio_targets(node)


def test_agent_restart_and_lost_lio_config_keep_exports_and_data(cluster):
    v = cluster.create("restart", zone="zone-a")
    ctx = cluster.publish(v.volume_id)
    target = cluster.stage_publish(v.volume_id, ctx)
    digest = cluster.write(target)
    s1 = cluster.s1
    kill_agent_and_clear_lio(s1)
    cluster.d.start_agent(s1)
    assert ids.parse_id(v.volume_id).iqn in lio_targets(s1)
    # the worker's session recovers by itself (same ACL and CHAP) and the data is intact
    assert cluster.read(target) == digest
    assert cluster.publish(v.volume_id) == ctx
    cluster.teardown(v.volume_id)


METRICS_PORT = 9822
READY_PROBE = ("import sys, urllib.error, urllib.request\n"
               "try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
               "except urllib.error.HTTPError as e:\n    r = e\n"
               "print(r.status, r.read().decode().strip())")


def readiness(node, port: int) -> str:
    """What the agent's /readyz (kubelet's readiness probe in the chart) answers, asked on its node."""
    url = f"http://127.0.0.1:{port}{metrics.READY_PATH}"
    return node.run([sys.executable, "-c", READY_PROBE, url], timeout=30, check=True).stdout.strip()


def test_an_agent_serves_while_its_start_brings_the_volumes_back(cluster):
    """LIO cleared (a reboot's state), the agent started with a pause before each volume it brings back: it
    answers meanwhile; a publish of a volume not back yet gets ABORTED with the reason (the attacher retries),
    a volume already back is published, and a new volume is made and exported; its readiness probe says not
    ready, with the reason. Let go, all come back and it is ready."""
    vols = [cluster.create(f"serve-{i}", zone="zone-a") for i in range(2)]
    iqns = {v.volume_id: ids.parse_id(v.volume_id).iqn for v in vols}
    s1 = cluster.s1
    kill_agent_and_clear_lio(s1)
    pauses = s1.workdir / "restore-pauses"
    paused, go = pauses / "restore.volume.paused", pauses / "restore.volume.go"
    cluster.d.start_agent(s1, env={faults.PAUSE_ENV: "restore.volume", faults.PAUSE_DIR_ENV: str(pauses)},
                          restored=False, extra=["--metrics-address", f"127.0.0.1:{METRICS_PORT}"])
    refused, both_ways, made, reasons, probes = set(), False, None, [], []
    try:
        with cluster.d.agent_channel(s1) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            deadline = time.monotonic() + 180
            while not (info := stub.GetInfo(apb.GetInfoRequest(), timeout=30)).ready:
                assert time.monotonic() < deadline, info.not_ready_reason
                if not paused.exists():
                    time.sleep(0.1)
                    continue
                reasons.append(info.not_ready_reason)
                probes.append(readiness(s1, METRICS_PORT))
                exported = lio_targets(s1)
                back = [v for v in vols if iqns[v.volume_id] in exported]
                for v in back:
                    cluster.publish(v.volume_id)
                for v in vols:
                    if v in back:
                        continue
                    with pytest.raises(grpc.RpcError) as e:
                        cluster.publish(v.volume_id)
                    assert e.value.code() == grpc.StatusCode.ABORTED, e.value.details()
                    assert "is being brought back after the agent's start: retry" in e.value.details()
                    refused.add(v.volume_id)
                both_ways = both_ways or 0 < len(back) < len(vols)
                if made is None:
                    made = cluster.create("serve-new", zone="zone-a")
                    assert iqns.setdefault(made.volume_id, ids.parse_id(made.volume_id).iqn) in lio_targets(s1)
                go.touch()
                while go.exists():
                    time.sleep(0.1)
        ready = readiness(s1, METRICS_PORT)
    finally:
        cluster.d.start_agent(s1)    # without the pause; it brings back whatever the test left
    # every volume refused while it was still to come back; once, one served while the other was not
    assert refused == {v.volume_id for v in vols} and both_ways, (refused, both_ways)
    assert reasons[0].startswith("restoring exports after the agent's start: ") and reasons[0].endswith(
        " volumes left"), reasons
    assert probes[0] == f"503 {reasons[0]}" and ready == "200 ok", (probes, ready)
    assert set(iqns.values()) <= lio_targets(s1)
    for v in vols:
        cluster.publish(v.volume_id)
        cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
            volume_id=v.volume_id, node_id=cluster.node_id), timeout=60)
    for vid in iqns:
        cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120)


def test_bad_input_gets_the_right_code_and_changes_nothing(cluster):
    before = cluster.storage_state()
    good = cluster.create("bad-input-ref", zone="zone-a")
    ref_state = cluster.storage_state()
    vid = good.volume_id
    staging, target = cluster.paths(vid)
    outside = "/etc/passwd-csi"
    ctrl, node = cluster.ctrl, cluster.node
    cases = [
        (ctrl.CreateVolume, csi.CreateVolumeRequest(volume_capabilities=[MOUNT]), grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="x", volume_capabilities=[MOUNT],
                                                    parameters={"nonsense": "1"}), grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="x", volume_capabilities=[MOUNT], capacity_range=
                                                    csi.CapacityRange(required_bytes=-5)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="x", volume_capabilities=[MOUNT],
                                                    capacity_range=csi.CapacityRange()),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="x", volume_capabilities=[MOUNT], capacity_range=
                                                    csi.CapacityRange(required_bytes=1 << 45)),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="x", volume_capabilities=[MOUNT], capacity_range=
                                                    csi.CapacityRange(required_bytes=2 * GiB, limit_bytes=GiB)),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="x", volume_capabilities=[csi.VolumeCapability(
            mount=csi.VolumeCapability.MountVolume(), access_mode=M(mode=M.MULTI_NODE_MULTI_WRITER))]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="$(reboot); `rm -rf /`", volume_capabilities=[MOUNT],
                                                    parameters={"pool": "../../etc"}),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.CreateVolume, csi.CreateVolumeRequest(name="bad-input-ref", volume_capabilities=[MOUNT],
                                                    capacity_range=csi.CapacityRange(required_bytes=GiB)),
         grpc.StatusCode.ALREADY_EXISTS),
        (ctrl.DeleteVolume, csi.DeleteVolumeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
            volume_id="v1:storage-1:csi-vg:-rf", node_id=cluster.node_id, volume_capability=MOUNT),
         grpc.StatusCode.NOT_FOUND),
        (ctrl.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
            volume_id="other-driver-id", node_id=cluster.node_id, volume_capability=MOUNT),
         grpc.StatusCode.NOT_FOUND),
        (ctrl.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="--op=delete", volume_capability=MOUNT), grpc.StatusCode.NOT_FOUND),
        (ctrl.ControllerPublishVolume, csi.ControllerPublishVolumeRequest(volume_id=vid, node_id=cluster.node_id),
         grpc.StatusCode.INVALID_ARGUMENT),
        (ctrl.ValidateVolumeCapabilities, csi.ValidateVolumeCapabilitiesRequest(
            volume_id="v1:storage-1:csi-vg:e2e-gone-0000000000", volume_capabilities=[MOUNT]),
         grpc.StatusCode.NOT_FOUND),
        (ctrl.ListVolumes, csi.ListVolumesRequest(starting_token="bogus"), grpc.StatusCode.ABORTED),
        (node.NodeStageVolume, csi.NodeStageVolumeRequest(volume_id=vid, staging_target_path=outside,
                                                          volume_capability=MOUNT, publish_context={"x": "y"}),
         grpc.StatusCode.INVALID_ARGUMENT),
        (node.NodeStageVolume, csi.NodeStageVolumeRequest(volume_id=vid, staging_target_path=str(staging),
                                                          volume_capability=MOUNT),
         grpc.StatusCode.INVALID_ARGUMENT),
        (node.NodeStageVolume, csi.NodeStageVolumeRequest(volume_id="nope", staging_target_path=str(staging),
                                                          volume_capability=MOUNT), grpc.StatusCode.NOT_FOUND),
        (node.NodePublishVolume, csi.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(cluster.kubelet / ".." / "escape"),
            volume_capability=MOUNT), grpc.StatusCode.INVALID_ARGUMENT),
        (node.NodePublishVolume, csi.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=str(staging), target_path=str(target), volume_capability=MOUNT),
         grpc.StatusCode.FAILED_PRECONDITION),
        (node.NodeUnstageVolume, csi.NodeUnstageVolumeRequest(volume_id=vid), grpc.StatusCode.INVALID_ARGUMENT),
        (node.NodeGetVolumeStats, csi.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=str(target)),
         grpc.StatusCode.NOT_FOUND),
    ]
    failures = []
    for fn, req, want in cases:
        try:
            fn(req, timeout=60)
            failures.append(f"{type(req).__name__} {str(req)[:80]!r}: succeeded, want {want.name}")
        except grpc.RpcError as exc:
            if exc.code() != want:
                failures.append(f"{type(req).__name__} {str(req)[:80]!r}: {exc.code().name} ({exc.details()}), "
                                f"want {want.name}")
    assert not failures, "\n".join(failures)
    assert cluster.storage_state() == ref_state
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid))
    assert cluster.storage_state() == before


def test_concurrent_calls_on_one_id_get_aborted_not_corruption(cluster):
    from concurrent.futures import ThreadPoolExecutor
    req = csi.CreateVolumeRequest(name="concurrent", capacity_range=csi.CapacityRange(required_bytes=64 * MiB),
                                  volume_capabilities=[MOUNT])
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _try(cluster.ctrl.CreateVolume, req), range(4)))
    codes = {r if isinstance(r, grpc.StatusCode) else "ok" for r in results}
    assert "ok" in codes and codes <= {"ok", grpc.StatusCode.ABORTED}
    vid = next(r.volume.volume_id for r in results if not isinstance(r, grpc.StatusCode))
    assert cluster.ctrl.CreateVolume(req, timeout=120).volume.volume_id == vid
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid))


def _try(fn, req):
    try:
        return fn(req, timeout=120)
    except grpc.RpcError as exc:
        return exc.code()


def test_a_full_thin_pool_fails_writes_at_once_instead_of_queueing_them(cluster):
    """Nothing extends a pool (the agent's lvm.conf has monitoring off), so a pool that queues I/O when full
    only hangs every writer for the kernel's no_space_timeout before failing it anyway: the agent turns
    error-when-full on at start, in LVM's metadata and in the kernel's table of the pool."""
    from csi.storage.lvm import dm_name
    s1 = cluster.s1

    def policy() -> tuple[str, str]:
        lvm = s1.run(["lvs", "--noheadings", "-o", "lv_when_full", "csi-vg/thinpool"], timeout=30).stdout.strip()
        kernel = s1.run(["dmsetup", "status", dm_name("csi-vg", "thinpool", "tpool")], timeout=30).stdout
        return lvm, "error_if_no_space" if "error_if_no_space" in kernel else "queue_if_no_space"

    assert policy() == ("error", "error_if_no_space")
    s1.run(["lvchange", "--errorwhenfull", "n", "csi-vg/thinpool"], timeout=60)
    try:
        assert policy() == ("queue", "queue_if_no_space")     # the check can tell them apart
    finally:
        cluster.d.start_agent(s1)
    assert policy() == ("error", "error_if_no_space")


def test_status_shows_agents_pools_and_volumes(cluster):
    v = cluster.create("status-vol", zone="zone-b")
    r = cluster.d.status([cluster.s1, cluster.s2, cluster.s3])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "storage-1  zone-a  up" in r.stdout and "storage-2  zone-b  up" in r.stdout
    assert v.volume_id in r.stdout and "status-vol" in r.stdout
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id))


def test_agent_refuses_a_client_without_a_certificate_of_its_ca(cluster):
    rogue_dir, good_dir = cluster.d.pki.rogue(), cluster.d.pki.ensure("controller")
    port = cluster.lab.expose(cluster.s1.ip, 7600)
    rogue = grpc.ssl_channel_credentials((rogue_dir / "ca.crt").read_bytes(), (rogue_dir / "tls.key").read_bytes(),
                                         (rogue_dir / "tls.crt").read_bytes())
    opts = [("grpc.ssl_target_name_override", peers.dns_name(peers.AGENT, "storage-1"))]
    with grpc.secure_channel(f"127.0.0.1:{port}", rogue, options=opts) as ch:
        with pytest.raises(grpc.RpcError) as e:
            agent_pb2_grpc.AgentStub(ch).GetInfo(apb.GetInfoRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError):
            agent_pb2_grpc.AgentStub(ch).GetInfo(apb.GetInfoRequest(), timeout=10)
    good = grpc.ssl_channel_credentials((good_dir / "ca.crt").read_bytes(), (good_dir / "tls.key").read_bytes(),
                                        (good_dir / "tls.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", good, options=opts) as ch:
        assert agent_pb2_grpc.AgentStub(ch).GetInfo(apb.GetInfoRequest(), timeout=10).node_name == "storage-1"


def test_no_secret_in_any_log_and_records_are_private(cluster):
    """The cluster's daemons run at debug level (tests/e2e/cluster.py): every request and response is logged
    (redacted) and every command run. A volume with mutual CHAP is published, staged, written and torn down,
    so the controller, the agent and the node plugin have all handled both of its secrets."""
    v = cluster.create("secret-check", zone="zone-a", params={"mutualChap": "true"})
    ctx = cluster.publish(v.volume_id)
    chap = cluster.chap(v.volume_id)
    secrets = [chap["chapSecret"], chap["mutualChapSecret"]]
    assert not [s for s in secrets if s in str(ctx)]
    target = cluster.stage_publish(v.volume_id, ctx)
    # the node record holds them (the one place iscsiadm reads them from), private to root
    ref = ids.parse_id(v.volume_id)
    listing = cluster.w.run(["find", "/etc/iscsi/nodes", "-path", f"*{ref.iqn}*", "-type", "f", "-printf",
                             "%m %p\\n"], timeout=30).stdout.split()
    assert listing and listing[0] == "600", listing
    cluster.write(target, mib=1)
    ref = ids.parse_id(v.volume_id)
    record = cluster.d.agent_state(cluster.s1) / "volumes" / ref.vg / f"{ref.lv}.json"
    assert all(s in record.read_text() for s in secrets)
    assert record.stat().st_mode & 0o777 == 0o600
    cluster.teardown(v.volume_id)
    assert not record.exists()

    logs = sorted(cluster.lab.workdir.rglob("*.log"))
    text = {p.name if p.parent == cluster.lab.workdir else f"{p.parent.name}/{p.name}": p.read_text(errors="replace")
            for p in logs}
    leaks = [f"{name}: line {n + 1}" for name, t in text.items() for n, line in enumerate(t.splitlines())
             if any(s in line for s in secrets)]
    assert not leaks, f"CHAP secrets in logs: {leaks}"
    # The logs do hold this volume's calls at debug level, with the secrets' places redacted: without them this
    # test would pass whatever the code logged.
    node_log, agent_log = text["worker-1/node-plugin.log"], text["storage-1/agent.log"]
    assert re.search(rf'NodeStageVolume request: .*value: "{re.escape(ref.iqn)}"', node_log)
    assert re.search(rf"ran \[.*'{re.escape(ref.iqn)}', .*'--login'\]", node_log)
    assert re.search(r'GetCredentials response: .*chap_secret: "\*\*\*".*mutual_chap_secret: "\*\*\*"', agent_log)
    assert "ControllerPublishVolume response" in text["controller.log"]
