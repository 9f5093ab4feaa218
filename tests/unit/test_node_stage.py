"""NodeStageVolume's data-safety rules (issue 12): a device is formatted only when blkid finds no signature
of any kind on it, and a staging path that already holds a mount is accepted only when that mount is this
volume's disk. blkid's answers are its real output, recorded on a UML node (recorded/record_blkid.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from csi import errors, ids
from csi.config import NodeConfig
from csi import contract
from csi.node import mount
from csi.node.iscsi import Iscsiadm, Target
from csi.node.service import NodeService
from csi.proto import csi_pb2 as csi
from tests.unit.conftest import RECORDED, recorded

VID = "v1:storage-1:csi-vg:e2e-vol-0123456789"
REF = ids.parse_id(VID)
PORTAL = "10.213.1.11:3260"
DEVICE = "/dev/sdb"
CASES = ("blank", "ext4", "xfs", "gpt", "dos", "lvm2_member", "ext4_dos")
M = csi.VolumeCapability.AccessMode


def blkid_output(case: str) -> tuple[int, str]:
    return int(recorded(f"blkid_{case}.rc")), recorded(f"blkid_{case}.stdout")


def fake_blkid(case: str):
    """blkid on a device holding `case`: the recorded `-p -o export` output; asked for the TYPE value only
    (`-s TYPE -o value`, what the node plugin ran before issue 12), the TYPE line's value, as blkid prints it."""
    rc, out = blkid_output(case)

    def answer(argv: list[str]) -> tuple[int, str, str]:
        if argv[-3:-1] == ["-o", "export"]:
            return rc, out, ""
        value = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith("TYPE=")]
        return rc, "".join(v + "\n" for v in value), ""
    return answer


def test_every_case_was_recorded():
    assert sorted(p.name[len("blkid_"):-len(".rc")] for p in RECORDED.glob("blkid_*.rc")) == sorted(CASES)


@pytest.mark.parametrize("case, expect", [
    ("blank", {}),
    ("ext4", {"type": "ext4", "usage": "filesystem"}),
    ("xfs", {"type": "xfs", "usage": "filesystem"}),
    ("gpt", {"pt_type": "gpt"}),
    ("dos", {"pt_type": "dos"}),
    ("lvm2_member", {"type": "LVM2_member", "usage": "raid"}),
    ("ext4_dos", {"type": "ext4", "usage": "filesystem", "pt_type": "dos"}),
])
def test_probe_reads_every_kind_of_signature(fake_run, case, expect):
    fake_run.on("blkid", fn=fake_blkid(case))
    expect = mount.Signatures(**expect)
    assert mount.probe(Path(DEVICE)) == expect
    assert fake_run.calls == [["blkid", "-p", "-o", "export", DEVICE]]
    assert expect.blank is (case == "blank")


def test_export_values_are_unescaped():
    assert mount.parse_blkid_export(recorded("blkid_lvm2_member.stdout"))["VERSION"] == "LVM2 001"


def test_an_ambivalent_probe_is_not_blank(fake_run):
    # blkid -p exits 8 when two superblocks on the device both look valid (see blkid(8)).
    fake_run.on("blkid", rc=8, stderr=f"blkid: {DEVICE}: ambivalent result (probably more filesystems on the "
                                       "device, use wipefs(8) to see more details)\n")
    found = mount.probe(Path(DEVICE))
    assert not found.blank and "more than one" in found.describe()


def test_a_disk_blkid_cannot_read_is_never_called_blank(fake_run, node, mounts):
    """blkid exits 2 both for "nothing found" and when it cannot open the device (ENXIO for a disk the kernel
    has not finished adding, say): the second is no answer, and a stage on it writes nothing."""
    fake_run.on("blkid", rc=2, stderr=f"blkid: error: {DEVICE}: No such device or address\n")
    with pytest.raises(errors.CsiError) as e:
        mount.probe(Path(DEVICE))
    assert e.value.code == errors.Code.UNAVAILABLE and "No such device or address" in e.value.message
    mount_tools(fake_run, mounts)
    with pytest.raises(errors.CsiError):
        node.NodeStageVolume(stage_request(node, "ext4"), None)
    assert writes(fake_run) == [] and mounts == []
    assert node.iscsi.logouts == [REF.iqn]


