"""The open-iscsi initiator, through iscsiadm (os-brick's lessons kept).

- Node records are made directly (`-m node -o new`), never by discovery, with node.startup=manual: a rebooted
  worker logs into nothing by itself, and a record nobody stages is deleted at unstage or at start.
- Exit codes carry meaning: 15 = session exists (success for login), 21 = no records / no sessions (success
  for logout and delete).
- CHAP secrets are masked in every log line and error message (runner's `secrets`).
- Login is bounded: a short login timeout and few retries instead of open-iscsi's 8 x 15 s.
- Every `iscsiadm -m node` command of this process runs under one lock (os-brick serializes its connects
  too): open-iscsi's update, delete, login, logout and listing walk every record in its database, and a
  record that another volume's stage or unstage adds or removes meanwhile makes the walk fail with exit 6
  ("Could not execute operation on all records"). Seen with 50 stages at once per worker.
- Node record writes are never cut short by the RPC's deadline: iscsiadm truncates a record file, then writes
  it, and one killed in between leaves a record without a target name that makes every later `-o new` of that
  target fail (exit 6) for good. Seen under load, when a call's deadline was spent and the runner's 2 s floor
  killed iscsiadm waiting for the record lock. Such a broken record is also removed and the write tried again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from csi import errors, runner
from csi.node import disk_queue, noderecord
from csi.storage.lio import Portal
from csi.runner import CommandError

log = logging.getLogger(__name__)

RC_SESSION_EXISTS = 15
RC_IDBM = 6          # ISCSI_ERR_IDBM: the node database failed (e.g. a record that a killed iscsiadm truncated)
RC_NO_OBJECTS = 21
# Time a node record change may take whatever the RPC's deadline (iscsiadm waits up to 30 s for its lock).
RECORD_TIMEOUT_S = 45.0
# Where open-iscsi keeps node records: Debian's and Red Hat's builds.
NODE_DB_DIRS = (Path("/etc/iscsi/nodes"), Path("/var/lib/iscsi/nodes"))
LOGIN_TIMEOUT_S = 10
LOGIN_RETRIES = 2
SYSFS_SESSIONS = Path("/sys/class/iscsi_session")
SYSFS_CONNECTIONS = Path("/sys/class/iscsi_connection")   # connection<sid>:<cid>
DEV = Path("/dev")
# Polling for a new disk in sysfs (a glob and a stat, cheap): it appears within some 0.1 s of the login.
DEVICE_POLL_S = 0.05
DEVICE_RESCAN_AT_S = (1.0, 3.0, 7.0)     # seconds after the wait began: a rescan of the target's sessions
_NODE_DB = threading.RLock()   # see the module doc


@contextlib.contextmanager
def _node_db_lock():
    """While no other `iscsiadm -m node` command or record write of this process runs. The wait counts
    against the call's deadline; when it is spent, nothing has been done and the caller retries."""
    if not _NODE_DB.acquire(timeout=runner.time_left()):
        raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED, "other iSCSI operations on this node took the "
                                                             "call's time; nothing was done, retry")
    try:
        yield
    finally:
        _NODE_DB.release()


def _node_db(argv: list[str], ok: tuple[int, ...] = (0,), secrets: tuple[str, ...] = ()) -> runner.Result:
    """Runs one `iscsiadm -m node` command while no other of this process runs (_node_db_lock)."""
    with _node_db_lock():
        return runner.run(argv, ok_codes=ok, secrets=secrets)
LOGGED_IN = "LOGGED_IN"
_SESSION_RE = re.compile(r"^(\w+): \[(\d+)\] (\S+?),\d+ (\S+)")


@dataclass(frozen=True)
class Target:
    iqn: str
    portals: tuple[str, ...]
    lun: int
    chap_user: str = ""
    chap_secret: str = ""
    mutual_user: str = ""
    mutual_secret: str = ""
    # node record settings beyond the defaults of login() (a replica leg's short replacement timeout)
    settings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Session:
    sid: int
    portal: str
    iqn: str


