"""Whose iscsiadm the node plugin runs (csi/node/iscsiadm_mode.py): the host's through nsenter in host mode, for
every iscsiadm command, and the start-up check that compares the image's version with the host's."""

import os

import pytest

from csi.node import iscsiadm_mode as mode
from csi.node.iscsi import Iscsiadm, Target

HOST = list(mode.HOST_PREFIX)
T = Target("iqn.2026-11.dev.csi.lvm-iscsi:vg.lv", ("10.0.0.1:3260",), 0, "u1", "secret-123456789")
VERSION_OUT = "iscsiadm version 2.1.8\n"     # Debian 12's open-iscsi, as it printed it here


def test_host_mode_runs_every_iscsiadm_in_the_hosts_mount_namespace(fake_run, node_db):
    fake_run.on(*HOST, "iscsiadm", "-m", "session", rc=21)
    fake_run.on(*HOST, "iscsiadm", "-m", "node")
    tool = Iscsiadm(mode.prefix("host"))
    tool.login(T)
    tool.rescan(T.iqn)
    tool.logout(T.iqn)
    base = HOST + ["iscsiadm", "-m", "node", "-T", T.iqn]
    assert fake_run.calls[0] == base + ["-p", "10.0.0.1:3260", "-o", "new"]
    assert fake_run.calls[-3:] == [base + ["-R"], base + ["--logout"], base + ["-o", "delete"]]
    assert all(c[:len(HOST) + 1] == HOST + ["iscsiadm"] for c in fake_run.calls), fake_run.calls
    assert not [c for c in fake_run.calls if any("secret" in a for a in c)]


def test_image_mode_runs_the_images_iscsiadm(fake_run):
    assert mode.prefix("image") == ()
    fake_run.on("iscsiadm", "-m", "session", rc=21)
    Iscsiadm(mode.prefix("image")).sessions()
    assert fake_run.calls == [["iscsiadm", "-m", "session"]]
    with pytest.raises(ValueError):
        mode.prefix("chroot")


def test_version_is_read_from_iscsiadm_and_none_when_it_fails(fake_run):
    fake_run.on("iscsiadm", "--version", stdout=VERSION_OUT)
    fake_run.on(*HOST, "iscsiadm", "--version", rc=1, stderr="nsenter: failed to execute iscsiadm: No such file "
                                                              "or directory\n")
    assert mode.version() == "2.1.8"
    assert mode.version(mode.HOST_PREFIX) is None
    assert mode.parse_version("something else") is None


@pytest.mark.parametrize("args, problem, warning", [
    # image mode: different releases are what hangs logins: say what to set
    (("image", "2.1.10", "2.1.8", True), None, "set node.iscsiadm: host"),
    (("image", "2.1.8", "2.1.8", True), None, None),
    (("image", "2.1.8", None, False), None, None),        # the host not in view: nothing compared
    (("image", None, None, False), "not installed in the image", None),
    # host mode: the host's own tool, or a clear reason why not
    (("host", "2.1.10", "2.1.8", True), None, None),
    (("host", "2.1.10", None, True), "the host has no working iscsiadm", None),
    (("host", "2.1.10", "2.1.10", False), None, "lacks hostPID"),
])
def test_start_up_check(args, problem, warning):
    got = mode.check(*args)
    assert (got.problem is None) == (problem is None) and (problem or "") in (got.problem or ""), got
    assert (got.warning is None) == (warning is None) and (warning or "") in (got.warning or ""), got
    assert got.summary.startswith("iscsiadm: the " + ("host's" if args[0] == "host" else "image's"))


def test_the_host_is_in_view_when_pid_1_has_another_mount_namespace(tmp_path):
    for pid, ns in (("1", "mnt:[4026531841]"), ("self", "mnt:[4026532999]")):
        (tmp_path / pid / "ns").mkdir(parents=True)
        os.symlink(ns, tmp_path / pid / "ns" / "mnt")
    assert mode.host_in_view(tmp_path)
    os.unlink(tmp_path / "1" / "ns" / "mnt")
    os.symlink("mnt:[4026532999]", tmp_path / "1" / "ns" / "mnt")
    assert not mode.host_in_view(tmp_path)                  # the pod's own PID 1, or the plugin on the host
    assert not mode.host_in_view(tmp_path / "missing")


def test_startup_check_compares_the_images_version_with_the_hosts(fake_run, monkeypatch, caplog):
    monkeypatch.setattr(mode, "host_in_view", lambda: True)
    fake_run.on("iscsiadm", "--version", stdout="iscsiadm version 2.1.10\n")
    fake_run.on(*HOST, "iscsiadm", "--version", stdout=VERSION_OUT)
    got = mode.startup_check("image")
    assert got.warning and "2.1.10" in got.warning and "2.1.8" in got.warning
    assert "set node.iscsiadm: host" in caplog.text
