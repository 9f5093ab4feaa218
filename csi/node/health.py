"""Volume and storage health from the node's side (CSI v1.13 NodeGetVolumeHealth / NodeGetStorageHealth).

A volume is healthy here while a session to its target is logged in. A session that lost its target stays
listed by iscsiadm (the initiator keeps trying to log in again), so the kernel's session state decides, not the
session's presence. The storage nodes this node depends on are those of the volumes staged here (the stage
records): a storage node none of whose portals accepts a connection while its sessions are down, or whose
agent does not, is STORAGE_UNREACHABLE. Portals are probed only when a session is down (a healthy session
proves its portal answers, and LIO logs every connection that does not log in); the agent's gRPC port, which
only answers new stages, on every call.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from csi import ids
from csi.node.iscsi import LOGGED_IN, Iscsiadm
from csi.proto import csi_pb2 as csi

Entry = csi.VolumeHealth.VolumeHealthEntry
Backend = csi.NodeGetStorageHealthResponse.StorageBackendHealth

PROBE_TIMEOUT = 2.0


def connects(address: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """True when a TCP connection to host:port ([v6]:port too) is accepted within timeout."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _states(iscsi: Iscsiadm) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in iscsi.sessions():
        out.setdefault(s.iqn, set()).add(iscsi.session_state(s))
    return out


def _carries_io(states: set[str]) -> bool:
    return LOGGED_IN in states or states == {""}   # "": sysfs does not say; the session is there


def volume(iscsi: Iscsiadm, ref: ids.LvRef, staging_mounted: bool | None = None,
           publish_mounted: bool | None = None, staging: str = "", publish: str = "",
           forced_read_only: bool = False, fs_errors: int = 0,
           root_io_error: Callable[[], str] = lambda: "", transport: list[Entry] | None = None) -> list[Entry]:
    """The adverse conditions of one volume on this node (empty when healthy). *_mounted: None when the CO
    gave no such path (or, for staging, when the volume is a raw block one: nothing is mounted there).
    forced_read_only: its filesystem, mounted read-write, was made read-only by the kernel (mount.py);
    fs_errors: the errors the kernel recorded on it since its last check; root_io_error: lists its root
    directory and says the I/O error that fails (mount.root_io_error), asked only while the session carries
    I/O. transport: what a replicated volume's array says (replicated.health) in place of the one session's."""
    out = []
    states = _states(iscsi).get(ref.iqn, set()) if transport is None else set()
    carries = _carries_io(states) if transport is None else not any(e.status == csi.INACCESSIBLE for e in transport)
    failing = root_io_error() if carries else ""
    if failing:
        out.append(Entry(status=csi.INACCESSIBLE, reason="FileSystemShutDown",
                         message=f"the volume's filesystem fails every read and write ({failing}) while its iSCSI "
                                 "session is up: the kernel shut it down after I/O errors (xfs does after a "
                                 "storage outage longer than open-iscsi's replacement timeout). Recover by "
                                 "restarting the pod that uses it: the volume is unstaged, and the next stage "
                                 "mounts it again (xfs replays its log)"))
    if transport is not None:
        out += transport
    elif not states:
        out.append(Entry(status=csi.INACCESSIBLE, reason="NoIscsiSession",
                         message=f"no iSCSI session to {ref.iqn}: the target is unreachable or gone, or the volume "
                                 "is not staged on this node"))
    elif not _carries_io(states):
        shown = "/".join(sorted(states))
        out.append(Entry(status=csi.INACCESSIBLE, reason="IscsiSessionNotLoggedIn",
                         message=f"iSCSI session to {ref.iqn} is {shown}: the target is unreachable or gone; I/O "
                                 "waits for it, and fails once open-iscsi's replacement timeout passes"))
    if staging_mounted is False:
        out.append(Entry(status=csi.INACCESSIBLE, reason="NotStaged",
                         message=f"nothing is mounted at the staging path {staging}: the volume is not staged "
                                 "there (kubelet stages it again before it publishes it)"))
    if forced_read_only:
        out.append(Entry(status=csi.DEGRADED, reason="FileSystemReadOnly",
                         message="the kernel made the volume's filesystem read-only after I/O errors (a storage "
                                 "outage longer than open-iscsi's replacement timeout, or a filesystem error): "
                                 "reads work, writes fail. Recover by restarting the pod that uses it: the "
                                 "volume is unstaged, and the next stage checks the filesystem (e2fsck -p for "
                                 "ext4) and mounts it read-write again"))
    elif fs_errors:
        out.append(Entry(status=csi.DEGRADED, reason="FileSystemErrors",
                         message=f"the kernel recorded {fs_errors} error(s) on the volume's filesystem since its "
                                 "last check (I/O errors from a storage outage, or corruption): writes may fail. "
                                 "Recover by restarting the pod that uses it: the next stage runs e2fsck -p"))
    if publish_mounted is False:
        out.append(Entry(status=csi.INACCESSIBLE, reason="NotPublished",
                         message=f"nothing is mounted at the publish path {publish}: the pod does not see the "
                                 "volume there"))
    return out


@dataclass
class _StorageNode:
    portals: set[str] = field(default_factory=set)
    agents: set[str] = field(default_factory=set)
    volumes: list[tuple[str, str]] = field(default_factory=list)   # (volume_id, target iqn)


def staged(state_dir: Path) -> list[dict]:
    """The stage records of this node plugin (service.py writes them before each login)."""
    out = []
    if state_dir.is_dir():
        for path in sorted(state_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                if isinstance(rec, dict) and rec.get("volume_id") and rec.get("iqn"):
                    out.append(rec)
            except (OSError, ValueError):
                continue
    return out


def storage(iscsi: Iscsiadm, records: list[dict], probe: Callable[[str], bool] = connects) -> list[Backend]:
    """STORAGE_UNREACHABLE per storage node of a volume staged here whose portals or agent do not answer."""
    nodes: dict[str, _StorageNode] = {}
    for rec in records:
        ref = ids.parse_id(rec["volume_id"])
        if ref is None:
            continue
        n = nodes.setdefault(ref.node, _StorageNode())
        n.portals.update(p for p in rec.get("portals", []) if isinstance(p, str))
        if isinstance(rec.get("agent"), str) and rec["agent"]:
            n.agents.add(rec["agent"])   # stage records from before 1.13 do not name it: not probed
        n.volumes.append((rec["volume_id"], rec["iqn"]))
    if not nodes:
        return []
    states = _states(iscsi)
    out = []
    for name in sorted(nodes):
        n = nodes[name]
        down = [vid for vid, iqn in n.volumes if not _carries_io(states.get(iqn, set()))]
        if down and n.portals and not any(probe(p) for p in sorted(n.portals)):
            out.append(Backend(status=csi.STORAGE_UNREACHABLE, reason="PortalUnreachable",
                               message=f"no iSCSI portal of storage node {name} ({', '.join(sorted(n.portals))}) "
                                       f"accepts a connection from this node: {len(down)} volume(s) staged here "
                                       f"from it have no path to their data ({', '.join(down)}); I/O waits for "
                                       "the storage node, then fails once open-iscsi's replacement timeout passes"))
        silent = [a for a in sorted(n.agents) if not probe(a)]
        if silent:
            out.append(Backend(status=csi.STORAGE_UNREACHABLE, reason="AgentUnreachable",
                               message=f"the agent of storage node {name} ({', '.join(silent)}) does not accept a "
                                       "connection from this node: no volume of that storage node can be staged "
                                       "here now (its CHAP credentials come from the agent); volumes already "
                                       "staged keep their I/O while its portal answers"))
    return out