def read_initiator_name(path: Path) -> str:
    try:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("InitiatorName="):
                return line.split("=", 1)[1].strip()
    except OSError as exc:
        raise errors.precondition(f"cannot read the initiator name from {path}: {exc}") from None
    raise errors.precondition(f"{path} holds no InitiatorName= line")


def by_path(portal: str, iqn: str, lun: int) -> Path:
    return DEV / "disk" / "by-path" / f"ip-{portal}-iscsi-{iqn}-lun-{lun}"


def parse_sessions(text: str) -> list[Session]:
    out = []
    for line in text.splitlines():
        m = _SESSION_RE.match(line.strip())
        if m:
            out.append(Session(int(m.group(2)), m.group(3), m.group(4)))
    return out


class Iscsiadm:
    """`prefix` goes before every iscsiadm argv: the host's own iscsiadm through nsenter (iscsiadm_mode.py)."""

    def __init__(self, prefix: tuple[str, ...] = ()):
        self.prefix = tuple(prefix)

    def _argv(self, *args: str) -> list[str]:
        return [*self.prefix, "iscsiadm", *args]

    def sessions(self) -> list[Session]:
        r = runner.run(self._argv("-m", "session"), ok_codes=(0, RC_NO_OBJECTS))
        return parse_sessions(r.stdout) if r.rc == 0 else []

    def session_state(self, session: Session) -> str:
        """The kernel's state of a session: LOGGED_IN while it carries I/O, FAILED while the initiator tries to
        log in again (target gone or unreachable: I/O waits, then fails at the replacement timeout); "" when
        sysfs does not say. `iscsiadm -m session` lists a FAILED session like a healthy one."""
        try:
            return (SYSFS_SESSIONS / f"session{session.sid}" / "state").read_text().strip()
        except OSError:
            return ""

    def _node_argv(self, iqn: str, portal: str, *args: str) -> list[str]:
        return self._argv("-m", "node", "-T", iqn, "-p", portal, *args)

    def _node(self, iqn: str, portal: str, *args: str, ok: tuple[int, ...] = (0,), secrets: tuple[str, ...] = ()):
        return _node_db(self._node_argv(iqn, portal, *args), ok=ok, secrets=secrets)

    @staticmethod
    def _record_change(argv: list[str], ok: tuple[int, ...] = (0,), secrets: tuple[str, ...] = ()):
        """A node record write: given RECORD_TIMEOUT_S even when the RPC has less left (see the module doc)."""
        with runner.deadline(max(runner.time_left(), RECORD_TIMEOUT_S)):
            return _node_db(argv, ok=ok, secrets=secrets)

    def _new_record(self, iqn: str, portal: str) -> None:
        argv = self._node_argv(iqn, portal, "-o", "new")
        try:
            self._record_change(argv, ok=(0, RC_SESSION_EXISTS))
        except CommandError as exc:
            if exc.rc != RC_IDBM or not self._drop_broken_records(iqn, portal):
                raise
            self._record_change(argv, ok=(0, RC_SESSION_EXISTS))

    @staticmethod
    def _drop_broken_records(iqn: str, portal: str) -> bool:
        """Removes the node records of this target and portal by hand, when iscsiadm cannot read them any more.
        Called only before a login, so no session uses them. True if there was one to remove."""
        removed = False
        for rec in noderecord.record_entries(NODE_DB_DIRS, iqn, portal):
            log.warning("removing the broken iSCSI node record %s (iscsiadm cannot read it)", rec)
            if rec.is_dir():
                shutil.rmtree(rec, ignore_errors=True)
            else:
                rec.unlink(missing_ok=True)
            removed = True
        return removed

    def _write_settings(self, target: "Target", portal: str) -> None:
        """Our settings and the CHAP ones, into the record file itself in one write (noderecord.py): no secret in
        an argv, and no `iscsiadm -o update` process per key (about 0.1 s each on a busy node)."""
        settings = {"node.startup": "manual", "node.conn[0].timeo.login_timeout": str(LOGIN_TIMEOUT_S),
                    "node.session.initial_login_retry_max": str(LOGIN_RETRIES), **dict(target.settings),
                    **noderecord.auth_settings(target.chap_user, target.chap_secret, target.mutual_user,
                                               target.mutual_secret)}
        with _node_db_lock():
            noderecord.write_settings(NODE_DB_DIRS, target.iqn, portal, settings)

    @staticmethod
    def _sessions_of(iqn: str) -> Iterator[tuple[Path, str]]:
        """(sysfs directory, portal as Portal prints it) of each session of the kernel to the target now. An
        entry that cannot be read (a session going away meanwhile) is left out."""
        for session in SYSFS_SESSIONS.glob("session*"):
            try:
                if (session / "targetname").read_text().strip() != iqn:
                    continue
                conn = SYSFS_CONNECTIONS / f"connection{session.name[len('session'):]}:0"
                address = (conn / "persistent_address").read_text().strip()
                port = int((conn / "persistent_port").read_text().strip())
                yield session, str(Portal.parse(f"[{address}]:{port}"))
            except (OSError, ValueError):
                continue

    def logged_in_portals(self, iqn: str) -> set[str]:
        """The portals ("ip:port") with a session to the target now, read from sysfs: no iscsiadm process. An
        unreadable entry is left out: the login that follows then answers "session exists" (exit 15), which is
        success too."""
        return {portal for _, portal in self._sessions_of(iqn)}

    @classmethod
    def _session_dirs(cls, target: Target) -> list[Path]:
        """The sysfs directories of the kernel's sessions to the target at its portals, in its portals' order. The
        portal matters: replica legs on two storage nodes can share one IQN."""
        found = dict((portal, session) for session, portal in cls._sessions_of(target.iqn))
        return [found[portal] for portal in target.portals if portal in found]

    @staticmethod
    def _disk_of(session: Path, lun: int) -> Path | None:
        """LUN `lun` of one session as the kernel registered it (session<sid>/device/target<h>:<c>:<t>/
        <h>:<c>:<t>:<lun>/block/<name>), once its /dev node opens. The kernel shows the disk in sysfs and makes
        its node before the disk can be opened (device_add_disk: the block device is added last); an open in
        between fails with ENXIO, and blkid, failing so, says "nothing found" (exit 2) of a disk full of data."""
        for lun_dir in (session / "device").glob(f"target*/*:{lun}"):
            if lun_dir.name.count(":") != 3:
                continue
            try:
                names = sorted(entry.name for entry in (lun_dir / "block").iterdir())
            except OSError:
                continue      # the disk is not registered yet, or went away meanwhile
            for name in names:
                try:
                    os.close(os.open(DEV / name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                except OSError:
                    continue  # no node yet, or not openable yet (ENXIO)
                return DEV / name
        return None

    @classmethod
    def session_disk(cls, target: Target, sessions: list[Path] | None = None) -> Path | None:
        """The disk of LUN `lun` as the kernel made it for a session to one of the target's portals (of
        `sessions` when the caller found them already: walking every session of a busy worker each time costs),
        None when there is none now."""
        for session in cls._session_dirs(target) if sessions is None else sessions:
            disk = cls._disk_of(session, target.lun)
            if disk is not None:
                return disk
        return None

    def login(self, target: Target) -> None:
        """Records with our settings, then login on every portal. Already logged in is success."""
        live = self.logged_in_portals(target.iqn)
        for portal in target.portals:
            self._new_record(target.iqn, portal)
            self._write_settings(target, portal)
            if portal in live:
                continue
            try:
                self._node(target.iqn, portal, "--login", ok=(0, RC_SESSION_EXISTS))
            except CommandError as exc:
                if exc.rc == 24:  # ISCSI_ERR_LOGIN_AUTH_FAILED
                    raise errors.precondition(f"iSCSI login to {target.iqn} at {portal} refused: "
                                              "CHAP authentication failed") from None
                if exc.rc in (8, 19, 20):  # timeout / no connection / transport
                    raise errors.unavailable(f"cannot reach iSCSI portal {portal} for {target.iqn}: "
                                             f"{exc.stderr.strip()[-200:]}") from None
                raise

    def logout(self, iqn: str) -> None:
        """Logs out of every portal of the target and deletes its node records. Gone already is success."""
        _node_db(self._argv("-m", "node", "-T", iqn, "--logout"), ok=(0, RC_NO_OBJECTS))
        self._record_change(self._argv("-m", "node", "-T", iqn, "-o", "delete"), ok=(0, RC_NO_OBJECTS))

    def logout_portals(self, iqn: str, portals) -> None:
        """Logs out of the target at these portals only, deleting their node records: the legs of a replicated
        volume on storage nodes with one VG name share a target IQN, and only one leg leaves."""
        for portal in portals:
            self._node(iqn, portal, "--logout", ok=(0, RC_NO_OBJECTS))
            self._record_change(self._node_argv(iqn, portal, "-o", "delete"), ok=(0, RC_NO_OBJECTS))

    def rescan(self, iqn: str) -> None:
        _node_db(self._argv("-m", "node", "-T", iqn, "-R"), ok=(0, RC_NO_OBJECTS))

    def records(self) -> list[tuple[str, str]]:
        """(portal, iqn) of every node record."""
        r = _node_db(self._argv("-m", "node"), ok=(0, RC_NO_OBJECTS))
        out = []
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out.append((parts[0].split(",")[0], parts[1]))
        return out

    @classmethod
    def find_device(cls, target: Target, sessions: list[Path] | None = None) -> Path | None:
        """The disk of LUN `lun` through any portal (of `sessions`, as session_disk), None when there is none
        now. Found from its session in sysfs as soon as it opens (udev's /dev/disk/by-path link follows 0.1-0.5 s
        later, and not at all where udev does not run); the link, resolved, where sysfs does not show it."""
        disk = cls.session_disk(target, sessions)
        if disk is not None:
            return disk
        for portal in target.portals:
            link = by_path(portal, target.iqn, target.lun)
            if link.exists():
                return Path(os.path.realpath(link))
        return None

    def wait_for_device(self, target: Target, timeout: float = 20.0) -> Path:
        """The disk of LUN `lun` through any portal, once the kernel made it (with no I/O scheduler:
        disk_queue.py); rescans on a bounded schedule."""
        began = time.monotonic()
        deadline = began + min(timeout, runner.time_left())
        rescans = list(DEVICE_RESCAN_AT_S)
        sessions: list[Path] = []
        while True:
            if not sessions or not all(session.exists() for session in sessions):
                # every session walked until the target's show up, then only theirs (again if one went away)
                sessions = self._session_dirs(target)
            device = self.find_device(target, sessions)
            if device is not None:
                found = time.monotonic()
                disk_queue.use_no_scheduler(device)
                log.debug("LUN %d of %s is %s after %.3fs, its scheduler set in %.3fs", target.lun, target.iqn,
                          device, found - began, time.monotonic() - found)
                return device
            now = time.monotonic()
            if now >= deadline:
                raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED,
                                      f"logged in to {target.iqn}, but LUN {target.lun} did not appear "
                                      f"in sysfs or /dev/disk/by-path within {timeout:.0f}s")
            if rescans and now - began >= rescans[0]:
                self.rescan(target.iqn)
                sessions = []
                # the points it took us past go too: one rescan that waited for the node database's lock is
                # not followed by another at once
                done = time.monotonic() - began
                rescans = [at for at in rescans if at > done]
            time.sleep(DEVICE_POLL_S)
