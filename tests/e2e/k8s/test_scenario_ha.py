"""The control plane on a real cluster (issue 14), after the scenario of test_scenario.py (same installed chart):
storage nodes discovered from an administrator-only label, a node labelled during the run receiving volumes,
the provisioner's leader killed while claims are provisioned, and the placement journal's kill points against
the real API server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time

import grpc
import pytest
import yaml

from csi import faults, ids
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from tests.e2e.k8s import driver as drv
from tests.e2e.k8s.driver import NAMESPACE, RELEASE, STATE, STORAGE_LABEL, TIMINGS
from tests.e2e.k8s.test_scenario import empty_state, node_state, phase, pvc, wait_phase

pytestmark = pytest.mark.e2e
JOURNAL = "lvm-iscsi.csi.dev/journal=e2e,lvm-iscsi.csi.dev/record"


def journal_records(k8s, kind: str = "volume") -> list[dict]:
    cms = k8s.get("configmaps", "-n", NAMESPACE, "-l", f"{JOURNAL}={kind}")["items"]
    return [json.loads(cm["data"]["record"]) for cm in cms]


def operator(k8s, *args: str) -> str:
    """lvm-iscsi-csi <args> in a controller pod, as the chart's NOTES tell an operator to run it."""
    pod = drv.driver_pods(k8s)["controller"][0]["metadata"]["name"]
    fleet = ["--storage-node-label", f"kubernetes.io/os=linux,{STORAGE_LABEL}=true", "--agent-port",
             str(drv.AGENT_PORT), "--journal-namespace", NAMESPACE, "--tls-dir", "/run/lvm-iscsi-csi/tls",
             "--cluster-id", "e2e"]
    done = k8s.kubectl(["exec", "-n", NAMESPACE, pod, "-c", "driver", "--", "lvm-iscsi-csi", *args, *fleet],
                       check=False, timeout=180)
    return done.stdout + done.stderr


def test_a_kubelet_cannot_make_its_node_a_storage_node(installed):
    worker = STATE["worker"]
    kubelet = installed.dir / worker / "kubelet.kubeconfig"
    done = installed.host_tool([str(installed.bin / "kubectl"), "--kubeconfig", str(kubelet), "label", "node",
                                worker, f"{STORAGE_LABEL}=true"], check=False)
    assert done.returncode != 0 and "forbidden" in (done.stdout + done.stderr).lower(), done
    assert STORAGE_LABEL not in installed.get("node", worker)["metadata"]["labels"]


def test_status_lists_the_storage_nodes_discovered_from_labels(installed):
    out = operator(installed, "status")
    rows = [line.split() for line in out.splitlines()]
    assert [r[:3] for r in rows if r and r[0] == STATE["storage"]][0] == [STATE["storage"], "zone-a", "up"], out
    assert not [r for r in rows if r and r[0] == STATE["worker"]], out


