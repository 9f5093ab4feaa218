"""Property-based fuzzing of request validation (hypothesis), through the real servers of test_hostile.py.

Arbitrary names, IDs, parameter maps, capacity ranges, capabilities, publish contexts and paths (unicode,
control characters, '-' prefixes, '..', symlinks, very long) for CreateVolume, ControllerPublishVolume,
NodeStageVolume, NodePublishVolume and the agent's CreateVolume. For every request:

- an oracle written from the CSI spec and the README (not from the code) says whether the request is
  well-formed: a malformed one gets exactly INVALID_ARGUMENT (NOT_FOUND for an ID this driver cannot have
  made), a well-formed one succeeds or fails with a code the spec allows for that RPC; never UNKNOWN or
  INTERNAL, and every server keeps answering;
- a call that fails changes nothing; one that succeeds changes only what it should, inside its own world;
- no argv element is read by its command as an option that the driver did not put there (user input only
  ever as an option's argument or after "--");
- no secret reaches a log line (DEBUG) or an error message.

HOSTILE_FUZZ_EXAMPLES=<n> runs more examples than the default 200 per property.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from csi import ids
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2 as csi
from tests.unit.test_hostile import (AGENT_SEED_LV, ATTRIBUTES, BLOCK, CHAP_SECRET, CLUSTER, DRIVER, EXTENT,
                                     FOREIGN_LV, FREE, INT64_MAX, MUTUAL_SECRET, NODE_BLOCK, NODE_VOL, PLANTED,
                                     PORTAL, REQUEST_SECRETS, SEED, SEED_LV, SNAP, SRC2, TOPOLOGY_KEY, WORKER,
                                     WORKER2, Code, GiB, Harness, M, debug_logging, option_injections,
                                     running)

EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

OK, INVALID, NOT_FOUND = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND
# What the CSI spec lets each RPC answer to a well-formed request in this harness (no concurrency, no agent
# down, so no ABORTED or UNAVAILABLE).
CREATE_CODES = {OK, NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE}
PUBLISH_CODES = {OK, NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION, INVALID}
NODE_PUBLISH_CODES = {OK, Code.FAILED_PRECONDITION}
AGENT_CREATE_CODES = {OK, NOT_FOUND, Code.ALREADY_EXISTS, Code.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with running(tmp_path_factory.mktemp("fuzz")) as h:
        yield h


@pytest.fixture
def h(harness, caplog):
    harness.reset()
    debug_logging(caplog)
    yield harness
    harness.alive()   # after hundreds of hostile calls, every server still answers


# ---------------------------------------------------------------------------------------------- strategies

# Protobuf strings are UTF-8: every code point but the surrogates.
def text(max_size: int = 30):
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=max_size)


HOSTILE = ["", "-", "--", "-rf", "--help", "-o delete", "--login", "..", "../..", "../../etc/passwd", "/", "/etc",
           "\0", "\n", "a\nb", "x\n", "\r\n", "\x1b[31m", "\u202e", "\u200b", "é", "€", "日本", "🙂", " ", "\t",
           "a/b", "a,b", "a=b", "$(reboot)", "`id`", ";reboot", "'", '"', "%s%n", "{}", "\\", "*", "?", ":",
           "iqn.", "v1:", "s1:", WORKER]
hostile = st.one_of(st.sampled_from(HOSTILE), text(),
                    st.tuples(st.sampled_from(HOSTILE), text(12), st.sampled_from(HOSTILE)).map("".join),
                    st.integers(100, 5000).map(lambda n: "x" * n),
                    st.integers(16 << 10, 64 << 10).map(lambda n: "y" * n))   # over gRPC's 16 KiB metadata limit

def mostly(valid, other, odds: int = 3):
    """`valid` `odds` times out of odds + 1: each hostile variant of a field then meets a request whose other
    fields are well-formed, so it is the one the driver has to deal with."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: valid if ok else other)


# Legal, yet hostile-looking: option-like, path-like, unicode. A name or path made of these must work.
PRINTABLE = st.characters(whitelist_categories=("L", "M", "N", "P", "S"), whitelist_characters=" ")
LEGAL_NAMES = st.one_of(st.sampled_from(["pvc-3f1c9a0e-8d7b-4c52-9a41-0f6e2b7d1c55", "-rf --yes", "--help",
                                         "../../etc/passwd", "$(reboot)", "a,b=c", "日本語のボリューム", "🙂",
                                         "pvc-seed", "pvc-free", "x" * 128]),
                        st.text(PRINTABLE, min_size=1, max_size=40))
