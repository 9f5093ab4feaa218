"""Names and identifiers. There is no database, so the IDs carry the routing.

volume_id   = "v1:<storage node>:<vg>:<lv>"      (snapshot ids use "s1:")
              "r1:<lv>" for a replicated volume: its legs (storage node, VG each; the LV has the same name on
              both) are in the controller's placement journal, since replacing a leg must not change the ID
LV name     = "<cluster>-<slug of the request name>-<10 hex of a hash of kind, cluster and name>"
target IQN  = IQN_PREFIX + "<vg>.<lv>" made IQN-safe (lower case; the hash keeps it unique)

Everything here is pure: unit tests cover it without a kernel.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from csi import errors

DRIVER_NAME = "lvm-iscsi.csi.dev"
IQN_PREFIX = "iqn.2026-11.dev.csi.lvm-iscsi:"
TAG_PREFIX = "dev.csi.lvm-iscsi"


def topology_key(driver_name: str) -> str:
    return f"topology.{driver_name}/zone"


MAX_ID = 128
MAX_NAME = 128      # request names: the CSI spec lets a plugin choose; Kubernetes sends 40 ("pvc-<uuid>")
_CLUSTER_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?")
_NODE_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")
_LVM_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
# RFC 3720: iqn.yyyy-mm.reversed.domain[:anything]; restricted here to what iscsiadm and LIO take safely
IQN_RE = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[a-z0-9.:-]{1,200})?")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_RESERVED_LV = ("snapshot", "pvmove", "_")


def check_cluster_id(cluster_id: str) -> str:
    if not _CLUSTER_RE.fullmatch(cluster_id) or cluster_id.startswith(_RESERVED_LV):
        raise ValueError(f"cluster id {cluster_id!r}: 1-16 lower-case letters, digits and '-'")
    return cluster_id


def check_node_name(name: str) -> str:
    if not _NODE_RE.fullmatch(name):
        raise ValueError(f"storage node name {name!r}: a DNS label/subdomain of at most 63 characters")
    return name


def check_request_name(name: str, what: str = "name") -> str:
    if not name:
        raise errors.invalid(f"{what} is required")
    if len(name.encode()) > MAX_NAME:
        raise errors.invalid(f"{what} is longer than {MAX_NAME} bytes")
    if not name.isprintable():
        raise errors.invalid(f"{what} holds control characters")
    return name


def lv_name(cluster_id: str, request_name: str, kind: str = "volume") -> str:
    """Deterministic LV name for a CSI request name: a retried CreateVolume finds the LV it made before."""
    digest = hashlib.sha256(f"{kind}\0{cluster_id}\0{request_name}".encode()).hexdigest()[:10]
    slug = _NAME_CHARS.sub("_", request_name)[:40].strip("_.-") or "x"
    middle = "s-" if kind == "snapshot" else ""
    return f"{cluster_id}-{middle}{slug}-{digest}"


def wipe_lv_name(cluster_id: str) -> str:
    """The name a thick LV takes while it is zeroed after its deletion: outside the volume namespace, since `+`
    never appears in the LV name of a volume or snapshot (`lv_name` keeps [A-Za-z0-9_.-])."""
    return f"{cluster_id}+wipe+{secrets.token_hex(8)}"


def is_wipe_lv_name(name: str) -> bool:
    return "+wipe+" in name


def target_iqn(vg: str, lv: str) -> str:
    return IQN_PREFIX + re.sub(r"[^a-z0-9.-]", "-", f"{vg}.{lv}".lower())


def is_iqn(value: str) -> bool:
    """An iSCSI qualified name, in any case (see normalize_iqn)."""
    return normalize_iqn(value) is not None


def normalize_iqn(value: str) -> str | None:
    """The lower-case form of an IQN, None when `value` is not one. iSCSI names compare case-insensitively
    (RFC 3720 3.2.6.1) and LIO lower-cases the name an initiator logs in with, so an initiator named with
    upper-case letters must get its ACL, grant and node_id in lower case. ASCII only: some other letters
    lower-case to ASCII ones (KELVIN SIGN to "k") and would name someone else."""
    lowered = value.lower()
    if not value.isascii() or len(value) > 223 or not IQN_RE.fullmatch(lowered):
        return None
    return lowered


@dataclass(frozen=True)
class LvRef:
    """Where a volume or snapshot lives: storage node, VG and LV."""
    node: str
    vg: str
    lv: str
    kind: str = "volume"

    def encode(self) -> str:
        prefix = "s1" if self.kind == "snapshot" else "v1"
        return f"{prefix}:{self.node}:{self.vg}:{self.lv}"

    @property
    def iqn(self) -> str:
        return target_iqn(self.vg, self.lv)

    def __str__(self) -> str:
        return self.encode()


def parse_id(value: str, kind: str = "volume") -> LvRef | None:
    """The LvRef an ID names, or None when it is not an ID this driver could have made (another driver's,
    malformed, too long). Callers turn None into NOT_FOUND or success as the RPC's rules say."""
    if not value or len(value) > MAX_ID:
        return None
    parts = value.split(":")
    if len(parts) != 4 or parts[0] != ("s1" if kind == "snapshot" else "v1"):
        return None
    _, node, vg, lv = parts
    if not _NODE_RE.fullmatch(node) or not _is_lvm_name(vg) or not _is_lvm_name(lv):
        return None
    return LvRef(node, vg, lv, kind)


def replicated_volume_id(key: str) -> str:
    """The volume_id of a replicated volume whose legs are LVs named `key` (ids.lv_name of its request name)."""
    return f"r1:{key}"


def parse_replicated_id(value: str) -> str | None:
    """The key (LV name of both legs) a replicated volume_id names, or None when it is not one."""
    if not value or len(value) > MAX_ID or not value.startswith("r1:"):
        return None
    key = value[3:]
    return key if _is_lvm_name(key) and not key.startswith(_RESERVED_LV) else None


def md_name(key: str) -> str:
    """The md array name of a replicated volume: `homehost:name` as its superblock keeps it (at most 32 bytes),
    with a homehost of the driver's own, so the udev rule that keeps workers and storage nodes from
    assembling these arrays on their own (csi/node/raid.py) can tell them apart."""
    return MD_HOMEHOST + ":" + hashlib.sha256(key.encode()).hexdigest()[:16]


MD_HOMEHOST = "lvmiscsi"


def _is_lvm_name(value: str) -> bool:
    # LVM refuses "." and ".."; they would also take a record path out of its directory
    return bool(_LVM_NAME_RE.fullmatch(value)) and value not in (".", "..")


def check_lvm_name(value: str, what: str) -> str:
    if not _is_lvm_name(value) or value.startswith(_RESERVED_LV):
        raise errors.invalid(f"{what} {value!r} is not a valid LVM name")
    return value
