"""Who is who on the driver's mutual-TLS connections: the names certificates carry, and the identity of a caller.

Every process has its own certificate, issued by the cluster's CA (the chart's, or the controller's signer of
certificate signing requests, csi/certsigner.py), with one DNS name that says its role and, for agents and node
plugins, its node:

    controller                  controller.lvm-iscsi.internal
    agent on storage node N     N.agent.lvm-iscsi.internal
    node plugin on worker W     W.node.lvm-iscsi.internal

The controller checks an agent's certificate against the name of the node it means to call (so a storage node
cannot pose as another), and an agent decides what a caller may do from the name in the caller's certificate
(storage/authz.py). A certificate without such a name is nobody: it may do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from csi import ids

DOMAIN = "lvm-iscsi.internal"
CONTROLLER = "controller"
AGENT = "agent"
NODE = "node"
ROLES = (CONTROLLER, AGENT, NODE)


def dns_name(role: str, node: str = "") -> str:
    """The DNS name a certificate of this role (and node) carries."""
    if role == CONTROLLER:
        return f"{CONTROLLER}.{DOMAIN}"
    if role not in (AGENT, NODE):
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    ids.check_node_name(node)
    return f"{node}.{role}.{DOMAIN}"


@dataclass(frozen=True)
class Peer:
    role: str          # controller | agent | node | "" (nobody)
    node: str = ""     # the agent's or node plugin's node

    def __str__(self) -> str:
        if not self.role:
            return "an unknown caller"
        return self.role if self.role == CONTROLLER else f"the {self.role} of {self.node}"


NOBODY = Peer("")


def parse_name(name: str) -> Peer:
    """The identity a certificate's DNS name gives, or NOBODY."""
    if name == f"{CONTROLLER}.{DOMAIN}":
        return Peer(CONTROLLER)
    for role in (AGENT, NODE):
        suffix = f".{role}.{DOMAIN}"
        if name.endswith(suffix):
            node = name[:-len(suffix)]
            try:
                return Peer(role, ids.check_node_name(node))
            except ValueError:
                return NOBODY
    return NOBODY


def peer_of(context) -> Peer:
    """The caller of a gRPC call, from its verified client certificate (mutual TLS). A certificate naming
    more than one identity is nobody: no certificate this driver issues does."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - a context without one (an insecure channel) has no identity
        return NOBODY
    names = [v.decode(errors="replace") for v in auth.get("x509_subject_alternative_name", [])]
    found = {parse_name(n) for n in names} - {NOBODY}
    return found.pop() if len(found) == 1 else NOBODY