NAMES = mostly(LEGAL_NAMES, st.one_of(hostile, st.integers(120, 140).map(lambda n: "é" * (n // 2))))

MODES = st.one_of(st.sampled_from(sorted(M.Mode.values())), st.integers(-(1 << 31), (1 << 31) - 1))
FS_TYPES = st.one_of(st.sampled_from(["", "ext4", "xfs", "ext3", "EXT4", "ext4 ", "-t", "../xfs"]), hostile)
MOUNT_FLAGS = st.lists(st.one_of(st.sampled_from(["ro", "noatime", "discard", "nosuid,nodev", "-o", "--bind",
                                                  "a b", "x\0", "", "y" * 257]), hostile), max_size=3)
LEGAL_FLAGS = st.lists(st.sampled_from(["noatime", "discard", "nosuid,nodev", "errors=remount-ro", "x-é=1"]),
                       max_size=2)
SINGLE_NODE_MODES = [M.SINGLE_NODE_WRITER, M.SINGLE_NODE_READER_ONLY, M.SINGLE_NODE_SINGLE_WRITER,
                     M.SINGLE_NODE_MULTI_WRITER]
MOUNT_MODES = st.sampled_from(SINGLE_NODE_MODES + [M.MULTI_NODE_READER_ONLY])
BLOCK_MODES = st.sampled_from(SINGLE_NODE_MODES + [M.MULTI_NODE_READER_ONLY, M.MULTI_NODE_MULTI_WRITER])


@st.composite
def any_capability(draw) -> csi.VolumeCapability:
    cap = csi.VolumeCapability(access_mode=M(mode=draw(MODES)))
    kind = draw(st.sampled_from(["mount", "mount", "block", "none"]))
    if kind == "mount":
        cap.mount.SetInParent()
        cap.mount.fs_type = draw(FS_TYPES)
        cap.mount.mount_flags.extend(draw(MOUNT_FLAGS))
    elif kind == "block":
        cap.block.SetInParent()
    return cap


@st.composite
def legal_capabilities(draw) -> list[csi.VolumeCapability]:
    """1 or 2 capabilities that agree with each other (block or mount, one filesystem)."""
    block, fs = draw(st.booleans()), draw(st.sampled_from(["", "ext4", "xfs"]))
    out = []
    for _ in range(draw(st.integers(1, 2))):
        if block:
            out.append(csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                                            access_mode=M(mode=draw(BLOCK_MODES))))
        else:
            out.append(csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(
                fs_type=fs, mount_flags=draw(LEGAL_FLAGS)), access_mode=M(mode=draw(MOUNT_MODES))))
    return out


CAPABILITIES = mostly(legal_capabilities(), st.lists(any_capability(), max_size=3))
CAPABILITY = mostly(legal_capabilities().map(lambda caps: caps[0]), st.one_of(st.none(), any_capability()))

SIZES = st.one_of(st.sampled_from([0, 1, -1, EXTENT - 1, EXTENT, GiB, GiB + 1, 20 * GiB, 60 * GiB, 1 << 62, INT64_MAX,
                                   -INT64_MAX - 1]), st.integers(-(1 << 63), INT64_MAX))
LEGAL_CAPACITY = st.one_of(
    st.none(),
    st.builds(lambda r, extra, limited: csi.CapacityRange(required_bytes=r, limit_bytes=r + extra if limited else 0),
              st.integers(1, 60 * GiB), st.integers(0, 4 * GiB), st.booleans()),
    st.builds(lambda limit: csi.CapacityRange(limit_bytes=limit), st.integers(1, 60 * GiB)))
CAPACITY = mostly(LEGAL_CAPACITY, st.builds(lambda r, l: csi.CapacityRange(required_bytes=r, limit_bytes=l), SIZES,
                                            SIZES))

PARAM_KEYS = st.one_of(st.sampled_from(["pool", "type", "fsType", "csi.storage.k8s.io/fstype", "mutualChap", "wipe",
                                        "csi.storage.k8s.io/pvc/name", "--pool", "Pool", "type ", "mutualchap"]),
                       hostile)
PARAM_VALUES = st.one_of(st.sampled_from(["thin", "thick", "ext4", "xfs", "true", "false", "TRUE", "False", "", "yes",
                                          "1", "-rf", "../../vg", "pool-a", "thin.1", "пул"]), hostile)
LEGAL_PARAMS = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["thin", "thick", ""]), "pool": st.sampled_from(["thin", "thick", "nope", "-rf", "p.1"]),
    "fsType": st.sampled_from(["ext4", "xfs", ""]), "mutualChap": st.sampled_from(["true", "false", "TRUE", ""]),
    "wipe": st.sampled_from(["true", "false"]),
    # The provisioner's own keys: accepted and ignored, whatever they hold.
    "csi.storage.k8s.io/pvc/name": hostile, "csi.storage.k8s.io/pvc/namespace": hostile})


