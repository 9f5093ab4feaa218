"""The controller's view of the storage nodes: one mutual-TLS channel per agent, and whether each is up.

A background poller asks every agent for its pools (GetInfo) every POLL_SECONDS, each bounded by PROBE_TIMEOUT,
a slice of at most POLL_SLICE agents at a time spread over the interval (not all at once: at 100 agents, 100
answers arriving together every 3 s held the controller's CreateVolume calls for a moment each time); a node
that joins is asked at once. The scheduler and GetCapacity read those answers instead of asking every agent
per call (counting the controller's own placements until the next answer), so a CreateVolume costs one agent
call whatever the size of the cluster, and a node that is down is skipped, not waited for. Channels keep alive
(a powered-off node is noticed within seconds, not at the caller's deadline) and reconnect with a short
backoff (a node that comes back is used again within seconds, however long it was away). A call to a node
seen down gets a short timeout; the poller brings the node back as soon as it answers.

Storage nodes come from a source (a static file, or the Kubernetes API: discovery.py); a node that leaves the
source but holds volumes stays, down, until an administrator retires it (see `retire`).

The controller's certificate is renewed while it runs (csi/certkeeper.py): when its TLS files change, every
node gets a new channel, whose connection presents the new certificate; the old channels are closed once the
longest call that may still use them is over.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

import grpc

from csi import errors, peers, runner
from csi.config import StorageNode
from csi.controller.scheduler import Candidate
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.server import TlsFiles

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_SECONDS = 3.0
POLL_SLICE = 10
# A loaded storage node may take seconds to answer GetInfo (its LVM reports): the probe waits for it rather than
# call it down. A node gone is noticed sooner anyway: its connection fails (UNAVAILABLE) at once.
PROBE_TIMEOUT = 15.0
SLOW_PROBES_DOWN = 3
# Asking the nodes that were down once more before a placement gives up: an agent that restarted a moment ago
# answers at once; this must not cost the CreateVolume a whole probe's wait.
RECHECK_TIMEOUT = 5.0
DOWN_CALL_TIMEOUT = 5.0
RETIRED_REFRESH = 30.0
# Calls that only read or change a record and an ACL answer in well under a second on a healthy node: a node
# that takes longer is treated as unreachable. Calls that run LVM or copy data keep the caller's deadline.
QUICK_CALLS = {"GetInfo", "GetVolume", "GetSnapshot", "ListVolumes", "ListSnapshots", "GrantAccess",
               "RevokeAccess"}
QUICK_CALL_TIMEOUT = 20.0
RECONNECT_WAIT = 10.0
# How long a channel replaced by one with new certificates stays open for the calls still running on it: longer
# than any call's deadline (a copy's CreateVolume: the provisioner's 300 s).
RETIRED_CHANNEL_GRACE = 900.0
# A powered-off node answers nothing, not even a refusal: the keepalive notices within 5 + 2 s, fails the calls
# still waiting on that connection as UNAVAILABLE, and the poller marks the node down at once (csi/server.py lets
# agents accept pings this often).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3_000),
    ("grpc.max_receive_message_length", 16 << 20),
]

# Codes an agent returns that mean "this call, here, now": passed on as they are.
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.PERMISSION_DENIED}


@dataclass
class Health:
    up: bool = True               # until the first probe says otherwise: a new node is tried normally
    info: pb.AgentInfo | None = None
    checked: float = 0.0          # monotonic time of the last answer or failure (0: never asked)
    since: float = 0.0            # wall time the node went up or down
    error: str = ""
    failures: int = 0             # probes failed in a row
    listed: bool = True           # still named by the source of storage nodes
    # (info, node, candidates): info's pools as the scheduler's candidates, made once per answer
    _converted: tuple = field(default=(None, None, ()), repr=False, compare=False)

    def candidates(self, node: StorageNode) -> list[Candidate]:
        """The pools of the last answer as the scheduler takes them. Converted once per answer (or placement
        counted, see Agents.consume): reading every pool's protobuf fields on every CreateVolume and
        GetCapacity cost half a millisecond per call at 100 storage nodes."""
        info, converted = self.info, self._converted
        if info is None:
            return []
        if converted[0] is not info or converted[1] != node:
            converted = (info, node, [Candidate(node.name, node.zone, p.name, bool(p.thin_pool), p.available_bytes,
                                                p.extent_bytes) for p in info.pools])
            self._converted = converted     # one assignment: a reader sees the old triple or the new one
        return converted[2]


class AgentClient:
    def __init__(self, node: StorageNode, channel: grpc.Channel, health: Health | None = None):
        self.node = node
        self.channel = channel
        self.health = health or Health(up=True)
        self._stub = agent_pb2_grpc.AgentStub(channel)

    def call(self, method: str, request, timeout: float | None = None, reconnect: bool = True):
        """reconnect: a call refused at once waits (once, up to RECONNECT_WAIT) for the channel to connect
        again, then runs with the time left; the poller's probes do not wait, so that a refusal marks the node
        down at once."""
        limit = min(timeout, runner.time_left()) if timeout else runner.time_left()
        if method in QUICK_CALLS:
            limit = min(limit, QUICK_CALL_TIMEOUT)
        if not self.health.up:
            limit = min(limit, DOWN_CALL_TIMEOUT)
        started = time.monotonic()
        try:
            try:
                return getattr(self._stub, method)(request, timeout=limit)
            except grpc.RpcError as exc:
                # Refused at once: the channel is reconnecting (an agent restarting, a connection the keepalive
                # just dropped). Every agent call is idempotent: wait a few seconds for the channel, once.
                left = limit - (time.monotonic() - started)
                if exc.code() != grpc.StatusCode.UNAVAILABLE or left < 1.0 or not reconnect:
                    raise
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=min(left, RECONNECT_WAIT))
                except grpc.FutureTimeoutError:
                    raise exc from None     # refused, then no connection within the wait: unreachable
                # Connected again: the call gets the whole time left, however long it runs (a copy).
                return getattr(self._stub, method)(request, timeout=max(0.1, limit - (time.monotonic() - started)))
        except grpc.RpcError as exc:
            code = exc.code()
            detail = exc.details() or ""
            if code in _PASS_THROUGH:
                raise errors.CsiError(code, f"storage node {self.node.name}: {detail}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and self.health.up:
                raise errors.CsiError(code, f"storage node {self.node.name} did not answer in time") from None
            since = time.strftime('%H:%M:%S', time.localtime(self.health.since))
            state = "" if self.health.up else f" (down since {since})"
            raise errors.unavailable(f"storage node {self.node.name} ({self.node.address}) is unreachable"
                                     f"{state}: {code.name if code else '?'} {detail}") from None

    def info(self, timeout: float | None = None, reconnect: bool = True) -> pb.AgentInfo:
        return self.call("GetInfo", pb.GetInfoRequest(), timeout, reconnect)


@dataclass
class _Known:
    node: StorageNode
    client: AgentClient
    health: Health = field(default_factory=Health)


class Agents:
    """The storage nodes and their clients. `poll=True` (the controller) keeps a background poller."""

    def __init__(self, tls_dir, nodes: Iterable[StorageNode] = (),
                 retired: Callable[[], set[str]] = set, remember: Callable[[list[StorageNode]], None] | None = None,
                 poll: bool = False, client_factory: Callable[[StorageNode, Health], AgentClient] | None = None,
                 observe: Callable[[str, bool, pb.AgentInfo | None, str], None] | None = None):
        """nodes: the storage nodes known so far (listed ones come through update()); retired: reads the
        storage nodes retired for good (the journal's), re-read by the poller; remember: stores the nodes
        that joined or moved, so a node that later leaves the source is still known after a restart.
        client_factory: makes a node's client (tests pass fakes; default: a mutual-TLS channel).
        observe(node, up, info, error): told after every probe (csi/controller/events.py)."""
        self._observe = observe
        self._tls = TlsFiles(tls_dir)
        self._tls_version = self._tls.version()
        self._credentials: grpc.ChannelCredentials | None = None   # of _tls_version, made on first use
        self._old_channels: list[tuple[float, grpc.Channel]] = []
        self._known: dict[str, _Known] = {}
        self._read_retired = retired
        self._retired: set[str] = set(retired())
        self._remember = remember
        self._retired_at = time.monotonic()
        self._factory = client_factory or (lambda node, health: AgentClient(node, self._channel(node), health))
        self._mutex = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="agents")
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._joined: set[str] = set()      # nodes that joined or moved since the poller last looked
        self._probing: set[str] = set()     # nodes whose probe is running (the poller's own)
        self.update(nodes, listed=False)
        if poll:
            threading.Thread(target=self._poll_forever, name="agent-poller", daemon=True).start()

    # ---- membership

    def _follow_tls_files(self) -> None:
        """New channels for every node once the controller's TLS files changed (a stat of three files: cheap
        enough for every lookup of a client); the old ones are closed after RETIRED_CHANNEL_GRACE."""
        now = self._tls.version()
        if now == self._tls_version:
            return
        try:
            credentials = self._tls.channel_credentials()
        except ValueError as exc:   # caught between two replaced files: the next lookup tries again
            log.info("not using the new TLS files yet: %s", exc)
            return
        with self._mutex:
            if now == self._tls_version:
                return
            self._tls_version, self._credentials = now, credentials
            for known in self._known.values():
                self._old_channels.append((time.monotonic(), known.client.channel))
                known.client = self._factory(known.node, known.health)
        log.info("the controller's TLS files changed: new connections to the storage nodes use them")

    def _close_old_channels(self) -> None:
        with self._mutex:
            cutoff = time.monotonic() - RETIRED_CHANNEL_GRACE
            done = [c for t, c in self._old_channels if t < cutoff]
            self._old_channels = [(t, c) for t, c in self._old_channels if t >= cutoff]
        for channel in done:
            channel.close()

    def _channel(self, node: StorageNode) -> grpc.Channel:
        # The agent must present the certificate of this very node: a storage node cannot pose as another.
        name = peers.dns_name(peers.AGENT, node.name)
        options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)] + CHANNEL_OPTIONS
        if self._credentials is None:
            self._credentials = self._tls.channel_credentials()
        return grpc.secure_channel(node.address, self._credentials, options=options)

    def update(self, nodes: Iterable[StorageNode], listed: bool = True) -> None:
        """The source's current list: new nodes join, changed addresses get a new channel, nodes that left
        stay (down, `listed` false) until retired: a storage node that holds volumes never silently leaves.
        listed=False adds remembered nodes without saying the source lists them."""
        nodes = {n.name: n for n in nodes if n.name not in self._retired}
        joined = []
        with self._mutex:
            for name, node in nodes.items():
                known = self._known.get(name)
                if known is not None and known.node == node:
                    known.health.listed = known.health.listed or listed
                    continue
                joined.append(node)
                if known is not None:
                    known.client.channel.close()
                    log.info("storage node %s moved to %s (zone %s)", name, node.address, node.zone or "-")
                else:
                    log.info("storage node %s at %s (zone %s) joined", name, node.address, node.zone or "-")
                health = known.health if known is not None else Health()
                health.listed = listed or (known is not None and known.health.listed)
                self._known[name] = _Known(node, self._factory(node, health), health)
            for name, known in self._known.items() if listed else ():
                if name not in nodes and known.health.listed:
                    known.health.listed = False
                    log.warning("storage node %s is no longer listed as a storage node; it stays known until an "
                                "administrator retires it (lvm-iscsi-csi retire-storage-node %s)", name, name)
        if joined and listed and self._remember is not None:
            self._remember(joined)
        if joined:
            with self._mutex:
                self._joined.update(n.name for n in joined)
            self._changed.set()

    def refresh_retired(self) -> None:
        retired = set(self._read_retired())
        self._retired_at = time.monotonic()
        with self._mutex:
            self._retired = retired
            gone = [self._known.pop(n) for n in list(self._known) if n in retired]
        for known in gone:
            log.warning("storage node %s is retired: its volumes are gone with it", known.node.name)
            known.client.channel.close()

    def is_retired(self, name: str) -> bool:
        return name in self._retired

    def node(self, name: str) -> StorageNode | None:
        with self._mutex:
            known = self._known.get(name)
        return known.node if known is not None else None

    def get(self, node_name: str) -> AgentClient:
        self._follow_tls_files()
        with self._mutex:
            known = self._known.get(node_name)
        if known is None:
            raise errors.not_found(f"storage node {node_name!r} is not known to this controller")
        return known.client

    def all(self) -> list[AgentClient]:
        self._follow_tls_files()
        with self._mutex:
            return [self._known[n].client for n in sorted(self._known)]

    def serving(self) -> list[tuple[StorageNode, Health]]:
        """(node, health) of every known storage node that is not retired, in name order."""
        with self._mutex:
            return [(k.node, k.health) for name, k in sorted(self._known.items()) if name not in self._retired]

    def health(self, name: str) -> Health | None:
        with self._mutex:
            known = self._known.get(name)
        return known.health if known is not None else None

    # ---- calls to many

    def each(self, fn: Callable[[AgentClient], T], clients: list[AgentClient] | None = None
             ) -> dict[str, T | errors.CsiError]:
        """Runs fn against every agent (or those given) at once; the value or the CsiError per node name."""
        clients = self.all() if clients is None else clients
        jobs = {c.node.name: self._pool.submit(_capture, fn, c, runner.time_left()) for c in clients}
        return {name: job.result() for name, job in jobs.items()}

    def infos(self, max_age: float = 2 * POLL_SECONDS) -> dict[str, pb.AgentInfo | errors.CsiError]:
        """Every known agent's pools as the poller last saw them; nodes whose answer is older than max_age are
        asked now (in parallel, bounded), unless the poller's probe of them still runs: a slow node then costs
        the caller nothing, its last answer serves. A node that is down is a CsiError, never a wait."""
        now = time.monotonic()
        out: dict[str, pb.AgentInfo | errors.CsiError] = {}
        stale = []
        with self._mutex:
            probing = set(self._probing)
        for client in self.all():
            h = client.health
            if now - h.checked <= max_age or (client.node.name in probing and h.checked):
                out[client.node.name] = h.info if h.up and h.info is not None else errors.unavailable(
                    f"storage node {client.node.name} is down: {h.error}")
            else:
                stale.append(client)
        if stale:
            self._probe(stale)
            for client in stale:
                h = client.health
                out[client.node.name] = h.info if h.up and h.info is not None else errors.unavailable(
                    f"storage node {client.node.name} is down: {h.error}")
        return out

    def recheck(self, names: Iterable[str]) -> None:
        """Asks these nodes now (bounded by RECHECK_TIMEOUT): before a placement gives up because the only nodes
        that could take it were down at the last poll (an agent restarting a moment ago, say)."""
        wanted = set(names)
        clients = [c for c in self.all() if c.node.name in wanted]
        if clients:
            with runner.deadline(RECHECK_TIMEOUT + 1):
                self._probe(clients, RECHECK_TIMEOUT, reconnect=True)

    def consume(self, node: str, pool: str, size: int) -> None:
        """Counts a placement against the pool's space as last polled, until the node's next answer (which
        counts it itself): a burst of CreateVolume between two polls then spreads over the pools by their
        space, as cinder-scheduler's consume_from_request does, instead of all landing on the pool that had
        the most at the last poll."""
        with self._mutex:
            known = self._known.get(node)
            if known is None or known.health.info is None:
                return
            info = pb.AgentInfo()
            info.CopyFrom(known.health.info)
            for p in info.pools:
                if p.name == pool:
                    p.available_bytes = max(0, p.available_bytes - size)
            known.health.info = info

    # ---- the poller

    def _probe(self, clients: list[AgentClient], timeout: float = PROBE_TIMEOUT, reconnect: bool = False) -> None:
        """reconnect: wait for a channel that refused (backing off after an agent restarted) to connect again,
        within the timeout: a recheck asks because the node may be back; the poller only reports."""
        results = self.each(lambda c: c.info(timeout=timeout, reconnect=reconnect), clients)
        for client in clients:
            self._record(client, results[client.node.name])

    def _record(self, client: AgentClient, result: pb.AgentInfo | errors.CsiError) -> None:
        h = client.health
        was_up = h.up
        if isinstance(result, errors.CsiError):
            h.failures += 1
            h.error = result.message
            # Unreachable (refused, no route, connection lost): down at once. A slow or failed answer (its LVM
            # report late on a loaded node) only after SLOW_PROBES_DOWN in a row: one late answer is not a
            # node down, and calling it one failed every CreateVolume until the next probe.
            if result.code == errors.Code.UNAVAILABLE or h.failures >= SLOW_PROBES_DOWN:
                h.up = False
        else:
            h.up, h.info, h.error, h.failures = True, result, "", 0
        h.checked = time.monotonic()
        if h.up != was_up:
            h.since = time.time()
            if h.up:
                log.info("storage node %s is up", client.node.name)
            else:
                log.warning("storage node %s is down: %s", client.node.name, h.error)
        if self._observe is not None:
            try:
                self._observe(client.node.name, h.up, h.info if h.up else None, h.error)
            except Exception as exc:  # noqa: BLE001 - an observer never stops the poller
                log.warning("observing storage node %s: %s", client.node.name, exc)

    def poll_once(self) -> None:
        """Every storage node at once, and waits for them (tests, operators' commands)."""
        if time.monotonic() - self._retired_at > RETIRED_REFRESH:
            self.refresh_retired()
        with runner.deadline(PROBE_TIMEOUT + 2):
            self._probe(self.all())

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if started - self._retired_at > RETIRED_REFRESH:
                    self.refresh_retired()
                self._close_old_channels()
                clients = self.all()
                slices = max(1, -(-len(clients) // POLL_SLICE))
                for i in range(slices):
                    if self._stop.is_set():
                        return
                    self._start_probes(clients[i::slices])
                    self._wait(started + (i + 1) * POLL_SECONDS / slices)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad answer
                log.exception("polling the storage nodes failed")
                self._wait(time.monotonic() + POLL_SECONDS)

    def _start_probes(self, clients: list[AgentClient]) -> None:
        """Probes each node on its own, without waiting: a node that does not answer holds its own probe for
        PROBE_TIMEOUT, not the slices after it. A node whose last probe still runs is not asked again."""
        with self._mutex:
            clients = [c for c in clients if c.node.name not in self._probing]
            self._probing.update(c.node.name for c in clients)
        for client in clients:
            self._pool.submit(self._probe_one, client)

    def _probe_one(self, client: AgentClient) -> None:
        try:
            self._record(client, _capture(lambda c: c.info(timeout=PROBE_TIMEOUT, reconnect=False), client,
                                          PROBE_TIMEOUT + 2))
        except Exception:  # noqa: BLE001 - as in the poller
            log.exception("probing storage node %s failed", client.node.name)
        finally:
            with self._mutex:
                self._probing.discard(client.node.name)

    def _wait(self, until: float) -> None:
        """Until `until` (monotonic), probing at once every node that joins or moves meanwhile."""
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0 or not self._changed.wait(left):
                return
            self._changed.clear()
            with self._mutex:
                joined, self._joined = self._joined, set()
                clients = [self._known[n].client for n in sorted(joined) if n in self._known]
            self._start_probes(clients)

    def close(self) -> None:
        self._stop.set()
        self._changed.set()
        for client in self.all():
            client.channel.close()
        with self._mutex:
            old, self._old_channels = self._old_channels, []
        for _, channel in old:
            channel.close()


def _capture(fn, client, seconds):
    with runner.deadline(seconds):
        try:
            return fn(client)
        except errors.CsiError as exc:
            return exc
