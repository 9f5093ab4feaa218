"""Hostile input, at the unit tier, through real in-process gRPC servers.

Every case sends one malformed or malicious request over a unix socket to a server built by
csi.server.make_server (so the real interceptor logs the call and maps every exception) serving:

- the real ControllerService, with stub agents that record every call and behave like the agent's API;
- the real NodeService, with the real Iscsiadm argv going through FakeRunner (only the wait for udev is
  faked) and real mountinfo (nothing the tests use is mounted);
- the real AgentService, with the real Lvm going through FakeRunner to a small simulated LVM that answers
  with LVM's recorded words, and a fake LIO that checks initiator names with rtslib's own function.

For every case: the status code the CSI spec asks for (never UNKNOWN); no side effect (no mutating agent
call, no command except read-only ones, no LIO change, nothing created, changed or removed under the kubelet,
node state, agent state or an "outside" directory); no secret in any log line (DEBUG) or error message; and
every server still answering afterwards. A case marked xfail(strict=True) documents an open bug in the driver;
cases with `guards=` found a bug fixed since. Either way what they assert is the correct behaviour, and a
`guards=` case that fails names the bug that came back.

test_fuzz.py reuses the harness (Harness, running) and the argv checks (option_injections).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from rtslib_fb.utils import normalize_wwn

from csi import capabilities as caps
from csi import contract, errors, ids, runner, server
from csi.config import AgentConfig, ControllerConfig, NodeConfig, PoolConfig, StorageNode
from csi.controller.agents import Agents
from csi.controller.journal import FileJournal
from csi.controller.nodes import StaticNodes
from csi.controller.placement import Placement
from csi.controller.service import ControllerService, volume_attributes
from csi.identity import IdentityService
from csi.node.iscsi import Iscsiadm, Target
from csi.node.service import NodeService
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.server import KeyLocks
from csi.storage.lio import AclState, Portal
from csi.storage.lvm import Lvm, dm_name
from csi.storage.records import RecordStore
from csi.storage.capacity import PoolReports, PoolTotals
from csi.storage.service import AgentService
from tests.unit.conftest import FakeRunner, recorded, recorded_failure

Code = grpc.StatusCode
OK = Code.OK
INVALID, NOT_FOUND, EXISTS = Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS
PRECONDITION, OUT_OF_RANGE, EXHAUSTED = Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED
M = csi.VolumeCapability.AccessMode

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
EXTENT = 4 * MiB
INT64_MAX = (1 << 63) - 1
DRIVER = ids.DRIVER_NAME
CLUSTER = "c1"
TOPOLOGY_KEY = ids.topology_key(DRIVER)
WORKER = "iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1"
WORKER2 = "iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-2"
PORTAL = "10.0.0.1:3260"

# Distinctive secrets: none of them may ever reach a log line or an error message.
SECRET = "Req-Secret-5b1f0c9e77"             # in the requests' `secrets` maps
CHAP_SECRET = "Chap-Secret-a83d2e77f1c4"     # what the stub agents grant; in publish_context
MUTUAL_SECRET = "Mutual-Secret-6e0b94d2c7"   # mutual CHAP, likewise
PLANTED = "Planted-Secret-1d7c3b0a59"        # a secret put where secrets do not belong (parameters, context)
SECRETS = (SECRET, CHAP_SECRET, MUTUAL_SECRET, PLANTED)
REQUEST_SECRETS = {"chapSecret": SECRET, "password": SECRET, "user-key": SECRET}

# Controller world: s1 (zone-a) holds pvc-seed (published to WORKER), pvc-free, pvc-block and snap-seed;
# s2 (zone-b) holds pvc-src2.
SEED_LV = ids.lv_name(CLUSTER, "pvc-seed")
SEED = f"v1:s1:vg:{SEED_LV}"
FREE = "v1:s1:vg:" + ids.lv_name(CLUSTER, "pvc-free")
BLOCK = "v1:s1:vg:" + ids.lv_name(CLUSTER, "pvc-block")
SRC2 = "v1:s2:vg:" + ids.lv_name(CLUSTER, "pvc-src2")
SNAP = "s1:s1:vg:" + ids.lv_name(CLUSTER, "snap-seed", "snapshot")
# Node world: NODE_VOL is not staged; NODE_BLOCK is staged as a raw block volume (its record is seeded).
NODE_VOL = "v1:s1:vg:" + ids.lv_name(CLUSTER, "pvc-node")
NODE_BLOCK = "v1:s1:vg:" + ids.lv_name(CLUSTER, "pvc-staged")
# Agent world (node s1, VG "vg": thin pool "tp" and thick space): the same pvc-seed (granted to WORKER),
# pvc-thick, snap-seed, and someone-elses-lv (an LV of another user of the VG, without our tags).
AGENT_SEED_LV = SEED_LV
AGENT_THICK_LV = ids.lv_name(CLUSTER, "pvc-thick")
AGENT_SNAP_LV = ids.lv_name(CLUSTER, "snap-seed", "snapshot")
FOREIGN_LV = "someone-elses-lv"
POOLS = (PoolConfig("thin", "vg", "tp", overprovision_ratio=2.0), PoolConfig("thick", "vg"))


def mount_cap(mode=M.SINGLE_NODE_WRITER, fs="ext4", flags=()) -> csi.VolumeCapability:
    return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs, mount_flags=list(flags)),
                                access_mode=M(mode=mode))


def block_cap(mode=M.SINGLE_NODE_WRITER) -> csi.VolumeCapability:
    return csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=M(mode=mode))


ATTRIBUTES = volume_attributes(caps.check_capabilities([mount_cap()]), caps.parse_params({}))
BLOCK_ATTRIBUTES = volume_attributes(caps.check_capabilities([block_cap(M.MULTI_NODE_MULTI_WRITER)]),
                                     caps.parse_params({}))


def round_up(size: int, extent: int = EXTENT) -> int:
    return -(-size // extent) * extent


# ---------------------------------------------------------------------------------------------- controller side

MUTATING_AGENT_CALLS = {"CreateVolume", "DeleteVolume", "ExpandVolume", "GrantAccess", "RevokeAccess",
                        "CreateSnapshot", "DeleteSnapshot"}


class StubAgent:
    """One storage node's agent as the controller sees it: the agent API's answers (NOT_FOUND, ALREADY_EXISTS
    when the name exists with other attributes or smaller than asked, OUT_OF_RANGE for a shrink or past
    limit_bytes, sizes rounded to 4 MiB extents), every call recorded."""

    def __init__(self, node: StorageNode, available: int):
        self.node = node
        self.initial_available = available
        self.reset()

    def reset(self) -> None:
        self.available = self.initial_available
        self.volumes: dict[str, apb.Volume] = {}
        self.snapshots: dict[str, apb.Snapshot] = {}
        self.calls: list[tuple[str, Any]] = []

    def info(self, timeout=None, reconnect=True):
        return self.call("GetInfo", apb.GetInfoRequest())

    def call(self, method, request, timeout=None, reconnect=True):
        self.calls.append((method, request))
        return getattr(self, "_" + method)(request)

    def _GetInfo(self, request):
        return apb.AgentInfo(node_name=self.node.name, pools=[
            apb.Pool(name="thin", vg="vg", thin_pool="tp", extent_bytes=EXTENT, available_bytes=self.available),
            apb.Pool(name="thick", vg="vg", extent_bytes=EXTENT, available_bytes=self.available // 2)])

    def _vol(self, lv: str) -> apb.Volume:
        if lv not in self.volumes:
            raise errors.not_found(f"no volume vg/{lv} on {self.node.name}")
        return self.volumes[lv]

    def _GetVolume(self, request):
        return self._vol(ids.lv_name(CLUSTER, request.name) if request.name else request.lv)

    def _ListVolumes(self, request):
        return apb.ListVolumesResponse(volumes=list(self.volumes.values()))

    def _CreateVolume(self, request):
        if request.size_bytes <= 0:
            raise errors.invalid("size_bytes must be positive")
        if request.pool not in ("thin", "thick"):
            raise errors.invalid(f"no pool {request.pool!r}")
        lv = ids.lv_name(CLUSTER, request.name)
        size = round_up(max(request.size_bytes, request.source.size_bytes if request.HasField("source") else 0))
        vol = self.volumes.get(lv)
        if vol is not None:
            if vol.size_bytes < size or dict(vol.attributes) != dict(request.attributes):
                raise errors.exists(f"volume {request.name!r} exists with another size, pool, source or capabilities")
            return vol
        if size > self.available:
            raise errors.exhausted(f"pool {request.pool} has {self.available} bytes available")
        vol = apb.Volume(name=request.name, pool=request.pool, vg="vg", lv=lv, size_bytes=size,
                         attributes=request.attributes, target_iqn=ids.target_iqn("vg", lv), healthy=True,
                         exported=True, ready=True)
        self.volumes[lv] = vol
        return vol

    def _DeleteVolume(self, request):
        self.volumes.pop(request.lv, None)
        return apb.DeleteVolumeResponse()

    def _ExpandVolume(self, request):
        vol = self._vol(request.lv)
        size = round_up(request.size_bytes)
        if size < vol.size_bytes:
            raise errors.out_of_range(f"volume is {vol.size_bytes} bytes; shrinking is not supported")
        if getattr(request, "limit_bytes", 0) and size > request.limit_bytes:
            raise errors.out_of_range(f"{size} bytes is above limit_bytes {request.limit_bytes}")
        if size - vol.size_bytes > self.available:
            raise errors.exhausted(f"growing needs {size - vol.size_bytes} bytes, {self.available} available")
        vol.size_bytes = size
        return vol

    def _GrantAccess(self, request):
        vol = self._vol(request.lv)
        if request.initiator_iqn not in [i.iqn for i in vol.initiators]:
            vol.initiators.add(iqn=request.initiator_iqn, read_only=request.read_only)
        assert request.node_name, "a grant names the node its initiator belongs to"
        return apb.GrantAccessResponse(target_iqn=vol.target_iqn, portals=[PORTAL], lun=0)

    def _RevokeAccess(self, request):
        vol = self.volumes.get(request.lv)
        if vol is not None:
            keep = [i for i in vol.initiators if i.iqn != request.initiator_iqn]
            del vol.initiators[:]
            vol.initiators.extend(keep)
        return apb.RevokeAccessResponse()

    def _GetSnapshot(self, request):
        lv = ids.lv_name(CLUSTER, request.name, "snapshot") if request.name else request.lv
        if lv not in self.snapshots:
            raise errors.not_found("no such snapshot")
        return self.snapshots[lv]

    def _CreateSnapshot(self, request):
        src = self._vol(request.source_lv)
        lv = ids.lv_name(CLUSTER, request.name, "snapshot")
        snap = self.snapshots.get(lv)
        if snap is not None:
            if snap.source_lv != request.source_lv:
                raise errors.exists("snapshot exists with another source")
            return snap
        snap = apb.Snapshot(name=request.name, vg="vg", lv=lv, source_vg="vg", source_lv=request.source_lv,
                            size_bytes=src.size_bytes, created_unix=1_790_000_000, ready=True)
        self.snapshots[lv] = snap
        return snap

    def _DeleteSnapshot(self, request):
        self.snapshots.pop(request.lv, None)
        return apb.DeleteSnapshotResponse()

    def _ListSnapshots(self, request):
        return apb.ListSnapshotsResponse(snapshots=list(self.snapshots.values()))


class _Channel:
    def close(self) -> None:
        pass


class StubAgents(Agents):
    """The controller's real Agents (membership, health, polling) over StubAgent clients."""

    def __init__(self, agents: list[StubAgent]):
        stubs = {a.node.name: a for a in agents}

        def factory(node, health):
            stub = stubs[node.name]
            stub.health, stub.channel = health, _Channel()
            return stub
        super().__init__(Path("/nonexistent"), client_factory=factory)
        self.update([a.node for a in agents])

    def seed(self) -> None:
        s1, s2 = self.get("s1"), self.get("s2")
        for a in (s1, s2):
            a.reset()
        for name, attrs in (("pvc-seed", ATTRIBUTES), ("pvc-free", ATTRIBUTES), ("pvc-block", BLOCK_ATTRIBUTES)):
            s1._CreateVolume(apb.CreateVolumeRequest(name=name, pool="thin", size_bytes=GiB, attributes=attrs))
        s1._GrantAccess(apb.GrantAccessRequest(vg="vg", lv=SEED_LV, initiator_iqn=WORKER, node_name="worker-1"))
        s1._CreateSnapshot(apb.CreateSnapshotRequest(name="snap-seed", source_vg="vg", source_lv=SEED_LV))
        s2._CreateVolume(apb.CreateVolumeRequest(name="pvc-src2", pool="thin", size_bytes=GiB, attributes=ATTRIBUTES))
        for a in (s1, s2):
            a.calls.clear()

    def state(self) -> dict[str, tuple]:
        return {a.node.name: (tuple(sorted((k, v.SerializeToString(deterministic=True)) for k, v in a.volumes.items())),
                              tuple(sorted((k, v.SerializeToString(deterministic=True))
                                           for k, v in a.snapshots.items())), a.available)
                for a in self.all()}

    def mutating_calls(self) -> list[str]:
        return [f"agent {a.node.name}: {m}" for a in self.all() for m, _ in a.calls if m in MUTATING_AGENT_CALLS]