# ---------------------------------------------------------------------------------------------- stage

class FakeIscsi(Iscsiadm):
    """Login does nothing; the volume's disk is DEVICE, or `disk` when set (None: no disk, no session)."""

    def __init__(self) -> None:
        super().__init__()
        self.disk: str | None = DEVICE
        self.logins: list[str] = []
        self.logouts: list[str] = []

    def login(self, target: Target) -> None:
        self.logins.append(target.iqn)

    def logout(self, iqn: str) -> None:
        self.logouts.append(iqn)

    def wait_for_device(self, target: Target, timeout: float = 20.0) -> Path:
        return Path(self.disk)

    def find_device(self, target: Target) -> Path | None:
        return Path(self.disk) if self.disk else None

    def sessions(self):
        return []


@pytest.fixture
def node(tmp_path):
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    initiator = tmp_path / "initiatorname.iscsi"
    initiator.write_text("InitiatorName=iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1\n")
    return NodeService(NodeConfig(ids.DRIVER_NAME, "worker-1", kubelet.resolve(), initiator, "zone-a", 16,
                                  kubelet / "plugins" / ids.DRIVER_NAME / "staged"), iscsi=FakeIscsi())


@pytest.fixture
def mounts(monkeypatch):
    """The mount table: a list of mount.Mount the node plugin sees; mount() appends to it."""
    table: list[mount.Mount] = []
    monkeypatch.setattr(mount, "mounts", lambda: list(table))
    return table


def stage_request(node: NodeService, fs: str = "ext4", mode=M.SINGLE_NODE_WRITER) -> csi.NodeStageVolumeRequest:
    staging = node.config.kubelet_dir / "plugins" / "kubernetes.io" / "csi" / "x" / "globalmount"
    staging.mkdir(parents=True, exist_ok=True)
    return csi.NodeStageVolumeRequest(
        volume_id=VID, staging_target_path=str(staging),
        # a context of the driver before node-bound grants: the secrets in it (contract.py reads those still)
        publish_context={contract.TARGET_IQN: REF.iqn, contract.PORTALS: PORTAL, contract.LUN: "0",
                         contract.LEGACY_CHAP_USER: "u1234567890", contract.LEGACY_CHAP_SECRET: "s" * 24},
        volume_capability=csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs),
                                               access_mode=M(mode=mode)))


def mount_tools(fake_run, mounts: list[mount.Mount]) -> None:
    def do_mount(argv):
        mounts.append(mount.Mount(argv[-2], argv[-1], argv[argv.index("-t") + 1], ("rw",)))
        return 0, "", ""
    fake_run.on("mount", fn=do_mount)
    for tool in ("mkfs.ext4", "mkfs.xfs", "resize2fs", "xfs_growfs", "e2fsck"):
        fake_run.on(tool)
    fake_run.on("umount")
    fake_run.on("blockdev", "--flushbufs")


def writes(fake_run) -> list[list[str]]:
    return [c for c in fake_run.calls if c[0] in ("mkfs.ext4", "mkfs.xfs", "mount", "resize2fs", "xfs_growfs")]


@pytest.mark.parametrize("case, fs, found", [("gpt", "ext4", "'gpt' partition table"),
                                             ("dos", "ext4", "'dos' partition table"),
                                             ("gpt", "xfs", "'gpt' partition table"),
                                             ("lvm2_member", "ext4", "'LVM2_member'"),
                                             ("ext4_dos", "ext4", "'dos' partition table")])
def test_stage_refuses_a_device_with_any_other_signature_and_writes_nothing(fake_run, node, mounts, case, fs,
                                                                            found):
    """Issue 12, defect 1: a disk whose only signature is a partition table was formatted."""
    fake_run.on("blkid", fn=fake_blkid(case))
    mount_tools(fake_run, mounts)
    with pytest.raises(errors.CsiError) as e:
        node.NodeStageVolume(stage_request(node, fs), None)
    assert e.value.code == errors.Code.FAILED_PRECONDITION
    assert found in e.value.message and "nothing was written" in e.value.message
    assert writes(fake_run) == [] and mounts == []
    assert node.iscsi.logouts == [REF.iqn]       # the failed stage logged out again
    assert not node._record_path(VID).exists()


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_stage_formats_a_blank_device(fake_run, node, mounts, fs):
    fake_run.on("blkid", fn=fake_blkid("blank"))
    mount_tools(fake_run, mounts)
    node.NodeStageVolume(stage_request(node, fs), None)
    assert writes(fake_run)[0][0] == f"mkfs.{fs}" and writes(fake_run)[0][-1] == DEVICE
    assert [(m.source, m.fs_type) for m in mounts] == [(DEVICE, fs)]
    # the filesystem mkfs just made fills the device: nothing to grow
    assert [c[0] for c in writes(fake_run)] == [f"mkfs.{fs}", "mount"]


