"""The driver in the e2e cluster: `helm install` of deploy/helm/lvm-iscsi-csi itself with test values, and the
snapshot CRDs and snapshot-controller (upstream manifests, copied by scripts/build-k8s) that the chart expects
a cluster to have. Nothing about the driver is started by hand: its controller, node and agent pods come from
the chart, their images from tests/e2e/k8s/images.py."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import yaml

from csi.lab.k8s import Cluster
from tests.e2e.k8s.images import SIDECARS, Image

PROJECT = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
# The chart's default agent.nodeSelector label: an administrator sets it (kubelets cannot, NodeRestriction).
STORAGE_LABEL = "node-restriction.kubernetes.io/lvm-iscsi-storage-node"
ZONE_LABEL = "topology.kubernetes.io/zone"
ZONE = "zone-a"
CHART = Path(os.environ.get("CSI_E2E_CHART") or PROJECT / "deploy/helm/lvm-iscsi-csi")   # another copy, to debug
NAMESPACE = "lvm-iscsi-csi"
RELEASE = "lvm-iscsi-csi"
AGENT_PORT = 7600
# chart value key of each sidecar -> image role name in images.SIDECARS
SIDECAR_VALUES = {"provisioner": "csi-provisioner", "attacher": "csi-attacher", "resizer": "csi-resizer",
                  "snapshotter": "csi-snapshotter", "livenessProbe": "livenessprobe",
                  "nodeDriverRegistrar": "csi-node-driver-registrar"}
THIN_CLASS = "lvm-iscsi-thin"          # the cluster's default (isDefault below; not the chart's), WaitForFirstConsumer
IMMEDIATE_CLASS = "lvm-iscsi-immediate"
BLOCK_CLASS = "lvm-iscsi-block"
EXTRA_CLASS = "lvm-iscsi-extra"        # pool "extra": VG csi-vg2, which only a node made storage later has
EXTRA_VG = "csi-vg2"
REPLICATED_CLASS = "lvm-iscsi-replicated"   # replicas: 2 in pool "extra" (test_scenario_replicas.py)
CONTROLLER_REPLICAS = 2
# csi-provisioner's leader election Lease: the driver name with "." and "/" as "-".
DRIVER_LEASE = "lvm-iscsi-csi-dev"
# What the tests share across modules (test_scenario.py, test_scenario_ha.py): timings and names.
TIMINGS: dict[str, float] = {}
STATE: dict[str, object] = {}


def e2e_values(images: dict[str, Image], controller_selector: dict) -> dict:
    """Values for the e2e install. No storageNodes: the controller discovers them from the labelled Nodes."""
    assert set(SIDECAR_VALUES.values()) <= set(SIDECARS)
    driver = images["driver"]
    return {
        "clusterId": "e2e",
        "logLevel": "debug",
        "image": {"repository": driver.repository, "tag": driver.tag, "pullPolicy": "Never"},
        "controller": {"nodeSelector": controller_selector, "replicas": CONTROLLER_REPLICAS,
                       "adoptionSettleSeconds": 0},
        "agent": {
            "port": AGENT_PORT,
            "pools": [
                {"name": "thin", "vg": "csi-vg", "thinPool": "thinpool", "overprovisionRatio": 4.0,
                 "maxFillPercent": 90, "warnFillPercent": 80},
                {"name": "thick", "vg": "csi-vg", "thinPool": "", "overprovisionRatio": 1.0,
                 "maxFillPercent": 100, "warnFillPercent": 90},
                {"name": "extra", "vg": EXTRA_VG, "thinPool": "thinpool2", "overprovisionRatio": 2.0,
                 "maxFillPercent": 90, "warnFillPercent": 80},
            ],
            "devices": ["/dev/loop*"],
        },
        "sidecars": {"pullPolicy": "Never", **{
            key: {"image": {"repository": images[role].repository, "tag": images[role].tag}}
            for key, role in SIDECAR_VALUES.items()}},
        "storageClasses": [
            {"name": THIN_CLASS, "isDefault": True, "pool": "thin", "type": "thin", "fsType": "ext4",
             "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": True},
            {"name": IMMEDIATE_CLASS, "pool": "thin", "type": "thin", "fsType": "ext4",
             "volumeBindingMode": "Immediate", "allowVolumeExpansion": True},
            {"name": BLOCK_CLASS, "pool": "thin", "type": "thin", "fsType": "",
             "volumeBindingMode": "WaitForFirstConsumer"},
            {"name": EXTRA_CLASS, "pool": "extra", "type": "thin", "fsType": "ext4",
             "volumeBindingMode": "Immediate"},
            {"name": REPLICATED_CLASS, "pool": "extra", "type": "thin", "fsType": "ext4", "replicas": 2,
             "volumeBindingMode": "Immediate"},
        ],
    }


def install_snapshot_support(cluster: Cluster, cache: Path, image: Image) -> None:
    """The VolumeSnapshot CRDs and the snapshot-controller Deployment (upstream manifests, our image)."""
    crds = sorted((cache / "k8s/crd").glob("*.yaml"))
    if not crds:
        raise FileNotFoundError(f"{cache}/k8s/crd is empty: run scripts/build-k8s")
    for crd in crds:
        cluster.kubectl(["apply", "--server-side", "-f", str(crd)])
    manifests = cache / "k8s/snapshot-controller"
    cluster.kubectl(["apply", "-f", str(manifests / "rbac-snapshot-controller.yaml")])
    docs = [d for d in yaml.safe_load_all((manifests / "setup-snapshot-controller.yaml").read_text()) if d]
    for doc in docs:
        if doc.get("kind") == "Deployment":
            doc["spec"]["replicas"] = 1
            for c in doc["spec"]["template"]["spec"]["containers"]:
                c["image"] = image.ref
                c["imagePullPolicy"] = "Never"
    cluster.apply(docs)
    cluster.kubectl(["wait", "--for=condition=Established", "--timeout=60s",
                     *[f"crd/{c.name.split('_', 1)[1].removesuffix('.yaml')}.snapshot.storage.k8s.io"
                       for c in crds]])


def helm_install(cluster: Cluster, helm: Path, values: dict, chart: Path = CHART, upgrade: bool = False) -> float:
    """helm install (or upgrade) of the chart; wait_driver_ready() then waits for the pods, container by
    container, and says which one is not ready. Seconds taken."""
    path = cluster.dir / "e2e-values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    verb = ["upgrade", RELEASE, str(chart)] if upgrade else ["install", RELEASE, str(chart), "--create-namespace"]
    t0 = time.monotonic()
    cluster.host_tool([str(helm), *verb, "--namespace", NAMESPACE,
                       "--values", str(path), "--kubeconfig", str(cluster.admin_kubeconfig)], timeout=300,
                      env={"HELM_CACHE_HOME": str(cluster.dir / "helm/cache"),
                           "HELM_CONFIG_HOME": str(cluster.dir / "helm/config"),
                           "HELM_DATA_HOME": str(cluster.dir / "helm/data")})
    return round(time.monotonic() - t0, 1)


# The container of each pod that runs the driver's own image (the agent's is named after its role).
DRIVER_CONTAINERS = ("driver", "agent")
CONTROLLER_CONTAINERS = ("driver", "csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer",
                         "liveness-probe")


def container_ready(pod: dict) -> dict[str, bool]:
    return {c["name"]: bool(c.get("ready")) for c in pod.get("status", {}).get("containerStatuses") or []}


def driver_pods(cluster) -> dict[str, list[dict]]:
    """Pods of the release by component (controller, node, agent)."""
    pods = cluster.get("pods", "-n", NAMESPACE)["items"]
    out: dict[str, list[dict]] = {}
    for p in pods:
        out.setdefault(p["metadata"]["labels"].get("app.kubernetes.io/component", "?"), []).append(p)
    return out


def controller_nodes(cluster) -> list[str]:
    """The nodes of the controller pods that are not being deleted, sorted (a node twice: two replicas there)."""
    return sorted(p["spec"].get("nodeName", "") for p in driver_pods(cluster).get("controller", [])
                  if not p["metadata"].get("deletionTimestamp"))


def wait_driver_ready(cluster, node_count: int, storage_count: int, timeout: float = 600,
                      images: dict[str, str] | None = None) -> float:
    """Until every container of every node, agent and controller pod is ready, and (with `images`, component ->
    image) every pod of those components runs that image and no other pod of theirs is left. Seconds taken."""
    t0 = time.monotonic()

    def ready():
        pods = driver_pods(cluster)
        for component, image in (images or {}).items():
            if any(c["image"] != image for p in pods.get(component, []) for c in p["spec"]["containers"]
                   if c["name"] in DRIVER_CONTAINERS):
                return False
        nodes = [p for p in pods.get("node", []) if all(container_ready(p).values() or [False])]
        agents = [p for p in pods.get("agent", []) if all(container_ready(p).values() or [False])]
        ctrl = [p for p in pods.get("controller", [])
                if all(container_ready(p).get(c) for c in CONTROLLER_CONTAINERS)]
        return len(nodes) == node_count and len(agents) == storage_count and len(ctrl) == CONTROLLER_REPLICAS

    try:
        cluster.wait_for(ready, timeout, "the driver's pods", interval=2)
    except Exception:
        print(cluster.kubectl(["get", "pods", "-n", NAMESPACE, "-o", "wide"], check=False).stdout)
        print(restart_report(cluster))
        print(current_logs(cluster))
        print(cluster.kubectl(["describe", "pods", "-n", NAMESPACE], check=False).stdout[-6000:])
        raise
    return round(time.monotonic() - t0, 1)


def restarts(cluster) -> dict[tuple[str, str], int]:
    """(pod, container) -> restart count, for the containers of the release that restarted."""
    return {(p["metadata"]["name"], c["name"]): c["restartCount"] for ps in driver_pods(cluster).values()
            for p in ps for c in p["status"].get("containerStatuses") or [] if c["restartCount"]}


# csi-attacher's start-up calls, made with a deadline of one second hard-coded upstream (csiTimeout in its
# main.go), after which it exits 1: on the lab's one-CPU nodes, busy starting every pod of a fresh install, it
# can miss one. Its restart is kubelet's, not a probe's, and the second start finds a quieter node.
# Its three start-up calls with that deadline: GetPluginInfo, GetPluginCapabilities, GetControllerCapabilities.
ATTACHER_START_DEADLINE = re.compile(r'"Failed to (get the CSI driver name|controller capability check|check if the '
                                     r'CSI Driver supports the CONTROLLER_SERVICE)" '
                                     r'err="rpc error: code = DeadlineExceeded')

# Every sidecar connects through csi-lib-utils (v0.25.0 connection.go), which sets grpc's backoff but not its
# MinConnectTimeout: grpc-go then gives a connection's HTTP/2 handshake only the first backoff, one second
# (+-20 %), closes it when the driver's first frame is later, and the next dial is taken for a lost connection
# (ExitOnConnectionLoss: exit 1). Seen once in CI (2026-12-04) on csi-snapshotter of a fresh install; the driver
# container of that pod had not restarted (a driver that did is counted on its own, never excused).
HANDSHAKE_DEADLINE = re.compile(r"error reading server preface: [^\n]*use of closed network connection"
                                r"(?s:.*)Lost connection to CSI driver, exiting")

# A sidecar's last exit is excused when its previous log ends with one of these (only the last previous log is
# kept). csi-attacher missed its deadline twice in one start-up on a one-CPU UML node where the pod's other
# sidecars started at the same moment (2026-12-03).
START_DEADLINES = {"csi-attacher": (ATTACHER_START_DEADLINE, HANDSHAKE_DEADLINE)}
SIDECAR_START_DEADLINES = (HANDSHAKE_DEADLINE,)
EXCUSED = 3


def unexplained_restarts(cluster) -> tuple[dict[tuple[str, str], int], list[str]]:
    """restarts() less up to EXCUSED exits of a CSI sidecar on a deadline hard-coded upstream (exit code 1 and
    one of START_DEADLINES at the end of its previous log), and the lines of those let through."""
    statuses = [(p["metadata"]["name"], c) for ps in driver_pods(cluster).values() for p in ps
                for c in p["status"].get("containerStatuses") or [] if c["restartCount"]]   # one listing
    left, excused = {}, []
    for pod, status in statuses:
        container, count = status["name"], status["restartCount"]
        ended = (status.get("lastState") or {}).get("terminated") or {}
        if container not in DRIVER_CONTAINERS and count <= EXCUSED and ended.get("exitCode") == 1:
            logs = cluster.kubectl(["logs", "-n", NAMESPACE, pod, "-c", container, "--previous", "--tail=8"],
                                   check=False).stdout
            found = next(filter(None, (d.search(logs) for d in
                                       START_DEADLINES.get(container, SIDECAR_START_DEADLINES))), None)
            if found:
                lines = found.group(0).splitlines()
                shown = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")
                excused.append(f"{pod}/{container} ({count}x): {shown}")
                continue
        left[(pod, container)] = count
    return left, excused


def restart_report(cluster, lines: int = 25) -> str:
    """Why each restarted container of the release stopped: its last state and the end of its previous log."""
    out = []
    for (pod, container), count in sorted(restarts(cluster).items()):
        logs = cluster.kubectl(["logs", "-n", NAMESPACE, pod, "-c", container, "--previous",
                                f"--tail={lines}"], check=False)
        out.append(f"--- {pod}/{container}: {count} restart(s)\n{logs.stdout}{logs.stderr}")
    return "\n".join(out)


def current_logs(cluster, lines: int = 60) -> str:
    """The end of the log of every driver and agent container of the release (the sidecars say less)."""
    out = []
    for ps in driver_pods(cluster).values():
        for p in ps:
            for c in p["spec"]["containers"]:
                if c["name"] not in DRIVER_CONTAINERS:
                    continue
                logs = cluster.kubectl(["logs", "-n", NAMESPACE, p["metadata"]["name"], "-c", c["name"],
                                        f"--tail={lines}"], check=False)
                out.append(f"--- {p['metadata']['name']}/{c['name']} (now)\n{logs.stdout}{logs.stderr}")
    return "\n".join(out)


def make_extra_vg(node) -> None:
    """A second VG (csi-vg2, pool "extra") on a loop device over a file in the node's lab dir (its disk), as an
    administrator prepares a storage node: the thin pool made, the VG left inactive (the agent activates)."""
    img = node.workdir / "csi-vg2.img"
    node.run(["truncate", "-s", str(2 << 30), str(img)], timeout=30, check=True)
    loop = node.run(["losetup", "-f", "--show", str(img)], timeout=30, check=True).stdout.strip()
    node.run(["vgcreate", "-q", EXTRA_VG, loop], timeout=120, check=True)
    node.run(["lvcreate", "-q", "--type", "thin-pool", "-l", "60%VG", "-n", "thinpool2", EXTRA_VG],
             timeout=120, check=True)
    node.run(["vgchange", "--activate", "n", EXTRA_VG], timeout=60, check=True)


def attach_extra_vg(node) -> None:
    """After the node booted again: its csi-vg2 file on a loop device again (what the machine's own boot would
    do for a disk), nothing activated."""
    node.run(["losetup", "-f", str(node.workdir / "csi-vg2.img")], timeout=30, check=True)
    node.run(["vgchange", "--activate", "n", EXTRA_VG], timeout=60, check=True)


def drop_extra_vg(node) -> None:
    node.run(["vgremove", "-q", "-f", EXTRA_VG], timeout=120)
    for line in node.run(["losetup", "-j", str(node.workdir / "csi-vg2.img")], timeout=30).stdout.splitlines():
        node.run(["losetup", "-d", line.split(":", 1)[0]], timeout=30)
    (node.workdir / "csi-vg2.img").unlink(missing_ok=True)