@st.composite
def parameters(draw) -> dict[str, str]:
    params = draw(mostly(LEGAL_PARAMS, st.dictionaries(PARAM_KEYS, PARAM_VALUES, max_size=4)))
    if draw(st.integers(0, 3)) == 0:
        params[draw(st.sampled_from(["chapSecret", "password"]))] = PLANTED   # a secret where none belongs
    return params


TOPOLOGY_KEYS = st.one_of(st.sampled_from(["topology.kubernetes.io/zone", "../key", ""]), hostile)
ZONES = st.one_of(st.sampled_from(["zone-a", "zone-b", "zone-b", "", "../../zone", "zone-a\n"]), hostile)
TOPOLOGY = mostly(st.builds(lambda z: csi.Topology(segments={TOPOLOGY_KEY: z}), ZONES),
                  st.builds(lambda segments: csi.Topology(segments=segments),
                            st.dictionaries(TOPOLOGY_KEYS, ZONES, max_size=2)))
REQUIREMENT = st.one_of(st.none(), st.none(), st.builds(lambda r, p: csi.TopologyRequirement(requisite=r, preferred=p),
                                                        st.lists(TOPOLOGY, max_size=2), st.lists(TOPOLOGY, max_size=2)))

LEGAL_IDS = st.builds(lambda node, vg, lv: f"v1:{node}:{vg}:{lv}", st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,8}[a-z0-9])?",
                                                                                  fullmatch=True),
                      st.from_regex(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,12}", fullmatch=True),
                      st.from_regex(r"c1-[A-Za-z0-9+_.-]{1,20}", fullmatch=True))
VOLUME_IDS = mostly(
    st.one_of(st.sampled_from([SEED, FREE, BLOCK, SRC2, NODE_VOL, NODE_BLOCK]), LEGAL_IDS),
    st.one_of(st.sampled_from([SNAP, "", "vol-1", "v1:s9:vg:" + SEED_LV, "v1:s1:vg:-rf", "v1:s1:..:..", SEED.upper(),
                               "v1:s1:vg:c2-x", "v1:s1:vg:c1-" + "a" * 130]),
              hostile,
              st.tuples(st.sampled_from([SEED, FREE, "v1:s1:vg:c1-", "v1:", "v1:s1:vg:", "s1:s1:vg:"]),
                        text(20)).map("".join)))
SNAPSHOT_IDS = st.one_of(st.sampled_from([SNAP, SNAP, "", "s1:s9:vg:c1-x", SEED, "s1:s1:vg:--all"]), hostile,
                         st.tuples(st.sampled_from([SNAP, "s1:s1:vg:c1-"]), text(20)).map("".join))
SOURCES = st.one_of(st.none(), st.none(), st.none(), st.builds(lambda i: ("snapshot", i), SNAPSHOT_IDS),
                    st.builds(lambda i: ("volume", i), VOLUME_IDS), st.just(("neither", "")))

LEGAL_IQNS = st.builds(lambda y, m, dom, suffix: f"iqn.{y}-{m}.{dom}{suffix}",
                       st.from_regex(r"[0-9]{4}", fullmatch=True), st.from_regex(r"[0-9]{2}", fullmatch=True),
                       st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True),
                       st.one_of(st.just(""), st.from_regex(r":[a-z0-9.:-]{1,40}", fullmatch=True)))
IQN_LIKE = st.builds(lambda y, m, dom, suffix: f"iqn.{y}-{m}.{dom}{suffix}",
                     st.sampled_from(["2026", "0000", "99999", "x"]), st.sampled_from(["11", "1", "00"]),
                     st.sampled_from(["dev.csi", "lab", "-x", "a_b", "ÉX", "", "a..b"]),
                     st.sampled_from(["", ":worker-1", ":w_1", ":w\n", ":" + "a" * 201, ":a b", ":a:b.c-d", ":-o"]))
NODE_IDS = mostly(st.one_of(st.sampled_from([WORKER, WORKER2, WORKER2, WORKER.upper()]), LEGAL_IQNS),
                  st.one_of(st.sampled_from(["", "-o", "iqn.2026-11.x", "iqn.2026-11.x:\u212a"]), IQN_LIKE, hostile))