def test_stage_leaves_the_disk_without_a_scheduler_a_udev_rule_set_after_the_login(fake_run, node, mounts,
                                                                                     sys_block):
    """The plugin sets `none` as it finds the disk (disk_queue.py); a host's udev rule may set mq-deadline after
    that, while mkfs runs: the stage sets `none` again at its end."""
    scheduler = sys_block / Path(DEVICE).name / "queue" / "scheduler"
    scheduler.parent.mkdir(parents=True)
    scheduler.write_text("[mq-deadline] none\n")           # FakeIscsi's wait_for_device leaves it so
    fake_run.on("blkid", fn=fake_blkid("blank"))
    mount_tools(fake_run, mounts)
    node.NodeStageVolume(stage_request(node, "ext4"), None)
    assert scheduler.read_text() == "none"


@pytest.mark.parametrize("case", ["ext4", "xfs"])
def test_stage_mounts_a_filesystem_it_finds_without_formatting(fake_run, node, mounts, case):
    fake_run.on("blkid", fn=fake_blkid(case))
    mount_tools(fake_run, mounts)
    node.NodeStageVolume(stage_request(node, "ext4"), None)
    assert not [c for c in fake_run.calls if c[0].startswith("mkfs")]
    assert [(m.source, m.fs_type) for m in mounts] == [(DEVICE, case)]
    # one found may be smaller than its device (a restore or clone made bigger than its source): grown
    assert [c[0] for c in writes(fake_run)] == ["mount", "resize2fs" if case == "ext4" else "xfs_growfs"]


@pytest.mark.parametrize("rc, repaired", [(0, False), (1, True)])
def test_an_ext4_filesystem_is_checked_before_a_read_write_mount(fake_run, node, mounts, caplog, rc, repaired):
    """e2fsck -p first (a clean filesystem costs a superblock read): a filesystem the kernel marked with errors
    after a storage outage is repaired and mounts read-write again, instead of going read-only at once."""
    fake_run.on("blkid", fn=fake_blkid("ext4"))
    mount_tools(fake_run, mounts)
    fake_run.on("e2fsck", rc=rc, stdout=f"{DEVICE}: clean\n" if not rc else f"{DEVICE}: 11/1024 files\n")
    with caplog.at_level(logging.WARNING):
        node.NodeStageVolume(stage_request(node, "ext4"), None)
    ran = [c[0] for c in fake_run.calls if c[0] in ("e2fsck", "mount")]
    assert ran == ["e2fsck", "mount"] and [m.fs_type for m in mounts] == ["ext4"]
    assert ("repaired its ext4 filesystem" in caplog.text) == repaired


def test_an_ext4_filesystem_with_errors_e2fsck_may_not_repair_is_not_mounted(fake_run, node, mounts):
    fake_run.on("blkid", fn=fake_blkid("ext4"))
    mount_tools(fake_run, mounts)
    fake_run.on("e2fsck", rc=4, stdout=f"{DEVICE}: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.\n")
    with pytest.raises(errors.CsiError) as e:
        node.NodeStageVolume(stage_request(node, "ext4"), None)
    assert e.value.code == errors.Code.FAILED_PRECONDITION
    assert "RUN fsck MANUALLY" in e.value.message and "nothing was mounted" in e.value.message
    assert mounts == [] and node.iscsi.logouts == [REF.iqn]


@pytest.mark.parametrize("case, fs, mode", [("ext4", "ext4", M.MULTI_NODE_READER_ONLY),
                                             ("xfs", "xfs", M.SINGLE_NODE_WRITER)])
