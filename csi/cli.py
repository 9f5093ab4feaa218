"""The one command, `lvm-iscsi-csi <role>`: parses flags, builds the role's configuration, starts it.

Roles: controller, node, agent (long-running daemons), status (an operator's view), cleanup (orphans: dry
run unless --delete), demo (the whole volume lifecycle on a throw-away storage node in User-Mode Linux),
certs (test/demo certificates).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from csi import ids

log = logging.getLogger("csi")


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_controller(a: argparse.Namespace) -> int:
    from csi import server
    from csi.config import ControllerConfig
    from csi.controller.agents import Agents
    from csi.controller.service import ControllerService
    from csi.identity import IdentityService
    from csi.proto import csi_pb2_grpc

    config = ControllerConfig.build(driver_name=a.driver_name, cluster_id=a.cluster_id,
                                    storage_nodes_file=a.storage_nodes, tls_dir=a.tls_dir,
                                    agent_server_name=a.agent_server_name, default_size=a.default_size)
    agents = Agents(config)
    srv = server.make_server()
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(config.driver_name, lambda: None), srv)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(config, agents), srv)
    server.serve(srv, a.endpoint)
    log.info("controller %s (cluster %s) with storage nodes: %s", config.driver_name, config.cluster_id,
             ", ".join(f"{n.name}@{n.address}/{n.zone or '-'}" for n in config.storage_nodes) or "none")
    server.wait_forever(srv)
    return 0


def run_node(a: argparse.Namespace) -> int:
    from csi import server
    from csi.config import NodeConfig
    from csi.identity import IdentityService
    from csi.node.service import NodeService
    from csi.node.zone import node_zone
    from csi.proto import csi_pb2_grpc

    config = NodeConfig.build(driver_name=a.driver_name, node_name=a.node_name, kubelet_dir=a.kubelet_dir,
                              initiator_name_file=a.initiator_name_file, zone=a.zone, max_volumes=a.max_volumes,
                              state_dir=a.state_dir)
    zone = a.zone if a.zone is not None else node_zone(a.node_name)

    def probe() -> str | None:
        if shutil.which("iscsiadm") is None:
            return "iscsiadm is not installed (open-iscsi)"
        if not config.initiator_name_file.exists():
            return f"{config.initiator_name_file} is missing"
        return None

    config.state_dir.mkdir(parents=True, exist_ok=True)
    node_service = NodeService(config, zone=zone or None)
    node_service.clean_stale()
    srv = server.make_server()
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(config.driver_name, probe), srv)
    csi_pb2_grpc.add_NodeServicer_to_server(node_service, srv)
    server.serve(srv, a.endpoint)
    log.info("node plugin on %s, zone %s, kubelet dir %s", a.node_name, zone or "-", config.kubelet_dir)
    server.wait_forever(srv)
    return 0


def run_agent(a: argparse.Namespace) -> int:
    from csi import server
    from csi.config import AgentConfig
    from csi.proto import agent_pb2_grpc
    from csi.storage import lio
    from csi.storage.lvm import Lvm
    from csi.storage.records import RecordStore
    from csi.storage.service import AgentService

    config = AgentConfig.build(node_name=a.node_name, listen=a.listen, portals=a.portal, state_dir=a.state_dir,
                               cluster_id=a.cluster_id, tls_dir=a.tls_dir, config_file=a.config)
    creds = server.TlsFiles(config.tls_dir).server_credentials()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.state_dir.chmod(0o700)
    lio.load_modules()
    lvm = Lvm(config.state_dir / "lvm-system")
    lvm.configure(config.devices, config.state_dir)
    service = AgentService(config, lvm, lio.Lio(config.portals), RecordStore(config.state_dir / "volumes"))
    service.restore()
    srv = server.make_server()
    agent_pb2_grpc.add_AgentServicer_to_server(service, srv)
    server.serve(srv, config.listen, creds)
    log.info("agent %s: pools %s, portals %s", config.node_name, ", ".join(p.name for p in config.pools),
             ", ".join(str(p) for p in config.portals))
    server.wait_forever(srv)
    return 0


def run_status(a: argparse.Namespace) -> int:
    from csi.status import status
    return status(a.storage_nodes, a.tls_dir, a.agent_server_name, a.cluster_id, sys.stdout)


def run_cleanup(a: argparse.Namespace) -> int:
    from csi.status import cleanup
    return cleanup(a.storage_nodes, a.tls_dir, a.agent_server_name, a.cluster_id, sys.stdout, a.min_age, a.delete)


def run_demo(a: argparse.Namespace) -> int:
    from csi.demo import demo
    return demo(Path(a.workdir), keep=a.keep)


def run_certs(a: argparse.Namespace) -> int:
    from csi.tls import write_test_pki
    write_test_pki(Path(a.out), a.agent_server_name)
    print(f"wrote agent/ and controller/ (each: ca.crt, tls.crt, tls.key) under {a.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvm-iscsi-csi", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="role", required=True)

    def common(sp, endpoint=True):
        sp.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
        sp.add_argument("--driver-name", default=ids.DRIVER_NAME)
        if endpoint:
            sp.add_argument("--endpoint", default="unix:///csi/csi.sock",
                            help="unix:///path or host:port where the CSI services listen")

    c = sub.add_parser("controller", help="CSI Identity + Controller")
    common(c)
    c.add_argument("--cluster-id", default="default")
    c.add_argument("--storage-nodes", required=True, help="YAML: storageNodes: [{name, address, zone}]")
    c.add_argument("--tls-dir", required=True, help="ca.crt, tls.crt, tls.key for mutual TLS to the agents")
    c.add_argument("--agent-server-name", default=ids.AGENT_SERVER_NAME)
    c.add_argument("--default-size", default="1Gi", help="size of a volume requested without a capacity range")
    c.set_defaults(func=run_controller)

    n = sub.add_parser("node", help="CSI Identity + Node on a worker")
    common(n)
    n.add_argument("--node-name", required=True)
    n.add_argument("--kubelet-dir", default="/var/lib/kubelet")
    n.add_argument("--initiator-name-file", default="/etc/iscsi/initiatorname.iscsi")
    n.add_argument("--zone", default=None, help="overrides the Node object's topology.kubernetes.io/zone label")
    n.add_argument("--max-volumes", type=int, default=128)
    n.add_argument("--state-dir", default=None, help="default: <kubelet-dir>/plugins/<driver>/staged")
    n.set_defaults(func=run_node)

    g = sub.add_parser("agent", help="storage agent on a storage node (LVM + LIO)")
    common(g, endpoint=False)
    g.add_argument("--listen", default="0.0.0.0:7600")
    g.add_argument("--node-name", required=True)
    g.add_argument("--portal", action="append", required=True, help="ip:port the iSCSI portal listens on")
    g.add_argument("--config", required=True, help="YAML: pools, devices, wipeThick")
    g.add_argument("--state-dir", default="/var/lib/lvm-iscsi-csi")
    g.add_argument("--cluster-id", default="default")
    g.add_argument("--tls-dir", required=True)
    g.set_defaults(func=run_agent)

    s = sub.add_parser("status", help="agents, pools, capacity and volumes, like cinder service-list + list")
    s.add_argument("--storage-nodes", required=True)
    s.add_argument("--tls-dir", required=True)
    s.add_argument("--agent-server-name", default=ids.AGENT_SERVER_NAME)
    s.add_argument("--cluster-id", default="default")
    s.set_defaults(func=run_status)

    o = sub.add_parser("cleanup", help="list (dry run) or remove objects of this driver that no record explains")
    o.add_argument("--storage-nodes", required=True)
    o.add_argument("--tls-dir", required=True)
    o.add_argument("--agent-server-name", default=ids.AGENT_SERVER_NAME)
    o.add_argument("--cluster-id", default="default")
    o.add_argument("--min-age", type=int, default=600, help="seconds; younger objects may belong to a call in flight")
    o.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    o.set_defaults(func=run_cleanup)

    d = sub.add_parser("demo", help="the whole volume lifecycle on a throw-away storage node (User-Mode Linux)")
    d.add_argument("--workdir", default="/tmp/lvm-iscsi-csi-demo")
    d.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    d.set_defaults(func=run_demo)

    t = sub.add_parser("certs", help="write a throw-away CA and agent/controller certificates (tests, demo)")
    t.add_argument("--out", required=True)
    t.add_argument("--agent-server-name", default=ids.AGENT_SERVER_NAME)
    t.set_defaults(func=run_certs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _logging(args.log_level)
    from csi import faults
    faults.warn_if_enabled()
    from csi.config import ConfigError
    try:
        return args.func(args)
    except ConfigError as exc:
        log.error("configuration: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