# Paths, with "@K" standing for the kubelet directory (known only once the harness runs).
LEGAL_SEGMENTS = st.one_of(st.sampled_from(["-rf", "--bind", "a b", "x\n", "é", "~", "*", "pvc-1", "globalmount",
                                            "$(reboot)"]),
                           st.text(PRINTABLE, min_size=1, max_size=20).filter(lambda t: "/" not in t and
                                                                              t not in (".", "..")))
LEGAL_STAGING = st.builds(lambda seg: f"@K/plugins/kubernetes.io/csi/pv/{seg}/globalmount", LEGAL_SEGMENTS)
LEGAL_TARGETS = st.builds(lambda seg: f"@K/pods/pod-1/volumes/kubernetes.io~csi/{seg}/mount", LEGAL_SEGMENTS)
SEGMENTS = st.one_of(st.sampled_from(["pods", "pod-1", "volumes", "plugins", "kubernetes.io", "csi", "pv",
                                      "globalmount", "mount", "..", ".", "", "evil-root", "evil-dir", "evil-file",
                                      "-rf", "--bind", "a b", "x\n", "é", "\0", "~", "*", DRIVER, "staged"]),
                     text(12))
HOSTILE_PATHS = st.one_of(
    st.lists(SEGMENTS, max_size=6).map(lambda segs: "/".join(["@K"] + segs)),
    st.lists(SEGMENTS, max_size=6).map(lambda segs: "/".join(["@K", "pods", "pod-1", "volumes"] + segs)),
    st.sampled_from(["", "/", "/etc", "/proc/self/root", "relative/path", "..", "@K", "@K/", "@K/../..",
                     "@K/pods/../../etc", "@K/pods/evil-root/..", "-o", "--bind"]),
    st.lists(SEGMENTS, min_size=1, max_size=4).map("/".join),
    st.integers(4000, 5000).map(lambda n: "@K/" + "d" * n),
    hostile)
STAGING_PATHS = mostly(LEGAL_STAGING, HOSTILE_PATHS)
TARGET_PATHS = mostly(LEGAL_TARGETS, HOSTILE_PATHS)


def render(path: str, h: Harness) -> str:
    return path.replace("@K", str(h.K))


# ---------------------------------------------------------------------------------------------- the oracle

IQN = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[a-z0-9.:-]{1,200})?")   # RFC 3720 3.2.6.3.1
LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")
NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?")


def is_iqn(value: str) -> bool:
    # iSCSI names compare case-insensitively (RFC 3720 3.2.6.1): any case is the same node, ASCII only
    return value.isascii() and bool(IQN.fullmatch(value.lower())) and len(value) <= 223


def lvm_name(value: str) -> bool:
    return bool(LVM_NAME.fullmatch(value)) and value not in (".", "..") and \
        not value.startswith(("snapshot", "pvmove", "_"))


def volume_ref(value: str, kind: str = "volume") -> ids.LvRef | None:
    """The (node, vg, lv) an ID names, when it is one this driver can have made ("v1:<node>:<vg>:<lv>")."""
    parts = value.split(":")
    if len(value) > 128 or len(parts) != 4 or parts[0] != ("s1" if kind == "snapshot" else "v1"):
        return None
    _, node, vg, lv = parts
    if not NODE_NAME.fullmatch(node) or not all(LVM_NAME.fullmatch(p) and p not in (".", "..") for p in (vg, lv)):
        return None
    return ids.LvRef(node, vg, lv, kind)


def name_problem(name: str) -> str | None:
    if not name:
        return "no name"
    if len(name.encode()) > 128:
        return "name over 128 bytes"
    if not name.isprintable():
        return "name with control characters"
    return None


def params_problem(params: dict[str, str]) -> str | None:
    known = {"pool", "type", "fsType", "mutualChap", "wipe"}
    if any(k not in known and not k.startswith("csi.storage.k8s.io/") for k in params):
        return "unknown parameter"
    if params.get("type", "") not in ("", "thin", "thick"):
        return "type"
    fs = params.get("fsType") or params.get("csi.storage.k8s.io/fstype") or ""
    if fs not in ("", "ext4", "xfs"):
        return "fsType"
    if not all(c.isalnum() or c in "-_." for c in params.get("pool", "")):
        return "pool"
    if any(params.get(k, "").lower() not in ("", "true", "false") for k in ("mutualChap", "wipe")):
        return "boolean"
    return None