# ---------------------------------------------------------------------------------------------- commands

class HostileRunner(FakeRunner):
    """FakeRunner, plus what the real subprocess.run does with a NUL in argv: refuse before running."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[list[str]] = []

    def reset(self, responses) -> None:
        self.calls.clear()
        self.envs.clear()
        self.refused.clear()
        self.responses = list(responses)

    def __call__(self, argv, **kw):
        if any("\0" in str(a) for a in argv):
            self.refused.append(list(argv))
            raise ValueError("embedded null byte")
        return super().__call__(argv, **kw)


def read_only(argv: list[str]) -> bool:
    """Commands that change nothing: listings, probes and size queries."""
    if argv[0] in ("lvs", "vgs", "blkid"):
        return True
    if argv[:2] == ["blockdev", "--getsize64"]:
        return True
    return argv in (["iscsiadm", "-m", "session"], ["iscsiadm", "-m", "node"])


# Per command: the options the driver passes that take the next argv element as their argument, and the
# options that take none. An argv element that starts with '-' is only acceptable as one of these, as the
# argument of one of the first kind, or after "--".
TAKES_ARGUMENT = {
    "iscsiadm": {"-m", "-T", "-p", "-o", "-n", "-v"},
    "mount": {"-t", "-o"},
    "blkid": {"-o"},
    "mkfs.ext4": {"-m", "-E"},
    "mkfs.xfs": {"-m", "-i"},
    "lvs": {"--reportformat", "--units", "-o", "--select"},
    "vgs": {"--reportformat", "--units", "-o"},
    "lvcreate": {"--name", "--activate", "--setactivationskip", "--addtag", "--virtualsize", "--thin", "--size",
                 "--wipesignatures", "--zero"},
    "lvextend": {"--size"},
    "lvchange": {"--activate", "--zero", "--errorwhenfull", "--addtag", "--deltag"},
    "blkdiscard": {"--offset", "--length"},
}
FLAGS = {
    "iscsiadm": {"--login", "--logout", "-R"},
    "blkid": {"-p"},
    "e2fsck": {"-p"},
    "blockdev": {"--flushbufs", "--getsize64"},
    "mkfs.ext4": {"-q", "-F"},
    "mkfs.xfs": {"-q"},
    "lvs": {"--nosuffix"},
    "vgs": {"--nosuffix"},
    "lvcreate": {"--yes", "--snapshot"},
    "lvremove": {"--yes"},
    "lvextend": {"--yes"},
    "lvchange": {"--ignoreactivationskip"},
    "lvconvert": {"--yes", "--splitsnapshot"},
    "blkdiscard": {"--zeroout"},
}


def option_injections(calls: list[list[str]]) -> list[tuple[list[str], int]]:
    """(argv, index) of every element that a command would read as an option the driver did not put there."""
    bad = []
    for argv in calls:
        takes, flags = TAKES_ARGUMENT.get(argv[0], set()), FLAGS.get(argv[0], set())
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "--":
                break
            if a in takes:
                i += 2
                continue
            if a.startswith("-") and a not in flags:
                bad.append((argv, i))
            i += 1
    return bad


# ---------------------------------------------------------------------------------------------- simulated LVM

_LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")


def _lvm_valid(name: str) -> bool:
    return bool(_LVM_NAME.fullmatch(name)) and name not in (".", "..") and len(name) <= 127


class LvmSim:
    """A small LVM behind FakeRunner: lvs / vgs answer with JSON reports shaped like the real ones (see
    test_lvm.py), lvcreate / lvremove / lvextend / lvchange change its state. "Not found" uses LVM's recorded
    words (tests/unit/recorded); a name LVM refuses gets a failure in other words (their exact text does not
    matter to the agent: anything but the two "not found" messages is a failure)."""

    VG_SIZE = 100 * GiB

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lvs: dict[tuple[str, str], dict[str, str]] = {}
        self.when_full = "error"     # the thin pool's lv_when_full
        self.add("vg", "tp", 20 * GiB, attr="twi-aotz--", data_percent="5.00", metadata_percent="2.00")
        self.add("vg", FOREIGN_LV, GiB)

    def add(self, vg: str, name: str, size: int, tags=(), pool: str = "", attr: str = "-wi-a-----",
            origin: str = "", data_percent: str = "", metadata_percent: str = "") -> None:
        self.lvs[(vg, name)] = {"lv_name": name, "vg_name": vg, "lv_size": str(size), "lv_tags": ",".join(tags),
                                "pool_lv": pool, "lv_attr": attr, "data_percent": data_percent,
                                "metadata_percent": metadata_percent, "origin": origin,
                                "lv_time": "2026-11-26 03:34:34 +0000"}

    def device_node_exists(self, path: str) -> bool:
        """The kernel's side: /dev/<vg>/<lv> exists exactly for the active LVs."""
        vg, _, lv = path.removeprefix("/dev/").partition("/")
        row = self.lvs.get((vg, lv)) if path.startswith("/dev/") else None
        return row is not None and row["lv_attr"][4] == "a"

    def dmsetup_status(self, argv: list[str]) -> tuple[int, str, str]:
        """The kernel's thin-pool status of an active pool's -tpool device, shaped like the recorded one."""
        rows = {dm_name(vg, n, "tpool"): r for (vg, n), r in self.lvs.items() if r["lv_attr"].startswith("t")}
        row = rows.get(argv[-1])
        if row is None or row["lv_attr"][4] != "a":
            rc, _, err = recorded_failure("dmsetup_status_missing")
            return rc, "", err
        blocks = int(row["lv_size"]) // (64 * 1024)
        used = int(blocks * float(row["data_percent"] or 0) / 100)
        meta_used = int(4096 * float(row["metadata_percent"] or 0) / 100)
        return 0, (f"0 {int(row['lv_size']) // 512} thin-pool 3 {meta_used}/4096 {used}/{blocks} - rw "
                   "no_discard_passdown queue_if_no_space - 1024 \n"), ""

    def _vg_row(self, vg: str) -> dict[str, str]:
        used = sum(int(r["lv_size"]) for (g, _), r in self.lvs.items() if g == vg and not r["pool_lv"])
        return {"vg_name": vg, "vg_size": str(self.VG_SIZE), "vg_free": str(self.VG_SIZE - used),
                "vg_extent_size": str(EXTENT), "lv_count": str(sum(1 for g, _ in self.lvs if g == vg))}

    @staticmethod
    def _missing_vg(vg: str) -> tuple[int, str, str]:
        rc, _, err = recorded_failure("lvs_novg")
        return rc, "", err.replace("nosuchvg", vg)

    @staticmethod
    def _missing_lv(vg: str, name: str) -> tuple[int, str, str]:
        rc, _, err = recorded_failure("lvs_missing")
        return rc, "", err.replace("csi-vg/missing", f"{vg}/{name}")

    @staticmethod
    def _invalid(what: str, name: str) -> tuple[int, str, str]:
        return 5, "", f'  {what} name "{name}" has invalid characters.\n'

    def _split(self, target: str) -> tuple[str, str, tuple[int, str, str] | None]:
        vg, _, name = target.partition("/")
        if not _lvm_valid(vg):
            return vg, name, self._invalid("Volume group", vg)
        if name and not _lvm_valid(name):
            return vg, name, self._invalid("Logical volume", name)
        if vg != "vg":
            return vg, name, self._missing_vg(vg)
        if name and (vg, name) not in self.lvs:
            return vg, name, self._missing_lv(vg, name)
        return vg, name, None

    def vgs(self, argv: list[str]) -> tuple[int, str, str]:
        vg, _, failure = self._split(argv[-1])
        if failure:
            return failure
        return 0, json.dumps({"report": [{"vg": [self._vg_row(vg)]}]}), ""

    def lvs_cmd(self, argv: list[str]) -> tuple[int, str, str]:
        fields = argv[argv.index("-o") + 1].split(",")
        vg, name, failure = self._split(argv[-1])
        if failure:
            return failure
        rows = [r for (g, n), r in sorted(self.lvs.items()) if g == vg and (not name or n == name)]
        out = []
        for r in rows:
            full = dict(r, **self._vg_row(vg), zero="zero", lv_when_full=self.when_full)
            out.append({f: full.get(f, "") for f in fields})
        return 0, json.dumps({"report": [{"lv": out}]}), ""

    def lvcreate(self, argv: list[str]) -> tuple[int, str, str]:
        opts: dict[str, str] = {}
        tags: list[str] = []
        positional: list[str] = []
        snapshot = False
        i = 1
        while i < len(argv):
            a = argv[i]
            if a == "--yes":
                i += 1
            elif a == "--snapshot":
                snapshot, i = True, i + 1
            elif a == "--addtag":
                tags.append(argv[i + 1])
                i += 2
            elif a in TAKES_ARGUMENT["lvcreate"]:
                opts[a] = argv[i + 1]
                i += 2
            elif a.startswith("-"):
                return 3, "", f"lvcreate: unrecognized option '{a}'\n"
            else:
                positional.append(a)
                i += 1
        name = opts["--name"]
        if not _lvm_valid(name):
            return self._invalid("Logical volume", name)
        active = opts.get("--activate", "y") == "y"
        if snapshot:
            vg, origin, failure = self._split(positional[0])
            if failure and vg == "vg" and _lvm_valid(origin):   # LVM's words for a missing origin
                rc, _, err = recorded_failure("lvcreate_snapshot_missing")
                return rc, "", err.replace("missing", origin, 1).replace("csi-vg", vg)
            if failure:
                return failure
            src = self.lvs[(vg, origin)]
            attr = "Vwi-a-tz--" if active else "Vwi---tz-k"
            size, pool = int(src["lv_size"]), src["pool_lv"]
            if not pool:   # a thick origin: a COW snapshot of --size bytes, and the origin says it is one
                attr, size = "swi-a-s---", int(opts["--size"].rstrip("b"))
                src["lv_attr"] = "o" + src["lv_attr"][1:]
        elif "--thin" in opts:
            vg, pool, failure = self._split(opts["--thin"])
            if failure:
                return failure
            size, attr, origin = int(opts["--virtualsize"].rstrip("b")), "Vwi-a-tz--", ""
        else:
            vg, _, failure = self._split(positional[0])
            if failure:
                return failure
            size, attr, pool, origin = int(opts["--size"].rstrip("b")), "-wi-a-----", "", ""
            if size > int(self._vg_row(vg)["vg_free"]):
                return 5, "", f'  Volume group "{vg}" has insufficient free space.\n'
        if (vg, name) in self.lvs:
            return 5, "", f'  Logical Volume "{name}" already exists in volume group "{vg}"\n'
        self.add(vg, name, size, tags, pool, attr, origin if snapshot else "",
                 "0.00" if pool else "")
        return 0, "", ""

    def lvremove(self, argv: list[str]) -> tuple[int, str, str]:
        vg, name, failure = self._split(argv[-1])
        if failure:
            return failure
        del self.lvs[(vg, name)]
        return 0, "", ""

    def lvconvert(self, argv: list[str]) -> tuple[int, str, str]:
        vg, name, failure = self._split(argv[-1])
        if failure:
            return failure
        row = self.lvs[(vg, name)]
        if "--splitsnapshot" in argv:
            origin, row["origin"], row["lv_attr"] = row["origin"], "", "-wi-a-----"
            if not any(r["origin"] == origin for (g, _), r in self.lvs.items() if g == vg):
                self.lvs[(vg, origin)]["lv_attr"] = "-" + self.lvs[(vg, origin)]["lv_attr"][1:]
        return 0, "", ""

    def lvrename(self, argv: list[str]) -> tuple[int, str, str]:
        vg, name, new = argv[1:4]
        _, _, failure = self._split(f"{vg}/{name}")
        if failure:
            return failure
        if not _lvm_valid(new):
            return self._invalid("Logical volume", new)
        if (vg, new) in self.lvs:
            return 5, "", f'  Logical Volume "{new}" already exists in volume group "{vg}"\n'
        row = self.lvs.pop((vg, name))
        row["lv_name"] = new
        self.lvs[(vg, new)] = row
        return 0, "", ""

    def lvextend(self, argv: list[str]) -> tuple[int, str, str]:
        vg, name, failure = self._split(argv[-1])
        if failure:
            return failure
        self.lvs[(vg, name)]["lv_size"] = argv[argv.index("--size") + 1].rstrip("b")
        return 0, "", ""

    def lvchange(self, argv: list[str]) -> tuple[int, str, str]:
        takes = TAKES_ARGUMENT["lvchange"]
        targets = [a for i, a in enumerate(argv) if i > 0 and not a.startswith("-") and argv[i - 1] not in takes]
        if len(targets) > 1:    # as LVM: each LV in turn, the command failed if one did
            options = argv[:len(argv) - len(targets)]
            results = [self.lvchange(options + [t]) for t in targets]
            return next((r for r in results if r[0] != 0), (0, "", ""))
        vg, name, failure = self._split(argv[-1])
        if failure:
            return failure
        if "--errorwhenfull" in argv:
            self.when_full = "error" if argv[argv.index("--errorwhenfull") + 1] == "y" else "queue"
        if "--activate" in argv:
            attr = self.lvs[(vg, name)]["lv_attr"]
            self.lvs[(vg, name)]["lv_attr"] = attr[:4] + "a" + attr[5:]
        row = self.lvs[(vg, name)]
        tags = [t for t in row["lv_tags"].split(",") if t]
        if "--addtag" in argv and argv[argv.index("--addtag") + 1] not in tags:
            tags.append(argv[argv.index("--addtag") + 1])
        if "--deltag" in argv:
            tags = [t for t in tags if t != argv[argv.index("--deltag") + 1]]
        row["lv_tags"] = ",".join(tags)
        return 0, "", ""


