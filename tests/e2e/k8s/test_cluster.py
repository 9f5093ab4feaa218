"""The e2e cluster itself: upstream control plane on the host, kubelet + containerd in UML nodes, CNI and
kube-proxy working. The driver's scenario (test_scenario.py) stands on this."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.e2e


def _pod(name: str, node: str, image: str, command: list[str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "e2e-probe"}},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node}, "restartPolicy": "Never",
                     "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                     "command": command}]}}


def test_nodes_are_ready_with_the_built_versions(k8s):
    nodes = k8s.get("nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["storage-1", "worker-1"]
    for n in nodes:
        info = n["status"]["nodeInfo"]
        assert info["kubeletVersion"] == "v1.35.4"
        assert info["containerRuntimeVersion"].startswith("containerd://1.6")
    storage = next(n for n in nodes if n["metadata"]["name"] == "storage-1")
    assert storage["metadata"]["labels"]["node-restriction.kubernetes.io/lvm-iscsi-storage-node"] == "true"
    version = json.loads(k8s.kubectl(["version", "-o", "json"]).stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.35.4"


@pytest.mark.campaign   # the lab cluster's own pod network: every driver test below would fail without it
def test_a_pod_runs_on_each_node_with_pod_network_and_service_ip(k8s, k8s_images):
    busybox = k8s_images["busybox"].ref
    for node in ("storage-1", "worker-1"):
        k8s.apply(_pod(f"probe-{node}", node, busybox, ["sh", "-c", "echo started on $(hostname); sleep 3600"]))
    def running():
        pods = k8s.get("pods", "-l", "app=e2e-probe")["items"]
        return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) and pods
    pods = k8s.wait_for(running, 180, "both probe pods Running", interval=2)
    ips = {}
    for p in pods:
        node = p["spec"]["nodeName"]
        assert p["metadata"]["name"] == f"probe-{node}"
        ips[node] = p["status"]["podIP"]
        assert ips[node].startswith(k8s.pod_cidrs[node].rsplit(".", 1)[0] + "."), (node, ips[node])
        assert "started on probe-" in k8s.kubectl(["logs", p["metadata"]["name"]]).stdout
    # pod to pod across nodes, and pod to the API server through the `kubernetes` Service (kube-proxy)
    k8s.kubectl(["exec", "probe-storage-1", "--", "ping", "-c", "1", "-W", "5", ips["worker-1"]])
    connect = "nc -w 5 {} 443 </dev/null"
    k8s.kubectl(["exec", "probe-worker-1", "--", "sh", "-c", connect.format("10.96.0.1")])
    # and the check can fail: an address no Service has is unreachable (the node has no default route)
    assert k8s.kubectl(["exec", "probe-worker-1", "--", "sh", "-c", connect.format("10.96.0.2")],
                       check=False).returncode != 0
    # hostNetwork processes (the node plugin, the agent) reach it too: kube-proxy's OUTPUT rules on the node
    for node in k8s.nodes.values():
        node.run([sys.executable, "-c", "import socket; socket.create_connection(('10.96.0.1', 443), 5).close()"],
                 timeout=30, check=True)
    k8s.kubectl(["delete", "pod", "-l", "app=e2e-probe", "--wait=true", "--timeout=60s"])
