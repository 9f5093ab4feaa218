"""The one command, `lvm-iscsi-csi <role>`: parses flags, builds the role's configuration, starts it.

Roles: controller, node, agent (long-running daemons), status (an operator's view), cleanup (orphans: dry
run unless --delete), demo (the whole volume lifecycle on a throw-away storage node in User-Mode Linux),
certs (test/demo certificates).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from csi import ids
from csi.node import iscsiadm_mode

log = logging.getLogger("csi")


def _logging(level: str, fmt: str = "text") -> None:
    from csi import logformat
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[logformat.handler(fmt, sys.stderr)])


def _controller_config(a: argparse.Namespace):
    from csi.config import ControllerConfig
    return ControllerConfig.build(driver_name=a.driver_name, cluster_id=a.cluster_id,
                                  storage_nodes_file=a.storage_nodes, tls_dir=a.tls_dir,
                                  default_size=getattr(a, "default_size", "1Gi"),
                                  storage_node_label=a.storage_node_label, agent_port=a.agent_port,
                                  journal_dir=a.journal_dir, journal_namespace=a.journal_namespace,
                                  adoption_settle=getattr(a, "adoption_settle", 0.0),
                                  node_directory=getattr(a, "node_directory", ""))


def _metrics(a: argparse.Namespace, *collectors, not_ready=None):
    """With --metrics-address: a registry of this process's own (RPCs, the role's collectors, the process's CPU,
    memory and file descriptors) served over HTTP, with csi/metrics.py's readiness path (`not_ready`: why the
    process is not ready, "" when it is); returns the RpcMetrics for the gRPC server, or None (off)."""
    if not a.metrics_address:
        return None
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    from csi import metrics
    registry = CollectorRegistry()
    for extra in (ProcessCollector, PlatformCollector, GCCollector):
        extra(registry=registry)
    rpc = metrics.RpcMetrics(registry)
    for c in collectors:
        registry.register(c)
    try:
        metrics.parse_address(a.metrics_address)
    except ValueError as exc:
        from csi.config import ConfigError
        raise ConfigError(str(exc)) from None
    metrics.serve(a.metrics_address, registry, not_ready)
    return rpc


def _migrate_attachments(service, driver_name: str) -> None:
    from csi.controller import fleet, migration
    try:
        migration.migrate(service, fleet.storage_api(), fleet._core_api(), driver_name)
    except Exception:  # noqa: BLE001 - the next start tries again; old contexts still stage meanwhile
        log.exception("moving the VolumeAttachments of the previous version to node-bound grants failed")


def _controller_certificates(a: argparse.Namespace, tls_dir: Path) -> None:
    """With --ca-dir: the controller's own certificate, issued here from that CA and renewed; with
    --csr-signer too: the signer of the agents' and node plugins' certificates (csi/certsigner.py)."""
    import datetime

    from csi import certkeeper, peers
    from csi.config import ConfigError
    if not a.ca_dir:
        if a.csr_signer:
            raise ConfigError("--csr-signer needs --ca-dir (the CA it signs with)")
        return
    lifetime = datetime.timedelta(hours=a.certificate_hours)
    trust = certkeeper.read_bundle(Path(a.ca_file or Path(a.ca_dir) / "ca.crt"))
    keeper = certkeeper.CertKeeper(tls_dir, peers.Peer(peers.CONTROLLER),
                                   certkeeper.from_ca(Path(a.ca_dir), peers.CONTROLLER, lifetime=lifetime), trust)
    try:
        keeper.renew()
    except ValueError as exc:
        raise ConfigError(f"the controller's certificate from --ca-dir {a.ca_dir}: {exc}") from None
    keeper.start()
    if a.csr_signer:
        from csi.certsigner import CsrSigner, SignerConfig
        from csi.kubecsr import CsrApi
        missing = [f for f in ("signer_namespace", "agent_service_account", "agent_daemonset",
                               "node_service_account", "node_daemonset") if not getattr(a, f)]
        if missing:
            raise ConfigError("--csr-signer needs " + ", ".join("--" + f.replace("_", "-") for f in missing))
        CsrSigner(SignerConfig(a.csr_signer, a.signer_namespace, a.agent_service_account, a.agent_daemonset,
                               a.node_service_account, a.node_daemonset, Path(a.ca_dir), lifetime),
                  CsrApi()).start()


def _pod_certificate(a: argparse.Namespace, role: str, node: str, tls_dir):
    """With --csr-signer: a keeper of this agent's or node plugin's certificate, obtained through a
    Kubernetes CertificateSigningRequest (csi/certrequest.py); None without (the files are made elsewhere:
    the lab's, the demo's)."""
    from csi import certkeeper, peers
    from csi.config import ConfigError
    if not a.csr_signer:
        return None
    if not tls_dir or not a.ca_file:
        raise ConfigError("--csr-signer needs --tls-dir (where the certificate goes) and --ca-file (the CA bundle)")
    from csi.certrequest import CsrClient
    from csi.kubecsr import CsrApi
    try:
        client = CsrClient(CsrApi(), a.csr_signer, role, node)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return certkeeper.CertKeeper(Path(tls_dir), peers.Peer(role, node), client,
                                 certkeeper.read_bundle(Path(a.ca_file)))


def run_controller(a: argparse.Namespace) -> int:
    from csi import server
    from csi.controller import fleet
    from csi.controller.nodes import CsiNodes, StaticNodes
    from csi.controller.placement import Placement
    from csi.controller.service import ControllerService
    from csi.identity import IdentityService
    from csi.proto import csi_pb2_grpc

    config = _controller_config(a)
    _controller_certificates(a, config.tls_dir)
    journal = fleet.open_journal(config)
    agents = fleet.storage_nodes(config, journal, poll=True, watch=True)
    placement = Placement(journal, agents, config.cluster_id, config.adoption_settle)
    placement.start_adoption()
    nodes = StaticNodes(config.node_directory) if config.node_directory else \
        CsiNodes(config.driver_name, fleet.storage_api())
    srv = server.make_server(server.CONTROLLER_WORKERS, metrics=_metrics(a))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(config.driver_name, lambda: None), srv)
    service = ControllerService(config, agents, placement, nodes)
    csi_pb2_grpc.add_ControllerServicer_to_server(service, srv)
    service.replicas.late.start()
    if not config.node_directory:   # in a cluster: attachments of the version before node-bound grants
        threading.Thread(target=_migrate_attachments, args=(service, config.driver_name), daemon=True).start()
    server.serve(srv, a.endpoint)
    log.info("controller %s (cluster %s) with storage nodes: %s", config.driver_name, config.cluster_id,
             ", ".join(f"{c.node.name}@{c.node.address}/{c.node.zone or '-'}" for c in agents.all()) or "none")
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
                              state_dir=a.state_dir, tls_dir=a.tls_dir, iscsiadm=a.iscsiadm)
    zone = a.zone if a.zone is not None else node_zone(a.node_name, ids.topology_key(config.driver_name))
    tool = iscsiadm_mode.startup_check(config.iscsiadm)

    def probe() -> str | None:
        nonlocal tool
        if tool.problem:
            tool = iscsiadm_mode.startup_check(config.iscsiadm)   # installed since, or a slow first try
            if tool.problem:
                return tool.problem
        if not config.initiator_name_file.exists():
            return f"{config.initiator_name_file} is missing"
        return None

    keeper = _pod_certificate(a, "node", a.node_name, a.tls_dir)
    if keeper is not None:
        keeper.start(first=True)   # in the background: kubelet's calls (unmounts above all) never wait for it
    config.state_dir.mkdir(parents=True, exist_ok=True)
    node_service = NodeService(config, zone=zone or None)
    node_service.clean_stale()
    node_service.start()
    from csi import metrics
    srv = server.make_server(metrics=_metrics(a, metrics.NodeCollector(node_service)))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(config.driver_name, probe), srv)
    csi_pb2_grpc.add_NodeServicer_to_server(node_service, srv)
    server.serve(srv, a.endpoint)
    log.info("node plugin on %s, zone %s, kubelet dir %s", a.node_name, zone or "-", config.kubelet_dir)
    server.wait_forever(srv)
    return 0


def run_agent(a: argparse.Namespace) -> int:
    from csi import heap, server
    from csi.config import AgentConfig
    from csi.proto import agent_pb2_grpc
    from csi.storage import access, lio
    from csi.storage.lvm import Lvm
    from csi.storage.records import RecordStore
    from csi.storage.service import AgentService

    heap.keep_freed_memory()   # before any copy: gRPC's TLS buffers reused, not paged in per message

    config = AgentConfig.build(node_name=a.node_name, listen=a.listen, portals=a.portal or [],
                               portal_cidrs=a.portal_cidr or [], portal_port=a.portal_port,
                               state_dir=a.state_dir, cluster_id=a.cluster_id, tls_dir=a.tls_dir,
                               config_file=a.config)
    keeper = _pod_certificate(a, "agent", config.node_name, config.tls_dir)
    if keeper is None:
        server.TlsFiles(config.tls_dir).read()   # made elsewhere: missing or broken files stop the agent now
    config.state_dir.mkdir(parents=True, exist_ok=True)
    config.state_dir.chmod(0o700)
    lio.load_modules()
    lvm = Lvm(config.state_dir / "lvm-system")
    lvm.configure(config.devices, config.state_dir)
    service = AgentService(config, lvm, lio.Lio(config.portals), RecordStore(config.state_dir / "volumes"))
    from csi.node import raid
    raid.install_udev_rule()   # before any export: a replica leg is never assembled on its own storage node
    # The exports come back in the background (workers' I/O needs no certificate), while the agent serves: a
    # volume's calls get ABORTED only until it is back. Then CHAP secrets that left the storage node (older
    # versions) are replaced, and wipes cut short resume: both take volumes' locks.
    service.start_restore(then=(lambda: access.start_rotation(service), service.wiper.start),
                          fatal=lambda: os._exit(1))
    service.lio.lock_discovery()
    if keeper is not None:
        from csi.certkeeper import Refused
        try:
            keeper.first()  # before serving: every caller of the agent checks its certificate
        except Refused as exc:
            log.error("the agent cannot have a certificate: %s", exc)
            return 1
        keeper.start()
    creds = server.TlsFiles(config.tls_dir).server_credentials()
    from csi import metrics
    # who may call what: storage/authz.py
    srv = server.make_server(server.AGENT_WORKERS, authorize=service.authorizer,
                             metrics=_metrics(a, metrics.AgentCollector(service), not_ready=service.restoring.reason))
    agent_pb2_grpc.add_AgentServicer_to_server(service, srv)
    server.serve(srv, config.listen, creds)
    log.info("agent %s: pools %s, portals %s", config.node_name, ", ".join(p.name for p in config.pools),
             ", ".join(str(p) for p in config.portals))
    server.wait_forever(srv)
    return 0


def run_status(a: argparse.Namespace) -> int:
    from csi.status import status
    return status(_controller_config(a), sys.stdout)


def run_cleanup(a: argparse.Namespace) -> int:
    from csi.status import cleanup
    return cleanup(_controller_config(a), sys.stdout, a.min_age, a.delete)


def run_wait_for_driver(a: argparse.Namespace) -> int:
    """Returns once the driver answers on its socket: the chart's postStart hook of the driver container, so
    that kubelet starts the CSI sidecars (the containers after it) only when the driver answers promptly.
    Started at once on a loaded node, each sidecar gave up on its first connection, exited and was restarted."""
    from csi.identity import wait_until_answering
    return 0 if wait_until_answering(a.path, a.timeout) else 1


def run_mark_leg(a: argparse.Namespace) -> int:
    from csi.legmark import mark
    return mark(_controller_config(a), a.volume_id, a.node, a.state, sys.stdout, a.yes)


def run_replace_leg(a: argparse.Namespace) -> int:
    from csi.legreplace import replace
    return replace(_controller_config(a), a.volume_id, a.node, a.to, sys.stdout, a.yes)


def run_retire(a: argparse.Namespace) -> int:
    from csi.retire import retire
    return retire(_controller_config(a), a.node, sys.stdout, a.yes)


def run_demo(a: argparse.Namespace) -> int:
    from csi.demo import demo
    return demo(Path(a.workdir), keep=a.keep)


def run_certs(a: argparse.Namespace) -> int:
    from csi.tls import TestPki
    pki = TestPki(Path(a.out))
    made = [pki.ensure("controller")] + [pki.ensure("agent", n) for n in a.storage_node] + \
        [pki.ensure("node", n) for n in a.worker]
    print(f"a throw-away CA in {pki.out / 'ca'}; ca.crt, tls.crt, tls.key in " + ", ".join(str(d) for d in made))
    return 0


def pod_certificate_flags(sp) -> None:
    sp.add_argument("--csr-signer", default="",
                    help="obtain this process's certificate into --tls-dir with a Kubernetes "
                         "CertificateSigningRequest to this signerName (the controller's), and renew it")
    sp.add_argument("--ca-file", default="", help="with --csr-signer: the CA bundle to trust (ca.crt in --tls-dir)")


def metrics_flag(sp) -> None:
    sp.add_argument("--metrics-address", default="", metavar="HOST:PORT",
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (':9820' for every address); "
                         "default: off. The chart uses 9820 (controller), 9821 (node plugin), 9822 (agent)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvm-iscsi-csi", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text, or json: one object per line with time, level, logger and message")
    sub = p.add_subparsers(dest="role", required=True)

    def common(sp, endpoint=True):
        sp.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
        sp.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"])
        sp.add_argument("--driver-name", default=ids.DRIVER_NAME)
        if endpoint:
            sp.add_argument("--endpoint", default="unix:///csi/csi.sock",
                            help="unix:///path or host:port where the CSI services listen")

    def fleet_flags(sp):
        """Where the storage nodes and the placement journal are: the controller's and the operator's."""
        sp.add_argument("--cluster-id", default="default")
        sp.add_argument("--storage-nodes", default="", help="YAML: storageNodes: [{name, address, zone}]")
        sp.add_argument("--storage-node-label", default="",
                        help="discover storage nodes from the Kubernetes API: Nodes with this label selector")
        sp.add_argument("--agent-port", type=int, default=7600, help="the agents' port (with discovery)")
        sp.add_argument("--journal-dir", default="", help="the placement journal in this directory")
        sp.add_argument("--journal-namespace", default="",
                        help="the placement journal as ConfigMaps in this Kubernetes namespace")
        sp.add_argument("--tls-dir", required=True, help="ca.crt, tls.crt, tls.key for mutual TLS to the agents")

    c = sub.add_parser("controller", help="CSI Identity + Controller")
    common(c)
    fleet_flags(c)
    c.add_argument("--default-size", default="1Gi", help="size of a volume requested without a capacity range")
    c.add_argument("--node-directory", default="",
                   help="YAML: nodes: [{name, iqn}], which node each initiator name belongs to (outside a cluster; "
                        "in one, the CSINode objects say it)")
    c.add_argument("--adoption-settle", type=float, default=0.0,
                   help="seconds between the two scans that adopt volumes made before the journal (upgrades: "
                        "the provisioner's timeout)")
    c.add_argument("--ca-dir", default="",
                   help="ca.crt and ca.key of the CA to issue from: the controller's own certificate goes into "
                        "--tls-dir and is renewed while it runs (default: the files in --tls-dir are made "
                        "elsewhere)")
    c.add_argument("--ca-file", default="", help="the CA bundle peers are verified with (default: --ca-dir's ca.crt)")
    c.add_argument("--certificate-hours", type=float, default=168.0,
                   help="lifetime of the certificates issued (renewed at 2/3 of it)")
    c.add_argument("--csr-signer", default="",
                   help="approve and sign the Kubernetes CertificateSigningRequests of this signerName, after "
                        "checking pod, node and DaemonSet (needs --ca-dir and the four accounts and DaemonSets)")
    c.add_argument("--signer-namespace", default="", help="the namespace of the driver's pods")
    c.add_argument("--agent-service-account", default="")
    c.add_argument("--agent-daemonset", default="")
    c.add_argument("--node-service-account", default="")
    c.add_argument("--node-daemonset", default="")
    metrics_flag(c)
    c.set_defaults(func=run_controller)

    n = sub.add_parser("node", help="CSI Identity + Node on a worker")
    common(n)
    n.add_argument("--node-name", required=True)
    n.add_argument("--kubelet-dir", default="/var/lib/kubelet")
    n.add_argument("--initiator-name-file", default="/etc/iscsi/initiatorname.iscsi")
    n.add_argument("--zone", default=None, help="overrides the Node object's topology.kubernetes.io/zone label")
    n.add_argument("--max-volumes", type=int, default=128)
    n.add_argument("--iscsiadm", choices=iscsiadm_mode.MODES, default="image",
                   help="whose iscsiadm runs: the image's, or the host's own through nsenter (needs the host's PID "
                        "namespace); use host when the host's iscsid is of another open-iscsi release")
    n.add_argument("--state-dir", default=None, help="default: <kubelet-dir>/plugins/<driver>/staged")
    n.add_argument("--tls-dir", default="", help="ca.crt, tls.crt, tls.key: this node plugin's identity; the agents "
                                                 "give a volume's CHAP credentials only to the node it is attached to")
    pod_certificate_flags(n)
    metrics_flag(n)
    n.set_defaults(func=run_node)

    g = sub.add_parser("agent", help="storage agent on a storage node (LVM + LIO)")
    common(g, endpoint=False)
    g.add_argument("--listen", default="0.0.0.0:7600")
    g.add_argument("--node-name", required=True)
    g.add_argument("--portal", action="append", help="ip:port the iSCSI portal listens on (repeatable)")
    g.add_argument("--portal-cidr", action="append", metavar="CIDR",
                   help="a network (e.g. a dedicated storage network, 10.20.0.0/24) in which this host's own "
                        "address is the portal: found at start, exactly one address or the agent stops")
    g.add_argument("--portal-port", type=int, default=3260, help="port of the --portal-cidr portals")
    g.add_argument("--config", required=True, help="YAML: pools, devices, wipeThick")
    g.add_argument("--state-dir", default="/var/lib/lvm-iscsi-csi")
    g.add_argument("--cluster-id", default="default")
    g.add_argument("--tls-dir", required=True)
    pod_certificate_flags(g)
    metrics_flag(g)
    g.set_defaults(func=run_agent)

    s = sub.add_parser("status", help="agents, pools, capacity and volumes, like cinder service-list + list")
    common(s, endpoint=False)
    fleet_flags(s)
    s.set_defaults(func=run_status)

    o = sub.add_parser("cleanup", help="list (dry run) or remove objects of this driver that no record explains")
    common(o, endpoint=False)
    fleet_flags(o)
    o.add_argument("--min-age", type=int, default=600, help="seconds; younger objects may belong to a call in flight")
    o.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    o.set_defaults(func=run_cleanup)

    r = sub.add_parser("retire-storage-node", help="a storage node lost for good: its volumes, snapshots and "
                                                   "attachments are released without it")
    common(r, endpoint=False)
    fleet_flags(r)
    r.add_argument("node", help="the storage node's name")
    r.add_argument("--yes", action="store_true", help="really retire it (default: say what would happen)")
    r.set_defaults(func=run_retire)

    m = sub.add_parser("mark-replica-leg", help="record one leg of a replicated volume outdated (serve the volume "
                                                "from the other, giving up what only this one holds) or in sync")
    common(m, endpoint=False)
    fleet_flags(m)
    m.add_argument("volume_id", help="the replicated volume's ID (r1:<name>), the PV's volumeHandle")
    m.add_argument("node", help="the storage node of the leg")
    m.add_argument("state", choices=("outdated", "in-sync"))
    m.add_argument("--yes", action="store_true", help="really record it (default: say what would happen)")
    m.set_defaults(func=run_mark_leg)

    x = sub.add_parser("replace-replica-leg", help="replace the leg of a replicated volume on a storage node lost "
                                                  "for good by a new one on another node (copied in full)")
    common(x, endpoint=False)
    fleet_flags(x)
    x.add_argument("volume_id", help="the replicated volume's ID (r1:<name>), the PV's volumeHandle")
    x.add_argument("node", help="the lost storage node of the leg")
    x.add_argument("--to", required=True, help="the storage node of the new leg")
    x.add_argument("--yes", action="store_true", help="really replace it (default: say what would happen)")
    x.set_defaults(func=run_replace_leg)

    d = sub.add_parser("demo", help="the whole volume lifecycle on a throw-away storage node (User-Mode Linux)")
    d.add_argument("--workdir", default="/tmp/lvm-iscsi-csi-demo")
    d.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    d.set_defaults(func=run_demo)

    w = sub.add_parser("wait-for-driver", help="wait until the CSI driver on a unix socket answers promptly (the "
                                              "chart's postStart hook: the sidecars start once it does)")
    w.add_argument("path")
    w.add_argument("--timeout", type=float, default=300.0, help="seconds; exits 1 after them")
    w.set_defaults(func=run_wait_for_driver)

    t = sub.add_parser("certs", help="write a throw-away CA and certificates for the controller, agents and node "
                                    "plugins (tests, demo)")
    t.add_argument("--out", required=True)
    t.add_argument("--storage-node", action="append", default=[], help="an agent certificate for this node")
    t.add_argument("--worker", action="append", default=[], help="a node plugin certificate for this node")
    t.set_defaults(func=run_certs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _logging(args.log_level, args.log_format)
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