def test_a_read_only_stage_and_xfs_are_not_checked(fake_run, node, mounts, case, fs, mode):
    """A read-only LUN cannot take a repair; xfs replays its log at mount and has no -p mode."""
    fake_run.on("blkid", fn=fake_blkid(case))
    mount_tools(fake_run, mounts)
    node.NodeStageVolume(stage_request(node, fs, mode=mode), None)
    assert [m.fs_type for m in mounts] == [case]
    assert not [c for c in fake_run.calls if c[0] == "e2fsck"]


def test_a_blank_device_published_read_only_is_not_formatted(fake_run, node, mounts):
    fake_run.on("blkid", fn=fake_blkid("blank"))
    mount_tools(fake_run, mounts)
    with pytest.raises(errors.CsiError) as e:
        node.NodeStageVolume(stage_request(node, mode=M.MULTI_NODE_READER_ONLY), None)
    assert e.value.code == errors.Code.FAILED_PRECONDITION and writes(fake_run) == []


# ---------------------------------------------------------------------------------------------- defect 9

@pytest.mark.parametrize("source", ["/dev/sdc", "tmpfs"])
def test_stage_refuses_a_staging_path_that_holds_something_else(fake_run, node, mounts, source):
    """Issue 12, defect 9: a stage that found anything mounted at its staging path returned OK."""
    req = stage_request(node)
    mounts.append(mount.Mount(source, req.staging_target_path, "ext4", ("rw",)))
    with pytest.raises(errors.CsiError) as e:
        node.NodeStageVolume(req, None)
    assert e.value.code == errors.Code.FAILED_PRECONDITION
    assert source in e.value.message and DEVICE in e.value.message
    assert fake_run.calls == [] and node.iscsi.logins == [] and not node._record_path(VID).exists()


def test_stage_refuses_a_mount_whose_disk_is_gone(fake_run, node, mounts):
    """The staging mount is there, the volume's disk is not (its session was logged out under it): the mount
    is not this volume's disk any more, whatever name it had."""
    req = stage_request(node)
    mounts.append(mount.Mount(DEVICE, req.staging_target_path, "ext4", ("rw",)))
    node.iscsi.disk = None
    with pytest.raises(errors.CsiError) as e:
        node.NodeStageVolume(req, None)
    assert e.value.code == errors.Code.FAILED_PRECONDITION and "no disk" in e.value.message


def test_stage_that_finds_its_own_disk_mounted_is_a_repeat(fake_run, node, mounts):
    req = stage_request(node)
    mounts.append(mount.Mount(DEVICE, req.staging_target_path, "ext4", ("rw",)))
    node.NodeStageVolume(req, None)
    assert fake_run.calls == [] and node.iscsi.logins == []


# ---------------------------------------------------------------------------------------------- the ledger

def test_stage_enters_its_target_in_the_ledger_before_the_login_and_unstage_removes_it(fake_run, node, mounts):
    """The node plugin logs out at start only what its ledger says it logged in (issue 12: two releases of
    the driver on one worker): the entry is there before the login and goes only after the logout."""
    ledger = node.config.state_dir / "logins" / REF.iqn
    seen = []
    login = node.iscsi.login
    node.iscsi.login = lambda target: (seen.append(ledger.exists()), login(target))
    fake_run.on("blkid", fn=fake_blkid("ext4"))
    mount_tools(fake_run, mounts)
    req = stage_request(node)
    node.NodeStageVolume(req, None)
    assert seen == [True] and ledger.stat().st_mode & 0o777 == 0o600
    logout = node.iscsi.logout
    node.iscsi.logout = lambda iqn: (seen.append(ledger.exists()), logout(iqn))
    fake_run.on("umount", fn=lambda argv: (mounts.clear(), (0, "", ""))[1])
    node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=VID, staging_target_path=req.staging_target_path),
                           None)
    assert seen == [True, True] and not ledger.exists() and node.iscsi.logouts == [REF.iqn]


def test_a_failed_stage_leaves_no_ledger_entry(fake_run, node, mounts):
    fake_run.on("blkid", fn=fake_blkid("gpt"))
    mount_tools(fake_run, mounts)
    with pytest.raises(errors.CsiError):
        node.NodeStageVolume(stage_request(node), None)
    assert node.iscsi.logouts == [REF.iqn] and not (node.config.state_dir / "logins" / REF.iqn).exists()
