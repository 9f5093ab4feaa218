"""Grants: who may log in to a volume's target, with which CHAP secrets, and who may learn those secrets.

  grant:        record (with the node the initiator belongs to, and new secrets) -> ACL in the kernel
  revoke:       record without the grant -> ACL removed (the kernel ends the sessions: fencing)
  credentials:  the secrets of one grant, only to the node plugin of the grant's own node
  rotation:     secrets that left the storage node (records of the driver before node-bound grants handed
                them to the controller, which put them in VolumeAttachments) are replaced at the first moment
                no session uses them: a live session keeps working (CHAP is checked at login only), and the
                next login, whose node plugin fetches the new secret first, uses the new one.

The single-writer rule lives here too: a volume whose access modes are all single-node is granted to one
initiator at a time, whatever two controllers (HA, a stale leader) believe.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import string
import threading
import time

from csi import capabilities as caps
from csi import errors, faults, ids, peers
from csi.proto import agent_pb2 as pb
from csi.storage import lio
from csi.storage.lio import Access
from csi.storage.records import Grant, VolumeRecord

log = logging.getLogger(__name__)

CHAP_ALPHABET = string.ascii_letters + string.digits
CHAP_SECRET_LEN = 24  # LIO takes 12 to 255; many initiators want at least 12
ROTATION_INTERVAL = 600.0


def new_secret() -> str:
    return "".join(secrets.choice(CHAP_ALPHABET) for _ in range(CHAP_SECRET_LEN))


def _checked(request) -> str:
    ids.check_lvm_name(request.vg, "vg")
    ids.check_lvm_name(request.lv, "lv")
    initiator = ids.normalize_iqn(request.initiator_iqn)   # LIO compares the lower-case form
    if initiator is None:
        raise errors.invalid(f"initiator {request.initiator_iqn[:230]!r} is not an iSCSI qualified name")
    return initiator


def _single_node(rec: VolumeRecord) -> bool:
    modes = {caps.Mode.Mode.Value(m) for m in rec.attributes.get("accessModes", "").split(",")
             if m in caps.Mode.Mode.keys()}
    return bool(modes) and modes <= caps.SINGLE_NODE


def _acl(grant: Grant) -> Access:
    return Access(grant.initiator, grant.read_only, grant.chap_user, grant.chap_secret, grant.mutual_user,
                  grant.mutual_secret)


def grant(service, request) -> pb.GrantAccessResponse:
    initiator = _checked(request)
    if request.node_name and not _valid_node(request.node_name):
        raise errors.invalid(f"node_name {request.node_name[:100]!r} is not a node name")
    with service.locks.hold(f"{request.vg}/{request.lv}"), lio.CHANGES.quick():   # a pod waits for it
        rec = service.records.load(request.vg, request.lv)
        if rec is None or rec.deleting:
            raise errors.not_found(f"no volume {request.vg}/{request.lv} on {service.config.node_name}")
        others = sorted(i for i in rec.grants if i != initiator)
        if others and _single_node(rec):
            raise errors.precondition(f"volume {rec.name!r} is granted to {others[0]} and its access modes allow "
                                      "one node at a time: unpublish it there first")
        device = service._active_device(rec)
        old = rec.grants.get(initiator)
        wanted_mutual = request.mutual_chap
        node = request.node_name or (old.node if old else "")
        if old is None or old.read_only != request.read_only or bool(old.mutual_user) != wanted_mutual or \
                old.node != node:
            user = "u" + hashlib.sha256(f"{rec.lv}\0{initiator}".encode()).hexdigest()[:15]
            # The secrets stay for the same node (or a grant whose node was not known: an older controller's,
            # or one read back from the kernel after the state directory was lost), so a live session keeps
            # logging in again; exposed ones stay only while a session uses them (rotated when none does).
            # A grant moving to another node (an initiator name reused) gets new ones: the old node has them.
            live = old is not None and _live(service, rec, initiator)
            keep = old is not None and old.node in ("", node) and (not old.exposed or live)
            new = Grant(initiator=initiator, read_only=request.read_only, chap_user=old.chap_user if old else user,
                        chap_secret=old.chap_secret if keep else new_secret(),
                        mutual_user=("t" + user[1:]) if wanted_mutual else "",
                        mutual_secret=((old.mutual_secret if keep and old.mutual_secret else new_secret())
                                       if wanted_mutual else ""),
                        node=node, exposed=keep and old.exposed)
            rec.grants[initiator] = new
            service.records.save(rec)
            faults.step("grant.record")
            old = new
        pool = service.config.pool(rec.pool)
        service.lio.export(rec.target_iqn, rec.lv, device, bool(pool and pool.thin))
        service.lio.grant(rec.target_iqn, _acl(old))
        faults.step("grant.acl")
        return pb.GrantAccessResponse(target_iqn=rec.target_iqn, portals=[str(p) for p in service.config.portals],
                                      lun=0)


def _valid_node(name: str) -> bool:
    try:
        ids.check_node_name(name)
        return True
    except ValueError:
        return False


def revoke(service, request) -> pb.RevokeAccessResponse:
    initiator = _checked(request)
    with service.locks.hold(f"{request.vg}/{request.lv}"), lio.CHANGES.quick():
        rec = service.records.load(request.vg, request.lv)
        if rec is not None and rec.grants.pop(initiator, None) is not None:
            service.records.save(rec)
            faults.step("revoke.record")
        ended = service.lio.revoke(ids.target_iqn(request.vg, request.lv), initiator)
        return pb.RevokeAccessResponse(sessions_ended=ended)


def credentials(service, request, caller: peers.Peer) -> pb.Credentials:
    """The secrets of one grant, for the node plugin of the grant's node. A grant made before grants named
    their node (an older controller) is refused: nothing says which node may have it; a new publish binds it."""
    initiator = _checked(request)
    with service.locks.hold(f"{request.vg}/{request.lv}"):
        rec = service.records.load(request.vg, request.lv)
        g = rec.grants.get(initiator) if rec is not None and not rec.deleting else None
        if g is None:
            raise errors.not_found(f"volume {request.vg}/{request.lv} is not granted to {initiator} on "
                                   f"{service.config.node_name}")
        if caller.role != peers.CONTROLLER and (not g.node or g.node != caller.node):
            log.warning("refused the credentials of %s on %s/%s to %s (granted to node %s)", initiator,
                        request.vg, request.lv, caller, g.node or "unknown")
            raise errors.CsiError(errors.Code.PERMISSION_DENIED,
                                  f"{caller} may not have the credentials of a grant made for "
                                  f"{'node ' + g.node if g.node else 'an unknown node'}")
        if g.exposed and not _live(service, rec, initiator):
            g = _rotate(service, rec, initiator)   # its node is about to log in: with secrets nobody saw
        return pb.Credentials(chap_user=g.chap_user, chap_secret=g.chap_secret, mutual_chap_user=g.mutual_user,
                              mutual_chap_secret=g.mutual_secret)


def _live(service, rec: VolumeRecord, initiator: str) -> bool:
    return any(a.initiator == initiator and a.logged_in for a in service.lio.acls(rec.target_iqn))


def _rotate(service, rec: VolumeRecord, initiator: str) -> Grant:
    """New secrets for an exposed grant: record first, then the kernel's ACL (a crash between the two leaves
    the record's secrets, which restore() puts in the ACL)."""
    old = rec.grants[initiator]
    new = Grant(initiator=initiator, read_only=old.read_only, chap_user=old.chap_user, chap_secret=new_secret(),
                mutual_user=old.mutual_user, mutual_secret=new_secret() if old.mutual_user else "", node=old.node,
                exposed=False)
    rec.grants[initiator] = new
    service.records.save(rec)
    faults.step("rotate.record")
    if service.lio.is_exported(rec.target_iqn):
        service.lio.grant(rec.target_iqn, _acl(new))
    log.info("rotated the CHAP secrets of %s on %s/%s: they had left the storage node", initiator, rec.vg, rec.lv)
    return new


