"""mkfs options (csi/mkfs_options.py): the StorageClass parameter mkfsOptions, checked strictly, carried in the
volume's attributes to the node, applied at mkfs; and the xfs default that older worker kernels can mount, checked
against the real mkfs.xfs of this machine (the xfsprogs of deploy/packages.txt, which scripts/setup installs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from csi import capabilities as caps
from csi import errors, ids, mkfs_options
from csi.config import NodeConfig
from csi.controller.service import volume_attributes
from csi.node.iscsi import Iscsiadm, Target
from csi.node.service import NodeService
from csi.proto import csi_pb2 as csi
from tests.unit.conftest import recorded_failure
from tests.unit.test_controller import cap, svc  # noqa: F401 - the controller over fake agents

M = csi.VolumeCapability.AccessMode
GiB = 1 << 30
DEFAULT_XFS = ["-m", "bigtime=0,inobtcount=0", "-i", "nrext64=0"]


# ---------------------------------------------------------------------------------------------- the parameter

@pytest.mark.parametrize("text,canonical", [
    ("", ""),
    ("   ", ""),
    ("-m bigtime=1", "-m bigtime=1"),
    ("-i size=512 -m inobtcount=1,bigtime=1", "-m bigtime=1,inobtcount=1 -i size=512"),
    ("-m bigtime=1 -m reflink=0", "-m bigtime=1,reflink=0"),
    ("-i nrext64=1  -i sparse=0", "-i nrext64=1,sparse=0"),
])
def test_options_are_parsed_into_a_canonical_form(text, canonical):
    assert str(mkfs_options.parse(text)) == canonical


@pytest.mark.parametrize("text", [
    "-f",                                   # overwrite whatever is on the device
    "-m bigtime=0 /dev/sda",                # a second device
    "-d name=/etc/passwd",                  # a file as the data section
    "-p /etc/shadow",                       # a protofile
    "-l logdev=/dev/sdb",
    "-L label",
    "-m uuid=00000000-0000-0000-0000-000000000000",
    "-m crc=0",                             # a V4 file system: deprecated, not offered
    "-m bigtime=2",
    "-m bigtime",
    "-m bigtime=0;reboot",
    "-m bigtime=0 $(reboot)",
    "-m bigtime=0,bigtime=1",               # twice: mkfs.xfs refuses it too
    "-m bigtime=0 -m bigtime=0",
    "-m inobtcount=1,finobt=0",             # mkfs.xfs would refuse it at stage time
    "-i size=4096",
    "--m bigtime=0",
    "-m\nbigtime=0\0",
    "-m\tbigtime=0",
    "-m " + ",".join(["reflink=1"] * 100),
])
def test_anything_outside_the_known_safe_options_is_refused(text):
    with pytest.raises(errors.CsiError) as e:
        mkfs_options.parse(text)
    assert e.value.code == errors.Code.INVALID_ARGUMENT and "mkfsOptions" in e.value.message


def test_the_xfs_default_turns_off_what_older_kernels_cannot_mount():
    assert mkfs_options.mkfs_args("xfs") == DEFAULT_XFS
    assert mkfs_options.mkfs_args("ext4") == []
    # A class's options go over the defaults, one -m and one -i (mkfs.xfs refuses a suboption given twice).
    assert mkfs_options.mkfs_args("xfs", mkfs_options.parse("-i size=1024 -m bigtime=1,reflink=0")) == [
        "-m", "bigtime=1,inobtcount=0,reflink=0", "-i", "nrext64=0,size=1024"]
    with pytest.raises(errors.CsiError):
        mkfs_options.mkfs_args("ext4", mkfs_options.parse("-m bigtime=1"))


def test_storage_class_parameter_and_its_file_system():
    assert caps.parse_params({"mkfsOptions": "-m  bigtime=1"}).mkfs_options == "-m bigtime=1"
    assert caps.parse_params({"csi.storage.k8s.io/fstype": "xfs", "mkfsOptions": "-m bigtime=1"}).mkfs_options
    assert caps.parse_params({}).mkfs_options == ""
    for params in ({"csi.storage.k8s.io/fstype": "ext4", "mkfsOptions": "-m bigtime=1"},
                   {"fsType": "xfs", "mkfsOptions": "-f"}):
        with pytest.raises(errors.CsiError) as e:
            caps.parse_params(params)
        assert e.value.code == errors.Code.INVALID_ARGUMENT


def _access(fs="xfs", block=False):
    return caps.Access(block, "" if block else fs, frozenset({M.SINGLE_NODE_WRITER}))


def test_attributes_of_a_volume_without_the_parameter_are_what_they_always_were():
    """The attributes are part of a CreateVolume request's identity (the agent compares them on a retry): a
    volume created before mkfsOptions existed must keep exactly its attribute set."""
    params = caps.parse_params({"csi.storage.k8s.io/fstype": "xfs"})
    assert volume_attributes(_access(), params) == {
        "accessType": "mount", "fsType": "xfs", "accessModes": "SINGLE_NODE_WRITER", "mutualChap": "false",
        "wipe": "true"}
    with_options = volume_attributes(_access(), caps.parse_params({"mkfsOptions": "-m bigtime=1"}))
    assert with_options.pop("mkfsOptions") == "-m bigtime=1"
    assert with_options == volume_attributes(_access(), params)
    # A raw block claim of the same class is never formatted: nothing to carry.
    block = volume_attributes(_access(block=True), caps.parse_params({"mkfsOptions": "-m bigtime=1"}))
    assert "mkfsOptions" not in block
    # The file system can come from the claim's capability instead of the class: ext4 does not take them.
    with pytest.raises(errors.CsiError):
        volume_attributes(_access("ext4"), caps.parse_params({"mkfsOptions": "-m bigtime=1"}))


def test_create_volume_hands_the_options_to_the_node_in_the_volume_context(svc):  # noqa: F811
    def create(name, parameters):
        return svc.CreateVolume(csi.CreateVolumeRequest(
            name=name, volume_capabilities=[cap(fs="xfs")], parameters=parameters,
            capacity_range=csi.CapacityRange(required_bytes=GiB)), None).volume

    vol = create("pvc-xfs", {"csi.storage.k8s.io/fstype": "xfs", "mkfsOptions": "-m bigtime=1,inobtcount=1"})
    assert dict(vol.volume_context) == {"fsType": "xfs", "accessType": "mount",
                                        "mkfsOptions": "-m bigtime=1,inobtcount=1"}
    assert dict(create("pvc-plain", {"csi.storage.k8s.io/fstype": "xfs"}).volume_context) == {
        "fsType": "xfs", "accessType": "mount"}
    with pytest.raises(errors.CsiError) as e:
        create("pvc-bad", {"csi.storage.k8s.io/fstype": "xfs", "mkfsOptions": "-m bigtime=1 /dev/sda"})
    assert e.value.code == errors.Code.INVALID_ARGUMENT
    assert all("pvc-bad" not in v.name for a in svc.agents.all() for v in a.volumes.values())


# ---------------------------------------------------------------------------------------------- the node

VID = "v1:storage-1:csi-vg:e2e-vol-0123456789"
PORTAL = "10.213.1.11:3260"


class DeviceAppears(Iscsiadm):
    def __init__(self, device: Path):
        super().__init__()
        self.device = device

    def wait_for_device(self, target: Target, timeout: float = 20.0) -> Path:
        return self.device


@pytest.fixture
def node(tmp_path, fake_run):
    kubelet = (tmp_path / "kubelet").resolve()
    kubelet.mkdir()
    initiator = tmp_path / "initiatorname.iscsi"
    initiator.write_text("InitiatorName=iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1\n")
    rc, _, err = recorded_failure("session_none")
    fake_run.on("iscsiadm", "-m", "session", rc=rc, stderr=err)
    fake_run.on("iscsiadm", "-m", "node")
    fake_run.on("blkid", rc=int((Path(__file__).parent / "recorded" / "blkid_blank.rc").read_text()))
    for tool in ("mkfs.xfs", "mkfs.ext4", "mount", "xfs_growfs", "resize2fs"):
        fake_run.on(tool)
    return NodeService(NodeConfig(ids.DRIVER_NAME, "worker-1", kubelet, initiator, "zone-a", 16,
                                  kubelet / "plugins" / ids.DRIVER_NAME / "staged"),
                       iscsi=DeviceAppears(tmp_path / "sdx"))


def stage(node, fs, context):
    staging = node.config.kubelet_dir / "plugins" / "kubernetes.io" / "csi" / ids.DRIVER_NAME / "x" / "globalmount"
    node.NodeStageVolume(csi.NodeStageVolumeRequest(
        volume_id=VID, staging_target_path=str(staging), volume_context=context,
        volume_capability=csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs),
                                               access_mode=M(mode=M.SINGLE_NODE_WRITER)),
        publish_context={"targetIqn": ids.parse_id(VID).iqn, "portals": PORTAL, "lun": "0", "chapUser": "u1",
                         "chapSecret": "s" * 24}), None)


def mkfs_calls(fake_run):
    return [c for c in fake_run.calls if c[0].startswith("mkfs.")]


@pytest.mark.parametrize("context,argv", [
    ({"fsType": "xfs"}, ["mkfs.xfs", "-q", *DEFAULT_XFS]),
    ({"fsType": "xfs", "mkfsOptions": "-m bigtime=1,inobtcount=1 -i nrext64=1"},
     ["mkfs.xfs", "-q", "-m", "bigtime=1,inobtcount=1", "-i", "nrext64=1"]),
])
def test_the_node_formats_xfs_with_the_volumes_options(node, fake_run, tmp_path, context, argv):
    stage(node, "xfs", context)
    assert mkfs_calls(fake_run) == [argv + [str(tmp_path / "sdx")]]


def test_ext4_is_made_as_before(node, fake_run, tmp_path):
    stage(node, "ext4", {"fsType": "ext4"})
    assert mkfs_calls(fake_run) == [["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                                     "lazy_itable_init=1,lazy_journal_init=1", str(tmp_path / "sdx")]]


@pytest.mark.parametrize("fs,options", [("xfs", "-d name=/etc/passwd"), ("xfs", "-m bigtime=1 /dev/sda"),
                                        ("ext4", "-m bigtime=1")])
def test_the_node_refuses_bad_options_before_it_logs_in(node, fake_run, fs, options):
    """A volume_context can come from a hand-made PV: the node checks it again, before any side effect."""
    with pytest.raises(errors.CsiError) as e:
        stage(node, fs, {"fsType": fs, "mkfsOptions": options})
    assert e.value.code == errors.Code.INVALID_ARGUMENT
    assert fake_run.calls == []


# ---------------------------------------------------------------------------------------------- the real mkfs.xfs

def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)
    if not path:
        pytest.fail(f"{name} not found: run scripts/setup (xfsprogs is in deploy/packages.txt)", pytrace=False)
    return path


def _features(image: Path) -> set[str]:
    out = subprocess.run([_tool("xfs_db"), "-r", "-c", "version", str(image)], capture_output=True, text=True,
                         check=True, env={**os.environ, "LC_ALL": "C"}).stdout
    # versionnum [0xb4a5+0x18a] = V5,NLINK,...,REFLINK,INOBTCNT,BIGTIME
    return set(out.split("=", 1)[1].strip().split(","))


@pytest.mark.parametrize("options,absent,present", [
    ("", {"BIGTIME", "INOBTCNT", "NREXT64"}, {"V5", "CRC", "REFLINK", "FINOBT"}),
    ("-m bigtime=1,inobtcount=1", {"NREXT64"}, {"BIGTIME", "INOBTCNT"}),
])
def test_the_real_mkfs_xfs_takes_the_options_and_makes_what_they_say(tmp_path, options, absent, present):
    """The argv the node plugin builds, run by this machine's mkfs.xfs on a sparse file (a block device needs root
    and a kernel; the options are the same). Here it is xfsprogs 6.1.0 (Debian 12, the Kubernetes tier's image);
    the Dockerfile's Debian 13 has a later 6.x, which knows the same options (nrext64 since 5.19)."""
    image = tmp_path / "xfs.img"
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run([_tool("mkfs.xfs"), "-q", *mkfs_options.mkfs_args("xfs", mkfs_options.parse(options)),
                    str(image)], check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"})
    features = _features(image)
    assert not absent & features and present <= features, features
