"""CSI Node service: iSCSI login / logout, mkfs, mount, bind mount, stats, health (health.py). Talks to an agent
only to fetch its own CHAP credentials at stage (credentials.py).

What each stage needs to be undone (target IQN, portals, device) is written to a small record before the
login, so NodeUnstageVolume can always log out, even after a crash, a reboot or a vanished target. The IQN is
also derivable from the volume ID, so even without a record nothing stays logged in. The target also goes
into the plugin's login ledger (csi/node/ledger.py) before the login: the start-up clean-up logs out only
what the ledger holds, never another release's sessions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from csi import capabilities as caps
from csi import contract, errors, faults, ids, mkfs_options
from csi.config import NodeConfig
from csi.fsutil import remove, write_atomic
from csi.node import credentials, disk_queue, health, iscsiadm_mode, mount, raid, replicated
from csi.node.iscsi import Iscsiadm, Target, read_initiator_name
from csi.node.ledger import LoginLedger
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.server import KeyLocks

log = logging.getLogger(__name__)

Cap = csi.NodeServiceCapability.RPC.Type
CAPABILITIES = (Cap.STAGE_UNSTAGE_VOLUME, Cap.GET_VOLUME_STATS, Cap.SINGLE_NODE_MULTI_WRITER, Cap.EXPAND_VOLUME,
                Cap.GET_VOLUME_HEALTH, Cap.GET_STORAGE_HEALTH)


def _require(value: str, what: str) -> None:
    # Presence is checked before existence: a request missing a field is INVALID_ARGUMENT even when its
    # volume does not exist.
    if not value:
        raise errors.invalid(f"{what} is required")


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: NodeConfig, iscsi: Iscsiadm | None = None, zone: str | None = None):
        self.config = config
        self.iscsi = iscsi or Iscsiadm(iscsiadm_mode.prefix(config.iscsiadm))
        self.zone = zone
        self.locks = KeyLocks()
        self.ledger = LoginLedger(config.state_dir / "logins")
        self.replicated = replicated.Replicated(self)

    def start(self) -> None:
        """At the plugin's start: nothing but this plugin assembles replicated volumes' arrays; the legs of
        staged replicated volumes are put back (then every few seconds)."""
        raid.install_udev_rule()
        raid.load_module()
        self.replicated.start()    # its first round at once, in its own thread: registration does not wait

    # ------------------------------------------------------------------------------------ checks

    def _ref(self, volume_id: str) -> ids.LvRef:
        if not volume_id:
            raise errors.invalid("volume_id is required")
        key = replicated.key_of(volume_id)
        if key is not None:
            # A replicated volume's legs are in its stage record; the LvRef names the array for messages.
            return ids.LvRef("replicated", "md", key)
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
        """At start: logs out of and deletes the node records of the targets this plugin logged in to (its
        ledger, and its stage records) that no staged volume uses (left by a crash, a reboot, a failed
        unstage), so a worker never keeps sessions or logs in at boot to targets nobody uses. Sessions it did
        not make are never touched: another driver's, or another release of this one (same target IQN
        prefix, another driver name and state directory). Returns the targets it logged out of.

        A stage record counts only while its stage is still there: its staging mount, or for a raw block
        volume its session. After a reboot neither is (the records live on the kubelet's disk, the mounts and
        sessions did not survive): those records go too, and kubelet's next NodeStageVolume starts afresh."""
        sessions = self.iscsi.sessions()
        staged = set()
        ours = self.ledger.targets()
        if self.config.state_dir.is_dir():
            for path in self.config.state_dir.glob("*.json"):
                try:
                    rec = json.loads(path.read_text())
                    if rec.get("replicated"):
                        legs = {leg["iqn"] for leg in rec["legs"] if leg.get("iqn")}
                        ours |= legs
                        if raid.status(rec["key"]) is not None:
                            staged |= legs   # the array runs: its legs stay, even one the reconciler waits for
                        else:
                            log.warning("forgetting the stage of %s: its array is not assembled", rec["volume_id"])
                            remove(path)
                        continue
                    iqn, block, at = rec["iqn"], bool(rec.get("block")), Path(rec["staging"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                ours.add(iqn)   # a stage of this plugin's, also one from before the ledger existed
                if (block and any(s.iqn == iqn for s in sessions)) or (not block and mount.mount_at(at)):
                    staged.add(iqn)
                else:
                    log.warning("forgetting the stage of %s at %s: it is not staged any more (a reboot, or a "
                                "stage cut short)", rec.get("volume_id", iqn), at)
                    remove(path)
        present = {iqn for _, iqn in self.iscsi.records()} | {s.iqn for s in sessions}
        logged_out = []
        for iqn in sorted(i for i in ours - staged if ids.is_iqn(i)):
            if iqn in present:
                log.warning("logging out of %s: no staged volume uses it", iqn)
                self.iscsi.logout(iqn)
                logged_out.append(iqn)
            self.ledger.remove(iqn)
        return logged_out

    # ------------------------------------------------------------------------------------ stage

    def NodeStageVolume(self, request, context):
        _require(request.volume_id, "volume_id")
        staging = self._path(request.staging_target_path, "staging_target_path")
        if not request.HasField("volume_capability"):
            raise errors.invalid("volume_capability is required")
        ref = self._ref(request.volume_id)
        default_fs = request.volume_context.get("fsType") or caps.DEFAULT_FS
        access = caps.check_capability(request.volume_capability, default_fs)
        # Checked again here, before anything is done: a volume_context can come from a hand-made PV.
        mkfs_opts = mkfs_options.parse(request.volume_context.get(mkfs_options.PARAM, ""))
        if not access.block:
            mkfs_options.check_fs(mkfs_opts, access.fs_type)
        if replicated.key_of(request.volume_id) is not None:
            with self.locks.hold(request.volume_id):
                self.replicated.stage(request.volume_id, request.publish_context, staging, access, mkfs_opts)
            return csi.NodeStageVolumeResponse()
        att = contract.parse(request.publish_context, ref)
        target = Target(att.iqn, att.portals, att.lun)
        with self.locks.hold(request.volume_id):
            if not access.block:
                existing = mount.mount_at(staging)
                if existing is not None:
                    self._check_staged(request.volume_id, target, staging, existing)
                    return csi.NodeStageVolumeResponse()
            # Written before the login: from here on, unstage knows what to log out of, and the start-up
            # clean-up knows that this plugin may have logged in to the target.
            self.ledger.add(target.iqn)
            write_atomic(self._record_path(request.volume_id), json.dumps(
                {"volume_id": request.volume_id, "iqn": target.iqn, "portals": list(target.portals),
                 "lun": target.lun, "staging": str(staging), "block": access.block,
                 "agent": att.agent}), mode=0o600)   # agent: probed by NodeGetStorageHealth
            faults.step("stage.record")
            try:
                self.iscsi.login(self._with_credentials(target, att, ref))
                faults.step("stage.login")
                device = self.iscsi.wait_for_device(target)
                if access.block:
                    return csi.NodeStageVolumeResponse()
                staging.mkdir(parents=True, exist_ok=True)
                found, formatted = self._filesystem(ref, device, access, mkfs_opts)
                mount.mount(device, staging, found, self._options(found, access))
                faults.step("stage.mount")
                if not access.read_only and not formatted:
                    # A volume restored or cloned bigger than its source: the filesystem fills it on first stage
                    # (one mkfs just made fills its device already).
                    mount.grow_filesystem(device, found, staging)
                # Once more now that udev has had the disk for the mkfs and mount: a rule of the host's that
                # sets a scheduler on new disks ran after wait_for_device's (a block volume's publish checks too).
                disk_queue.use_no_scheduler(device)
            except Exception:
                # Leave nothing half-done: a failed stage logs out again (the CO will retry the whole stage).
                self._undo_stage(request.volume_id, ref, staging)
                raise
        return csi.NodeStageVolumeResponse()

    def _with_credentials(self, target: Target, att: contract.Attachment, ref: ids.LvRef) -> Target:
        """The target with its CHAP credentials: from the storage node's agent (the node's own certificate),
        or, for a VolumeAttachment of the driver before that, from publish_context itself."""
        if att.agent and self.config.tls_dir is not None:
            chap = credentials.fetch(self.config.tls_dir, att, ref.vg, ref.lv, self.initiator())
        elif att.legacy_chap is not None:
            chap = att.legacy_chap
        else:
            raise errors.precondition("this node plugin has no certificate (--tls-dir) to ask storage node "
                                      f"{att.storage_node} for the volume's credentials")
        return dataclasses.replace(target, chap_user=chap.user, chap_secret=chap.secret,
                                   mutual_user=chap.mutual_user, mutual_secret=chap.mutual_secret)

    def initiator(self) -> str:
        """This node's initiator name, lower-cased: iSCSI names compare case-insensitively and LIO lower-cases
        ours at login. The node_id NodeGetInfo reports, and the initiator the agent granted."""
        return read_initiator_name(self.config.initiator_name_file).lower()

    def _check_staged(self, volume_id: str, target: Target, staging: Path, existing: mount.Mount) -> None:
        """A repeated stage finds its staging path mounted: that is success only when the mount is this volume's
        disk (through the portals of publish_context or of the stage record), not another volume's, a stale
        disk whose session went away, or anything else mounted there."""
        rec = self._record(volume_id) or {}
        portals = tuple(dict.fromkeys([*target.portals, *rec.get("portals", [])]))
        device = self.iscsi.find_device(Target(target.iqn, portals, target.lun))
        if device is not None and os.path.realpath(existing.source) == str(device):
            return
        disk = f"its disk is {device}" if device is not None else f"{target.iqn} has no disk on this node"
        raise errors.precondition(f"{staging} already has {existing.source} mounted, which is not this volume's "
                                  f"disk ({disk}); unmount it first")

    @staticmethod
    def _filesystem(ref: ids.LvRef, device: Path, access: caps.Access, mkfs_opts) -> tuple[str, bool]:
        """The filesystem to mount, and whether it was made now: the one on the device, or a new one when blkid
        finds no signature of any kind. A partition table, an LVM / RAID member, LUKS, two signatures at once, a
        filesystem beside a partition table: someone's data, never formatted and never mounted."""
        found = mount.probe(device)
        if found.blank:
            if access.read_only:
                raise errors.precondition("the volume is blank and published read-only: it cannot be "
                                          "formatted; write to it once through a writable claim")
            log.info("formatting %s (%s) as %s: blkid finds no signature on it", ref, device, access.fs_type)
            mount.mkfs(device, access.fs_type, mkfs_options.mkfs_args(access.fs_type, mkfs_opts))
            faults.step("stage.mkfs")
            return access.fs_type, True
        if found.type in caps.FS_TYPES and not found.pt_type:
            if found.type == "ext4" and not access.read_only:
                try:
                    if mount.check_ext4(device):
                        log.warning("%s (%s): e2fsck -p repaired its ext4 filesystem before mounting it",
                                    ref, device)
                except mount.FilesystemErrors as exc:
                    raise errors.precondition(
                        f"the ext4 filesystem on {ref} has errors e2fsck -p may not repair on its own ({exc}); "
                        f"nothing was mounted. Check it by hand (e2fsck -f on {device}, the volume staged "
                        "nowhere else) or restore it from a snapshot") from None
            return found.type, False
        raise errors.precondition(f"the volume holds {found.describe()}, not a filesystem this driver mounts "
                                  f"({', '.join(caps.FS_TYPES)}); nothing was written to it")

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
            if replicated.key_of(request.volume_id) is not None:
                self.replicated.unstage(request.volume_id, staging)
            else:
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
                if health.volume(self.iscsi, ref):
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
        self.ledger.remove(iqn)

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
                device = self._device(request.volume_id, rec)
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

    def _device(self, volume_id: str, rec: dict) -> Path:
        """The staged volume's block device: its array for a replicated volume, else its iSCSI disk."""
        if rec.get("replicated"):
            device = self.replicated.device(volume_id)
            if not device.exists():
                raise errors.precondition(f"volume {volume_id}: its array {device} is not assembled on this node")
            return device
        return self.iscsi.wait_for_device(Target(rec["iqn"], tuple(rec["portals"]), rec["lun"]), timeout=5)

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
        # A raw block device whose session lost its target is not asked for its size: that would wait for it.
        # An array answers while one leg does.
        live = self.replicated.device(request.volume_id).exists() if replicated.key_of(request.volume_id) \
            else not health.volume(self.iscsi, ref)
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
        return csi.NodeGetVolumeStatsResponse(usage=usage)

    def NodeGetVolumeHealth(self, request, context):
        """The volume from this node (health.py): its iSCSI session, and the mounts at the paths the CO gives
        (both OPTIONAL). No entry while healthy."""
        ref = self._ref(request.volume_id)
        staging_mounted = publish_mounted = None
        forced_read_only, fs_errors, mounted_at = False, 0, ""
        rec = self._record(request.volume_id)
        block = bool(rec and rec.get("block"))   # a raw block stage mounts nothing at its staging path
        if request.staging_target_path:
            staging = self._path(request.staging_target_path, "staging_target_path")
            if not block:
                found = mount.mount_at(staging)
                staging_mounted = found is not None
                mounted_at = str(staging) if found is not None else ""
                forced_read_only = found is not None and found.forced_read_only
                fs_errors = mount.ext4_errors(found.source) if found is not None and found.fs_type == "ext4" else 0
        if request.volume_publish_path:
            found = mount.mount_at(self._path(request.volume_publish_path, "volume_publish_path"))
            publish_mounted = found is not None
            forced_read_only = forced_read_only or (found is not None and found.forced_read_only)
            if found is not None and not mounted_at and not block:
                mounted_at = found.target
        entries = health.volume(self.iscsi, ref, staging_mounted, publish_mounted, request.staging_target_path,
                                request.volume_publish_path, forced_read_only, fs_errors,
                                lambda: mount.root_io_error(mounted_at) if mounted_at else "",
                                self.replicated.health(request.volume_id, rec) if replicated.key_of(request.volume_id)
                                else None)
        return csi.NodeGetVolumeHealthResponse(volume_health=csi.VolumeHealth(volume_id=request.volume_id,
                                                                              health_statuses=entries))

    def NodeGetStorageHealth(self, request, context):
        """The storage nodes of the volumes staged here, from this node (health.py). Empty while all answer."""
        return csi.NodeGetStorageHealthResponse(
            backend_health=health.storage(self.iscsi, health.staged(self.config.state_dir)))

    def NodeGetCapabilities(self, request, context):
        return csi.NodeGetCapabilitiesResponse(capabilities=[
            csi.NodeServiceCapability(rpc=csi.NodeServiceCapability.RPC(type=c)) for c in CAPABILITIES])

    def NodeGetInfo(self, request, context):
        # iSCSI names compare case-insensitively and LIO lower-cases ours at login: report the form it uses.
        iqn = self.initiator()
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
            if rec.get("replicated"):
                device, size = self.replicated.expand(request.volume_id, rec, required, self._wait_size)
            else:
                device = self.iscsi.wait_for_device(Target(rec["iqn"], tuple(rec["portals"]), rec["lun"]),
                                                    timeout=5)
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