@pytest.mark.campaign   # 4-5 minutes of CI's hour: scripts/fault-campaign (label discovery itself: the test above)
def test_a_node_labelled_during_the_run_receives_volumes(installed):
    k8s = installed
    worker = k8s.lab.node(STATE["worker"])
    drv.make_extra_vg(worker)
    try:
        k8s.apply(pvc("extra", size="64Mi", storage_class=drv.EXTRA_CLASS))
        time.sleep(8)
        assert phase(k8s, "pvc", "extra") == "Pending"   # no storage node has pool "extra" yet
        t0 = time.monotonic()
        k8s.kubectl(["label", "node", worker.name, f"{STORAGE_LABEL}=true"])
        wait_phase(k8s, "pvc", "extra", "Bound", timeout=300)
        TIMINGS["node labelled -> claim of its pool Bound"] = time.monotonic() - t0
        pv = k8s.get("pv", k8s.get("pvc", "extra")["spec"]["volumeName"])
        assert pv["spec"]["csi"]["volumeHandle"].startswith(f"v1:{worker.name}:{drv.EXTRA_VG}:")
        assert [r["node"] for r in journal_records(k8s)] == [worker.name]
        k8s.kubectl(["delete", "pvc", "extra", "--wait=true", "--timeout=180s"])
        k8s.wait_for(lambda: not k8s.get("pv")["items"], 180, "the PV gone")
        assert not journal_records(k8s)
    finally:
        k8s.kubectl(["label", "node", worker.name, f"{STORAGE_LABEL}-"], check=False)
        k8s.wait_for(lambda: len(drv.driver_pods(k8s).get("agent", [])) == 1, 180, "the worker's agent pod gone")
        drv.drop_extra_vg(worker)
    # It held volumes once, so it stays known (down) until an administrator retires it.
    k8s.wait_for(lambda: any(line.split()[:3] == [worker.name, "zone-a", "down"]
                             for line in operator(k8s, "status").splitlines()), 60, "the worker listed down")
    # ... and the controller said so on its Node, where `kubectl describe node` shows it
    k8s.wait_for(lambda: [e for e in k8s.get("events", "-n", "default")["items"]
                          if e["reason"] == "StorageNodeDown" and e["type"] == "Warning"
                          and e["involvedObject"]["kind"] == "Node" and e["involvedObject"]["name"] == worker.name],
                 60, "a StorageNodeDown event on the worker's Node")
    dry = operator(k8s, "retire-storage-node", worker.name)
    assert "dry run" in dry, dry
    out = operator(k8s, "retire-storage-node", worker.name, "--yes")
    assert "is retired" in out, out
    assert not [line for line in operator(k8s, "status").splitlines() if line.startswith(worker.name + " ")]


def test_provisioner_leader_killed_while_claims_are_provisioned(installed):
    k8s = installed
    names = [f"ha-{i}" for i in range(6)]
    k8s.apply([pvc(n, size="32Mi", storage_class=drv.IMMEDIATE_CLASS) for n in names])
    lease = k8s.get("lease", "-n", NAMESPACE, drv.DRIVER_LEASE)
    leader = lease["spec"]["holderIdentity"]
    pods = [p["metadata"]["name"] for p in drv.driver_pods(k8s)["controller"]]
    assert leader in pods, (leader, pods)
    t0 = time.monotonic()
    k8s.kubectl(["delete", "pod", "-n", NAMESPACE, leader, "--grace-period=0", "--force", "--wait=false"])
    for n in names:
        wait_phase(k8s, "pvc", n, "Bound", timeout=420)
    TIMINGS["provisioner leader killed -> 6 claims Bound"] = time.monotonic() - t0
    handles = sorted(k8s.get("pv", k8s.get("pvc", n)["spec"]["volumeName"])["spec"]["csi"]["volumeHandle"]
                     for n in names)
    lvs = node_state(k8s)["lvs"]
    assert sorted(ids.parse_id(h).lv for h in handles) == lvs and len(lvs) == 6   # no duplicate, no orphan
    assert sorted(r["key"] for r in journal_records(k8s)) == lvs
    assert k8s.get("lease", "-n", NAMESPACE, drv.DRIVER_LEASE)["spec"]["holderIdentity"] != leader
    k8s.kubectl(["delete", "pvc", *names, "--wait=true", "--timeout=300s"])
    k8s.wait_for(lambda: not k8s.get("pv")["items"], 300, "every PV gone")
    k8s.wait_for(lambda: node_state(k8s) == empty_state(k8s), 120, "no LV, target, session or record left")
    assert not journal_records(k8s)
    drv.wait_driver_ready(k8s, len(k8s.nodes), 1)


