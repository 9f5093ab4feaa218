"""The lab itself, on a real kernel: nodes boot, LVM + LIO export with ACL and CHAP, an open-iscsi login
across the lab network, mkfs / mount / write / read, a power cut of the storage node, and the host's own
state left alone."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csi.lab import VG_NAME, GuestResult, LabError

pytestmark = pytest.mark.e2e

PYTHON = sys.executable  # the project's venv; the nodes see it through hostfs
REPO = Path(__file__).resolve().parents[2]
TARGET_IQN = "iqn.2026-11.dev.csi.lvm-iscsi:lab-test-vol1"
LV = "vol1"
CHAP_USER = "labuser"
CHAP_PASSWORD = "labsecret123456"
# Host paths a node would write to, were its root not read-only with tmpfs / overlays on top.
WRITTEN = {}  # what the iSCSI test wrote, for the reboot test to read back
HOST_PATHS = ["/etc/lvm", "/etc/iscsi", "/etc/target", "/var/lib/iscsi", "/etc/machine-id", "/etc/hostname",
              "/etc/hosts"]

EXPORT = """
import json, sys
from rtslib_fb import (LUN, TPG, BlockStorageObject, FabricModule, MappedLUN, NetworkPortal, NodeACL,
                       Target)
a = json.load(sys.stdin)
so = BlockStorageObject(a["name"], dev=a["dev"])
tpg = TPG(Target(FabricModule("iscsi"), a["iqn"]), 1)
tpg.set_attribute("authentication", "1")
tpg.set_attribute("generate_node_acls", "0")
NetworkPortal(tpg, a["ip"], 3260)
lun = LUN(tpg, 0, so)
acl = NodeACL(tpg, a["initiator"])
acl.chap_userid = a["user"]
acl.chap_password = a["password"]
MappedLUN(acl, 0, lun)
tpg.enable = True
print(json.dumps({"acls": [n.node_wwn for n in tpg.node_acls], "luns": [l.lun for l in tpg.luns]}))
"""

UNEXPORT = """
import json, sys
from rtslib_fb import BlockStorageObject, FabricModule, Target
a = json.load(sys.stdin)
Target(FabricModule("iscsi"), a["iqn"], mode="lookup").delete()
BlockStorageObject(a["name"]).delete()
"""


def _snapshot(paths):
    seen = {}
    for top in paths:
        for root, dirs, files in os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top), [], [top])]:
            for name in dirs + files:
                p = os.path.join(root, name)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                seen[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
        seen.setdefault(top, os.path.exists(top))
    return seen


@pytest.fixture(scope="module", autouse=True)
def host_before():
    """Taken before the lab fixture boots anything (autouse fixtures come first in their scope)."""
    return _snapshot(HOST_PATHS)


def _wait_for(node, path, timeout=30):
    deadline = time.monotonic() + timeout
    while node.run(["test", "-e", path]).rc != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear on {node.name}: "
                        f"{node.run(['ls', '-l', '/dev/disk/by-path']).stdout}")
        node.run(["udevadm", "settle", "--timeout=5"])


def test_nodes_boot_with_their_identity(lab):
    s1, w1 = lab.node("storage-1"), lab.node("worker-1")
    assert (s1.ip, w1.ip) == (lab.subnet + ".11", lab.subnet + ".21")
    for node in (s1, w1):
        assert node.run(["hostname"]).stdout.strip() == node.name
        iqn = node.run(["cat", "/etc/iscsi/initiatorname.iscsi"], check=True).stdout
        assert iqn.strip() == f"InitiatorName={node.initiator_iqn}"
        assert node.run(["pidof", "iscsid"]).rc == 0
        # The host's tree is read-only in the guest; its /etc is an overlay of the node's own.
        assert node.run(["touch", "/usr/csilab-probe"]).rc != 0
        mounts = node.run(["cat", "/proc/mounts"]).stdout
        assert "overlay /etc overlay" in mounts and "tmpfs /run tmpfs" in mounts
    assert s1.run(["cat", "/etc/machine-id"]).stdout != w1.run(["cat", "/etc/machine-id"]).stdout
    assert s1.boot_seconds and w1.boot_seconds
    # Outside the lab's namespace its addresses lead nowhere (never to the default route).
    routes = subprocess.run(["ip", "route", "show", "type", "blackhole"], capture_output=True, text=True).stdout
    assert f"blackhole {lab.subnet}.0/24" in routes
    # Each node reaches the other across the lab switch.
    probe = "import socket,sys; socket.create_connection((sys.argv[1], 7000), timeout=5).close()"
    w1.run([PYTHON, "-c", probe, s1.ip], check=True)
    report = json.loads(s1.run(["lvs", "--reportformat", "json", "-o", "lv_name,lv_attr,vg_name"],
                               check=True).stdout)
    pools = [lv for lv in report["report"][0]["lv"] if lv["lv_name"] == "thinpool"]
    assert pools and pools[0]["vg_name"] == VG_NAME and pools[0]["lv_attr"].startswith("t")


def test_guest_processes(lab):
    w1 = lab.node("worker-1")
    with pytest.raises(LabError, match="argv must be a list"):
        w1.run("echo hi")
    assert w1.run(["sh", "-c", "echo out; echo err >&2; exit 3"]) == GuestResult(3, "out\n", "err\n")
    with pytest.raises(LabError, match="timeout"):
        w1.run(["sleep", "30"], timeout=1)
    w1.spawn("sleeper", ["sh", "-c", "echo started $GREETING; exec sleep 300"], env={"GREETING": "hello"})
    deadline = time.monotonic() + 10
    while "started hello" not in w1.log_path("sleeper").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert w1.status("sleeper")["running"]
    w1.signal("sleeper", 9)
    assert w1.wait_exit("sleeper", timeout=10) == -9
    assert "started hello" in w1.log_path("sleeper").read_text()


def test_iscsi_export_login_mkfs_write_read(lab):
    s1, w1 = lab.node("storage-1"), lab.node("worker-1")
    dev = f"/dev/{VG_NAME}/{LV}"
    s1.run(["lvcreate", "-q", "-V", "256M", "-T", f"{VG_NAME}/thinpool", "-n", LV], timeout=60, check=True)
    out = s1.run([PYTHON, "-c", EXPORT], timeout=60, check=True, input=json.dumps({
        "name": LV, "dev": dev, "iqn": TARGET_IQN, "ip": s1.ip, "initiator": w1.initiator_iqn,
        "user": CHAP_USER, "password": CHAP_PASSWORD})).stdout
    assert json.loads(out) == {"acls": [w1.initiator_iqn], "luns": [0]}

    portal = f"{s1.ip}:3260"
    found = w1.run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", portal], timeout=30, check=True).stdout
    assert f"{portal},1 {TARGET_IQN}" in found
    node = ["iscsiadm", "-m", "node", "-T", TARGET_IQN, "-p", portal]

    def set_chap(password):
        for key, value in (("node.session.auth.authmethod", "CHAP"),
                           ("node.session.auth.username", CHAP_USER),
                           ("node.session.auth.password", password)):
            w1.run([*node, "-o", "update", "-n", key, "-v", value], check=True)

    set_chap("wrongpassword123")
    assert w1.run([*node, "--login"], timeout=60).rc == 24  # ISCSI_ERR_LOGIN_AUTH_FAILED: CHAP is enforced
    set_chap(CHAP_PASSWORD)
    w1.run([*node, "--login"], timeout=60, check=True)
    disk = f"/dev/disk/by-path/ip-{portal}-iscsi-{TARGET_IQN}-lun-0"
    _wait_for(w1, disk)

    w1.run(["mkfs.ext4", "-q", "-F", disk], timeout=120, check=True)
    w1.run(["mkdir", "-p", "/run/mnt"], check=True)
    w1.run(["mount", disk, "/run/mnt"], timeout=60, check=True)
    w1.run(["dd", "if=/dev/urandom", "of=/run/mnt/data", "bs=1M", "count=8", "status=none"], timeout=60,
           check=True)
    written = w1.run(["sha256sum", "/run/mnt/data"], check=True).stdout.split()[0]
    w1.run(["umount", "/run/mnt"], timeout=60, check=True)
    w1.run(["mount", disk, "/run/mnt"], timeout=60, check=True)  # read back after a remount: from the target
    w1.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    assert w1.run(["sha256sum", "/run/mnt/data"], check=True).stdout.split()[0] == written
    w1.run(["umount", "/run/mnt"], timeout=60, check=True)
    w1.run([*node, "--logout"], timeout=60, check=True)
    w1.run([*node, "-o", "delete"], check=True)
    assert w1.run(["iscsiadm", "-m", "session"]).rc == 21  # no sessions left

    # Without its export (LIO holds the LV open), the storage node has the very bytes the worker wrote.
    s1.run([PYTHON, "-c", UNEXPORT], timeout=60, check=True, input=json.dumps({"name": LV, "iqn": TARGET_IQN}))
    assert s1.run(["test", "-e", f"/sys/kernel/config/target/iscsi/{TARGET_IQN}"]).rc == 1
    s1.run(["mkdir", "-p", "/run/check"], check=True)
    s1.run(["mount", "-o", "ro", dev, "/run/check"], timeout=60, check=True)
    assert s1.run(["sha256sum", "/run/check/data"], check=True).stdout.split()[0] == written
    s1.run(["umount", "/run/check"], timeout=60, check=True)
    WRITTEN["sha256"] = written


CONCURRENT = """
import glob, json, sys
from concurrent.futures import ThreadPoolExecutor
from csi.storage.lio import Access, Lio, Portal
a = json.load(sys.stdin)
lio = Lio([Portal(a["ip"])])
def export(name):
    iqn = a["prefix"] + name
    lio.export(iqn, name, "/dev/%s/%s" % (a["vg"], name), thin=True)
    lio.grant(iqn, Access(a["initiator"], False, "user" + name, "secret-of-" + name))