# ---------------------------------------------------------------------------------------------- fake LIO

WWN_TYPES = ("iqn", "naa", "eui")   # rtslib's FabricModule("iscsi").wwn_types


class FakeLio:
    """csi.storage.lio.Lio in memory. Like rtslib: initiator names go through normalize_wwn (RTSLibError for
    a name LIO refuses), and deleting a backstore deletes every LUN that uses it. `changes` lists every change
    of state (a call that changes nothing is not one)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.targets: dict[str, dict[str, Any]] = {}     # iqn -> {"lun": backstore name or None, "acls": {}}
        self.backstores: dict[str, str] = {}             # name -> device
        self.changes: list[tuple] = []
        self.logged_in: set[tuple[str, str]] = set()      # (target, initiator) of live sessions (tests set it)

    def export(self, iqn: str, backstore: str, device: str, thin: bool) -> None:
        if backstore not in self.backstores:
            self.backstores[backstore] = device
            self.changes.append(("backstore created", backstore))
        if iqn not in self.targets:
            self.targets[iqn] = {"lun": None, "acls": {}}
            self.changes.append(("target created", iqn))
        if self.targets[iqn]["lun"] is None:
            self.targets[iqn]["lun"] = backstore
            self.changes.append(("LUN 0 created", iqn, backstore))

    def unexport(self, iqn: str, backstore: str) -> None:
        if self.targets.pop(iqn, None) is not None:
            self.changes.append(("target deleted", iqn))
        if self.backstores.pop(backstore, None) is not None:
            self.changes.append(("backstore deleted", backstore))
            for other, t in self.targets.items():
                if t["lun"] == backstore:
                    t["lun"] = None
                    self.changes.append(("LUN 0 deleted", other))

    def remove_target(self, iqn: str) -> None:
        t = self.targets.pop(iqn, None)
        if t is None:
            return
        self.changes.append(("target deleted", iqn))
        store = t["lun"]
        if store is not None and not any(o["lun"] == store for o in self.targets.values()):
            if self.backstores.pop(store, None) is not None:
                self.changes.append(("backstore deleted", store))

    def is_exported(self, iqn: str) -> bool:
        t = self.targets.get(iqn)
        return bool(t and t["lun"])

    def exported_iqns(self, prefix: str) -> list[str]:
        return sorted(i for i in self.targets if i.startswith(prefix))

    def lun_device(self, iqn: str) -> str | None:
        t = self.targets.get(iqn)
        return self.backstores.get(t["lun"]) if t and t["lun"] else None

    def grant(self, iqn: str, access) -> None:
        t = self.targets.get(iqn)
        if t is None:
            raise LookupError(f"target {iqn} is not exported")
        wwn, _ = normalize_wwn(WWN_TYPES, access.initiator)
        if t["acls"].get(wwn) != access:
            t["acls"][wwn] = access
            self.changes.append(("ACL set", iqn, wwn))

    def revoke(self, iqn: str, initiator: str) -> int:
        t = self.targets.get(iqn)
        if t is None:
            return 0
        wwn, _ = normalize_wwn(WWN_TYPES, initiator)
        if t["acls"].pop(wwn, None) is not None:
            self.changes.append(("ACL deleted", iqn, wwn))
        return 0

    def acl_access(self, iqn: str) -> list:
        t = self.targets.get(iqn) or {"acls": {}}
        return list(t["acls"].values())

    def acls(self, iqn: str) -> list[AclState]:
        t = self.targets.get(iqn) or {"acls": {}}
        return [AclState(w, a.read_only, (iqn, w) in self.logged_in) for w, a in t["acls"].items()]


# ---------------------------------------------------------------------------------------------- node side

class FakeIscsiadm(Iscsiadm):
    """The real Iscsiadm (its argv go through the runner, so FakeRunner records them); only the look-up of the
    disk and the wait for udev are faked: the disk appears at once through any portal, and with no portal at
    all the wait ends as the real one does when its time is up."""

    def __init__(self, device: Path):
        super().__init__()
        self.device = device
        self.waits: list[Target] = []

    def find_device(self, target: Target) -> Path | None:
        return self.device if target.portals else None

    def wait_for_device(self, target: Target, timeout: float = 20.0) -> Path:
        self.waits.append(target)
        if not target.portals:
            raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED,
                                  f"logged in to {target.iqn}, but LUN {target.lun} did not appear")
        return self.device


def node_responses(lvm: LvmSim) -> list:
    """FakeRunner's answers: an initiator with no session, a blank-free disk (blkid finds ext4), tools that
    succeed, umount that finds nothing mounted (nothing the tests use is), and the simulated LVM."""
    r = FakeRunner()
    rc, _, err = recorded_failure("session_none")
    r.on("iscsiadm", "-m", "session", rc=rc, stderr=err)
    r.on("iscsiadm", "-m", "node")
    r.on("blkid", stdout=recorded("blkid_ext4.stdout"))
    for tool in ("mkfs.ext4", "mkfs.xfs", "mount", "resize2fs", "xfs_growfs", "blkdiscard", "e2fsck"):
        r.on(tool)
    r.on("umount", fn=lambda argv: (32, "", f"umount: {argv[-1]}: not mounted.\n"))
    r.on("blockdev", "--flushbufs")
    r.on("blockdev", "--getsize64", stdout=f"{GiB}\n")
    r.on("vgs", fn=lvm.vgs)
    r.on("dmsetup", "status", fn=lvm.dmsetup_status)
    r.on("lvs", fn=lvm.lvs_cmd)
    for cmd in ("lvcreate", "lvremove", "lvextend", "lvchange", "lvrename", "lvconvert"):
        r.on(cmd, fn=getattr(lvm, cmd))
    return r.responses


# ---------------------------------------------------------------------------------------------- the harness

def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under root with what identifies its state: a file rewritten (write_atomic replaces it) gets
    another inode, a file written in place another size or mtime."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
    return out


@dataclass
class Outcome:
    code: grpc.StatusCode
    response: Any
    details: str


class Harness:
    """Three real servers (controller + identity, node + identity, agent) on unix sockets, their clients, and
    every fake behind them, reset to a seeded world by `reset()`."""

    def __init__(self, base: Path, sockets: Path):
        self.base = base
        self.sockets = sockets
        self.K = base / "kubelet"
        self.node_state = self.K / "plugins" / DRIVER / "staged"
        self.agent_state = base / "agent"
        self.outside = base / "outside"
        self.device = base / "dev" / "sdz"
        self.initiator_file = base / "initiatorname.iscsi"
        self.run = HostileRunner()
        self.lvm = LvmSim()
        self.lio = FakeLio()
        self.responses = node_responses(self.lvm)
        nodes = (StorageNode("s1", "10.0.0.11:7600", "zone-a"), StorageNode("s2", "10.0.0.12:7600", "zone-b"))
        self.agents = StubAgents([StubAgent(nodes[0], 50 * GiB), StubAgent(nodes[1], 20 * GiB)])
        self.journal_dir = base / "journal"
        (base / "nodes.yaml").parent.mkdir(parents=True, exist_ok=True)
        (base / "nodes.yaml").write_text(f"nodes: [{{name: worker-1, iqn: '{WORKER}'}}, "
                                         f"{{name: worker-2, iqn: '{WORKER2}'}}]\n")
        self.controller = ControllerService(ControllerConfig(DRIVER, CLUSTER, nodes, base / "tls"), self.agents,
                                            Placement(FileJournal(self.journal_dir), self.agents, CLUSTER),
                                            StaticNodes(base / "nodes.yaml"))
        self.iscsi = FakeIscsiadm(self.device)
        self.node = NodeService(NodeConfig(DRIVER, "worker-1", self.K, self.initiator_file, "zone-a", 16,
                                           self.node_state), iscsi=self.iscsi, zone="zone-a")
        self.agent = AgentService(AgentConfig("s1", "unused", (Portal("10.0.0.1"),), self.agent_state, CLUSTER,
                                              base / "tls", POOLS, ("/dev/sdb",)),
                                  Lvm(self.agent_state / "lvm-system"), self.lio,
                                  RecordStore(self.agent_state / "volumes"), self.lvm.device_node_exists)
        self.servers: list[grpc.Server] = []
        self.channels: dict[str, grpc.Channel] = {}
        self.stubs: dict[str, Any] = {}
        self._marks: dict[str, Any] = {}
        self._agent_seed = None

    # -------------------------------------------------------------------------------- servers

    def start(self) -> None:
        def serve(name: str, add) -> None:
            srv = server.make_server(max_workers=4)
            add(srv)
            server.serve(srv, f"unix://{self.sockets / name}.sock")
            self.servers.append(srv)
            self.channels[name] = grpc.insecure_channel(f"unix:{self.sockets / name}.sock")

        def controller(srv):
            csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(DRIVER, lambda: None), srv)
            csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, srv)

        def node(srv):
            csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(DRIVER, lambda: None), srv)
            csi_pb2_grpc.add_NodeServicer_to_server(self.node, srv)

        serve("controller", controller)
        serve("node", node)
        serve("agent", lambda srv: agent_pb2_grpc.add_AgentServicer_to_server(self.agent, srv))
        self.stubs = {"identity": csi_pb2_grpc.IdentityStub(self.channels["controller"]),
                      "node-identity": csi_pb2_grpc.IdentityStub(self.channels["node"]),
                      "controller": csi_pb2_grpc.ControllerStub(self.channels["controller"]),
                      "node": csi_pb2_grpc.NodeStub(self.channels["node"]),
                      "agent": agent_pb2_grpc.AgentStub(self.channels["agent"])}

    def stop(self) -> None:
        for ch in self.channels.values():
            ch.close()
        for srv in self.servers:
            srv.stop(grace=None).wait()

    # -------------------------------------------------------------------------------- state

    def reset(self) -> None:
        """Every world back to its seeded state."""
        self.run.reset(self.responses)
        self.reset_controller()
        self.reset_node()
        self.reset_agent()
        self.mark()

    def reset_controller(self) -> None:
        self.controller.locks = KeyLocks()
        self.agents.seed()
        # The placement journal as adoption leaves it: every seeded volume and snapshot recorded.
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        journal = FileJournal(self.journal_dir)
        self.controller.placement = Placement(journal, self.agents, CLUSTER)
        self.controller.placement.scan()
        journal.mark_adopted()
        self.agents.poll_once()
        for a in self.agents.all():
            a.calls.clear()

    def reset_node(self) -> None:
        for d in (self.K, self.outside, self.device.parent):
            shutil.rmtree(d, ignore_errors=True)
        for d in (self.node_state, self.K / "pods" / "pod-1" / "volumes", self.K / "plugins" / "kubernetes.io",
                  self.outside / "dir", self.device.parent):
            d.mkdir(parents=True)
        self.device.write_bytes(b"")
        (self.outside / "victim").write_text("not the driver's")
        (self.K / "pods" / "evil-root").symlink_to("/")
        (self.K / "pods" / "evil-dir").symlink_to(self.outside / "dir")
        (self.K / "pods" / "evil-file").symlink_to(self.outside / "victim")
        self.initiator_file.write_text(f"InitiatorName={WORKER}\n")
        self.iscsi.waits.clear()
        self.node.locks = KeyLocks()
        # NODE_BLOCK staged as raw block, as NodeStageVolume records it.
        ref = ids.parse_id(NODE_BLOCK)
        self.node._record_path(NODE_BLOCK).write_text(json.dumps(
            {"volume_id": NODE_BLOCK, "iqn": ref.iqn, "portals": [PORTAL], "lun": 0,
             "staging": self.staging("pvc-staged"), "block": True}))

    def reset_agent(self) -> None:
        """The agent's world (simulated LVM, LIO, records) as seeded: seeded once through the servicer itself
        (not over gRPC: nothing of this is under test), then restored from a copy, which is much cheaper than
        seeding again (every record write fsyncs)."""
        a = self.agent
        a.locks = KeyLocks()
        a.totals = PoolTotals(a)
        a.pool_reports = PoolReports(a.lvm)
        if self._agent_seed is None:
            self.lvm.reset()
            self.lio.reset()
            shutil.rmtree(self.agent_state, ignore_errors=True)
            self.agent_state.mkdir(parents=True)
            a.CreateVolume(apb.CreateVolumeRequest(name="pvc-seed", pool="thin", size_bytes=GiB,
                                                   attributes=ATTRIBUTES), None)
            a.GrantAccess(apb.GrantAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn=WORKER), None)
            a.CreateVolume(apb.CreateVolumeRequest(name="pvc-thick", pool="thick", size_bytes=GiB,
                                                   attributes=dict(ATTRIBUTES, wipe="false")), None)
            a.CreateSnapshot(apb.CreateSnapshotRequest(name="snap-seed", source_vg="vg", source_lv=AGENT_SEED_LV),
                             None)
            a.totals = PoolTotals(a)
            files = {p.relative_to(self.agent_state): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
                     for p in self.agent_state.rglob("*") if p.is_file()}
            self._agent_seed = (copy.deepcopy(self.lvm.lvs), copy.deepcopy(self.lio.targets),
                                dict(self.lio.backstores), files)
            return
        lvs, targets, backstores, files = self._agent_seed
        self.lvm.lvs = copy.deepcopy(lvs)
        self.lio.targets, self.lio.backstores = copy.deepcopy(targets), dict(backstores)
        shutil.rmtree(self.agent_state, ignore_errors=True)
        for rel, (data, mode) in files.items():
            (self.agent_state / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.agent_state / rel).write_bytes(data)
            (self.agent_state / rel).chmod(mode)
        self.agent_state.mkdir(parents=True, exist_ok=True)

    def restore(self, effects: list[str]) -> None:
        """After a call: back to the seeded state, resetting only the worlds that `effects` touched."""
        if effects:
            agent = any(e.startswith(("LIO:", "agent state:", "command: lv", "command: blkdiscard")) for e in effects)
            node = any(e.startswith(("kubelet:", "outside:", "command:")) for e in effects)
            if any(e.startswith("agent ") for e in effects):
                self.reset_controller()
            if node:
                self.reset_node()
            if agent:
                self.reset_agent()
            self.mark()
        else:
            self.mark(trees=False)

    def staging(self, vol: str = "pvc-node") -> str:
        return str(self.K / "plugins" / "kubernetes.io" / "csi" / "pv" / vol / "globalmount")

    def target(self, vol: str = "pvc-node") -> str:
        return str(self.K / "pods" / "pod-1" / "volumes" / "kubernetes.io~csi" / vol / "mount")

    def roots(self) -> dict[str, Path]:
        return {"kubelet": self.K, "agent state": self.agent_state, "outside": self.outside}

    def mark(self, trees: bool = True) -> None:
        """From now on, `effects()` reports what changes. trees=False: the directories are known unchanged."""
        for a in self.agents.all():
            a.calls.clear()
        if trees or not self._marks:
            self._marks = {"trees": {name: _tree(root) for name, root in self.roots().items()},
                           "secrets": self.record_secrets(), "stubs": self.agents.state()}
        self._marks.update(runs=len(self.run.calls), lio=len(self.lio.changes))

    def commands(self) -> list[list[str]]:
        """Every command run since the mark."""
        return self.run.calls[self._marks["runs"]:]

    def effects(self, calls: bool = True) -> list[str]:
        """What changed since the mark. calls=False: the stub agents' state instead of the mutating calls they
        got (a call an agent refuses changes nothing)."""
        if calls:
            out = self.agents.mutating_calls()
        else:
            before, now = self._marks["stubs"], self.agents.state()
            out = [f"agent {n}: state changed" for n in sorted(now) if now[n] != before.get(n)]
        out += ["command: " + " ".join(argv) for argv in self.commands() if not read_only(argv)]
        out += [f"LIO: {c}" for c in self.lio.changes[self._marks["lio"]:]]
        for name, root in self.roots().items():
            before, now = self._marks["trees"][name], _tree(root)
            for rel in sorted(set(before) | set(now)):
                if before.get(rel) != now.get(rel):
                    what = "created" if rel not in before else "removed" if rel not in now else "changed"
                    out.append(f"{name}: {rel} {what}")
        return out

    def record_secrets(self) -> set[str]:
        """The CHAP secrets the agent generated (seeded grants and any made since)."""
        out = set()
        for p in (self.agent_state / "volumes").glob("*/*.json"):
            with contextlib.suppress(ValueError, OSError):
                for g in json.loads(p.read_text()).get("grants", {}).values():
                    out |= {g.get("chap_secret", ""), g.get("mutual_secret", "")}
        return out - {""}

    def secrets(self) -> set[str]:
        return set(SECRETS) | self._marks.get("secrets", set()) | self.record_secrets()

    # -------------------------------------------------------------------------------- calls

    def invoke(self, target: str, method: str, request, timeout: float = 30.0) -> Outcome:
        try:
            if target.startswith("raw-"):
                call = self.channels[target[4:]].unary_unary(method, request_serializer=None,
                                                             response_deserializer=None)
                return Outcome(OK, call(request, timeout=timeout), "")
            rpc = getattr(self.stubs[target], method)
            if method == "ReadData":
                return Outcome(OK, list(rpc(request, timeout=timeout)), "")
            return Outcome(OK, rpc(request, timeout=timeout), "")
        except grpc.RpcError as exc:
            return Outcome(exc.code(), None, exc.details() or "")

    def alive(self) -> None:
        """Every server still answers."""
        assert self.stubs["identity"].GetPluginInfo(csi.GetPluginInfoRequest(), timeout=10).name == DRIVER
        assert self.stubs["node-identity"].Probe(csi.ProbeRequest(), timeout=10).ready.value
        assert self.stubs["agent"].GetInfo(apb.GetInfoRequest(), timeout=10).node_name == "s1"


@contextlib.contextmanager
def running(base: Path) -> Iterator[Harness]:
    """A started harness whose commands all go to its HostileRunner, for the length of the block."""
    sockets = Path(tempfile.mkdtemp(prefix="csi-h-"))   # unix socket paths must stay short
    h = Harness(base.resolve(), sockets)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.subprocess, "run", h.run)
        mp.delenv("LVM_ISCSI_CSI_KILL_AT", raising=False)   # csi/faults.py: never kill the test process
        h.start()
        try:
            h.reset()
            yield h
        finally:
            h.stop()
            shutil.rmtree(sockets, ignore_errors=True)


WAS_REDACT = ("csi/server.py _redact read FieldDescriptor.label, which protobuf 7 no longer has: at DEBUG, "
              "redact() raised AttributeError outside the interceptor's try, so every call whose request or "
              "response holds a nested message answered UNKNOWN, after its side effects")


def debug_logging(caplog) -> None:
    """Every logger at DEBUG: the interceptor's request and response lines are checked for secrets too."""
    caplog.set_level(logging.DEBUG)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with running(tmp_path_factory.mktemp("hostile")) as h:
        yield h