class HostController:
    """The driver's controller run on the host (in the lab's namespace) against the cluster's API server and
    storage-1's agent: its journal is the real one (ConfigMaps), and fault injection can kill it."""

    def __init__(self, k8s):
        self.k8s = k8s
        self.dir = k8s.dir / "host-controller"
        # The controller's certificate as the chart's controller gets it: issued in-process (--ca-dir) from
        # the CA the chart keeps in its Secret.
        ca = self.dir / "ca"
        ca.mkdir(parents=True, exist_ok=True)
        (self.dir / "tls").mkdir(exist_ok=True)
        secret = k8s.get("secret", "-n", NAMESPACE, f"{RELEASE}-ca")
        for key, name in (("tls.crt", "ca.crt"), ("tls.key", "ca.key")):
            (ca / name).write_bytes(base64.b64decode(secret["data"][key]))
        storage = k8s.lab.node(STATE["storage"])
        (self.dir / "storage-nodes.yaml").write_text(yaml.safe_dump({"storageNodes": [
            {"name": storage.name, "address": f"{storage.ip}:{drv.AGENT_PORT}", "zone": "zone-a"}]}))
        self.socket = self.dir / "controller.sock"
        self.tmp = self.dir / "tmp"
        self.proc = None

    def start(self, kill_at: str = "") -> None:
        # The kubernetes client writes the kubeconfig's admin key into temporary files and removes them at exit;
        # a controller killed (SIGKILL) never gets there, so they go into a directory stop() removes.
        self.tmp.mkdir(exist_ok=True)
        env = {**os.environ, "KUBECONFIG": str(self.k8s.admin_kubeconfig), "TMPDIR": str(self.tmp)}
        env.pop(faults.ENV, None)
        if kill_at:
            env[faults.ENV] = kill_at
        log = open(self.dir / "controller.log", "ab")
        self.proc = self.k8s.lab.popen_in_netns(
            [sys.executable, "-m", "csi", "controller", "--endpoint", f"unix://{self.socket}", "--cluster-id",
             "e2e", "--storage-nodes", str(self.dir / "storage-nodes.yaml"), "--journal-namespace", NAMESPACE,
             "--tls-dir", str(self.dir / "tls"), "--ca-dir", str(self.dir / "ca"),
             "--ca-file", str(self.dir / "ca" / "ca.crt")], stdout=log, stderr=log, env=env)
        log.close()
        from csi.lab.deploy import wait_ready
        wait_ready(f"unix:{self.socket}", "host controller", proc=self.proc, log=self.dir / "controller.log")
        # Ready is not the same as having reached storage-1's agent: on the loaded one-CPU storage node its first
        # TLS handshake has failed (seen once), and the node then counts as down until the next poll.
        deadline = time.monotonic() + 120
        while self.stub().GetCapacity(csi.GetCapacityRequest(parameters={"type": "thin"}),
                                      timeout=30).available_capacity == 0:
            assert time.monotonic() < deadline, "the host controller never reached storage-1's agent"
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stub(self):
        return csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix:{self.socket}"))


def test_journal_kill_points_against_the_api_server(installed):
    k8s = installed
    host = HostController(k8s)
    req = csi.CreateVolumeRequest(name="journal-kill", capacity_range=csi.CapacityRange(required_bytes=32 << 20),
                                  volume_capabilities=[csi.VolumeCapability(
                                      mount=csi.VolumeCapability.MountVolume(fs_type="ext4"),
                                      access_mode=csi.VolumeCapability.AccessMode(mode=1))],
                                  parameters={"type": "thin"})
    try:
        vid = None
        for step in ("create.placed", "create.made"):
            host.start(kill_at=step)
            with pytest.raises(grpc.RpcError):
                host.stub().CreateVolume(req, timeout=120)
            assert host.proc.wait(60) == -9, f"the host controller did not die at {step}"
            host.start()
            vol = host.stub().CreateVolume(req, timeout=120, wait_for_ready=True).volume
            assert vid in (None, vol.volume_id)
            vid = vol.volume_id
            records = journal_records(k8s)
            assert [(r["key"], r["state"]) for r in records] == [(ids.parse_id(vid).lv, "ready")], records
            assert node_state(k8s)["lvs"] == [ids.parse_id(vid).lv]
            host.stop()
        host.start(kill_at="delete.removed")
        with pytest.raises(grpc.RpcError):
            host.stub().DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120)
        assert host.proc.wait(60) == -9
        assert len(journal_records(k8s)) == 1 and node_state(k8s)["lvs"] == []   # LV gone, record not yet
        host.start()
        host.stub().DeleteVolume(csi.DeleteVolumeRequest(volume_id=vid), timeout=120, wait_for_ready=True)
        assert not journal_records(k8s) and node_state(k8s) == empty_state(k8s)
    finally:
        host.stop()
