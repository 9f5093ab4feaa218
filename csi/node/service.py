"""CSI Node service: iSCSI login / logout, mkfs, mount, bind mount, stats. Never talks to an agent.

What each stage needs to be undone (target IQN, portals, device) is written to a small record before the
login, so NodeUnstageVolume can always log out, even after a crash, a reboot or a vanished target. The IQN is
also derivable from the volume ID, so even without a record nothing stays logged in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from csi import capabilities as caps
from csi import errors, faults, ids
from csi.config import NodeConfig
from csi.controller.service import (CTX_CHAP_SECRET, CTX_CHAP_USER, CTX_IQN, CTX_LUN, CTX_MUTUAL_SECRET,
                                    CTX_MUTUAL_USER, CTX_PORTALS)
from csi.fsutil import remove, write_atomic
from csi.node import mount
from csi.node.iscsi import LOGGED_IN, Iscsiadm, Target, read_initiator_name
from csi.proto import csi_pb2 as csi
from csi.storage.lio import Portal
from csi.proto import csi_pb2_grpc
from csi.server import KeyLocks

log = logging.getLogger(__name__)

Cap = csi.NodeServiceCapability.RPC.Type
CAPABILITIES = (Cap.STAGE_UNSTAGE_VOLUME, Cap.GET_VOLUME_STATS, Cap.VOLUME_CONDITION, Cap.SINGLE_NODE_MULTI_WRITER,
                Cap.EXPAND_VOLUME)


_CHAP_VALUE = re.compile(r"[!-~]{1,255}")


def _target_of(ctx, ref: ids.LvRef) -> Target:
    """The iSCSI target publish_context describes, checked: it must be this volume's, on host:port portals."""
    missing = [k for k in (CTX_IQN, CTX_PORTALS, CTX_LUN) if not ctx.get(k)]
    if missing:
        raise errors.invalid(f"publish_context lacks {', '.join(missing)} (was the volume published by this "
                             "driver's controller?)")
    if ctx[CTX_IQN] != ref.iqn:
        raise errors.invalid("publish_context names another target than the volume")
    lun = ctx[CTX_LUN]
    if not re.fullmatch(r"[0-9]{1,5}", lun) or int(lun) > 16383:
        raise errors.invalid("publish_context lun must be a number from 0 to 16383")
    try:
        portals = tuple(str(Portal.parse(p)) for p in ctx[CTX_PORTALS].split(",") if p)
    except ValueError:
        raise errors.invalid("publish_context portals must be ip:port items") from None
    if not portals:
        raise errors.invalid("publish_context names no portal")
    chap = [ctx.get(k, "") for k in (CTX_CHAP_USER, CTX_CHAP_SECRET, CTX_MUTUAL_USER, CTX_MUTUAL_SECRET)]
    # iscsiadm writes node records as "name = value" lines: a value with a newline would add a setting.
    if any(v and not _CHAP_VALUE.fullmatch(v) for v in chap):
        raise errors.invalid("publish_context CHAP values must be 1 to 255 printable ASCII characters, no spaces")
    return Target(ctx[CTX_IQN], portals, int(lun), *chap)