@pytest.fixture
def h(harness):
    harness.reset()
    return harness


# ---------------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    target: str                  # controller | identity | node | node-identity | agent | raw-controller | raw-node
    method: str
    request: Any                 # a message, bytes (raw-*), or a function of the harness returning one
    codes: frozenset
    allow: tuple[str, ...] = ()  # side effects (regexes over Harness.effects()) that are right for this case
    check: Callable[[Harness, Any], None] | None = None
    setup: Callable[[Harness], None] | None = None
    guards: str = ""             # the bug this case found (fixed since): named when the case fails again


def case(id: str, target: str, method: str, request, *codes: grpc.StatusCode, allow=(), check=None, setup=None,
         guards: str = "", bug: str = ""):
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(Case(target, method, request, frozenset(codes), tuple(allow), check, setup, guards), id=id,
                        marks=marks)


def varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def unknown_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def ctx(volume_id: str = NODE_VOL, **over: str) -> dict[str, str]:
    """publish_context as ControllerPublishVolume makes it, with CHAP secrets."""
    out = {"targetIqn": ids.parse_id(volume_id).iqn, "portals": PORTAL, "lun": "0", "chapUser": "u1",
           "chapSecret": CHAP_SECRET, "mutualChapUser": "t1", "mutualChapSecret": MUTUAL_SECRET}
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


def stage(h: Harness, volume_id: str = NODE_VOL, staging: str | None = None, cap=None, context=None, **kw):
    return csi.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=h.staging() if staging is None
                                      else staging, volume_capability=mount_cap() if cap is None else cap,
                                      publish_context=ctx(volume_id) if context is None else context,
                                      secrets=REQUEST_SECRETS, **kw)


