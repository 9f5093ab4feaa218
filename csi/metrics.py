"""Prometheus metrics of every role: RPC counts and latencies, and what the agent and node plugin hold.

RPCs are counted in one place, the gRPC server's interceptor (csi/server.py), by service, method and the status
code the client saw: no servicer has metric code of its own. The gauges are computed when Prometheus scrapes,
by collectors that read what the process already keeps (the agent's cached pool reports, its per-volume records,
its wipe queue; the node plugin's stage records), never by a thread of their own: a scrape costs at most what
one GetInfo costs, and nothing runs between scrapes.

Every name starts with lvm_iscsi_csi_; sizes are in bytes and fill levels are ratios (0 to 1), as Prometheus
wants base units. The HTTP endpoint serves prometheus_client's exposition, off unless --metrics-address is given,
and /readyz beside it: kubelet's readiness probe of the agent, which says not ready while the agent's start brings
its volumes back (a rolling update of the agents then waits for it before it takes the next storage node).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "lvm_iscsi_csi"
# From a GetPluginInfo (milliseconds) to a CreateVolume that copies a snapshot or a stage that logs in and
# formats (tens of seconds); the sidecars' timeouts are minutes.
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SCRAPE_DEADLINE = 10.0   # seconds an LVM report started by a scrape may take


class RpcMetrics:
    """What the interceptor records for every call its server answers."""

    def __init__(self, registry: CollectorRegistry):
        labels = ("grpc_service", "grpc_method", "grpc_code")
        self.handled = Counter(f"{PREFIX}_grpc_server_handled", "RPCs completed by this server, by the status "
                               "code the client got", labels, registry=registry)
        self.seconds = Histogram(f"{PREFIX}_grpc_server_handling_seconds", "Time from the start of an RPC to its "
                                 "answer, by the status code the client got", labels, buckets=RPC_BUCKETS,
                                 registry=registry)

    def observe(self, full_method: str, code: grpc.StatusCode, seconds: float) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        labels = (service, method, code.name)
        self.handled.labels(*labels).inc()
        self.seconds.labels(*labels).observe(seconds)


def parse_address(address: str) -> tuple[str, int]:
    """`host:port`, `:port` (every address) or `[v6]:port` -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {address!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


READY_PATH = "/readyz"


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True    # a scrape that hangs never holds the process's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):   # noqa: A002 - the base class's signature
        pass                                 # a line per scrape or probe would drown the log


def app(registry: CollectorRegistry, not_ready: Callable[[], str] | None = None):
    """The WSGI application: READY_PATH answers 200 "ok", or 503 with the reason `not_ready` gives (a process
    without one is always ready); every other path the registry's exposition."""
    exposition = make_wsgi_app(registry)

    def serve_one(environ, start_response):
        if environ.get("PATH_INFO") != READY_PATH:
            return exposition(environ, start_response)
        reason = not_ready() if not_ready is not None else ""
        start_response("503 Service Unavailable" if reason else "200 OK", [("Content-Type", "text/plain")])
        return [(reason or "ok").encode() + b"\n"]
    return serve_one


def serve(address: str, registry: CollectorRegistry, not_ready: Callable[[], str] | None = None):
    """Serves app() on `address` from a daemon thread; returns (server, thread)."""
    host, port = parse_address(address)
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("Server", (_Server,), {"address_family": family})   # IPv6 too
    server = make_server(sockaddr[0], port, app(registry, not_ready), server_class=server_class,
                         handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics, readiness on %s", host, server.server_port, READY_PATH)
    return server, thread


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


# ---------------------------------------------------------------------------------------------- agent

POOL_LABELS = ("pool", "vg", "thin_pool")


class AgentCollector(Collector):
    """The storage node's state at scrape time, from the agent's own caches and records.

    Pool numbers come from the same cached reports as GetInfo (csi/storage/capacity.py): a thin pool's fill is
    at most POOL_REPORT_TTL seconds old, and a scrape runs at most the `dmsetup status` that a GetInfo would.
    Exports and ACLs are what the per-volume records say the kernel holds (the agent restores exactly that at
    start and keeps it so); no LIO scan per scrape."""

    def __init__(self, service):
        self._service = service

    def describe(self):
        return []   # computed at scrape time: nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from csi import errors, runner

        s = self._service
        present = _gauge("pool_up", "1 when the pool's VG (and thin pool) is on this node, 0 when missing",
                         POOL_LABELS)
        size = _gauge("pool_size_bytes", "Physical size of the pool (thin pool data, or the VG)", POOL_LABELS)
        used = _gauge("pool_used_bytes", "Physical bytes in use in the pool", POOL_LABELS)
        available = _gauge("pool_available_bytes", "Bytes new volumes may still get (after overprovisioning and "
                           "the max fill level)", POOL_LABELS)
        data = _gauge("pool_data_fill_ratio", "Data fill of the thin pool (used/size of the VG, thick), 0 to 1",
                      POOL_LABELS)
        meta = _gauge("pool_metadata_fill_ratio", "Metadata fill of the thin pool, 0 to 1 (0 for thick)",
                      POOL_LABELS)
        warn = _gauge("pool_warn_fill_ratio", "The pool's configured warn level (warnFillPercent), 0 to 1",
                      POOL_LABELS)
        limit = _gauge("pool_max_fill_ratio", "Fill level above which the pool takes no new volume, 0 to 1",
                       POOL_LABELS)
        over = _gauge("pool_overprovision_ratio", "Configured overprovision ratio of the pool", POOL_LABELS)
        volumes = _gauge("pool_volumes", "Volumes of this cluster in the pool", POOL_LABELS)
        errors_seen = 0
        with runner.deadline(SCRAPE_DEADLINE):
            for p in s.config.pools:
                labels = [p.name, p.vg, p.thin_pool]
                warn.add_metric(labels, p.warn_fill_percent / 100)
                limit.add_metric(labels, p.max_fill_percent / 100)
                over.add_metric(labels, p.overprovision_ratio)
                try:
                    u = s.usage(p)
                except errors.CsiError as exc:
                    # Every node gets every pool's definition: one this node lacks is reported as missing.
                    log.debug("pool %s not on this node: %s", p.name, exc.message)
                    present.add_metric(labels, 0)
                    continue
                except Exception:  # noqa: BLE001 - a scrape must answer with what it has
                    log.exception("metrics: cannot read pool %s", p.name)
                    errors_seen += 1
                    continue
                present.add_metric(labels, 1)
                size.add_metric(labels, u.physical_total)
                used.add_metric(labels, u.physical_used)
                available.add_metric(labels, u.available)
                data.add_metric(labels, u.data_percent / 100)
                meta.add_metric(labels, u.metadata_percent / 100)
                volumes.add_metric(labels, u.volumes)
        yield from (present, size, used, available, data, meta, warn, limit, over, volumes)
        yield from self._exports()
        yield from self._wipes()
        yield from self._copies()
        failed = _gauge("scrape_errors", "Parts of the last scrape that could not be read (see the log)")
        failed.add_metric([], errors_seen)
        yield failed

    def _exports(self) -> Iterator[GaugeMetricFamily]:
        exports = _gauge("exports", "iSCSI targets this agent exports (one per ready volume)", ("pool",))
        acls = _gauge("acls", "Initiator ACLs on this agent's targets (one per attachment)", ("pool",))
        counts: dict[str, list[int]] = {p.name: [0, 0] for p in self._service.config.pools}
        for rec in self._service.records.all():
            if rec.deleting or rec.state != "ready":
                continue
            c = counts.setdefault(rec.pool, [0, 0])
            c[0] += 1
            c[1] += len(rec.grants)
        for pool, (e, a) in sorted(counts.items()):
            exports.add_metric([pool], e)
            acls.add_metric([pool], a)
        yield exports
        yield acls

    def _wipes(self) -> Iterator[GaugeMetricFamily]:
        vols = _gauge("wipe_backlog_volumes", "Deleted thick LVs still being zeroed before their space is freed",
                      ("vg",))
        left = _gauge("wipe_backlog_bytes", "Bytes still to zero in deleted thick LVs", ("vg",))
        failing = _gauge("wipe_failing", "1 when the last try of a wipe in this VG failed (see the log)", ("vg",))
        wiper = self._service.wiper
        for vg in sorted({p.vg for p in self._service.config.pools if not p.thin}):
            b = wiper.backlog(vg)
            vols.add_metric([vg], b.volumes)
            left.add_metric([vg], b.bytes_left)
            failing.add_metric([vg], 1 if b.error else 0)
        yield from (vols, left, failing)

    def _copies(self) -> Iterator[GaugeMetricFamily]:
        running = _gauge("copies_in_flight", "Volume contents being copied into this node (clones, restores)")
        total = _gauge("copy_total_bytes", "Bytes to copy, of the copies in flight")
        done = _gauge("copy_done_bytes", "Bytes copied so far, of the copies in flight")
        jobs = self._service.copies.running()
        running.add_metric([], len(jobs))
        total.add_metric([], sum(p.total for p in jobs.values()))
        done.add_metric([], sum(p.done for p in jobs.values()))
        left = _gauge("restore_volumes_left", "Volumes the agent's start has not brought back yet (exported again, "
                      "their ACLs made): their calls get ABORTED until then")
        left.add_metric([], self._service.restoring.left)
        yield from (running, total, done, left)


# ---------------------------------------------------------------------------------------------- node plugin

class NodeCollector(Collector):
    """The worker's stages at scrape time, from the node plugin's own files: a stage record per staged volume
    (written before the login, removed after the unstage) and its ledger of logins. No iscsiadm per scrape."""

    def __init__(self, service):
        self._service = service

    def describe(self):
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        staged = _gauge("node_staged_volumes", "Volumes staged on this worker (a stage record each)")
        directory = self._service.config.state_dir
        try:
            count = sum(1 for p in directory.glob("*.json") if not p.name.startswith("."))
        except OSError:
            count = 0
        staged.add_metric([], count)
        logins = _gauge("node_iscsi_logins", "iSCSI targets this node plugin logged in to and has not logged "
                        "out of (its ledger)")
        logins.add_metric([], len(self._service.ledger.targets()))
        yield staged
        yield logins
