"""Fakes for the unit tier: a runner that records every argv and replays recorded real output."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from csi import runner

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> str:
    return (RECORDED / name).read_text()


def recorded_failure(name: str) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of a command recorded failing in a real kernel (see recorded/README)."""
    return int(recorded(f"{name}.rc").strip()), "", recorded(f"{name}.stderr")


class Overlap:
    """A fake command's body (FakeRunner.on(..., fn=Overlap(...))) that counts how many of its commands run at
    once: `running` now, `most` the highest seen. Each holds `hold` seconds, or until `gate` is set."""

    def __init__(self, hold: float = 0.0, gate=None) -> None:
        import threading
        self.hold, self.gate = hold, gate
        self.running = self.most = 0
        self._mutex = threading.Lock()

    def __call__(self, argv) -> tuple[int, str, str]:
        import time
        with self._mutex:
            self.running += 1
            self.most = max(self.most, self.running)
        if self.gate is not None:
            self.gate.wait(10)
        else:
            time.sleep(self.hold)
        with self._mutex:
            self.running -= 1
        return 0, "", ""


class FakeRunner:
    """Replaces runner.run's process start: answers come from `responses`, matched by argv prefix (the
    longest prefix wins; among equals, the latest registered); every call is recorded with its full argv and environment."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.timeouts: list[float | None] = []
        self.responses: list[tuple[tuple[str, ...], Callable[[list[str]], tuple[int, str, str]]]] = []

    def on(self, *prefix: str, rc: int = 0, stdout: str = "", stderr: str = "", fn=None) -> None:
        self.responses.append((prefix, fn or (lambda argv: (rc, stdout, stderr))))

    def __call__(self, argv, *, input=None, capture_output=True, text=True, timeout=None, env=None, check=False,
                 stdin=None):
        argv = list(argv)
        self.calls.append(argv)
        self.envs.append(env or {})
        self.timeouts.append(timeout)
        best = None
        for prefix, fn in self.responses:
            if tuple(argv[:len(prefix)]) == prefix and (best is None or len(prefix) >= len(best[0])):
                best = (prefix, fn)
        if best is None:
            raise AssertionError(f"unexpected command {argv}")
        rc, out, err = best[1](argv)
        core = argv[argv.index("iscsiadm"):] if "iscsiadm" in argv else []   # the host's, through nsenter, too
        if rc in (0, 15) and core[:3] == ["iscsiadm", "-m", "node"] and argv[-2:] == ["-o", "new"]:
            make_node_record(argv[argv.index("-T") + 1], argv[argv.index("-p") + 1])
        import subprocess
        return subprocess.CompletedProcess(argv, rc, out, err)


def make_node_record(iqn: str, portal: str) -> Path:
    """What `iscsiadm -m node -o new` leaves in the node database (Debian's layout: a directory per portal,
    a file per iface), in the unit tier's own database (the node_db fixture), never the host's."""
    from csi.node import iscsi, noderecord
    path = iscsi.NODE_DB_DIRS[0] / iqn / f"{noderecord.portal_prefix(portal)},1" / "default"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# BEGIN RECORD 2.1.8\nnode.name = {iqn}\nnode.tpgt = 1\nnode.startup = automatic\n"
                    f"node.session.auth.authmethod = None\nnode.conn[0].address = {portal.rsplit(':', 1)[0]}\n"
                    "# END RECORD\n")
    return path


@pytest.fixture(autouse=True)
def node_db(tmp_path, monkeypatch) -> Path:
    """The iSCSI node database the node plugin reads and writes: a temporary directory in every unit test."""
    from csi.node import iscsi
    db = tmp_path / "iscsi-nodes"
    db.mkdir()
    monkeypatch.setattr(iscsi, "NODE_DB_DIRS", (db,))
    return db


@pytest.fixture(autouse=True)
def sys_block(tmp_path, monkeypatch) -> Path:
    """Where the node plugin sets its disks' schedulers: a temporary directory, never the host's /sys/block."""
    from csi.node import disk_queue
    path = tmp_path / "sys-block"
    path.mkdir()
    monkeypatch.setattr(disk_queue, "SYS_BLOCK", path)
    return path


class IscsiSysfs:
    """The kernel's iSCSI sessions as sysfs shows them (/sys/class/iscsi_session/session<sid>/targetname, and
    /sys/class/iscsi_connection/connection<sid>:0/persistent_address and persistent_port), their disks, and
    /dev, in a temporary tree."""

    def __init__(self, root: Path):
        self.sessions, self.connections = root / "iscsi_session", root / "iscsi_connection"
        self.dev = root / "dev"
        self.sessions.mkdir(parents=True)
        self.connections.mkdir()
        self.dev.mkdir()

    def add(self, sid: int, iqn: str, address: str, port: int = 3260) -> None:
        (self.sessions / f"session{sid}").mkdir(exist_ok=True)
        (self.sessions / f"session{sid}" / "targetname").write_text(iqn + "\n")
        conn = self.connections / f"connection{sid}:0"
        conn.mkdir()
        (conn / "persistent_address").write_text(address + "\n")
        (conn / "persistent_port").write_text(f"{port}\n")

    def add_disk(self, sid: int, lun: int, name: str, node: bool = True) -> Path:
        """LUN `lun` of session `sid` as the kernel registers it (host 2 + sid, channel 0, target 0), and its
        /dev node unless `node` is False (devtmpfs makes it just after the sysfs entry)."""
        host = 2 + sid
        lun_dir = self.sessions / f"session{sid}" / "device" / f"target{host}:0:0" / f"{host}:0:0:{lun}"
        (lun_dir / "block" / name).mkdir(parents=True)
        (lun_dir.parent / "power").mkdir(exist_ok=True)   # sysfs keeps other entries beside the LUNs
        if node:
            (self.dev / name).touch()
        return self.dev / name

    def set_state(self, sid: int, state: str) -> None:
        (self.sessions / f"session{sid}").mkdir(exist_ok=True)
        (self.sessions / f"session{sid}" / "state").write_text(state + "\n")


@pytest.fixture(autouse=True)
def iscsi_sysfs(tmp_path, monkeypatch) -> IscsiSysfs:
    """The iSCSI sessions the node plugin reads in sysfs: none unless a test adds one, never the host's."""
    from csi.node import iscsi
    tree = IscsiSysfs(tmp_path / "sys-class")
    monkeypatch.setattr(iscsi, "SYSFS_SESSIONS", tree.sessions)
    monkeypatch.setattr(iscsi, "SYSFS_CONNECTIONS", tree.connections)
    monkeypatch.setattr(iscsi, "DEV", tree.dev)
    return tree


@pytest.fixture
def fake_run(monkeypatch) -> FakeRunner:
    fake = FakeRunner()
    monkeypatch.setattr(runner.subprocess, "run", fake)
    return fake