def publish(h: Harness, volume_id: str = NODE_VOL, target: str | None = None, staging: str | None = None,
            cap=None, **kw):
    return csi.NodePublishVolumeRequest(volume_id=volume_id, staging_target_path=h.staging() if staging is None
                                        else staging, target_path=h.target() if target is None else target,
                                        volume_capability=mount_cap() if cap is None else cap,
                                        publish_context=ctx(volume_id), secrets=REQUEST_SECRETS, **kw)


def create(name: str = "pvc-new", size: int = GiB, **kw) -> csi.CreateVolumeRequest:
    kw.setdefault("volume_capabilities", [mount_cap()])
    if size is not None:
        kw.setdefault("capacity_range", csi.CapacityRange(required_bytes=size))
    return csi.CreateVolumeRequest(name=name, secrets=REQUEST_SECRETS, **kw)


def cpublish(volume_id: str = FREE, node_id: str = WORKER, cap=None, **kw):
    return csi.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id,
                                              volume_capability=mount_cap() if cap is None else cap,
                                              secrets=REQUEST_SECRETS, **kw)


def expand(volume_id: str = SEED, required: int = 2 * GiB, limit: int = 0):
    return csi.ControllerExpandVolumeRequest(volume_id=volume_id, capacity_range=csi.CapacityRange(
        required_bytes=required, limit_bytes=limit), secrets=REQUEST_SECRETS)


def agent_create(name: str = "pvc-new", pool: str = "thin", size: int = GiB, **kw):
    return apb.CreateVolumeRequest(name=name, pool=pool, size_bytes=size, attributes=ATTRIBUTES, **kw)


def safe_lv_names(h: Harness, out) -> None:
    for a in h.agents.all():
        for lv in a.volumes:
            assert re.fullmatch(r"c1-[A-Za-z0-9_.-]+-[0-9a-f]{10}", lv) and not lv.startswith("-"), lv


def seed_still_exported(h: Harness, out) -> None:
    assert h.lio.is_exported(ids.target_iqn("vg", AGENT_SEED_LV)), "the seeded volume lost its export"


def not_confirmed(h: Harness, out) -> None:
    assert not out.HasField("confirmed") and out.message


def empty_list(h: Harness, out) -> None:
    assert not out.entries and not out.next_token


def no_secret_in_publish_context(h: Harness, out) -> None:
    ctx = dict(out.publish_context)
    assert not [k for k in ctx if "secret" in k.lower()] and CHAP_SECRET not in str(ctx), ctx
    assert ctx[contract.AGENT] == "10.0.0.11:7600" and ctx[contract.STORAGE_NODE] == "s1"


def seed_size_unchanged(h: Harness, out) -> None:
    assert h.agents.get("s1").volumes[SEED_LV].size_bytes == GiB


def ascii_portals(h: Harness, out) -> None:
    portals = [argv[argv.index("-p") + 1] for argv in h.commands() if argv[0] == "iscsiadm" and "-p" in argv]
    assert all(re.fullmatch(r"[0-9a-fA-F.:\[\]]+:[0-9]+", p) for p in portals), portals


def no_snapshot_left_on_s2(h: Harness, out) -> None:
    assert not h.agents.get("s2").snapshots, "a transient snapshot was left behind"


def write_outside_record(h: Harness) -> None:
    (h.agent_state / "escape.json").write_text(json.dumps({"planted": True}))


NAME_129 = "€" * 43   # 129 bytes of UTF-8
# Bugs found in the second round (fixed since); a case that fails again names its bug.
BUG_DIGITS = ("csi/node/service.py _target_of: lun.isdigit() and Portal.parse's port.isdigit() are true for "
              "Unicode digits: lun '²' makes int() raise ValueError -> INTERNAL; a port '３２６０' passes and "
              "the raw text reaches `iscsiadm -p` (check with re.fullmatch('[0-9]+'), pass str(Portal))")
BUG_CHAP = ("csi/node/service.py _target_of never checks the CHAP values of publish_context: a NUL makes "
            "subprocess refuse the argv half-way through the login (INTERNAL), and a newline reaches "
            "`iscsiadm -o update -v`, whose node records are 'name = value' lines (open-iscsi idbm.c), so it "
            "adds a line of its own, e.g. node.startup = automatic")

# The bugs these cases found (fixed since); a case that fails again names its bug.
WAS_NEWLINE = ("csi/ids.py matched IQN_RE, _NODE_RE and _LVM_NAME_RE with re.match and '$', which also matches "
               "before a trailing newline: is_iqn, parse_id and check_lvm_name accepted values ending in '\\n'")
WAS_IQN_CHARS = ("csi/ids.py IQN_RE allowed '_', which RFC 3720 (and rtslib's normalize_wwn) refuse: GrantAccess "
                 "saved a grant with a new CHAP secret, then LIO refused the ACL -> INTERNAL")
WAS_DOTDOT = ("csi/ids.py check_lvm_name accepted '.' and '..', which LVM refuses (-> INTERNAL) and which take "
              "RecordStore paths out of <state>/volumes")
WAS_OTHER_VG = ("csi/storage/service.py _delete, for a VG that is none of the agent's pools, still called "
                "lio.unexport(target, lv); backstores are named by LV name alone, so the volume with that LV name "
                "in the real VG lost its backstore and LUN 0")
WAS_REVOKE = ("csi/storage/service.py RevokeAccess did not check initiator_iqn: rtslib's NodeACL refused the name "
              "with RTSLibError -> INTERNAL")
WAS_MODE = ("csi/capabilities.py check_capability: an access mode outside the enum made mode_name() raise "
            "ValueError while building the error message -> INTERNAL")
WAS_CONTEXT = ("csi/node/service.py NodeStageVolume checked only that publish_context had targetIqn, portals and "
               "lun: int(lun) raised ValueError (INTERNAL); a negative lun, an empty portal list or a portal that "
               "is not ip:port went on to the record, iscsiadm and the wait for the disk")
WAS_SYMLINK = ("csi/node/service.py _path resolved the parent only: a last component that is a symlink to "
               "outside the kubelet directory passed, and mount/umount followed it")
WAS_STATE_DIR = ("csi/node/service.py _path accepted the node plugin's own state directory and its ancestors "
                 "(<kubelet>/plugins): a stage could mount over the records unstage needs")
WAS_NAME_MAX = ("csi/node/service.py _path checked the path's length (4096) but not its components' (255): "
                "NodeStage wrote its record and logged in, then mkdir raised ENAMETOOLONG -> INTERNAL")
WAS_VOLUME_PATH = ("csi/node/service.py NodeGetVolumeStats and NodeExpandVolume did not check volume_path: '/' "
                   "or a relative '../..' path was statted / used")
WAS_NODE_RANGE = "csi/node/service.py NodeExpandVolume did not check capacity_range (negative required_bytes)"
WAS_EXPAND_LIMIT = ("csi/controller/service.py ControllerExpandVolume compared limit_bytes only after the agent "
                    "grew the LV (rounded up to the extent size): OUT_OF_RANGE, with the volume grown past it")
WAS_CLONE_LEAK = ("csi/controller/service.py CreateVolume from a volume on another node left the transient "
                  "snapshot behind when the agent's CreateVolume failed (ALREADY_EXISTS)")
WAS_LIMIT_CODE = ("csi/controller/scheduler.py choose() answered RESOURCE_EXHAUSTED for a limit_bytes below one "
                  "extent, unsatisfiable in every pool, as soon as pools of the other type existed")
WAS_ECHO = ("csi/controller/service.py echoed IDs and tokens of any length into the status message and log line: "
            "a 1 MiB token gave a 1 MiB status, which clients with the default 16 KiB metadata limit receive as "
            "RESOURCE_EXHAUSTED")
WAS_RETRY_SIZE = ("csi/controller/service.py CreateVolume passed `required` rather than the existing size for a "
                  "name that exists: a compatible capacity_range got ALREADY_EXISTS from the agent")