def capability_problem(cap: csi.VolumeCapability, default_fs: str) -> str | None:
    kind = cap.WhichOneof("access_type")
    supported = {M.SINGLE_NODE_WRITER, M.SINGLE_NODE_READER_ONLY, M.SINGLE_NODE_SINGLE_WRITER,
                 M.SINGLE_NODE_MULTI_WRITER, M.MULTI_NODE_READER_ONLY, M.MULTI_NODE_MULTI_WRITER}
    if kind is None:
        return "no access type"
    if cap.access_mode.mode not in supported:
        return "access mode"
    if kind == "mount":
        if (cap.mount.fs_type or default_fs) not in ("ext4", "xfs"):
            return "filesystem"
        if cap.access_mode.mode == M.MULTI_NODE_MULTI_WRITER:
            return "multi-node writer on a filesystem"
        for flag in cap.mount.mount_flags:
            if not flag or flag.startswith("-") or any(c in flag for c in "\0\n ") or len(flag) > 256:
                return "mount flag"
    return None


def capabilities_problem(capabilities, default_fs: str) -> str | None:
    if not capabilities:
        return "no capabilities"
    for cap in capabilities:
        problem = capability_problem(cap, default_fs)
        if problem:
            return problem
    if len({c.WhichOneof("access_type") for c in capabilities}) > 1:
        return "block and mount"
    if len({c.mount.fs_type or default_fs for c in capabilities if c.HasField("mount")}) > 1:
        return "two filesystems"
    return None


def path_problem(h: Harness, value: str) -> str | None:
    """A path the node may act on: absolute, a path Linux can hold, and (resolved, symlinks included) inside
    the kubelet directory."""
    if not value:
        return "no path"
    if "\0" in value or not value.startswith("/") or len(value) > 4096:
        return "not an absolute path"
    if any(len(part.encode()) > 255 for part in value.split("/")):
        return "a component longer than NAME_MAX"
    if h.K not in Path(os.path.realpath(os.path.normpath(value))).parents:
        return "outside the kubelet directory"
    return None


# ---------------------------------------------------------------------------------------------- the properties

class Example(contextlib.AbstractContextManager):
    """One hypothesis example: the call, what every call must satisfy whatever its input, and afterwards the
    harness back to its seeded state."""

    def __init__(self, h: Harness, caplog):
        self.h, self.caplog, self.effects = h, caplog, None

    def call(self, target: str, method: str, request):
        self.caplog.clear()
        out = self.h.invoke(target, method, request)
        self.effects = self.h.effects()
        event(f"{method}: {out.code.name}")
        assert out.code not in (Code.UNKNOWN, Code.INTERNAL), f"{out.code.name}: {out.details}"
        assert option_injections(self.h.commands()) == []
        assert self.h.run.refused == []
        leaked = sorted(s for s in self.h.secrets() if s in self.caplog.text or s in out.details)
        assert leaked == [], "secrets in the log or the error message"
        if out.code != OK:
            changes = self.h.effects(calls=False)
            assert changes == [], f"{out.code.name}, yet: {changes} (calls: {self.effects})"
        return out

    def __exit__(self, *exc):
        self.h.restore(self.h.effects() if self.effects is None else self.effects)


def expect(out, problem: str | None, code, allowed) -> None:
    if problem:
        assert out.code == code, f"{problem}: expected {code.name}, got {out.code.name} {out.details}"
    else:
        assert out.code in allowed, f"well-formed request: {out.code.name} {out.details}"


def inside_kubelet(h: Harness, path: str) -> bool:
    return os.path.realpath(path) == path and h.K in Path(path).parents


@FUZZ
@given(name=NAMES, capacity=CAPACITY, capabilities=CAPABILITIES, params=parameters(),
       source=SOURCES,
       requirement=REQUIREMENT, mutable=st.one_of(st.none(), st.just({"password": PLANTED})))