def rotate_exposed(service) -> dict[str, int]:
    """Every exposed grant that no session uses gets new secrets now; the others at their next login. At start
    and then now and then (cli.run_agent)."""
    counts = {"rotated": 0, "in_use": 0}
    for rec in service.records.all():
        exposed = [i for i, g in rec.grants.items() if g.exposed]
        if not exposed or rec.deleting:
            continue
        try:
            with service.locks.hold(f"{rec.vg}/{rec.lv}"):
                fresh = service.records.load(rec.vg, rec.lv)
                for initiator in exposed:
                    if fresh is None or initiator not in fresh.grants or not fresh.grants[initiator].exposed:
                        continue
                    if _live(service, fresh, initiator):
                        counts["in_use"] += 1
                    else:
                        _rotate(service, fresh, initiator)
                        counts["rotated"] += 1
        except errors.CsiError as exc:
            if exc.code != errors.Code.ABORTED:   # busy with a call: next time
                raise
    if counts["rotated"] or counts["in_use"]:
        log.info("exposed CHAP secrets: %d rotated, %d kept until their session ends", counts["rotated"],
                 counts["in_use"])
    return counts


def start_rotation(service, every: float = ROTATION_INTERVAL) -> threading.Thread:
    """rotate_exposed now, then every `every` seconds, in the background (a failure is logged, not fatal)."""
    def loop():
        while True:
            try:
                rotate_exposed(service)
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("rotating exposed CHAP secrets failed")
            time.sleep(every)
    thread = threading.Thread(target=loop, name="chap-rotation", daemon=True)
    thread.start()
    return thread


def allow_copy(service, request) -> pb.AllowCopyResponse:
    ids.check_lvm_name(request.vg, "vg")
    ids.check_lvm_name(request.lv, "lv")
    if not _valid_node(request.destination_node) or request.destination_node == service.config.node_name:
        raise errors.invalid(f"destination_node {request.destination_node[:100]!r} is not another storage node")
    if not 0 < request.ttl_seconds <= 24 * 3600:
        raise errors.invalid("ttl_seconds must be from 1 to 86400")
    service.authorizer.copies.allow(request.vg, request.lv, request.destination_node, request.ttl_seconds)
    return pb.AllowCopyResponse()