CASES = [
    # ------------------------------------------------------------------ Identity (and the transport)
    case("identity-unknown-field", "raw-controller", "/csi.v1.Identity/GetPluginInfo", unknown_field(99, b"x"),
         OK),
    case("identity-1MiB-unknown-field", "raw-node", "/csi.v1.Identity/GetPluginCapabilities",
         unknown_field(99, b"x" * MiB), OK),
    # gRPC's own status for a request it cannot parse (grpc doc/statuscodes.md: "Error parsing request
    # proto: INTERNAL"); no driver code runs.
    case("identity-undecodable-bytes", "raw-controller", "/csi.v1.Identity/Probe", b"\xff\xff\xff",
         Code.INTERNAL),
    case("identity-unknown-method", "raw-controller", "/csi.v1.Identity/DeleteEverything", b"",
         Code.UNIMPLEMENTED),
    case("identity-method-path-traversal", "raw-node", "/csi.v1.Identity/../Controller/DeleteVolume", b"",
         Code.UNIMPLEMENTED),
    case("controller-rpc-on-node-endpoint", "raw-node", "/csi.v1.Controller/DeleteVolume",
         csi.DeleteVolumeRequest(volume_id=SEED).SerializeToString(), Code.UNIMPLEMENTED),
    case("agent-rpc-on-controller-endpoint", "raw-controller", "/lvmiscsi.agent.v1.Agent/DeleteVolume",
         apb.DeleteVolumeRequest(vg="vg", lv=SEED_LV).SerializeToString(), Code.UNIMPLEMENTED),
    case("controller-get-snapshot-unimplemented", "controller", "GetSnapshot",
         csi.GetSnapshotRequest(snapshot_id=SNAP), Code.UNIMPLEMENTED),

    # ------------------------------------------------------------------ CreateVolume
    case("create-no-name", "controller", "CreateVolume", create(""), INVALID),
    case("create-name-newline", "controller", "CreateVolume", create("pvc\n-x"), INVALID),
    case("create-name-nul", "controller", "CreateVolume", create("pvc\0x"), INVALID),
    case("create-name-ansi-escape", "controller", "CreateVolume", create("pvc\x1b[2J\x1b[31mOWNED"), INVALID),
    case("create-name-bidi-override", "controller", "CreateVolume", create("pvc-\u202egpj.exe"), INVALID),
    case("create-name-129-bytes-unicode", "controller", "CreateVolume", create(NAME_129), INVALID),
    case("create-name-100KiB", "controller", "CreateVolume", create("n" * (100 * KiB)), INVALID),
    case("create-name-5MiB-over-grpc-limit", "controller", "CreateVolume", create("n" * (5 * MiB)), EXHAUSTED),
    case("create-name-sent-as-varint", "raw-controller", "/csi.v1.Controller/CreateVolume", b"\x08\x05", INVALID),
    case("create-name-invalid-utf8", "raw-controller", "/csi.v1.Controller/CreateVolume", b"\x0a\x02\xff\xfe",
         Code.INTERNAL),   # gRPC's own answer to an unparsable request, as above
    case("create-required-bytes-sent-as-string", "raw-controller", "/csi.v1.Controller/CreateVolume",
         create("pvc-x", size=None).SerializeToString() + unknown_field(2, b"\x0a\x03abc"), INVALID),
    case("create-no-capabilities", "controller", "CreateVolume", create(volume_capabilities=[]), INVALID),
    case("create-capability-without-access-type", "controller", "CreateVolume",
         create(volume_capabilities=[csi.VolumeCapability(access_mode=M(mode=M.SINGLE_NODE_WRITER))]), INVALID),
    case("create-access-mode-unknown", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(mode=M.UNKNOWN)]), INVALID),
    case("create-access-mode-outside-enum", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(mode=99)]), INVALID, guards=WAS_MODE),
    case("create-fs-type-option", "controller", "CreateVolume", create(volume_capabilities=[mount_cap(fs="-o")]),
         INVALID),
    case("create-fs-type-path", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(fs="../../bin/sh")]), INVALID),
    case("create-mount-flag-option", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(flags=["--bind"])]), INVALID),
    case("create-mount-flag-space", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(flags=["ro -o remount"])]), INVALID),
    case("create-multi-writer-filesystem", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(mode=M.MULTI_NODE_MULTI_WRITER)]), INVALID),
    case("create-block-and-mount", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(), block_cap()]), INVALID),
    case("create-param-option-key", "controller", "CreateVolume", create(parameters={"--pool": "thin"}), INVALID),
    case("create-param-type-injection", "controller", "CreateVolume",
         create(parameters={"type": "thin; rm -rf /"}), INVALID),
    case("create-param-bool-wrong-type", "controller", "CreateVolume", create(parameters={"mutualChap": "yes"}),
         INVALID),
    case("create-param-wipe-number", "controller", "CreateVolume", create(parameters={"wipe": "1"}), INVALID),
    case("create-param-fstype-option", "controller", "CreateVolume",
         create(parameters={"csi.storage.k8s.io/fstype": "-t"}), INVALID),
    case("create-param-pool-traversal", "controller", "CreateVolume", create(parameters={"pool": "../../vg"}),
         INVALID),
    # mkfsOptions: only known-safe mkfs.xfs options, never a device, a file, -f or a shell word.
    case("create-param-mkfs-shell", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(fs="xfs")], parameters={"mkfsOptions": "-m bigtime=0; reboot"}),
         INVALID),
    case("create-param-mkfs-second-device", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(fs="xfs")], parameters={"mkfsOptions": "-m bigtime=0 /dev/sda"}),
         INVALID),
    case("create-param-mkfs-force", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(fs="xfs")], parameters={"mkfsOptions": "-f -K"}), INVALID),
    case("create-param-mkfs-file", "controller", "CreateVolume",
         create(volume_capabilities=[mount_cap(fs="xfs")], parameters={"mkfsOptions": "-d name=/etc/shadow"}),
         INVALID),
    case("create-param-mkfs-on-ext4", "controller", "CreateVolume",
         create(parameters={"mkfsOptions": "-m bigtime=0"}), INVALID),
    # A pool name of legal characters that no agent has: no pool can hold it (RESOURCE_EXHAUSTED, as the
    # scheduler says today) or a bad parameter (INVALID_ARGUMENT): either is within the spec.
    case("create-param-pool-dash", "controller", "CreateVolume", create(parameters={"pool": "-rf"}), INVALID,
         EXHAUSTED),
    case("create-secret-in-parameters", "controller", "CreateVolume", create(parameters={"chapSecret": PLANTED}),
         INVALID),
    case("create-secret-in-mutable-parameters", "controller", "CreateVolume",
         create(mutable_parameters={"password": PLANTED}, capacity_range=csi.CapacityRange(required_bytes=-1)),
         INVALID),
    case("create-negative-required", "controller", "CreateVolume", create(size=-1), INVALID),
    case("create-negative-limit", "controller", "CreateVolume",
         create(capacity_range=csi.CapacityRange(limit_bytes=-5)), INVALID),
    case("create-required-over-limit", "controller", "CreateVolume",
         create(capacity_range=csi.CapacityRange(required_bytes=2 * GiB, limit_bytes=GiB)), INVALID),
    case("create-empty-capacity-range", "controller", "CreateVolume",
         create(capacity_range=csi.CapacityRange()), INVALID),
    case("create-int64-max", "controller", "CreateVolume", create(size=INT64_MAX), OUT_OF_RANGE, EXHAUSTED),
    case("create-limit-below-one-extent", "controller", "CreateVolume",
         create(capacity_range=csi.CapacityRange(limit_bytes=1)), OUT_OF_RANGE, guards=WAS_LIMIT_CODE),
    case("create-topology-unknown-key", "controller", "CreateVolume", create(accessibility_requirements=
         csi.TopologyRequirement(requisite=[csi.Topology(segments={"kubernetes.io/hostname": "x"})])), INVALID),
    case("create-topology-hostile-zone", "controller", "CreateVolume", create(accessibility_requirements=
         csi.TopologyRequirement(requisite=[csi.Topology(segments={TOPOLOGY_KEY: "../../zone\n"})])), EXHAUSTED),
    case("create-source-snapshot-traversal", "controller", "CreateVolume", create(volume_content_source=
         csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(snapshot_id="s1:s1:vg:../../x"))),
         NOT_FOUND),
    case("create-source-snapshot-empty", "controller", "CreateVolume", create(volume_content_source=
         csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource())), INVALID),
    case("create-source-volume-option", "controller", "CreateVolume", create(volume_content_source=
         csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(volume_id="--all"))), NOT_FOUND),
    case("create-source-snapshot-unknown-node", "controller", "CreateVolume", create(volume_content_source=
         csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(
             snapshot_id="s1:s9:vg:" + ids.lv_name(CLUSTER, "x", "snapshot")))), NOT_FOUND),
    case("create-source-smaller-than-snapshot", "controller", "CreateVolume", create(size=GiB // 2,
         volume_content_source=csi.VolumeContentSource(snapshot=csi.VolumeContentSource.SnapshotSource(
             snapshot_id=SNAP))), OUT_OF_RANGE),
    case("create-name-path-traversal-is-a-name", "controller", "CreateVolume", create("../../etc/passwd"), OK,
         allow=[r"^agent s\d: CreateVolume$"], check=safe_lv_names),
    case("create-name-option-is-a-name", "controller", "CreateVolume", create("-rf --no-preserve-root"), OK,
         allow=[r"^agent s\d: CreateVolume$"], check=safe_lv_names),
    case("create-retry-compatible-smaller-range", "controller", "CreateVolume", create("pvc-seed", size=EXTENT),
         OK, allow=[r"^agent s1: CreateVolume$"], guards=WAS_RETRY_SIZE),
    case("create-existing-name-clone-from-other-node", "controller", "CreateVolume", create("pvc-seed",
         volume_content_source=csi.VolumeContentSource(volume=csi.VolumeContentSource.VolumeSource(
             volume_id=SRC2))), EXISTS, allow=[r"^agent s2: (Create|Delete)Snapshot$", r"^agent s1: CreateVolume$"],
         check=no_snapshot_left_on_s2,
         guards=WAS_CLONE_LEAK),

    # ------------------------------------------------------------------ DeleteVolume
    case("delete-no-id", "controller", "DeleteVolume", csi.DeleteVolumeRequest(secrets=REQUEST_SECRETS), INVALID),
    case("delete-path-traversal", "controller", "DeleteVolume",
         csi.DeleteVolumeRequest(volume_id="../../../etc/passwd"), OK),
    case("delete-lv-option", "controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id="v1:s1:vg:-rf"), OK),
    case("delete-other-cluster", "controller", "DeleteVolume",
         csi.DeleteVolumeRequest(volume_id="v1:s1:vg:c2-" + SEED_LV[3:]), OK),
    case("delete-1MiB-id", "controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id="v1:" + "x" * MiB), OK),
    case("delete-snapshot-id-as-volume", "controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id=SNAP), OK),
    case("delete-trailing-newline", "controller", "DeleteVolume", csi.DeleteVolumeRequest(volume_id=SEED + "\n"),
         OK, guards=WAS_NEWLINE),
    case("delete-unconfigured-node", "controller", "DeleteVolume",
         csi.DeleteVolumeRequest(volume_id="v1:s9:vg:" + SEED_LV), PRECONDITION),

    # ------------------------------------------------------------------ ControllerPublish / Unpublish
    case("publish-no-node", "controller", "ControllerPublishVolume", cpublish(node_id=""), INVALID),
    case("publish-no-capability", "controller", "ControllerPublishVolume",
         csi.ControllerPublishVolumeRequest(volume_id=FREE, node_id=WORKER), INVALID),
    case("publish-node-option", "controller", "ControllerPublishVolume", cpublish(node_id="-o delete"), NOT_FOUND),
    case("publish-node-shell", "controller", "ControllerPublishVolume", cpublish(node_id=WORKER + ";reboot"),
         NOT_FOUND),
    case("publish-node-too-long", "controller", "ControllerPublishVolume",
         cpublish(node_id="iqn.2026-11.dev.x:" + "a" * 210), NOT_FOUND),
    case("publish-node-trailing-newline", "controller", "ControllerPublishVolume", cpublish(node_id=WORKER + "\n"),
         NOT_FOUND, guards=WAS_NEWLINE),
    case("publish-foreign-volume", "controller", "ControllerPublishVolume", cpublish(volume_id="vol-1"),
         NOT_FOUND),
    case("publish-block-capability-on-mount-volume", "controller", "ControllerPublishVolume",
         cpublish(cap=block_cap()), INVALID),
    case("publish-access-mode-outside-enum", "controller", "ControllerPublishVolume",
         cpublish(cap=mount_cap(mode=12345)), INVALID, guards=WAS_MODE),
    case("publish-second-node-single-writer", "controller", "ControllerPublishVolume",
         cpublish(volume_id=SEED, node_id=WORKER2), PRECONDITION),
    case("publish-secret-in-volume-context", "controller", "ControllerPublishVolume",
         cpublish(volume_id=SEED, cap=block_cap(), volume_context={"chapSecret": PLANTED}), INVALID),
    case("publish-repeat-returns-chap-secret-never-logs-it", "controller", "ControllerPublishVolume",
         cpublish(volume_id=SEED), OK, allow=[r"^agent s1: GrantAccess$"], check=no_secret_in_publish_context),
    case("unpublish-no-volume", "controller", "ControllerUnpublishVolume",
         csi.ControllerUnpublishVolumeRequest(node_id=WORKER), INVALID),
    case("unpublish-node-option", "controller", "ControllerUnpublishVolume",
         csi.ControllerUnpublishVolumeRequest(volume_id=SEED, node_id="-o"), OK),
    case("unpublish-volume-traversal", "controller", "ControllerUnpublishVolume",
         csi.ControllerUnpublishVolumeRequest(volume_id="../x", node_id=WORKER), OK),

    # ------------------------------------------------------------------ Validate / List / Capacity / Get
    case("validate-no-id", "controller", "ValidateVolumeCapabilities",
         csi.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()]), INVALID),
    case("validate-no-capabilities", "controller", "ValidateVolumeCapabilities",
         csi.ValidateVolumeCapabilitiesRequest(volume_id=SEED), INVALID),
    case("validate-unknown-volume", "controller", "ValidateVolumeCapabilities",
         csi.ValidateVolumeCapabilitiesRequest(volume_id="v1:s1:vg:c1-nope", volume_capabilities=[mount_cap()]),
         NOT_FOUND),
    case("validate-fs-option-not-confirmed", "controller", "ValidateVolumeCapabilities",
         csi.ValidateVolumeCapabilitiesRequest(volume_id=SEED, volume_capabilities=[mount_cap(fs="-x")]), OK,
         check=not_confirmed),
    case("validate-secret-in-parameters", "controller", "ValidateVolumeCapabilities",
         csi.ValidateVolumeCapabilitiesRequest(volume_id=SEED, volume_capabilities=[mount_cap()],
                                               parameters={"password": PLANTED}, secrets=REQUEST_SECRETS), INVALID),
    case("list-volumes-negative-max", "controller", "ListVolumes", csi.ListVolumesRequest(max_entries=-1), INVALID),
    case("list-volumes-token-traversal", "controller", "ListVolumes",
         csi.ListVolumesRequest(starting_token="../../"), Code.ABORTED),
    case("list-volumes-1MiB-token", "controller", "ListVolumes",
         csi.ListVolumesRequest(starting_token="v1:" + "a" * MiB), Code.ABORTED, guards=WAS_ECHO),
    case("list-volumes-int32-max", "controller", "ListVolumes", csi.ListVolumesRequest(max_entries=(1 << 31) - 1),
         OK),
    case("capacity-type-option", "controller", "GetCapacity", csi.GetCapacityRequest(parameters={"type": "-thin"}),
         INVALID),
    case("capacity-topology-unknown-key", "controller", "GetCapacity", csi.GetCapacityRequest(
        accessible_topology=csi.Topology(segments={"../key": "a"})), INVALID),
    case("capacity-bad-capability", "controller", "GetCapacity",
         csi.GetCapacityRequest(volume_capabilities=[mount_cap(fs="ntfs")]), INVALID),
    case("get-volume-no-id", "controller", "ControllerGetVolume", csi.ControllerGetVolumeRequest(), INVALID),
    case("get-volume-1MiB-id", "controller", "ControllerGetVolume",
         csi.ControllerGetVolumeRequest(volume_id="v1:" + "x" * MiB), NOT_FOUND, guards=WAS_ECHO),
    case("get-volume-nul", "controller", "ControllerGetVolume",
         csi.ControllerGetVolumeRequest(volume_id="v1:s1:vg:c1-\0"), NOT_FOUND),

    # ------------------------------------------------------------------ snapshots
    case("snapshot-no-name", "controller", "CreateSnapshot", csi.CreateSnapshotRequest(source_volume_id=SEED),
         INVALID),
    case("snapshot-name-control-chars", "controller", "CreateSnapshot",
         csi.CreateSnapshotRequest(name="snap\r\nX-Injected: 1", source_volume_id=SEED), INVALID),
    case("snapshot-name-200-bytes", "controller", "CreateSnapshot",
         csi.CreateSnapshotRequest(name="s" * 200, source_volume_id=SEED, secrets=REQUEST_SECRETS), INVALID),
    case("snapshot-no-source", "controller", "CreateSnapshot", csi.CreateSnapshotRequest(name="snap-x"), INVALID),
    case("snapshot-source-traversal", "controller", "CreateSnapshot",
         csi.CreateSnapshotRequest(name="snap-x", source_volume_id="v1:s1:..:.."), NOT_FOUND),
    case("delete-snapshot-no-id", "controller", "DeleteSnapshot", csi.DeleteSnapshotRequest(), INVALID),
    case("delete-snapshot-option", "controller", "DeleteSnapshot",
         csi.DeleteSnapshotRequest(snapshot_id="s1:s1:vg:--all"), OK),
    case("delete-snapshot-with-volume-id", "controller", "DeleteSnapshot", csi.DeleteSnapshotRequest(snapshot_id=SEED),
         OK),
    case("list-snapshots-token-garbage", "controller", "ListSnapshots",
         csi.ListSnapshotsRequest(starting_token="\0\0"), Code.ABORTED),
    case("list-snapshots-id-traversal", "controller", "ListSnapshots",
         csi.ListSnapshotsRequest(snapshot_id="../../etc"), OK, check=empty_list),
    case("list-snapshots-negative-max", "controller", "ListSnapshots", csi.ListSnapshotsRequest(max_entries=-5),
         INVALID),

    # ------------------------------------------------------------------ ControllerExpandVolume
    case("expand-no-range", "controller", "ControllerExpandVolume",
         csi.ControllerExpandVolumeRequest(volume_id=SEED), INVALID),
    case("expand-negative", "controller", "ControllerExpandVolume", expand(required=-GiB), INVALID),
    case("expand-required-over-limit", "controller", "ControllerExpandVolume", expand(required=3 * GiB, limit=GiB),
         INVALID),
    case("expand-unknown-volume", "controller", "ControllerExpandVolume", expand(volume_id="v1:s1:vg:c1-gone"),
         NOT_FOUND, allow=[r"^agent s1: ExpandVolume$"]),   # only the agent knows; it changes nothing
    case("expand-int64-max", "controller", "ControllerExpandVolume", expand(required=INT64_MAX), EXHAUSTED,
         OUT_OF_RANGE, allow=[r"^agent s1: ExpandVolume$"], check=seed_size_unchanged),
    case("expand-shrink", "controller", "ControllerExpandVolume", expand(required=GiB // 2), OUT_OF_RANGE,
         allow=[r"^agent s1: ExpandVolume$"], check=seed_size_unchanged),
    case("expand-limit-below-extent-rounding", "controller", "ControllerExpandVolume",
         expand(required=GiB + 1, limit=GiB + 2), OUT_OF_RANGE, allow=[r"^agent s1: ExpandVolume$"],
         check=seed_size_unchanged, guards=WAS_EXPAND_LIMIT),

    # ------------------------------------------------------------------ NodeStageVolume
    case("stage-no-volume", "node", "NodeStageVolume", lambda h: stage(h, volume_id="", context=ctx()), INVALID),
    case("stage-relative-path", "node", "NodeStageVolume", lambda h: stage(h, staging="globalmount"), INVALID),
    case("stage-dotdot-escape", "node", "NodeStageVolume",
         lambda h: stage(h, staging=str(h.K) + "/plugins/../../../etc"), INVALID),
    case("stage-outside-kubelet", "node", "NodeStageVolume", lambda h: stage(h, staging="/etc"), INVALID),
    case("stage-path-nul", "node", "NodeStageVolume", lambda h: stage(h, staging=h.staging() + "\0/x"), INVALID),
    case("stage-path-5000-chars", "node", "NodeStageVolume",
         lambda h: stage(h, staging=str(h.K) + "/" + "d" * 5000), INVALID),
    case("stage-path-through-symlink", "node", "NodeStageVolume",
         lambda h: stage(h, staging=str(h.K / "pods" / "evil-root" / "etc")), INVALID),
    case("stage-path-is-symlink-out", "node", "NodeStageVolume",
         lambda h: stage(h, staging=str(h.K / "pods" / "evil-dir")), INVALID, guards=WAS_SYMLINK),
    case("stage-over-own-state-dir", "node", "NodeStageVolume", lambda h: stage(h, staging=str(h.K / "plugins")),
         INVALID, guards=WAS_STATE_DIR),
    case("stage-path-component-over-255", "node", "NodeStageVolume",
         lambda h: stage(h, staging=str(h.K / "plugins" / ("d" * 300) / "globalmount")), INVALID, guards=WAS_NAME_MAX),
    case("stage-no-capability", "node", "NodeStageVolume",
         lambda h: csi.NodeStageVolumeRequest(volume_id=NODE_VOL, staging_target_path=h.staging(),
                                              publish_context=ctx()), INVALID),
    case("stage-foreign-volume", "node", "NodeStageVolume", lambda h: stage(h, volume_id="vol-1", context={}),
         NOT_FOUND),
    case("stage-fs-from-context-option", "node", "NodeStageVolume",
         lambda h: stage(h, cap=mount_cap(fs=""), volume_context={"fsType": "-t"}), INVALID),
    case("stage-mount-flag-option", "node", "NodeStageVolume",
         lambda h: stage(h, cap=mount_cap(flags=["-o", "remount"])), INVALID),
    case("stage-mkfs-options-file", "node", "NodeStageVolume",
         lambda h: stage(h, cap=mount_cap(fs="xfs"), volume_context={"mkfsOptions": "-p /etc/shadow"}), INVALID),
    case("stage-mkfs-options-ext4", "node", "NodeStageVolume",
         lambda h: stage(h, volume_context={"mkfsOptions": "-m bigtime=0"}), INVALID),
    case("stage-access-mode-outside-enum", "node", "NodeStageVolume", lambda h: stage(h, cap=mount_cap(mode=-7)),
         INVALID, guards=WAS_MODE),
    case("stage-no-publish-context", "node", "NodeStageVolume", lambda h: stage(h, context={"chapSecret": PLANTED}),
         INVALID),
    case("stage-other-target-iqn", "node", "NodeStageVolume",
         lambda h: stage(h, context=ctx(targetIqn=ids.parse_id(SEED).iqn)), INVALID),
    case("stage-lun-not-a-number", "node", "NodeStageVolume", lambda h: stage(h, context=ctx(lun="zero")), INVALID,
         guards=WAS_CONTEXT),
    case("stage-lun-negative", "node", "NodeStageVolume", lambda h: stage(h, context=ctx(lun="-1")), INVALID,
         guards=WAS_CONTEXT),
    case("stage-portals-empty-list", "node", "NodeStageVolume", lambda h: stage(h, context=ctx(portals=",")),
         INVALID, guards=WAS_CONTEXT),
    case("stage-portal-option", "node", "NodeStageVolume", lambda h: stage(h, context=ctx(portals="--login")),
         INVALID, guards=WAS_CONTEXT),
    case("stage-portal-nul", "node", "NodeStageVolume", lambda h: stage(h, context=ctx(portals="10.0.0.1\0:3260")),
         INVALID, guards=WAS_CONTEXT),
    case("stage-lun-superscript-digit", "node", "NodeStageVolume", lambda h: stage(h, context=ctx(lun="²")),
         INVALID, guards=BUG_DIGITS),
    case("stage-portal-fullwidth-port", "node", "NodeStageVolume",
         lambda h: stage(h, context=ctx(portals="10.0.0.1:３２６０")), INVALID, OK,
         allow=[r"^command: ", r"^kubelet: "], check=ascii_portals, guards=BUG_DIGITS),
    case("stage-chap-secret-nul", "node", "NodeStageVolume",
         lambda h: stage(h, context=ctx(chapSecret=CHAP_SECRET + "\0")), INVALID, guards=BUG_CHAP),
    case("stage-chap-user-newline", "node", "NodeStageVolume",
         lambda h: stage(h, context=ctx(chapUser="u1\nnode.startup = automatic")), INVALID, guards=BUG_CHAP),
    case("stage-multi-writer-filesystem", "node", "NodeStageVolume",
         lambda h: stage(h, cap=mount_cap(mode=M.MULTI_NODE_MULTI_WRITER)), INVALID),

    # ------------------------------------------------------------------ NodeUnstage / Publish / Unpublish
    case("unstage-outside", "node", "NodeUnstageVolume",
         lambda h: csi.NodeUnstageVolumeRequest(volume_id=NODE_VOL, staging_target_path="/var/lib/docker"), INVALID),
    case("unstage-foreign-volume", "node", "NodeUnstageVolume",
         lambda h: csi.NodeUnstageVolumeRequest(volume_id="../../x", staging_target_path=h.staging()), NOT_FOUND),
    case("unstage-no-volume", "node", "NodeUnstageVolume",
         lambda h: csi.NodeUnstageVolumeRequest(staging_target_path=h.staging()), INVALID),
    case("publish-target-outside", "node", "NodePublishVolume", lambda h: publish(h, target="/etc/cron.d"), INVALID),
    case("publish-target-dotdot", "node", "NodePublishVolume",
         lambda h: publish(h, target=str(h.K) + "/pods/../../../../root"), INVALID),
    case("publish-target-kubelet-dir-itself", "node", "NodePublishVolume", lambda h: publish(h, target=str(h.K)),
         INVALID),
    case("publish-no-staging", "node", "NodePublishVolume", lambda h: publish(h, staging=""), INVALID),
    case("publish-not-staged", "node", "NodePublishVolume", lambda h: publish(h), PRECONDITION),
    case("publish-block-target-is-symlink-out", "node", "NodePublishVolume",
         lambda h: publish(h, volume_id=NODE_BLOCK, staging=h.staging("pvc-staged"),
                           target=str(h.K / "pods" / "evil-file"), cap=block_cap()), INVALID, guards=WAS_SYMLINK),
    case("unpublish-target-outside", "node", "NodeUnpublishVolume",
         lambda h: csi.NodeUnpublishVolumeRequest(volume_id=NODE_VOL, target_path=str(h.outside / "victim")),
         INVALID),
    case("unpublish-foreign-volume", "node", "NodeUnpublishVolume",
         lambda h: csi.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=h.target()), NOT_FOUND),
    case("unpublish-target-missing-is-done", "node", "NodeUnpublishVolume",
         lambda h: csi.NodeUnpublishVolumeRequest(volume_id=NODE_VOL, target_path=h.target()), OK),
    case("unpublish-target-is-symlink-to-root", "node", "NodeUnpublishVolume",
         lambda h: csi.NodeUnpublishVolumeRequest(volume_id=NODE_VOL, target_path=str(h.K / "pods" / "evil-root")),
         INVALID, guards=WAS_SYMLINK),

    # ------------------------------------------------------------------ NodeGetVolumeStats / Expand / Info
    case("stats-no-path", "node", "NodeGetVolumeStats", csi.NodeGetVolumeStatsRequest(volume_id=NODE_VOL), INVALID),
    case("stats-foreign-volume", "node", "NodeGetVolumeStats",
         lambda h: csi.NodeGetVolumeStatsRequest(volume_id="x", volume_path=h.target()), NOT_FOUND),
    case("stats-path-missing", "node", "NodeGetVolumeStats",
         lambda h: csi.NodeGetVolumeStatsRequest(volume_id=NODE_VOL, volume_path=h.target()), NOT_FOUND),
    case("stats-root-of-host", "node", "NodeGetVolumeStats",
         csi.NodeGetVolumeStatsRequest(volume_id=NODE_VOL, volume_path="/"), NOT_FOUND, INVALID,
         guards=WAS_VOLUME_PATH),
    case("stats-relative-dotdot", "node", "NodeGetVolumeStats",
         csi.NodeGetVolumeStatsRequest(volume_id=NODE_VOL, volume_path="../" * 40 + "proc"), NOT_FOUND, INVALID,
         guards=WAS_VOLUME_PATH),
    case("node-expand-no-path", "node", "NodeExpandVolume", csi.NodeExpandVolumeRequest(volume_id=NODE_VOL),
         INVALID),
    case("node-expand-not-staged", "node", "NodeExpandVolume",
         lambda h: csi.NodeExpandVolumeRequest(volume_id=NODE_VOL, volume_path=str(h.K / "pods")), NOT_FOUND),
    case("node-expand-root-of-host", "node", "NodeExpandVolume",
         csi.NodeExpandVolumeRequest(volume_id=NODE_BLOCK, volume_path="/"), NOT_FOUND, INVALID,
         guards=WAS_VOLUME_PATH),
    case("node-expand-negative", "node", "NodeExpandVolume",
         lambda h: csi.NodeExpandVolumeRequest(volume_id=NODE_BLOCK, volume_path=str(h.K / "pods"),
                                               capacity_range=csi.CapacityRange(required_bytes=-1)), INVALID,
         guards=WAS_NODE_RANGE),
    case("node-info-unknown-field", "raw-node", "/csi.v1.Node/NodeGetInfo", unknown_field(7, b"-o delete"), OK),

    # ------------------------------------------------------------------ the agent's API
    case("agent-create-no-name", "agent", "CreateVolume", agent_create(""), INVALID),
    case("agent-create-name-newline", "agent", "CreateVolume", agent_create("a\nb"), INVALID),
    case("agent-create-pool-traversal", "agent", "CreateVolume", agent_create(pool="../../thin"), INVALID),
    case("agent-create-no-pool", "agent", "CreateVolume", agent_create(pool=""), INVALID),
    case("agent-create-size-zero", "agent", "CreateVolume", agent_create(size=0), INVALID),
    case("agent-create-size-negative", "agent", "CreateVolume", agent_create(size=-GiB), INVALID),
    case("agent-create-int64-max", "agent", "CreateVolume", agent_create(size=INT64_MAX), EXHAUSTED),
    case("agent-create-source-vg-option", "agent", "CreateVolume",
         agent_create(source=apb.VolumeSource(node="s1", vg="-ff", lv=AGENT_SEED_LV, size_bytes=GiB)), INVALID),
    case("agent-create-source-lv-traversal", "agent", "CreateVolume",
         agent_create(source=apb.VolumeSource(node="s1", vg="vg", lv="../../x", size_bytes=GiB)), INVALID),
    case("agent-create-source-foreign-lv", "agent", "CreateVolume",
         agent_create(source=apb.VolumeSource(node="s1", vg="vg", lv=FOREIGN_LV, size_bytes=GiB)), NOT_FOUND),
    case("agent-create-secret-in-attributes", "agent", "CreateVolume",
         apb.CreateVolumeRequest(name="x", pool="nope", size_bytes=GiB, attributes={"chapSecret": PLANTED}), INVALID),
    case("agent-create-name-option-is-a-name", "agent", "CreateVolume", agent_create("-rf --yes"), OK,
         allow=[r"^command: lvcreate ", r"^LIO: ",
                r"^agent state: volumes/vg/c1-rf_--yes-[0-9a-f]{10}\.json created$"]),
    case("agent-get-name-nul", "agent", "GetVolume", apb.GetVolumeRequest(name="\0"), INVALID),
    case("agent-grant-vg-option", "agent", "GrantAccess",
         apb.GrantAccessRequest(vg="-x", lv=AGENT_SEED_LV, initiator_iqn=WORKER2), INVALID),
    case("agent-grant-initiator-option", "agent", "GrantAccess",
         apb.GrantAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn="-o delete"), INVALID),
    case("agent-grant-unknown-volume", "agent", "GrantAccess",
         apb.GrantAccessRequest(vg="vg", lv="c1-nope", initiator_iqn=WORKER2), NOT_FOUND),
    case("agent-grant-repeat-never-logs-secret", "agent", "GrantAccess",
         apb.GrantAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn=WORKER), OK),
    case("agent-grant-initiator-trailing-newline", "agent", "GrantAccess",
         apb.GrantAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn=WORKER2 + "\n"), INVALID, guards=WAS_NEWLINE),
    case("agent-grant-initiator-underscore", "agent", "GrantAccess",
         apb.GrantAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn="iqn.2026-11.dev.lab:worker_2"), INVALID,
         guards=WAS_IQN_CHARS),
    case("agent-revoke-initiator-traversal", "agent", "RevokeAccess",
         apb.RevokeAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn="../../lun/lun_0"), INVALID,
         guards=WAS_REVOKE),
    case("agent-delete-lv-option", "agent", "DeleteVolume", apb.DeleteVolumeRequest(vg="vg", lv="-rf"), INVALID),
    case("agent-delete-foreign-lv", "agent", "DeleteVolume", apb.DeleteVolumeRequest(vg="vg", lv=FOREIGN_LV), OK),
    case("agent-delete-lv-trailing-newline", "agent", "DeleteVolume",
         apb.DeleteVolumeRequest(vg="vg", lv=AGENT_SEED_LV + "\n"), INVALID, guards=WAS_NEWLINE),
    case("agent-delete-vg-dotdot", "agent", "DeleteVolume", apb.DeleteVolumeRequest(vg="..", lv="escape"), INVALID,
         setup=write_outside_record, guards=WAS_DOTDOT),
    case("agent-delete-other-vg-same-lv", "agent", "DeleteVolume",
         apb.DeleteVolumeRequest(vg="othervg", lv=AGENT_SEED_LV), OK, check=seed_still_exported, guards=WAS_OTHER_VG),
    case("agent-expand-negative", "agent", "ExpandVolume",
         apb.ExpandVolumeRequest(vg="vg", lv=AGENT_SEED_LV, size_bytes=-1), OUT_OF_RANGE, INVALID),
    case("agent-expand-int64-max", "agent", "ExpandVolume",
         apb.ExpandVolumeRequest(vg="vg", lv=AGENT_SEED_LV, size_bytes=INT64_MAX), EXHAUSTED),
    case("agent-snapshot-no-name", "agent", "CreateSnapshot",
         apb.CreateSnapshotRequest(source_vg="vg", source_lv=AGENT_SEED_LV), INVALID),
    case("agent-snapshot-source-vg-option", "agent", "CreateSnapshot",
         apb.CreateSnapshotRequest(name="s", source_vg="--all", source_lv=AGENT_SEED_LV), INVALID),
    case("agent-snapshot-foreign-source", "agent", "CreateSnapshot",
         apb.CreateSnapshotRequest(name="s", source_vg="vg", source_lv=FOREIGN_LV), NOT_FOUND),
    case("agent-snapshot-of-thick", "agent", "CreateSnapshot",
         apb.CreateSnapshotRequest(name="s", source_vg="vg", source_lv=AGENT_THICK_LV), PRECONDITION),
    case("agent-delete-snapshot-given-a-volume", "agent", "DeleteSnapshot",
         apb.DeleteSnapshotRequest(vg="vg", lv=AGENT_SEED_LV), OK),
    case("agent-read-vg-option", "agent", "ReadData", apb.ReadDataRequest(vg="-x", lv=AGENT_SEED_LV), INVALID),
    case("agent-read-foreign-lv", "agent", "ReadData", apb.ReadDataRequest(vg="vg", lv=FOREIGN_LV), NOT_FOUND),
    case("agent-read-thin-pool-itself", "agent", "ReadData", apb.ReadDataRequest(vg="vg", lv="tp"), NOT_FOUND),
    case("agent-read-dotdot", "agent", "ReadData", apb.ReadDataRequest(vg="..", lv=".."), INVALID, guards=WAS_DOTDOT),
]


