"""The same scenario on kind, for a machine with Docker and a registry: CSI_E2E_CLUSTER=kind scripts/test
tests/e2e/k8s. UNTESTED on the project's machines (no Docker, no registry); see deploy/kind/README.md.

KindCluster offers what the tests use of csi.lab.k8s.Cluster: kubectl / get / apply / wait_for / host_tool,
nodes (with run(argv) inside the node container), dir, admin_kubeconfig, timings, and import_images
(`kind load image-archive`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from csi.lab import GuestResult, LabError
from csi.lab.k8s import Cluster
from tests.e2e.k8s.driver import STORAGE_LABEL

PROJECT = Path(__file__).resolve().parents[3]
CONFIG = PROJECT / "deploy/kind/cluster.yaml"
VG = "csi-vg"


@dataclass
class KindNode:
    name: str          # the Kubernetes node name (= the node container's name)
    role: str          # "storage" or "worker"
    ip: str

    def run(self, argv: list[str], timeout: float = 60, check: bool = False, input: str | None = None,
            env: dict | None = None, cwd: str | None = None) -> GuestResult:
        done = subprocess.run(["docker", "exec", "-i", self.name, *argv], capture_output=True, text=True,
                              input=input, timeout=timeout)
        result = GuestResult(done.returncode, done.stdout, done.stderr)
        return result.check(f"{self.name}: {argv}") if check else result


class KindCluster:
    wait_for = staticmethod(Cluster.wait_for)

    def __init__(self, workdir: Path, name: str | None = None):
        for tool in ("kind", "docker", "kubectl"):
            if shutil.which(tool) is None:
                raise LabError(f"CSI_E2E_CLUSTER=kind needs {tool} on PATH")
        self.name = name or yaml.safe_load(CONFIG.read_text())["name"]
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.admin_kubeconfig = self.dir / "kubeconfig"
        self.timings: dict[str, float] = {}
        self.nodes: dict[str, KindNode] = {}
        self.lab = self   # the scenario reads nodes through k8s.lab.node(name), as on the UML lab

    def create(self, storage_disk_bytes: int = 8 << 30) -> None:
        t0 = time.monotonic()
        subprocess.run(["kind", "create", "cluster", "--config", str(CONFIG), "--kubeconfig",
                        str(self.admin_kubeconfig), "--wait", "5m"], check=True)
        self.timings["kind create"] = round(time.monotonic() - t0, 1)
        nodes = self.get("nodes")["items"]
        for n in nodes:
            labels = n["metadata"]["labels"]
            if "node-role.kubernetes.io/control-plane" in labels:
                continue
            ip = next(a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP")
            role = "storage" if labels.get("lvm-iscsi.csi.dev/lab-role") == "storage" else "worker"
            self.nodes[n["metadata"]["name"]] = KindNode(n["metadata"]["name"], role, ip)
            if role == "storage":
                self.kubectl(["label", "node", n["metadata"]["name"], f"{STORAGE_LABEL}=true"])
        for node in self.nodes.values():
            self._prepare(node, storage_disk_bytes)

    def _prepare(self, node: KindNode, disk_bytes: int) -> None:
        """open-iscsi and LVM tools in the node container, iscsid running, and on the storage node a VG on a
        loop device with a thin pool, as the UML lab's storage nodes have."""
        if node.run(["which", "iscsiadm"]).rc != 0:
            node.run(["apt-get", "update", "-qq"], timeout=600, check=True)
            node.run(["apt-get", "install", "-y", "-qq", "open-iscsi", "lvm2", "thin-provisioning-tools"],
                     timeout=600, check=True)
        node.run(["tee", "/etc/iscsi/initiatorname.iscsi"], check=True,
                 input=f"InitiatorName=iqn.2026-11.dev.csi.lvm-iscsi.kind:{node.name}\n")
        if node.run(["pgrep", "-x", "iscsid"]).rc != 0:
            node.run(["iscsid"], check=True)
        if node.role == "storage":
            node.run(["truncate", "-s", str(disk_bytes), "/var/lib/csi-disk.img"], check=True)
            loop = node.run(["losetup", "-f", "--show", "/var/lib/csi-disk.img"], check=True).stdout.strip()
            node.run(["vgcreate", VG, loop], check=True)
            node.run(["lvcreate", "--type", "thin-pool", "-l", "60%VG", "-n", "thinpool", VG], check=True)

    def delete(self) -> None:
        subprocess.run(["kind", "delete", "cluster", "--name", self.name], check=False)

    def node(self, name: str) -> KindNode:
        return self.nodes[name]

    def import_images(self, archives: list[Path]) -> dict[str, float]:
        t0 = time.monotonic()
        for archive in archives:
            subprocess.run(["kind", "load", "image-archive", str(archive), "--name", self.name], check=True)
        return {"all nodes": round(time.monotonic() - t0, 1)}

    def host_tool(self, argv: list[str], check: bool = True, input: str | None = None, timeout: float = 120,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout,
                              env={**os.environ, **(env or {})})
        if check and done.returncode != 0:
            raise LabError(f"{argv} failed with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        return done

    def kubectl(self, args: list[str], check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        return self.host_tool(["kubectl", "--kubeconfig", str(self.admin_kubeconfig), *args], check=check,
                              input=input, timeout=timeout)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl(["get", *args, "-o", "json"]).stdout)

    def apply(self, manifest: dict | list) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        self.kubectl(["apply", "-f", "-"], input=yaml.safe_dump_all(docs))