def test_create_volume(h, caplog, name, capacity, capabilities, params, source, requirement, mutable):
    req = csi.CreateVolumeRequest(name=name, volume_capabilities=capabilities, parameters=params,
                                  secrets=REQUEST_SECRETS, capacity_range=capacity,
                                  accessibility_requirements=requirement, mutable_parameters=mutable)
    if source is not None:
        kind, sid = source
        req.volume_content_source.SetInParent()
        if kind == "snapshot":
            req.volume_content_source.snapshot.snapshot_id = sid
        elif kind == "volume":
            req.volume_content_source.volume.volume_id = sid
    problem = name_problem(name) or params_problem(params) or \
        capabilities_problem(capabilities, params.get("fsType") or params.get("csi.storage.k8s.io/fstype") or "ext4")
    if not problem and capacity is not None:
        r, l = capacity.required_bytes, capacity.limit_bytes
        problem = "negative size" if r < 0 or l < 0 else "empty range" if r == l == 0 else \
            "required over limit" if l and r > l else None
    if not problem and requirement is not None:
        if any(set(t.segments) - {TOPOLOGY_KEY} for t in [*requirement.requisite, *requirement.preferred]):
            problem = "unknown topology key"
    if not problem and source is not None:
        problem = "source without an ID" if not source[1] else None

    with Example(h, caplog) as ex:
        out = ex.call("controller", "CreateVolume", req)
        expect(out, problem, INVALID, CREATE_CODES)
        effects = ex.effects
        if out.code == OK:
            vol = out.response.volume
            ref = volume_ref(vol.volume_id)
            assert ref is not None and ref.lv == ids.lv_name(CLUSTER, name), vol.volume_id
            assert re.fullmatch(r"c1-[A-Za-z0-9_.-]+-[0-9a-f]{10}", ref.lv), ref.lv
            if capacity is not None:
                assert vol.capacity_bytes >= capacity.required_bytes
                assert not capacity.limit_bytes or vol.capacity_bytes <= capacity.limit_bytes
            creates = [e for e in effects if e.endswith(": CreateVolume")]
            assert len(creates) == 1 and creates[0] == f"agent {ref.node}: CreateVolume", effects
            assert all(re.fullmatch(r"agent s\d: (CreateVolume|CreateSnapshot|DeleteSnapshot)", e) for e in effects)
            assert all(not a.snapshots.keys() - {ids.parse_id(SNAP, "snapshot").lv} for a in h.agents.all()), \
                "a transient snapshot was left behind"


@FUZZ
@given(volume_id=VOLUME_IDS, node_id=NODE_IDS, cap=CAPABILITY, readonly=st.booleans(),
       context=st.one_of(st.just({}), st.just({"chapSecret": PLANTED}), st.dictionaries(hostile, hostile,
                                                                                          max_size=2)))
def test_controller_publish(h, caplog, volume_id, node_id, cap, readonly, context):
    req = csi.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id, volume_capability=cap,
                                             readonly=readonly, secrets=REQUEST_SECRETS, volume_context=context)
    problem = "no volume_id" if not volume_id else "no node_id" if not node_id else \
        "no capability" if cap is None else capability_problem(cap, "ext4")
    ref = volume_ref(volume_id)
    with Example(h, caplog) as ex:
        out = ex.call("controller", "ControllerPublishVolume", req)
        if not problem and (ref is None or not ref.lv.startswith(CLUSTER + "-") or not is_iqn(node_id)):
            assert out.code == NOT_FOUND, f"{out.code.name} {out.details}"
        expect(out, problem, INVALID, PUBLISH_CODES)
        effects = ex.effects
        if out.code == OK:
            ctx = out.response.publish_context
            assert ctx["targetIqn"] == ref.iqn and not [k for k in ctx if "secret" in k.lower()]
            assert CHAP_SECRET not in str(ctx) and MUTUAL_SECRET not in str(ctx)
            assert effects == [f"agent {ref.node}: GrantAccess"], effects
            assert node_id.lower() in [i.iqn for i in h.agents.get(ref.node).volumes[ref.lv].initiators]


CONTEXT_PORTALS = mostly(
    st.sampled_from([PORTAL, "10.0.0.1:3260,10.0.0.2:3260", "[fd00::1]:3260", "10.0.0.1:3260,"]),
    st.one_of(st.sampled_from(["", None, ",", "--login", "-p", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536",
                               "host.example:3260", "10.0.0.1:3260 -o new", "10.0.0.1\0:3260", "[::1]:3260,-p",
                               "010.0.0.1:3260", "1.2.3.4:３２６０", "1.2.3.4:²"]), hostile))
CONTEXT_LUNS = mostly(st.sampled_from(["0", "1", "255", "16383", "00"]),
                      st.one_of(st.sampled_from(["", None, "-1", "16384", "zero", " 1", "+1", "0x1", "1e3", "²", "١",
                                                 "99999999999999999999"]), hostile))
CHAP_USERS = mostly(st.sampled_from(["u1", "-o", "--login", "$(reboot)", "a=b", "x" * 255]), hostile)
# Secret values stay variants of the known ones, so that a leak of any of them is seen.
CHAP_SECRETS = st.sampled_from([CHAP_SECRET, "-" + CHAP_SECRET, "--" + CHAP_SECRET, CHAP_SECRET + "\0",
                                CHAP_SECRET + "\nnode.startup = automatic"])


