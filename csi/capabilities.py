"""Volume capabilities and StorageClass parameters: what this driver supports, checked in one place.

Supported: mount (ext4, xfs) or block; access modes SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY,
SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, MULTI_NODE_READER_ONLY (read-only LUN, filesystem
mounted read-only without journal replay), and MULTI_NODE_MULTI_WRITER for block only (a filesystem
mounted on two nodes at once would be corrupted).
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Iterable, Mapping

from csi import errors
from csi import mkfs_options
from csi.proto import csi_pb2 as csi

Mode = csi.VolumeCapability.AccessMode
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS = "ext4"
SINGLE_NODE = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY, Mode.SINGLE_NODE_SINGLE_WRITER,
               Mode.SINGLE_NODE_MULTI_WRITER}
READ_ONLY = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
SUPPORTED = SINGLE_NODE | {Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_MULTI_WRITER}
BLOCK_ONLY = {Mode.MULTI_NODE_MULTI_WRITER}

# StorageClass parameters (and their defaults, documented in the README).
PARAM_POOL = "pool"
PARAM_TYPE = "type"            # thin | thick; default thin unless `pool` names a thick pool
PARAM_FS = "fsType"            # ext4 | xfs; csi.storage.k8s.io/fstype is the same
PARAM_MUTUAL_CHAP = "mutualChap"
PARAM_WIPE = "wipe"            # thick volumes: zero before the space is reused (default: the agent's wipeThick)
PARAM_MKFS_OPTIONS = mkfs_options.PARAM   # xfs only: known-safe mkfs.xfs options (csi/mkfs_options.py)
PARAM_REPLICAS = "replicas"    # 1 | 2: 2 is two legs on two storage nodes (csi/controller/replicas.py)
# Zones, besides the first leg's, where the second leg may go: for workers that reach the storage nodes of both
PARAM_REPLICA_ZONES = "replicaZones"
KNOWN_PARAMS = {PARAM_POOL, PARAM_TYPE, PARAM_FS, PARAM_MUTUAL_CHAP, PARAM_WIPE, PARAM_MKFS_OPTIONS, PARAM_REPLICAS,
                PARAM_REPLICA_ZONES}
_ZONE_RE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")
REPLICA_COUNTS = (1, 2)
# Attributes a replicated volume's legs carry on their agents (a plain volume has neither, so its request digest
# is what it always was): how many legs the volume has, and which one this LV is.
ATTR_REPLICAS = "replicas"
ATTR_LEG = "replicaLeg"
K8S_PREFIX = "csi.storage.k8s.io/"


@dataclass(frozen=True)
class Access:
    block: bool
    fs_type: str
    modes: frozenset[int]
    mount_flags: tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        return bool(self.modes) and self.modes <= READ_ONLY

    @property
    def single_node(self) -> bool:
        return bool(self.modes) and self.modes <= SINGLE_NODE


def mode_name(mode: int) -> str:
    try:
        return Mode.Mode.Name(mode)
    except ValueError:
        return f"UNKNOWN({mode})"


def check_capability(cap: csi.VolumeCapability, default_fs: str = DEFAULT_FS) -> Access:
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise errors.invalid("volume capability needs an access type (mount or block)")
    mode = cap.access_mode.mode
    if mode == Mode.UNKNOWN:
        raise errors.invalid("volume capability needs an access mode")
    if mode not in SUPPORTED:
        raise errors.invalid(f"access mode {mode_name(mode)} is not supported")
    if kind == "mount":
        fs = cap.mount.fs_type or default_fs
        if fs not in FS_TYPES:
            raise errors.invalid(f"filesystem {fs!r} is not supported; use one of {', '.join(FS_TYPES)}")
        if mode in BLOCK_ONLY:
            raise errors.invalid(f"{mode_name(mode)} is supported for raw block volumes only: a filesystem "
                                 "mounted on several nodes at once would be corrupted")
        for flag in cap.mount.mount_flags:
            check_mount_flag(flag)
        return Access(False, fs, frozenset({mode}), tuple(cap.mount.mount_flags))
    return Access(True, "", frozenset({mode}))


def check_mount_flag(flag: str) -> str:
    if not flag or flag.startswith("-") or any(c in flag for c in "\0\n ") or len(flag) > 256:
        raise errors.invalid(f"mount flag {flag!r} is not allowed")
    return flag


def check_capabilities(caps: Iterable[csi.VolumeCapability], default_fs: str = DEFAULT_FS) -> Access:
    """All of a request's capabilities folded into one Access; they must agree on block vs. filesystem."""
    caps = list(caps)
    if not caps:
        raise errors.invalid("volume_capabilities is required")
    parsed = [check_capability(c, default_fs) for c in caps]
    if len({a.block for a in parsed}) > 1:
        raise errors.invalid("a volume is either block or mount; the capabilities ask for both")
    if len({a.fs_type for a in parsed}) > 1:
        raise errors.invalid("the capabilities ask for different filesystems")
    modes = frozenset().union(*(a.modes for a in parsed))
    return Access(parsed[0].block, parsed[0].fs_type, modes, tuple(f for a in parsed for f in a.mount_flags))


