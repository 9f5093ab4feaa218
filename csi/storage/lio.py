"""The LIO iSCSI target through rtslib-fb: one target per volume, LUN 0, portals, one ACL per initiator.

Every layer (backstore, target, TPG, LUN, portal, ACL, mapped LUN) is made idempotent on its own, so a call
cut short at any point is finished by its retry. Objects are looked up by name (configfs paths), never by a
scan of every target, and nothing here saves the whole LIO configuration: records.py keeps what rebuilds each
export. The kernel modules are loaded by the agent at start through the runner, so rtslib never runs its
own (shell-based) modprobe.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from csi import errors, runner
from csi.storage.lio_lock import TurnLock

log = logging.getLogger(__name__)

MODULES = ("configfs", "target_core_mod", "target_core_iblock", "iscsi_target_mod")
CONFIGFS = Path("/sys/kernel/config/target")
STORE_PLUGIN = "iblock"   # configfs names a block backstore's HBA directory iblock_<index>
# The host's (the chart mounts /run/lock/lvm-iscsi-csi): every agent of the node, of any cluster, takes it.
STORE_LOCK = Path("/run/lock/lvm-iscsi-csi/lio-backstores.lock")


@dataclass(frozen=True)
class Portal:
    ip: str
    port: int = 3260

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Portal":
        host, _, port = text.rpartition(":")
        try:
            ip = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            raise ValueError(f"portal {text[:100]!r}: expected ip:port") from None
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
            raise ValueError(f"portal {text[:100]!r}: expected ip:port")
        return cls(ip, int(port))


@dataclass(frozen=True)
class Access:
    """One initiator's ACL on a target."""
    initiator: str
    read_only: bool
    chap_user: str
    chap_secret: str
    mutual_user: str = ""
    mutual_secret: str = ""


@dataclass(frozen=True)
class AclState:
    initiator: str
    read_only: bool
    logged_in: bool


def load_modules() -> None:
    runner.run(["modprobe", "-a", *MODULES])


# Every change to LIO runs under this one lock (why, and why grants and revokes go first: lio_lock.py).
CHANGES = TurnLock()


def _rts():
    # Imported late: rtslib-fb reads configfs when its objects are made, and the unit tests and the
    # controller never need it.
    import rtslib_fb
    return rtslib_fb


