import pytest

from csi import capabilities as caps
from csi import errors
from csi.proto import csi_pb2 as csi

M = csi.VolumeCapability.AccessMode


def mount(mode, fs="", flags=()):
    return csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume(fs_type=fs, mount_flags=list(flags)),
                                access_mode=M(mode=mode))


def block(mode):
    return csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(), access_mode=M(mode=mode))


@pytest.mark.parametrize("mode", [M.SINGLE_NODE_WRITER, M.SINGLE_NODE_SINGLE_WRITER, M.SINGLE_NODE_MULTI_WRITER,
                                  M.MULTI_NODE_READER_ONLY, M.SINGLE_NODE_READER_ONLY])
def test_mount_modes(mode):
    a = caps.check_capability(mount(mode))
    assert not a.block and a.fs_type == "ext4"


def test_multi_writer_only_for_block():
    assert caps.check_capability(block(M.MULTI_NODE_MULTI_WRITER)).block
    with pytest.raises(errors.CsiError) as e:
        caps.check_capability(mount(M.MULTI_NODE_MULTI_WRITER))
    assert e.value.code == errors.Code.INVALID_ARGUMENT and "raw block" in e.value.message


@pytest.mark.parametrize("cap,needle", [
    (csi.VolumeCapability(access_mode=M(mode=M.SINGLE_NODE_WRITER)), "access type"),
    (csi.VolumeCapability(mount=csi.VolumeCapability.MountVolume()), "access mode"),
    (mount(M.SINGLE_NODE_WRITER, fs="btrfs"), "btrfs"),
    (mount(M.MULTI_NODE_SINGLE_WRITER), "not supported"),
    (mount(M.SINGLE_NODE_WRITER, flags=["-o", "x"]), "mount flag"),
    (mount(M.SINGLE_NODE_WRITER, flags=["ro;reboot x"]), "mount flag"),
])
def test_bad_capabilities(cap, needle):
    with pytest.raises(errors.CsiError) as e:
        caps.check_capability(cap)
    assert e.value.code == errors.Code.INVALID_ARGUMENT and needle in e.value.message


def test_mixed_capabilities_refused():
    with pytest.raises(errors.CsiError):
        caps.check_capabilities([mount(M.SINGLE_NODE_WRITER), block(M.SINGLE_NODE_WRITER)])
    with pytest.raises(errors.CsiError):
        caps.check_capabilities([])
    a = caps.check_capabilities([mount(M.SINGLE_NODE_WRITER, "xfs"), mount(M.MULTI_NODE_READER_ONLY, "xfs")])
    assert a.fs_type == "xfs" and not a.read_only and not a.single_node


def test_read_only_and_single_node():
    assert caps.check_capabilities([mount(M.MULTI_NODE_READER_ONLY)]).read_only
    assert caps.check_capabilities([mount(M.SINGLE_NODE_WRITER)]).single_node


def test_params_defaults_and_kubernetes_keys():
    p = caps.parse_params({"csi.storage.k8s.io/pvc/name": "x", "csi.storage.k8s.io/fstype": "xfs"})
    # wipe not set: None, so the agent's wipeThick decides (issue 12, defect 3)
    assert (p.pool, p.thin, p.fs_type, p.mutual_chap, p.wipe) == ("", None, "xfs", False, None)
    p = caps.parse_params({"pool": "fast", "type": "thick", "mutualChap": "true", "wipe": "false"})
    assert (p.pool, p.thin, p.mutual_chap, p.wipe) == ("fast", False, True, False)


@pytest.mark.parametrize("params,needle", [({"color": "red"}, "unknown parameter"), ({"type": "fat"}, "thin or thick"),
                                           ({"fsType": "ntfs"}, "ntfs"), ({"mutualChap": "yes"}, "true or false"),
                                           ({"pool": "../x"}, "not a pool name")])
def test_bad_params(params, needle):
    with pytest.raises(errors.CsiError) as e:
        caps.parse_params(params)
    assert e.value.code == errors.Code.INVALID_ARGUMENT and needle in e.value.message
