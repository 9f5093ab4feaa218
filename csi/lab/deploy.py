"""The driver deployed in a lab: agents on storage nodes, node plugins on workers, the controller on the host
inside the lab's network namespace. Shared by the demo, the e2e tests, csi-sanity and the benchmark, so
they all run the driver the same way: real processes, real flags, mutual TLS on.

Reaching it: the controller listens on a unix socket on the host (controller_target); each node plugin
listens on TCP in its guest and is exposed on 127.0.0.1 (node_target). The kubelet directory of a worker
is under the lab workdir, which guest and host share, so csi-sanity on the host can make its paths there.

Every daemon logs at `log_level` ("info" by default; "debug" logs every request, redacted, and every command
run: what a test needs that greps the logs for secrets).
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

from csi import peers
from csi.lab import Lab, LabError, LabNode
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.tls import TestPki

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
    pki: TestPki = field(init=False)
    log_level: str = "info"
    controller: subprocess.Popen | None = None
    node_ports: dict[tuple[str, str], int] = field(default_factory=dict)   # (node, process name) -> host port
    agent_ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (node, agent port) -> host port

    def __post_init__(self) -> None:
        # One certificate per process, each naming its role and node (csi/peers.py), from one throw-away CA.
        self.pki = TestPki(self.lab.workdir / "pki")

    # ------------------------------------------------------------------------------------ agent

    def agent_state(self, node: LabNode, name: str = "agent") -> Path:
        # on the host's disk: survives the node's reboot
        return node.workdir / ("agent-state" if name == "agent" else f"{name}-state")

    def start_all(self, storage: list[LabNode], workers: list[LabNode],
                  agent_env: dict[str, str] | None = None) -> None:
        """The whole driver: an agent on every storage node, the node plugin on every worker, the controller
        on the host knowing every storage node."""
        for node in storage:
            self.start_agent(node, env=agent_env)
        for node in workers:
            self.start_node_plugin(node)
        self.start_controller(storage)

    def start_agent(self, node: LabNode, pools=None, extra: list[str] | None = None,
                    env: dict[str, str] | None = None, name: str = "agent", cluster_id: str | None = None,
                    port: int = AGENT_PORT, wipe_thick: bool = True, timeout: float = 60,
                    restored: bool = True) -> None:
        """Starts (or restarts) an agent on a storage node and waits `timeout` s for it to listen and to have
        brought back every volume of its records (it serves meanwhile: wait_restored; `restored=False` waits for it
        to listen only). Another `name`, `cluster_id` and `port` start a second agent beside the first: another
        cluster sharing the node's VG and LIO, with its own state."""
        self._stop(node, name)
        config = node.workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"pools": pools or DEFAULT_POOLS, "devices": ["/dev/loop*"],
                                          "wipeThick": wipe_thick}))
        node.spawn(name, [PYTHON, "-m", "csi", "--log-level", self.log_level, "agent", "--node-name", node.name,
                          "--listen", f"{node.ip}:{port}", "--portal", f"{node.ip}:3260",
                          "--config", str(config), "--state-dir", str(self.agent_state(node, name)),
                          "--cluster-id", cluster_id or self.cluster_id,
                          "--tls-dir", str(self.pki.ensure("agent", node.name)),
                          *(extra or [])], env=env)
        deadline = time.monotonic() + timeout
        self._wait_port(node, port, name, timeout)
        if restored:
            self.wait_restored(node, port, name, max(1.0, deadline - time.monotonic()))

    def agent_channel(self, node: LabNode, port: int = AGENT_PORT) -> grpc.Channel:
        """A channel to the node's agent from the host, with the controller's certificate."""
        if (node.name, port) not in self.agent_ports:
            self.agent_ports[node.name, port] = self.lab.expose(node.ip, port)
        files = [(self.pki.ensure("controller") / n).read_bytes() for n in ("ca.crt", "tls.key", "tls.crt")]
        return grpc.secure_channel(f"127.0.0.1:{self.agent_ports[node.name, port]}",
                                   grpc.ssl_channel_credentials(*files),
                                   options=[("grpc.ssl_target_name_override", peers.dns_name(peers.AGENT, node.name))])

    def wait_restored(self, node: LabNode, port: int = AGENT_PORT, name: str = "agent", timeout: float = 60) -> float:
        """Until the agent's GetInfo says ready: every volume of its records back after its start. Seconds."""
        t0 = time.monotonic()
        last = ""
        with self.agent_channel(node, port) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            while True:
                self._check_running(node, name)
                try:
                    info = stub.GetInfo(apb.GetInfoRequest(), timeout=10)
                    if info.ready:
                        return time.monotonic() - t0
                    last = info.not_ready_reason
                except grpc.RpcError as exc:
                    last = exc.code().name
                if time.monotonic() - t0 > timeout:
                    raise LabError(f"{node.name}: {name} not ready after {timeout:.0f}s ({last}):\n"
                                   f"{_tail(node.log_path(name))}")
                time.sleep(0.3)

    def stop_agent(self, node: LabNode, name: str = "agent") -> None:
        self._stop(node, name)

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

    @staticmethod
    def _check_running(node: LabNode, name: str) -> None:
        st = node.status(name)
        if not st["running"]:
            raise LabError(f"{node.name}: {name} exited with {st['rc']}:\n{_tail(node.log_path(name))}")

    def _wait_port(self, node: LabNode, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running(node, name)
            r = node.run(["ss", "-Hltn", f"sport = :{port}"], timeout=10)
            if r.stdout.strip():
                return
            time.sleep(0.3)
        raise LabError(f"{node.name}: {name} does not listen on {port} after {timeout}s:\n"
                       f"{_tail(node.log_path(name))}")

    # ------------------------------------------------------------------------------------ node plugin

    def kubelet_dir(self, node: LabNode) -> Path:
        return node.workdir / "kubelet"

    def start_node_plugin(self, node: LabNode, env: dict[str, str] | None = None, name: str = "node-plugin",
                          port: int = NODE_PORT, extra: list[str] | None = None) -> str:
        """Starts (or restarts) a node plugin on a worker. `name`, `port` and `extra` flags (e.g.
        --driver-name, --state-dir) let a second release of the driver run beside the first."""
        self._stop(node, name)
        kubelet = self.kubelet_dir(node)
        kubelet.mkdir(parents=True, exist_ok=True)
        argv = [PYTHON, "-m", "csi", "--log-level", self.log_level, "node", "--endpoint", f"{node.ip}:{port}",
                "--node-name", node.name, "--kubelet-dir", str(kubelet), "--zone", self.zones.get(node.name, ""),
                "--tls-dir", str(self.pki.ensure("node", node.name)), *(extra or [])]
        node.spawn(name, argv, env=env)
        self._wait_port(node, port, name)
        if (node.name, name) not in self.node_ports:
            self.node_ports[node.name, name] = self.lab.expose(node.ip, port)
        return self.node_target(node, name)

    def stop_node_plugin(self, node: LabNode, name: str = "node-plugin") -> None:
        self._stop(node, name)

    def node_target(self, node: LabNode, name: str = "node-plugin") -> str:
        return f"127.0.0.1:{self.node_ports[node.name, name]}"

    # ------------------------------------------------------------------------------------ controller

    @property
    def controller_socket(self) -> Path:
        return self.lab.workdir / "controller.sock"

    @property
    def controller_target(self) -> str:
        return f"unix:{self.controller_socket}"

    def journal_dir_of(self, cluster_id: str | None = None) -> Path:
        """A controller's placement journal (the file store: there is no Kubernetes API in the lab), one per
        cluster id (two clusters may share the lab's storage nodes)."""
        cluster_id = cluster_id or self.cluster_id
        return self.lab.workdir / ("journal" if cluster_id == self.cluster_id else f"journal-{cluster_id}")

    @property
    def journal_dir(self) -> Path:
        return self.journal_dir_of()

    def storage_nodes_file(self, nodes: list[LabNode], port: int = AGENT_PORT) -> Path:
        path = self.lab.workdir / ("storage-nodes.yaml" if port == AGENT_PORT else f"storage-nodes-{port}.yaml")
        path.write_text(yaml.safe_dump({"storageNodes": [
            {"name": n.name, "address": f"{n.ip}:{port}", "zone": self.zones.get(n.name, "")}
            for n in nodes]}))
        return path

    def node_directory(self) -> Path:
        """Which node each initiator name belongs to: every node of the lab (in a cluster, the CSINodes)."""
        path = self.lab.workdir / "nodes.yaml"
        path.write_text(yaml.safe_dump({"nodes": [{"name": n.name, "iqn": n.initiator_iqn}
                                                  for n in self.lab.nodes.values()]}))
        return path

    def start_controller(self, storage: list[LabNode], env: dict[str, str] | None = None) -> str:
        self.stop_controller()
        log = open(self.lab.workdir / "controller.log", "ab")
        argv = [PYTHON, "-m", "csi", "--log-level", self.log_level, "controller",
                "--endpoint", f"unix://{self.controller_socket}",
                "--cluster-id", self.cluster_id, "--storage-nodes", str(self.storage_nodes_file(storage)),
                "--journal-dir", str(self.journal_dir), "--tls-dir", str(self.pki.ensure("controller")),
                "--node-directory", str(self.node_directory())]
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

    def operator_argv(self, command: str, storage: list[LabNode], *extra: str, cluster_id: str | None = None,
                      port: int = AGENT_PORT) -> list[str]:
        nodes = self.storage_nodes_file(storage, port=port)
        return ["ip", "netns", "exec", self.lab.netns, PYTHON, "-m", "csi", command, "--storage-nodes", str(nodes),
                "--journal-dir", str(self.journal_dir_of(cluster_id)), "--tls-dir", str(self.pki.ensure("controller")),
                "--cluster-id", cluster_id or self.cluster_id, *extra]

    def operator(self, command: str, storage: list[LabNode], *extra: str, cluster_id: str | None = None,
                 port: int = AGENT_PORT) -> subprocess.CompletedProcess:
        """`lvm-iscsi-csi status|cleanup ...` as an operator runs it, from the host inside the lab."""
        return subprocess.run(self.operator_argv(command, storage, *extra, cluster_id=cluster_id, port=port),
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