def _require(value: str, what: str) -> None:
    # Presence is checked before existence: a request missing a field is INVALID_ARGUMENT even when its
    # volume does not exist.
    if not value:
        raise errors.invalid(f"{what} is required")


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: NodeConfig, iscsi: Iscsiadm | None = None, zone: str | None = None):
        self.config = config
        self.iscsi = iscsi or Iscsiadm()
        self.zone = zone
        self.locks = KeyLocks()

    # ------------------------------------------------------------------------------------ checks

    def _ref(self, volume_id: str) -> ids.LvRef:
        if not volume_id:
            raise errors.invalid("volume_id is required")
        ref = ids.parse_id(volume_id)
        if ref is None:
            raise errors.not_found(f"volume {volume_id!r} is not a volume of this driver")
        return ref

    def _path(self, value: str, what: str) -> Path:
        """A path the CO hands us, checked before anything is mounted on it: absolute, inside the kubelet
        directory once every symlink (the last component's too) is resolved, not our own state directory or
        one of its ancestors, and of names the filesystem takes."""
        if not value:
            raise errors.invalid(f"{what} is required")
        if "\0" in value or not value.startswith("/") or len(value) > 4096:
            raise errors.invalid(f"{what} must be an absolute path of at most 4096 bytes")
        if any(len(part.encode()) > 255 for part in value.split("/")):
            raise errors.invalid(f"{what} has a component longer than 255 bytes")
        real = Path(os.path.realpath(os.path.normpath(value)))
        shown = value if len(value) <= 200 else value[:200] + "..."
        if self.config.kubelet_dir not in real.parents:
            raise errors.invalid(f"{what} {shown!r} is outside the kubelet directory {self.config.kubelet_dir}")
        state = Path(os.path.realpath(self.config.state_dir))
        if real == state or real in state.parents or state in real.parents:
            raise errors.invalid(f"{what} {shown!r} is the node plugin's own state directory or holds it")
        return real

    def _volume_path(self, value: str) -> Path:
        """volume_path of the stats and expand calls: required (INVALID_ARGUMENT), and a path that is not a
        volume's (relative, outside the kubelet directory, ...) holds no volume of ours: NOT_FOUND, as the
        spec and csi-sanity expect. It is never statted or used then."""
        _require(value, "volume_path")
        try:
            return self._path(value, "volume_path")
        except errors.CsiError as exc:
            raise errors.not_found(f"no volume at that path: {exc.message}") from None

    def _record_path(self, volume_id: str) -> Path:
        return self.config.state_dir / (hashlib.sha256(volume_id.encode()).hexdigest()[:32] + ".json")

    def _record(self, volume_id: str) -> dict | None:
        try:
            return json.loads(self._record_path(volume_id).read_text())
        except FileNotFoundError:
            return None

    def clean_stale(self) -> list[str]:
        """At start: logs out of and deletes the node records of this driver's targets that no staged volume
        uses (left by a crash, a reboot, a failed unstage), so a worker never keeps sessions or logs in at
        boot to targets nobody uses. Targets of other drivers are not touched.

        A stage record counts only while its stage is still there: its staging mount, or for a raw block
        volume its session. After a reboot neither is (the records live on the kubelet's disk, the mounts and
        sessions did not survive): those records go too, and kubelet's next NodeStageVolume starts afresh."""
        sessions = self.iscsi.sessions()
        staged = set()
        if self.config.state_dir.is_dir():
            for path in self.config.state_dir.glob("*.json"):
                try:
                    rec = json.loads(path.read_text())
                    iqn, block, at = rec["iqn"], bool(rec.get("block")), Path(rec["staging"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if (block and any(s.iqn == iqn for s in sessions)) or (not block and mount.mount_at(at)):
                    staged.add(iqn)
                else:
                    log.warning("forgetting the stage of %s at %s: it is not staged any more (a reboot, or a "
                                "stage cut short)", rec.get("volume_id", iqn), at)
                    remove(path)
        iqns = {iqn for _, iqn in self.iscsi.records()} | {s.iqn for s in sessions}
        stale = sorted(i for i in iqns if i.startswith(ids.IQN_PREFIX) and i not in staged)
        for iqn in stale:
            log.warning("logging out of %s: no staged volume uses it", iqn)
            self.iscsi.logout(iqn)
        return stale

    # ------------------------------------------------------------------------------------ stage

    def NodeStageVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise errors.invalid("volume_capability is required")
        ref = self._ref(request.volume_id)
        default_fs = request.volume_context.get("fsType") or caps.DEFAULT_FS
        access = caps.check_capability(request.volume_capability, default_fs)
        target = _target_of(request.publish_context, ref)
        with self.locks.hold(request.volume_id):
            if not access.block:
                existing = mount.mount_at(staging)
                if existing is not None:
                    return csi.NodeStageVolumeResponse()
            # Written before the login: from here on, unstage knows what to log out of.
            write_atomic(self._record_path(request.volume_id), json.dumps(
                {"volume_id": request.volume_id, "iqn": target.iqn, "portals": list(target.portals),
                 "lun": target.lun, "staging": str(staging), "block": access.block}), mode=0o600)
            faults.step("stage.record")
            try:
                self.iscsi.login(target)
                faults.step("stage.login")
                device = self.iscsi.wait_for_device(target)
                if access.block:
                    return csi.NodeStageVolumeResponse()
                staging.mkdir(parents=True, exist_ok=True)
                found = mount.fs_type(device)
                if found is None:
                    if access.read_only:
                        raise errors.precondition("the volume is blank and published read-only: it cannot be "
                                                  "formatted; write to it once through a writable claim")
                    log.info("formatting %s (%s) as %s", ref, device, access.fs_type)
                    mount.mkfs(device, access.fs_type)
                    faults.step("stage.mkfs")
                    found = access.fs_type
                elif found not in caps.FS_TYPES:
                    raise errors.precondition(f"the volume holds {found!r}, not a filesystem this driver mounts; "
                                              "nothing was changed")
                mount.mount(device, staging, found, self._options(found, access))
                faults.step("stage.mount")
                if not access.read_only:
                    # A volume restored or cloned bigger than its source: the filesystem fills it on first stage.
                    mount.grow_filesystem(device, found, staging)
            except Exception:
                # Leave nothing half-done: a failed stage logs out again (the CO will retry the whole stage).
                self._undo_stage(request.volume_id, ref, staging)
                raise
        return csi.NodeStageVolumeResponse()

    @staticmethod
    def _options(fs: str, access: caps.Access) -> list[str]:
        opts = list(access.mount_flags)
        if access.read_only:
            # A read-only LUN cannot take a journal replay: mount without one.
            opts += ["ro", "noload" if fs == "ext4" else "norecovery"]
        if fs == "xfs":
            opts.append("nouuid")  # clones and restored snapshots carry their source's UUID
        return opts

    def NodeUnstageVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        ref = self._ref(request.volume_id)
        with self.locks.hold(request.volume_id):
            self._undo_stage(request.volume_id, ref, staging)
        return csi.NodeUnstageVolumeResponse()

    def _undo_stage(self, volume_id: str, ref: ids.LvRef, staging: Path) -> None:
        """umount, flush, logout, delete the node record and our record: every step tried, errors raised once."""
        problems: list[str] = []
        rec = self._record(volume_id) or {}
        iqn = rec.get("iqn") or ref.iqn
        device = None
        m = mount.mount_at(staging)
        if m is not None:
            device = Path(m.source)
            try:
                mount.umount(staging)
                faults.step("unstage.umount")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"umount {staging}: {exc}")
        if device is not None and device.exists() and not problems:
            try:
                mount.flush(device)
            except Exception as exc:  # noqa: BLE001
                if self._condition(ref).abnormal:
                    # The target is gone: the kernel failed the session's I/O at the replacement timeout and took
                    # the disk offline, so nothing can be flushed any more and waiting saves nothing. Log out.
                    log.warning("not flushing %s: its iSCSI session to %s is not logged in (%s)", device, iqn, exc)
                else:
                    problems.append(f"flush {device}: {exc}")
        if problems:
            # Still mounted: logging out now would lose writes. The CO retries.
            raise errors.internal("; ".join(problems))
        self.iscsi.logout(iqn)
        faults.step("unstage.logout")
        remove(self._record_path(volume_id))

    # ------------------------------------------------------------------------------------ publish

    def NodePublishVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        target = self._path(request.target_path, "target_path")
        if not request.HasField("volume_capability"):
            raise errors.invalid("volume_capability is required")
        ref = self._ref(request.volume_id)
        access = caps.check_capability(request.volume_capability,
                                       request.volume_context.get("fsType") or caps.DEFAULT_FS)
        read_only = request.readonly or access.read_only
        with self.locks.hold(request.volume_id):
            existing = mount.mount_at(target)
            if existing is not None:
                if existing.read_only != read_only:
                    raise errors.exists(f"{target} is already mounted {'read-only' if existing.read_only else 'rw'}")
                return csi.NodePublishVolumeResponse()
            rec = self._record(request.volume_id)
            others = [t for t in (rec or {}).get("targets", []) if t != str(target) and mount.mount_at(Path(t))]
            if others and caps.Mode.SINGLE_NODE_SINGLE_WRITER in access.modes:
                raise errors.precondition(f"volume {ref} is SINGLE_NODE_SINGLE_WRITER and already published at "
                                          f"{others[0]}")
            if access.block:
                if rec is None:
                    raise errors.precondition(f"volume {ref} is not staged on this node")
                device = self.iscsi.wait_for_device(Target(rec["iqn"], tuple(rec["portals"]), rec["lun"]),
                                                    timeout=5)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.touch(mode=0o600)
                mount.bind(device, target, read_only)
            else:
                if mount.mount_at(staging) is None:
                    raise errors.precondition(f"volume {ref} is not staged at {staging}")
                target.mkdir(parents=True, exist_ok=True)
                mount.bind(staging, target, read_only)
            faults.step("publish.mount")
            if rec is not None:
                rec["targets"] = sorted(set(others) | {str(target)})
                write_atomic(self._record_path(request.volume_id), json.dumps(rec), mode=0o600)
        return csi.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        target = self._path(request.target_path, "target_path")
        self._ref(request.volume_id)
        with self.locks.hold(request.volume_id):
            while mount.mount_at(target) is not None:
                mount.umount(target)
            if target.is_dir():
                target.rmdir()
            elif target.exists():
                target.unlink()
            rec = self._record(request.volume_id)
            if rec is not None and str(target) in rec.get("targets", []):
                rec["targets"].remove(str(target))
                write_atomic(self._record_path(request.volume_id), json.dumps(rec), mode=0o600)
        return csi.NodeUnpublishVolumeResponse()

    # ------------------------------------------------------------------------------------ info

    def NodeGetVolumeStats(self, request, context):
        _require(request.volume_id, "volume_id")
        path = self._volume_path(request.volume_path)
        ref = self._ref(request.volume_id)
        if not path.exists():
            raise errors.not_found(f"volume path {path} does not exist")
        condition = self._condition(ref)
        live = not condition.abnormal
        m = mount.mount_at(path)
        if path.is_dir():
            if m is None:
                raise errors.not_found(f"{path} is not mounted")
            st = os.statvfs(path)
            usage = [csi.VolumeUsage(unit=csi.VolumeUsage.BYTES, total=st.f_blocks * st.f_frsize,
                                     available=st.f_bavail * st.f_frsize,
                                     used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                     csi.VolumeUsage(unit=csi.VolumeUsage.INODES, total=st.f_files, available=st.f_favail,
                                     used=st.f_files - st.f_ffree)]
        else:
            size = mount.device_size(Path(m.source)) if m and live else 0
            usage = [csi.VolumeUsage(unit=csi.VolumeUsage.BYTES, total=size)]
        return csi.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def _condition(self, ref: ids.LvRef) -> csi.VolumeCondition:
        """Healthy while a session to the volume's target is logged in. A session that lost its target stays
        listed (the initiator keeps trying to log in again), so its kernel state decides, not its presence."""
        states = sorted({self.iscsi.session_state(s) for s in self.iscsi.sessions() if s.iqn == ref.iqn})
        if not states:
            return csi.VolumeCondition(abnormal=True, message=f"no iSCSI session to {ref.iqn}: the target is "
                                                              "unreachable or gone")
        if LOGGED_IN in states or states == [""]:   # "": sysfs does not say; the session is there
            return csi.VolumeCondition(abnormal=False, message="healthy")
        return csi.VolumeCondition(abnormal=True, message=f"iSCSI session to {ref.iqn} is {'/'.join(states)}: "
                                                          "the target is unreachable or gone; I/O waits for it")

    def NodeGetCapabilities(self, request, context):
        return csi.NodeGetCapabilitiesResponse(capabilities=[
            csi.NodeServiceCapability(rpc=csi.NodeServiceCapability.RPC(type=c)) for c in CAPABILITIES])

    def NodeGetInfo(self, request, context):
        iqn = read_initiator_name(self.config.initiator_name_file)
        topology = None
        if self.zone:
            topology = csi.Topology(segments={ids.topology_key(self.config.driver_name): self.zone})
        return csi.NodeGetInfoResponse(node_id=iqn, max_volumes_per_node=self.config.max_volumes,
                                       accessible_topology=topology)

    def NodeExpandVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        path = self._volume_path(request.volume_path)
        ref = self._ref(request.volume_id)
        if not path.exists():
            raise errors.not_found(f"volume path {path} does not exist")
        required = request.capacity_range.required_bytes if request.HasField("capacity_range") else 0
        if required < 0 or (request.HasField("capacity_range") and request.capacity_range.limit_bytes < 0):
            raise errors.invalid("capacity_range bytes must not be negative")
        with self.locks.hold(request.volume_id):
            rec = self._record(request.volume_id)
            if rec is None:
                raise errors.not_found(f"volume {ref} is not staged on this node")
            device = self.iscsi.wait_for_device(Target(rec["iqn"], tuple(rec["portals"]), rec["lun"]), timeout=5)
            # The target already serves the new size; the initiator learns it from a rescan.
            self.iscsi.rescan(rec["iqn"])
            faults.step("expand.rescan")
            size = self._wait_size(device, required)
            block = (request.HasField("volume_capability") and request.volume_capability.HasField("block")) or \
                rec.get("block", False)
            if not block:
                m = mount.mount_at(Path(rec["staging"])) or mount.mount_at(path)
                if m is None:
                    raise errors.precondition(f"volume {ref} is not mounted at {rec['staging']} or {path}")
                mount.grow_filesystem(device, m.fs_type, Path(m.target))
        return csi.NodeExpandVolumeResponse(capacity_bytes=size)

    @staticmethod
    def _wait_size(device: Path, required: int, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            size = mount.device_size(device)
            if size >= required or time.monotonic() > deadline:
                if size < required:
                    raise errors.internal(f"{device} is {size} bytes after the rescan, {required} expected")
                return size
            time.sleep(0.5)