def unexport(name):
    lio.unexport(a["prefix"] + name, name)
with ThreadPoolExecutor(8) as pool:
    list(pool.map(export, a["names"]))  # re-raises the first failure
    exported = sorted(i for i in lio.exported_iqns(a["prefix"]) if lio.is_exported(i))
    list(pool.map(unexport, a["names"]))
stores = sorted(glob.glob("/sys/kernel/config/target/core/iblock_*/race*"))
print(json.dumps({"exported": exported, "left": lio.exported_iqns(a["prefix"]), "stores": stores}))
"""


@pytest.mark.campaign   # scripts/fault-campaign; its load test drives the same concurrency through the driver
def test_lio_exports_and_unexports_concurrently(lab):
    """The agent serves calls on many threads. rtslib objects are views of configfs paths, so one thread's
    removal of a target once broke another's walk over the targets (FileNotFoundError, found by the load test);
    every change now runs under one lock, and a backstore goes without that walk."""
    s1, w1 = lab.node("storage-1"), lab.node("worker-1")
    names = [f"race{i:02d}" for i in range(16)]
    for name in names:
        s1.run(["lvcreate", "-q", "-V", "16M", "-T", f"{VG_NAME}/thinpool", "-n", name], timeout=60, check=True)
    prefix = "iqn.2026-11.dev.csi.lvm-iscsi:race-"
    try:
        out = s1.run([PYTHON, "-c", CONCURRENT], timeout=180, check=True, cwd=str(REPO), input=json.dumps({
            "ip": s1.ip, "prefix": prefix, "vg": VG_NAME, "names": names,
            "initiator": w1.initiator_iqn})).stdout
        # Every export was whole, and every target and backstore went again.
        assert json.loads(out) == {"exported": [prefix + n for n in names], "left": [], "stores": []}
    finally:
        s1.run(["lvremove", "-q", "-y", *[f"{VG_NAME}/{n}" for n in names]], timeout=120)


def test_storage_reboot_keeps_disk_and_vg(lab):
    s1 = lab.node("storage-1")
    assert s1.disk is not None and s1.disk.exists()
    boots = len(s1.boot_seconds)
    s1.reboot(timeout=120)  # power cut: the UML process group is killed
    assert len(s1.boot_seconds) == boots + 1
    assert s1.disk.exists()
    # The kernel's state is gone: LIO has no target any more (rebuilding exports is the agent's job).
    assert s1.run(["test", "-e", f"/sys/kernel/config/target/iscsi/{TARGET_IQN}"]).rc == 1
    # The VG and its LVs are on the disk; activation is left to whoever owns them (the agent).
    report = json.loads(s1.run(["lvs", "--reportformat", "json", "-o", "lv_name,lv_active", VG_NAME],
                               check=True).stdout)
    names = {lv["lv_name"] for lv in report["report"][0]["lv"]}
    assert {"thinpool", LV} <= names
    s1.run(["lvchange", "-ay", f"{VG_NAME}/{LV}"], timeout=60, check=True)
    written = WRITTEN.get("sha256")
    if written:
        s1.run(["mkdir", "-p", "/run/check"], check=True)
        s1.run(["mount", "-o", "ro", f"/dev/{VG_NAME}/{LV}", "/run/check"], timeout=60, check=True)
        assert s1.run(["sha256sum", "/run/check/data"], check=True).stdout.split()[0] == written
        s1.run(["umount", "/run/check"], timeout=60, check=True)


def test_host_state_untouched(lab, host_before):
    """Nodes ran LVM, LIO and iscsid with the host's / as their root: none of it may show on the host."""
    probes = ["/etc/lvm/archive/csilab-probe", "/etc/iscsi/csilab-probe", "/var/lib/iscsi/csilab-probe"]
    for node in lab.nodes.values():
        node.run(["touch", *probes], check=True)  # the node's own /etc and /var take them
    assert not [p for p in probes if os.path.exists(p)]
    assert _snapshot(HOST_PATHS) == host_before
    for node in lab.nodes.values():
        assert "CSILAB-READY" in Path(node.console).read_text(errors="replace")