@st.composite
def chap(draw) -> dict[str, str]:
    kind = draw(st.sampled_from(["none", "chap", "mutual", "empty"]))
    if kind == "none":
        return {}
    if kind == "empty":
        return {"chapUser": "", "chapSecret": ""}
    out = {"chapUser": draw(CHAP_USERS), "chapSecret": draw(CHAP_SECRETS)}
    if kind == "mutual":
        out.update(mutualChapUser=draw(CHAP_USERS), mutualChapSecret=draw(CHAP_SECRETS).replace("Chap", "Mutual"))
    return out


def portal_problem(portal: str) -> str | None:
    host, _, port = portal.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "portal host"
    return None if re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536 else "portal port"


def context_problem(ctx: dict[str, str], ref: ids.LvRef) -> str | None:
    """publish_context as the controller makes it: this volume's target, ip:port portals, a LUN number, CHAP
    values of printable ASCII."""
    if not all(ctx.get(k) for k in ("targetIqn", "portals", "lun")):
        return "publish_context incomplete"
    if ctx["targetIqn"] != ref.iqn:
        return "another target"
    if not re.fullmatch(r"[0-9]+", ctx["lun"]) or int(ctx["lun"]) > 16383:
        return "lun"
    portals = [p for p in ctx["portals"].split(",") if p]
    if not portals:
        return "no portal"
    chap = [ctx.get(k, "") for k in ("chapUser", "chapSecret", "mutualChapUser", "mutualChapSecret")]
    if any(v and not re.fullmatch(r"[!-~]{1,255}", v) for v in chap):
        return "CHAP value"   # a newline would add a line to iscsiadm's node record
    if not ctx.get("agent") and not (chap[0] or chap[1]):
        return "no credentials and no agent to ask for them"   # CHAP is always on
    return next(filter(None, map(portal_problem, portals)), None)


@FUZZ
@given(data=st.data(), volume_id=VOLUME_IDS, staging=STAGING_PATHS, cap=CAPABILITY,
       context_fs=st.one_of(st.none(), st.none(), FS_TYPES))
def test_node_stage(h, caplog, data, volume_id, staging, cap, context_fs):
    staging = render(staging, h)
    ref = volume_ref(volume_id)
    ctx = {"targetIqn": data.draw(st.sampled_from([ref.iqn if ref else "", ref.iqn if ref else "",
                                                   ids.parse_id(SEED).iqn, "", None, "-T"])),
           "portals": data.draw(CONTEXT_PORTALS), "lun": data.draw(CONTEXT_LUNS), **data.draw(chap())}
    ctx = {k: v for k, v in ctx.items() if v is not None}
    req = csi.NodeStageVolumeRequest(volume_id=volume_id, staging_target_path=staging, volume_capability=cap,
                                     publish_context=ctx, secrets=REQUEST_SECRETS,
                                     volume_context={} if context_fs is None else {"fsType": context_fs})
    default_fs = context_fs or "ext4"
    problem = ("no volume_id" if not volume_id else path_problem(h, staging) or
               ("no capability" if cap is None else None))
    not_found = not problem and ref is None
    if not problem and not not_found:
        problem = capability_problem(cap, default_fs) or context_problem(ctx, ref)
    with Example(h, caplog) as ex:
        out = ex.call("node", "NodeStageVolume", req)
        if not_found:
            assert out.code == NOT_FOUND, f"{out.code.name} {out.details}"
        else:
            expect(out, problem, INVALID, {OK})
        effects = ex.effects
        if out.code == OK:
            real = os.path.realpath(os.path.normpath(staging))
            record = str(h.node._record_path(volume_id).relative_to(h.K))
            ledger = h.node.ledger.directory.relative_to(h.K)
            ours = {record, str(ledger), str(ledger / ref.iqn)}   # the stage record, the login ledger's entry
            for e in effects:
                if e.startswith("kubelet: "):
                    rel = e.removeprefix("kubelet: ").rsplit(" ", 1)[0]
                    assert rel in ours or real == str(h.K / rel) or real.startswith(str(h.K / rel) + "/"), e
                else:
                    assert e.startswith("command: "), e
            mounts = [c for c in h.commands() if c[0] == "mount"]
            assert all(c[-1] == real and inside_kubelet(h, c[-1]) for c in mounts), mounts
            assert bool(mounts) == cap.HasField("mount")
            portals = {p for p in ctx["portals"].split(",") if p}
            for c in h.commands():
                if c[0] == "iscsiadm" and "-p" in c:
                    assert c[c.index("-T") + 1] == ref.iqn and c[c.index("-p") + 1] in portals, c


