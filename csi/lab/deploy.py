"""The driver deployed in a lab: agents on storage nodes, node plugins on workers, the controller on the host
inside the lab's network namespace. Shared by the demo, the e2e tests, csi-sanity and the benchmark, so
they all run the driver the same way: real processes, real flags, mutual TLS on.

Reaching it: the controller listens on a unix socket on the host (controller_target); each node plugin
listens on TCP in its guest and is exposed on 127.0.0.1 (node_target). The kubelet directory of a worker
is under the lab workdir, which guest and host share, so csi-sanity on the host can make its paths there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from csi.lab import Lab, LabError, LabNode
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.tls import write_test_pki

AGENT_PORT = 7600
NODE_PORT = 7700
PYTHON = sys.executable

DEFAULT_POOLS = [
    {"name": "thin", "vg": "csi-vg", "thinPool": "thinpool", "overprovisionRatio": 4.0, "maxFillPercent": 90,
     "warnFillPercent": 80},
    {"name": "thick", "vg": "csi-vg"},
]


@dataclass
class Deployment:
    lab: Lab
    cluster_id: str = "lab"
    zones: dict[str, str] = field(default_factory=dict)   # node name -> zone
    pki: Path = field(init=False)
    controller: subprocess.Popen | None = None
    node_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pki = self.lab.workdir / "pki"
        if not (self.pki / "agent" / "tls.crt").exists():
            write_test_pki(self.pki, "lvm-iscsi-agent", other_ca=True)

    # ------------------------------------------------------------------------------------ agent

    def agent_state(self, node: LabNode) -> Path:
        return node.workdir / "agent-state"   # on the host's disk: survives the node's reboot

    def start_all(self, storage: list[LabNode], workers: list[LabNode]) -> None:
        """The whole driver: an agent on every storage node, the node plugin on every worker, the controller
        on the host knowing every storage node."""
        for node in storage:
            self.start_agent(node)
        for node in workers:
            self.start_node_plugin(node)
        self.start_controller(storage)

    def start_agent(self, node: LabNode, pools=None, extra: list[str] | None = None,
                    env: dict[str, str] | None = None) -> None:
        self._stop(node, "agent")
        config = node.workdir / "agent.yaml"
        config.write_text(yaml.safe_dump({"pools": pools or DEFAULT_POOLS, "devices": ["/dev/loop*"],
                                          "wipeThick": True}))
        node.spawn("agent", [PYTHON, "-m", "csi", "agent", "--node-name", node.name, "--listen",
                             f"{node.ip}:{AGENT_PORT}", "--portal", f"{node.ip}:3260", "--config", str(config),
                             "--state-dir", str(self.agent_state(node)), "--cluster-id", self.cluster_id,
                             "--tls-dir", str(self.pki / "agent"), *(extra or [])], env=env)
        self._wait_port(node, AGENT_PORT, "agent")

    @staticmethod
    def _stop(node: LabNode, name: str) -> None:
        """Stops a spawned daemon (SIGTERM, then SIGKILL) so that it can be started again."""
        try:
            running = node.status(name)["running"]
        except LabError:
            return   # never started
        if running:
            node.signal(name, 15)
            try:
                node.wait_exit(name, timeout=20)
            except LabError:
                node.signal(name, 9)
                node.wait_exit(name, timeout=10)

    def _wait_port(self, node: LabNode, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = node.status(name)
            if not st["running"]:
                raise LabError(f"{node.name}: {name} exited with {st['rc']}:\n{_tail(node.log_path(name))}")
            r = node.run(["ss", "-Hltn", f"sport = :{port}"], timeout=10)
            if r.stdout.strip():
                return
            time.sleep(0.3)
        raise LabError(f"{node.name}: {name} does not listen on {port} after {timeout}s:\n"
                       f"{_tail(node.log_path(name))}")

    # ------------------------------------------------------------------------------------ node plugin

    def kubelet_dir(self, node: LabNode) -> Path:
        return node.workdir / "kubelet"

    def start_node_plugin(self, node: LabNode, env: dict[str, str] | None = None) -> str:
        self._stop(node, "node-plugin")
        kubelet = self.kubelet_dir(node)
        kubelet.mkdir(parents=True, exist_ok=True)
        argv = [PYTHON, "-m", "csi", "node", "--endpoint", f"{node.ip}:{NODE_PORT}", "--node-name", node.name,
                "--kubelet-dir", str(kubelet), "--zone", self.zones.get(node.name, "")]
        node.spawn("node-plugin", argv, env=env)
        self._wait_port(node, NODE_PORT, "node-plugin")
        if node.name not in self.node_ports:
            self.node_ports[node.name] = self.lab.expose(node.ip, NODE_PORT)
        return self.node_target(node)

    def node_target(self, node: LabNode) -> str:
        return f"127.0.0.1:{self.node_ports[node.name]}"

    # ------------------------------------------------------------------------------------ controller

    @property
    def controller_socket(self) -> Path:
        return self.lab.workdir / "controller.sock"

    @property
    def controller_target(self) -> str:
        return f"unix:{self.controller_socket}"

    def storage_nodes_file(self, nodes: list[LabNode]) -> Path:
        path = self.lab.workdir / "storage-nodes.yaml"
        path.write_text(yaml.safe_dump({"storageNodes": [
            {"name": n.name, "address": f"{n.ip}:{AGENT_PORT}", "zone": self.zones.get(n.name, "")}
            for n in nodes]}))
        return path

    def start_controller(self, storage: list[LabNode], env: dict[str, str] | None = None) -> str:
        self.stop_controller()
        log = open(self.lab.workdir / "controller.log", "ab")
        argv = [PYTHON, "-m", "csi", "controller", "--endpoint", f"unix://{self.controller_socket}",
                "--cluster-id", self.cluster_id, "--storage-nodes", str(self.storage_nodes_file(storage)),
                "--tls-dir", str(self.pki / "controller")]
        self.controller = self.lab.popen_in_netns(argv, stdout=log, stderr=subprocess.STDOUT,
                                                  env={**os.environ, **(env or {})})
        log.close()
        wait_ready(self.controller_target, what="controller", proc=self.controller,
                   log=self.lab.workdir / "controller.log")
        return self.controller_target

    def stop_controller(self) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.terminate()
            try:
                self.controller.wait(10)
            except subprocess.TimeoutExpired:
                self.controller.kill()
        self.controller = None

    def status(self, storage: list[LabNode]) -> subprocess.CompletedProcess:
        return self.operator("status", storage)

    def operator(self, command: str, storage: list[LabNode], *extra: str) -> subprocess.CompletedProcess:
        """`lvm-iscsi-csi status|cleanup ...` as an operator runs it, from the host inside the lab."""
        return subprocess.run(["ip", "netns", "exec", self.lab.netns, PYTHON, "-m", "csi", command,
                               "--storage-nodes", str(self.storage_nodes_file(storage)),
                               "--tls-dir", str(self.pki / "controller"), "--cluster-id", self.cluster_id, *extra],
                              capture_output=True, text=True, timeout=180)


def wait_ready(target: str, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               timeout: float = 60) -> None:
    """Waits until a CSI endpoint answers Probe with ready."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LabError(f"{what} exited with {proc.returncode}:\n{_tail(log) if log else ''}")
        try:
            with grpc.insecure_channel(target) as ch:
                r = csi_pb2_grpc.IdentityStub(ch).Probe(csi.ProbeRequest(), timeout=5)
                if r.ready.value:
                    return
                last = "not ready"
        except grpc.RpcError as exc:
            last = exc.code().name
        time.sleep(0.3)
    raise LabError(f"{what} at {target} not ready after {timeout}s ({last}):\n{_tail(log) if log else ''}")


def _tail(path: Path | None, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""