def _serialised(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with CHANGES:
            return method(self, *args, **kwargs)
    return locked


def _find_store(name: str):
    """The block backstore of that name, or None: from rtslib's per-process map of backstore names to indexes
    (tcm.bs_cache, read from configfs once, at the first lookup), with no new read of configfs on a miss. That
    read lists every backstore's directory: done per new store it made a start with 500 volumes spend most of
    its time there. A miss is sure for this agent's names: only this agent makes them (another cluster's agent
    makes its own names), and an agent started again reads the map afresh."""
    rts = _rts()
    from rtslib_fb import tcm
    key = f"{STORE_PLUGIN}/{name}"
    index = tcm.bs_cache.get(key)
    if index is not None and not (CONFIGFS / "core" / f"{STORE_PLUGIN}_{index}" / name).is_dir():
        # Removed behind this agent's back (targetcli), its index perhaps another's now: rtslib, asked, would
        # try to remove that HBA directory, another agent's store in it.
        tcm.bs_cache.pop(key, None)
        return None
    try:
        return rts.BlockStorageObject(name)
    except rts.RTSLibNotInCFSError:
        return None


@contextlib.contextmanager
def _new_store_lock():
    """Held while a backstore is made: every agent on the node (one per cluster) picks a new store's index
    under this lock, among the directories that do not exist then (_free_store_index)."""
    STORE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(STORE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_store_index() -> int:
    """A block backstore index whose HBA directory does not exist: the lowest that rtslib's map does not hold,
    past those that other processes (another cluster's agent, an operator's targetcli) took meanwhile."""
    taken = set(_store_map().values())
    index = 0
    while index in taken or (CONFIGFS / "core" / f"{STORE_PLUGIN}_{index}").exists():
        index += 1
    return index


STORE_BUSY_TRIES = 3
STORE_BUSY_WAIT = 0.2


def _make_store(rts, name: str, device: str, wwn: str):
    """A block backstore. Enabling it makes the kernel open the device exclusively, which fails with EBUSY while
    something else holds it so: seen once in a hundred volumes made at once (bench/run --parts load), right
    after the volume's lvcreate. Tried again shortly, then ABORTED (the provisioner retries), never INTERNAL;
    rtslib removes the half-made store each time."""
    for attempt in range(1, STORE_BUSY_TRIES + 1):
        index = _free_store_index()
        try:
            so = rts.BlockStorageObject(name, dev=device, wwn=wwn, index=index)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            held = ", ".join(_holders(device)) or "no holder in sysfs"
            if attempt == STORE_BUSY_TRIES:
                raise errors.aborted(f"{device} is busy ({held}): its export cannot open it yet; retry") from None
            log.info("%s busy (%s) when its backstore was enabled: again in %.1fs", device, held, STORE_BUSY_WAIT)
            time.sleep(STORE_BUSY_WAIT)
            continue
        # rtslib maps a store made with a given index nowhere: the next lookup by name must find it
        _store_map()[f"{STORE_PLUGIN}/{name}"] = index
        return so


def _store_map() -> dict:
    """rtslib's map of backstore names to indexes. Read from configfs first if still empty: rtslib reads it only
    while it is empty, so an entry added to an unread map would hide every store made before."""
    from rtslib_fb import tcm
    if not tcm.bs_cache:
        _find_store(".unread")   # a lookup reads the map (then misses: no LV of ours is named so)
    return tcm.bs_cache


def _holders(device: str) -> list[str]:
    try:
        return sorted(os.listdir(f"/sys/class/block/{os.path.basename(os.path.realpath(device))}/holders"))
    except OSError:
        return []


def _drop_store(so) -> None:
    """Removes a backstore whose LUN is already gone (its target was deleted).

    rtslib's StorageObject.delete() first walks every LUN of every target looking for links to the store:
    a cost that grows with the number of exports. Our store's only LUN went with its target, and the
    kernel refuses (EBUSY) to remove a store a LUN still links to, so the walk buys nothing here.
    """
    from rtslib_fb.node import CFSNode
    CFSNode.delete(so)
    so._backstore.delete()  # the store's own HBA directory (rtslib makes one per store)


class Lio:
    def __init__(self, portals: Sequence[Portal]):
        self.portals = tuple(portals)

    def _fabric(self):
        return _rts().FabricModule("iscsi")

    def _target(self, iqn: str, mode: str = "lookup"):
        rts = _rts()
        try:
            return rts.Target(self._fabric(), iqn, mode=mode)
        except rts.RTSLibNotInCFSError:
            return None

    def _tpg(self, iqn: str):
        rts = _rts()
        target = self._target(iqn)
        if target is None:
            return None
        try:
            return rts.TPG(target, 1, mode="lookup")
        except rts.RTSLibNotInCFSError:
            return None

    # ------------------------------------------------------------------------------------ exports

    @_serialised
    def export(self, iqn: str, backstore: str, device: str, thin: bool) -> None:
        """Backstore, target, TPG 1 with CHAP enforced and no demo mode, LUN 0, portals."""
        rts = _rts()
        so = _find_store(backstore)
        if so is None:
            with _new_store_lock():
                so = _find_store(backstore) or _make_store(rts, backstore, device,
                                                           str(uuid.uuid5(uuid.NAMESPACE_URL, iqn)))
        if thin:
            # Lets the initiator's discards (fstrim, mkfs) give blocks back to the thin pool.
            so.set_attribute("emulate_tpu", "1")
        target = rts.Target(self._fabric(), iqn, mode="any")
        tpg = rts.TPG(target, 1, mode="any")
        tpg.set_attribute("authentication", "1")
        tpg.set_attribute("generate_node_acls", "0")
        tpg.set_attribute("demo_mode_write_protect", "1")
        tpg.set_attribute("cache_dynamic_acls", "0")
        # SendTargets lists only the targets an initiator has an ACL on (and lock_discovery makes it answer
        # nobody): the driver never discovers, it makes node records directly.
        tpg.set_attribute("demo_mode_discovery", "0")
        tpg.set_parameter("AuthMethod", "CHAP")
        try:
            rts.LUN(tpg, 0)
        except rts.RTSLibNotInCFSError:
            rts.LUN(tpg, 0, storage_object=so)
        wanted = {(p.ip, p.port) for p in self.portals}
        for np in list(tpg.network_portals):
            if (np.ip_address, np.port) not in wanted:
                np.delete()
        for p in self.portals:
            rts.NetworkPortal(tpg, p.ip, p.port, mode="any")
        if not tpg.enable:
            tpg.enable = True

    @_serialised
    def unexport(self, iqn: str, backstore: str) -> None:
        """Removes the target (its TPG, LUN, portals, ACLs: the kernel ends their sessions) and the backstore
        behind its LUN (found through the LUN, which names it exactly) or, with no target, by name."""
        target = self._target(iqn)
        stores = {}
        if target is not None:
            stores = {lun.storage_object.name: lun.storage_object for tpg in target.tpgs for lun in tpg.luns}
            target.delete()
        if backstore not in stores:
            so = _find_store(backstore)
            if so is not None:
                stores[backstore] = so
        for so in stores.values():
            _drop_store(so)

    @_serialised
    def remove_target(self, iqn: str) -> None:
        """Removes a target and the backstores its LUNs use, when nothing else says which backstore it is."""
        target = self._target(iqn)
        if target is None:
            return
        stores = [lun.storage_object for tpg in target.tpgs for lun in tpg.luns]
        target.delete()
        for so in stores:
            if not any(True for _ in so.attached_luns):
                so.delete()

    def is_exported(self, iqn: str) -> bool:
        rts = _rts()
        tpg = self._tpg(iqn)
        if tpg is None or not tpg.enable:
            return False
        try:
            rts.LUN(tpg, 0)
        except rts.RTSLibNotInCFSError:
            return False
        return any(True for _ in tpg.network_portals)

    def lun_device(self, iqn: str) -> str | None:
        """The device behind LUN 0 of a target (its backstore's udev_path), or None when it has none."""
        rts = _rts()
        tpg = self._tpg(iqn)
        if tpg is None:
            return None
        try:
            so = rts.LUN(tpg, 0).storage_object
        except rts.RTSLibNotInCFSError:
            return None
        return getattr(so, "udev_path", None) or None

    def exported_iqns(self, prefix: str) -> list[str]:
        """Targets of this driver that exist in the kernel (for orphan checks and `status`, not per call)."""
        base = CONFIGFS / "iscsi"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.name.startswith(prefix))

    @_serialised
    def lock_discovery(self) -> None:
        """SendTargets discovery needs CHAP with a secret made here and never kept or handed out: anyone on
        the storage network would otherwise list every target, whose names carry the VG, the cluster id and
        the claims' names. The driver never uses discovery (node records are made directly)."""
        fabric = self._fabric()
        fabric.discovery_userid = "nobody-" + secrets.token_hex(8)
        fabric.discovery_password = secrets.token_urlsafe(24)
        fabric.discovery_enable_auth = True

    def discovery_locked(self) -> bool:
        return bool(self._fabric().discovery_enable_auth)

    # ------------------------------------------------------------------------------------ ACLs

    @_serialised
    def grant(self, iqn: str, access: Access) -> None:
        rts = _rts()
        tpg = self._tpg(iqn)
        if tpg is None:
            raise LookupError(f"target {iqn} is not exported")
        acl = rts.NodeACL(tpg, access.initiator, mode="any")
        if acl.chap_userid != access.chap_user:
            acl.chap_userid = access.chap_user
        if acl.chap_password != access.chap_secret:
            acl.chap_password = access.chap_secret
        if (acl.chap_mutual_userid or "") != access.mutual_user:
            acl.chap_mutual_userid = access.mutual_user
        if (acl.chap_mutual_password or "") != access.mutual_secret:
            acl.chap_mutual_password = access.mutual_secret
        try:
            mapped = rts.MappedLUN(acl, 0)
            if bool(mapped.write_protect) != access.read_only:
                mapped.delete()
                mapped = None
        except rts.RTSLibNotInCFSError:
            mapped = None
        if mapped is None:
            rts.MappedLUN(acl, 0, tpg_lun=rts.LUN(tpg, 0), write_protect=access.read_only)

    @_serialised
    def revoke(self, iqn: str, initiator: str) -> int:
        """Removes the ACL; LIO ends the initiator's sessions with it. Returns how many were live."""
        rts = _rts()
        tpg = self._tpg(iqn)
        if tpg is None:
            return 0
        try:
            acl = rts.NodeACL(tpg, initiator, mode="lookup")
        except rts.RTSLibNotInCFSError:
            return 0
        live = 1 if acl.session else 0
        acl.delete()
        return live

    def acl_access(self, iqn: str) -> list[Access]:
        """Every ACL of a target with its CHAP credentials, as the kernel holds them (for a record rebuilt
        after the agent's state directory was lost)."""
        rts = _rts()
        tpg = self._tpg(iqn)
        if tpg is None:
            return []
        out = []
        for acl in tpg.node_acls:
            try:
                ro = bool(rts.MappedLUN(acl, 0).write_protect)
            except rts.RTSLibNotInCFSError:
                ro = False
            out.append(Access(acl.node_wwn, ro, acl.chap_userid or "", acl.chap_password or "",
                              acl.chap_mutual_userid or "", acl.chap_mutual_password or ""))
        return out

    def acls(self, iqn: str) -> list[AclState]:
        rts = _rts()
        tpg = self._tpg(iqn)
        if tpg is None:
            return []
        out = []
        for acl in tpg.node_acls:
            ro = False
            try:
                ro = bool(rts.MappedLUN(acl, 0).write_protect)
            except rts.RTSLibNotInCFSError:
                pass
            out.append(AclState(acl.node_wwn, ro, bool(acl.session)))
        return out