@pytest.mark.parametrize("c", CASES)
def test_hostile_request(h: Harness, c: Case, caplog):
    debug_logging(caplog)
    if c.setup:
        c.setup(h)
        h.mark()
    request = c.request(h) if callable(c.request) else c.request
    out = h.invoke(c.target, c.method, request)
    again = f" (this bug again? {c.guards})" if c.guards else ""
    assert out.code != Code.UNKNOWN, out.details + again
    assert out.code in c.codes, f"{out.code.name}: {out.details}{again}"
    effects = [e for e in h.effects() if not any(re.search(p, e) for p in c.allow)]
    assert effects == [], f"side effects: {effects}{again}"
    assert option_injections(h.commands()) == []
    leaked = sorted(s for s in h.secrets() if s in caplog.text or s in out.details)
    assert leaked == [], "secrets in the log or the error message"
    if c.check:
        try:
            c.check(h, out.response)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{again}") from None
    h.alive()


def test_catalogue_size_and_coverage():
    cases = [p.values[0] for p in CASES]
    assert len(cases) >= 60
    covered = {(c.target.removeprefix("raw-"), c.method.rsplit("/", 1)[-1]) for c in cases}
    wanted = {("controller", m) for m in ("CreateVolume", "DeleteVolume", "ControllerPublishVolume",
                                          "ControllerUnpublishVolume", "ValidateVolumeCapabilities", "ListVolumes",
                                          "GetCapacity", "ControllerGetVolume", "CreateSnapshot", "DeleteSnapshot",
                                          "ListSnapshots", "ControllerExpandVolume")}
    wanted |= {("node", m) for m in ("NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume",
                                     "NodeUnpublishVolume", "NodeGetVolumeStats", "NodeExpandVolume", "NodeGetInfo")}
    wanted |= {("agent", m) for m in ("CreateVolume", "GrantAccess", "RevokeAccess", "DeleteVolume", "ExpandVolume",
                                      "CreateSnapshot", "DeleteSnapshot", "ReadData")}
    assert wanted <= covered, sorted(wanted - covered)


def test_debug_logging_redacts_and_breaks_no_call(h: Harness, caplog):
    """Guards WAS_REDACT."""
    caplog.set_level(logging.DEBUG)
    calls = [("identity", "Probe", csi.ProbeRequest()),
             ("controller", "CreateVolume", create("pvc-debug")),
             ("controller", "ControllerPublishVolume", cpublish(volume_id=SEED)),
             ("node", "NodeStageVolume", stage(h)),
             ("agent", "GrantAccess", apb.GrantAccessRequest(vg="vg", lv=AGENT_SEED_LV, initiator_iqn=WORKER))]
    for target, method, request in calls:
        out = h.invoke(target, method, request)
        assert out.code == OK, f"{method}: {out.code.name} {out.details}"
    assert 'CreateVolume request: name: "pvc-debug"' in caplog.text
    assert caplog.text.count('value: "***"') >= 3     # the request's secrets, publish_context's CHAP secrets
    assert sorted(s for s in h.secrets() if s in caplog.text) == []
