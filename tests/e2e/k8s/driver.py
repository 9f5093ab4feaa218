"""The driver in the e2e cluster: `helm install` of deploy/helm/lvm-iscsi-csi itself with test values, and the
snapshot CRDs and snapshot-controller (upstream manifests, copied by scripts/build-k8s) that the chart expects
a cluster to have. Nothing about the driver is started by hand: its controller, node and agent pods come from
the chart, their images from tests/e2e/k8s/images.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from csi.lab.k8s import Cluster
from tests.e2e.k8s.images import SIDECARS, Image

PROJECT = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
STORAGE_LABEL = "lvm-iscsi.csi.dev/storage-node"
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
THIN_CLASS = "lvm-iscsi-thin"          # default, WaitForFirstConsumer
IMMEDIATE_CLASS = "lvm-iscsi-immediate"
BLOCK_CLASS = "lvm-iscsi-block"


def e2e_values(images: dict[str, Image], storage: dict[str, str], zone: str, controller_selector: dict) -> dict:
    """Values for the e2e install. storage: storage node name -> its IP."""
    assert set(SIDECAR_VALUES.values()) <= set(SIDECARS)
    driver = images["driver"]
    return {
        "clusterId": "e2e",
        "logLevel": "debug",
        "image": {"repository": driver.repository, "tag": driver.tag, "pullPolicy": "Never"},
        "storageNodes": [{"name": name, "address": f"{ip}:{AGENT_PORT}", "zone": zone}
                         for name, ip in sorted(storage.items())],
        "controller": {"nodeSelector": controller_selector},
        "agent": {
            "port": AGENT_PORT,
            "pools": [
                {"name": "thin", "vg": "csi-vg", "thinPool": "thinpool", "overprovisionRatio": 4.0,
                 "maxFillPercent": 90, "warnFillPercent": 80},
                {"name": "thick", "vg": "csi-vg", "thinPool": "", "overprovisionRatio": 1.0,
                 "maxFillPercent": 100, "warnFillPercent": 90},
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


def helm_install(cluster: Cluster, helm: Path, values: dict) -> float:
    """helm install of the chart; wait_driver_ready() then waits for the pods, container by container, and
    says which one is not ready. Seconds taken."""
    path = cluster.dir / "e2e-values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    t0 = time.monotonic()
    cluster.host_tool([str(helm), "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace",
                       "--values", str(path), "--kubeconfig", str(cluster.admin_kubeconfig)], timeout=300,
                      env={"HELM_CACHE_HOME": str(cluster.dir / "helm/cache"),
                           "HELM_CONFIG_HOME": str(cluster.dir / "helm/config"),
                           "HELM_DATA_HOME": str(cluster.dir / "helm/data")})
    return round(time.monotonic() - t0, 1)


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


def wait_driver_ready(cluster, node_count: int, storage_count: int, timeout: float = 600) -> float:
    """Until every container of every node, agent and controller pod is ready. Seconds taken."""
    t0 = time.monotonic()

    def ready():
        pods = driver_pods(cluster)
        nodes = [p for p in pods.get("node", []) if all(container_ready(p).values() or [False])]
        agents = [p for p in pods.get("agent", []) if all(container_ready(p).values() or [False])]
        ctrl = [p for p in pods.get("controller", [])
                if all(container_ready(p).get(c) for c in CONTROLLER_CONTAINERS)]
        return len(nodes) == node_count and len(agents) == storage_count and len(ctrl) == 1

    try:
        cluster.wait_for(ready, timeout, "the driver's pods", interval=2)
    except Exception:
        print(cluster.kubectl(["get", "pods", "-n", NAMESPACE, "-o", "wide"], check=False).stdout)
        print(cluster.kubectl(["describe", "pods", "-n", NAMESPACE], check=False).stdout[-6000:])
        raise
    return round(time.monotonic() - t0, 1)
