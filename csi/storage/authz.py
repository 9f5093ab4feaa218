"""Who may call what on an agent: decided by the identity in the caller's certificate (csi/peers.py).

  the controller            everything
  a node plugin of node W   GetCredentials, and access.credentials() then gives only the grants made for W;
                            GetPeerLeg, answered only for a leg granted to W (replica_legs.peer)
  the agent of node D       ReadData of a volume or snapshot the controller allowed D to copy (AllowCopy),
                            until that allowance expires
  anyone else               nothing

A refusal is PERMISSION_DENIED, logged with the caller's identity, before the call does anything. So root on
one storage node (its agent's key) reaches nothing on the others but a copy the controller asked for, and root
on one worker (its node plugin's key) obtains only the credentials of volumes attached to that worker.
"""

from __future__ import annotations

import logging
import threading
import time

from csi import errors, peers

log = logging.getLogger(__name__)

NODE_METHODS = frozenset({"GetCredentials", "GetPeerLeg"})
COPY_TTL_MAX = 24 * 3600


class CopyAllowances:
    """What the controller allowed other agents to read: (vg, lv, destination node) until an expiry."""

    def __init__(self):
        self._until: dict[tuple[str, str, str], float] = {}
        self._mutex = threading.Lock()

    def allow(self, vg: str, lv: str, destination: str, ttl: float) -> None:
        now = time.monotonic()
        with self._mutex:
            self._until = {k: t for k, t in self._until.items() if t > now}
            self._until[(vg, lv, destination)] = now + ttl

    def allowed(self, vg: str, lv: str, destination: str) -> bool:
        with self._mutex:
            return self._until.get((vg, lv, destination), 0.0) > time.monotonic()


class Authorizer:
    """The agent's authorization: called by the server's interceptor before every call (server.make_server)."""

    def __init__(self, node_name: str):
        self.node_name = node_name
        self.copies = CopyAllowances()

    def __call__(self, method: str, request, context) -> None:
        peer = peers.peer_of(context)
        if peer.role == peers.CONTROLLER:
            return
        if peer.role == peers.NODE and method in NODE_METHODS:
            return
        if peer.role == peers.AGENT and method == "ReadData" and peer.node != self.node_name and \
                self.copies.allowed(request.vg, request.lv, peer.node):
            return
        log.warning("refused %s to %s", method, peer)
        raise errors.CsiError(errors.Code.PERMISSION_DENIED, f"{peer} may not call {method} on this storage node")
