"""The node plugin's CHAP credentials for one volume: fetched from the volume's storage node's agent at stage.

Over mutual TLS with this node's own certificate (csi/peers.py): the agent gives them only for a grant made
for this node (storage/access.py), so neither a VolumeAttachment nor another worker ever holds them. The agent
must present the certificate of the storage node the volume lives on. Staging therefore needs that agent to
answer; the kernel's target alone would not do (the README's security section weighs this).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import grpc

from csi import contract, errors, peers, runner
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.server import TlsFiles

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 20.0


@contextlib.contextmanager
def _agent(tls_dir: Path, att: contract.Attachment):
    """A stub of the agent of att's storage node, which must present that node's certificate."""
    name = peers.dns_name(peers.AGENT, att.storage_node)
    creds = TlsFiles(tls_dir).channel_credentials()
    options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
    with grpc.secure_channel(att.agent, creds, options=options) as channel:
        yield agent_pb2_grpc.AgentStub(channel)


def peer_leg(tls_dir: Path, att: contract.Attachment, vg: str, lv: str, timeout: float) -> apb.PeerLeg:
    """Where the other leg of the replicated volume whose leg att is is now (csi/node/replica_join.py)."""
    with _agent(tls_dir, att) as agent:
        try:
            return agent.GetPeerLeg(apb.GetPeerLegRequest(vg=vg, lv=lv), timeout=timeout)
        except grpc.RpcError as exc:
            raise errors.unavailable(f"cannot ask storage node {att.storage_node} ({att.agent}) where the other "
                                     f"leg is: {exc.code().name if exc.code() else '?'} {exc.details() or ''}") \
                from None


def fetch(tls_dir: Path, att: contract.Attachment, vg: str, lv: str, initiator: str) -> contract.Chap:
    with _agent(tls_dir, att) as agent:
        try:
            got = agent.GetCredentials(
                apb.GetCredentialsRequest(vg=vg, lv=lv, initiator_iqn=initiator),
                timeout=min(FETCH_TIMEOUT, runner.time_left()), wait_for_ready=True)
        except grpc.RpcError as exc:
            code, detail = exc.code(), exc.details() or ""
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND):
                # Not granted to this node (yet, or any more): the CO publishes again, or the volume moved.
                raise errors.precondition(f"storage node {att.storage_node} has no grant of this volume for this "
                                          f"node: {detail}") from None
            raise errors.unavailable(f"cannot get this volume's credentials from storage node "
                                     f"{att.storage_node} ({att.agent}): {code.name if code else '?'} {detail}") \
                from None
    return contract.check_chap(contract.Chap(got.chap_user, got.chap_secret, got.mutual_chap_user,
                                             got.mutual_chap_secret))