@FUZZ
@given(volume_id=st.one_of(st.just(NODE_BLOCK), VOLUME_IDS), staging=STAGING_PATHS, target=TARGET_PATHS,
       cap=CAPABILITY, readonly=st.booleans(), context_fs=st.one_of(st.none(), st.none(), FS_TYPES))
def test_node_publish(h, caplog, volume_id, staging, target, cap, readonly, context_fs):
    staging, target = render(staging, h), render(target, h)
    req = csi.NodePublishVolumeRequest(volume_id=volume_id, staging_target_path=staging, target_path=target,
                                       volume_capability=cap, readonly=readonly, secrets=REQUEST_SECRETS,
                                       publish_context={"chapSecret": CHAP_SECRET},
                                       volume_context={} if context_fs is None else {"fsType": context_fs})
    ref = volume_ref(volume_id)
    problem = ("no volume_id" if not volume_id else path_problem(h, staging) or path_problem(h, target) or
               ("no capability" if cap is None else None))
    not_found = not problem and ref is None
    if not problem and not not_found:
        problem = capability_problem(cap, context_fs or "ext4")
    with Example(h, caplog) as ex:
        out = ex.call("node", "NodePublishVolume", req)
        if not_found:
            assert out.code == NOT_FOUND, f"{out.code.name} {out.details}"
        else:
            expect(out, problem, INVALID, NODE_PUBLISH_CODES)
        effects = ex.effects
        if out.code == OK:
            # Nothing is staged but NODE_BLOCK, as a raw block device: the only publish that can succeed.
            assert volume_id == NODE_BLOCK and cap.HasField("block")
            real = os.path.realpath(os.path.normpath(target))
            mounts = [c for c in h.commands() if c[0] == "mount"]
            assert len(mounts) == 1 and mounts[0][-1] == real and inside_kubelet(h, real), mounts
            assert ("ro" in mounts[0][mounts[0].index("-o") + 1].split(",")) == \
                (readonly or cap.access_mode.mode in (M.SINGLE_NODE_READER_ONLY, M.MULTI_NODE_READER_ONLY))
            assert all(e.startswith(("kubelet: ", "command: mount ")) for e in effects), effects
        elif not problem and not not_found:
            assert out.code == Code.FAILED_PRECONDITION and not (volume_id == NODE_BLOCK and cap.HasField("block"))


AGENT_SOURCES = st.one_of(
    st.none(),
    st.builds(lambda vg, lv: apb.VolumeSource(node="s1", vg=vg, lv=lv, size_bytes=GiB),
              st.one_of(st.just("vg"), hostile), st.one_of(st.sampled_from([FOREIGN_LV, "c1-missing", "tp"]), hostile)),
    # A thin snapshot of the seed in its own pool: the one source the agent serves without copying data.
    st.just(apb.VolumeSource(node="s1", vg="vg", lv=AGENT_SEED_LV, size_bytes=GiB)))


@FUZZ
@given(name=NAMES, pool=mostly(st.sampled_from(["thin", "thick"]), st.one_of(st.sampled_from(["Thin", ""]), hostile)),
       size=mostly(st.integers(1, 30 * GiB), SIZES),
       attributes=st.one_of(st.just(ATTRIBUTES), st.dictionaries(hostile, hostile, max_size=3),
                            st.just({"chapSecret": PLANTED})),
       source=st.one_of(st.none(), st.none(), AGENT_SOURCES))
def test_agent_create_volume(h, caplog, name, pool, size, attributes, source):
    if source is not None:
        # Any other source needs a copy of real data (a block device, another agent over TLS): not here.
        assume(source.lv != AGENT_SEED_LV or pool == "thin")
    req = apb.CreateVolumeRequest(name=name, pool=pool, size_bytes=size, attributes=attributes, source=source)
    problem = name_problem(name) or ("no such pool" if pool not in ("thin", "thick") else None) or \
        ("size" if size <= 0 else None)
    if not problem and source is not None and not (lvm_name(source.vg) and lvm_name(source.lv)):
        problem = "source name"
    with Example(h, caplog) as ex:
        out = ex.call("agent", "CreateVolume", req)
        expect(out, problem, INVALID, AGENT_CREATE_CODES)
        effects = ex.effects
        if out.code == OK:
            lv = ids.lv_name(CLUSTER, name)
            assert out.response.lv == lv and out.response.vg == "vg"
            assert h.lio.is_exported(ids.target_iqn("vg", lv))
            for argv in h.commands():
                if argv[0] == "lvcreate":
                    assert argv[argv.index("--name") + 1] == lv, argv
            for e in effects:
                assert e.startswith(("command: lv", "LIO: ", f"agent state: volumes/vg/{lv}.json")), e