@dataclass(frozen=True)
class Params:
    pool: str
    thin: bool | None
    fs_type: str
    mutual_chap: bool
    wipe: bool | None       # None: not set, the agent's wipeThick decides
    mkfs_options: str = ""   # canonical (csi/mkfs_options.py); "" when the class sets none
    replicas: int = 1
    replica_zones: tuple[str, ...] = ()


# How the wipe parameter is kept in a volume's attributes. "true" meant "set to true or not set" before the
# class could turn wiping on where the agent's default is off; it stays the value for "not set", so that the
# request digest of a class without the parameter (most of them) is what it was. See tags.request_digests.
WIPE_UNSET, WIPE_ON, WIPE_OFF = "true", "always", "false"


def wipe_attribute(wipe: bool | None) -> str:
    return WIPE_UNSET if wipe is None else WIPE_ON if wipe else WIPE_OFF


def parse_params(params: Mapping[str, str]) -> Params:
    unknown = sorted(k for k in params if k not in KNOWN_PARAMS and not k.startswith(K8S_PREFIX))
    if unknown:
        raise errors.invalid(f"unknown parameter(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(KNOWN_PARAMS))} and {K8S_PREFIX}*")
    thin: bool | None = None
    kind = params.get(PARAM_TYPE, "")
    if kind:
        if kind not in ("thin", "thick"):
            raise errors.invalid(f"parameter {PARAM_TYPE}={kind!r}: use thin or thick")
        thin = kind == "thin"
    fs = params.get(PARAM_FS) or params.get(K8S_PREFIX + "fstype") or ""
    if fs and fs not in FS_TYPES:
        raise errors.invalid(f"parameter {PARAM_FS}={fs!r}: use one of {', '.join(FS_TYPES)}")
    pool = params.get(PARAM_POOL, "")
    if pool and not all(c.isalnum() or c in "-_." for c in pool):
        raise errors.invalid(f"parameter {PARAM_POOL}={pool!r} is not a pool name")
    mkfs = mkfs_options.parse(params.get(PARAM_MKFS_OPTIONS, ""))
    if fs:
        mkfs_options.check_fs(mkfs, fs)
    replicas = params.get(PARAM_REPLICAS) or "1"
    if replicas not in [str(n) for n in REPLICA_COUNTS]:
        raise errors.invalid(f"parameter {PARAM_REPLICAS}={replicas!r}: use 1 (one LV) or 2 (two LVs on two storage "
                             "nodes of one zone, mirrored by the node)")
    zones = tuple(z.strip() for z in params.get(PARAM_REPLICA_ZONES, "").split(",") if z.strip())
    if zones and replicas == "1":
        raise errors.invalid(f"parameter {PARAM_REPLICA_ZONES} applies to {PARAM_REPLICAS}: 2 only")
    bad = [z for z in zones if not _ZONE_RE.fullmatch(z)]
    if bad:
        raise errors.invalid(f"parameter {PARAM_REPLICA_ZONES}: {bad[0]!r} is not a zone (a label value)")
    return Params(pool, thin, fs, bool(_bool(params, PARAM_MUTUAL_CHAP, False)), _bool(params, PARAM_WIPE, None),
                  str(mkfs), int(replicas), zones)


def check_replicated(access: Access) -> Access:
    """A replicated volume is an md RAID1 the node assembles: two nodes assembling it at once, each writing,
    would each keep its own idea of which blocks are in sync, and corrupt it. Read-only modes are fine."""
    if Mode.MULTI_NODE_MULTI_WRITER in access.modes:
        raise errors.invalid(f"{mode_name(Mode.MULTI_NODE_MULTI_WRITER)} is not supported for replicated volumes "
                             f"({PARAM_REPLICAS}: 2): a RAID1 assembled on two nodes at once would be corrupted")
    return access


def is_replica_leg(attributes: Mapping[str, str]) -> bool:
    """Whether an agent's volume is one leg of a replicated volume (listed and adopted as that, never alone)."""
    return attributes.get(ATTR_REPLICAS, "1") != "1"


def replica_leg(attributes: Mapping[str, str]) -> int:
    try:
        return int(attributes.get(ATTR_LEG, "0"))
    except ValueError:
        return 0


def _bool(params: Mapping[str, str], key: str, default: bool | None) -> bool | None:
    value = params.get(key)
    if value is None or value == "":
        return default
    if value.lower() not in ("true", "false"):
        raise errors.invalid(f"parameter {key}={value!r}: use true or false")
    return value.lower() == "true"
