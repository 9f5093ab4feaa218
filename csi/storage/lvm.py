"""LVM, read only through JSON reports (`--reportformat json --units b --nosuffix`), written through argv.

The agent's LVM runs with its own configuration directory (LVM_SYSTEM_DIR): it scans only the devices the
agent is configured for, never LVs (a tenant's PVs inside a volume stay invisible), activates nothing on its
own, and keeps its metadata backups in the agent's state directory instead of the host's /etc/lvm. A thin
pool's fill is also read from the kernel (device-mapper's status), which costs the same at any VG size.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from csi import errors, runner
from csi.fsutil import write_atomic
from csi.runner import CommandError, described

# The LVM commands that change metadata or devices: never killed at the RPC's deadline.
CHANGES = frozenset({"lvcreate", "lvremove", "lvextend", "lvconvert", "lvchange", "lvrename"})
# LVM runs the changes of a VG one at a time (its VG lock): more of them at once only adds processes waiting for
# that lock (their memory on the storage node). The agent serves many calls at once (csi/cli.py), so that a grant
# never waits behind a hundred volumes being made; the changes among them take turns here.
CHANGES_AT_ONCE = 4

LV_FIELDS = "lv_name,vg_name,lv_size,lv_tags,pool_lv,lv_attr,data_percent,metadata_percent,origin,lv_time"
VG_FIELDS = "vg_name,vg_size,vg_free,vg_extent_size,lv_count"
POOL_FIELDS = ("lv_name,vg_name,lv_size,lv_attr,data_percent,metadata_percent,zero,lv_when_full,vg_size,vg_free,"
               "vg_extent_size,lv_count")

# lvs exits with 5 and says exactly this when asked for an LV or VG that is not there.
_LV_MISSING = re.compile(r'^\s*Failed to find logical volume "[^"]+"\s*$', re.M)
_VG_MISSING = re.compile(r'^\s*Volume group "[^"]+" not found\s*$', re.M)
# lvcreate --snapshot says this instead, when the origin is not there.
_ORIGIN_MISSING = re.compile(r'^\s*Snapshot origin LV \S+ not found in Volume group \S+\s*$', re.M)
_DM_MISSING = re.compile(r'^\s*Device does not exist\.?\s*$', re.M)
_LV_EXISTS = re.compile(r'^\s*Logical [Vv]olume "[^"]+" already exists in [Vv]olume group "[^"]+"\s*$', re.M)


def is_missing(exc: CommandError) -> bool:
    """An LVM command failed because the LV or VG it names is not there (exit 5 and LVM's own words)."""
    return exc.rc == 5 and bool(_LV_MISSING.search(exc.stderr) or _VG_MISSING.search(exc.stderr) or
                                _ORIGIN_MISSING.search(exc.stderr))


def already_exists(exc: CommandError) -> bool:
    """lvcreate refused a name that is taken (exit 5 and LVM's own words)."""
    return exc.rc == 5 and bool(_LV_EXISTS.search(exc.stderr))


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    size: int
    tags: tuple[str, ...]
    pool: str
    attr: str
    data_percent: float | None = None
    metadata_percent: float | None = None
    origin: str = ""
    created: float = 0.0

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def is_thin_pool(self) -> bool:
        return self.attr.startswith("t")

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    def tag(self, key: str) -> str | None:
        prefix = key + "="
        for t in self.tags:
            if t.startswith(prefix):
                return t[len(prefix):]
        return None


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size: int
    free: int
    extent_size: int
    lv_count: int


@dataclass(frozen=True)
class ThinPoolState:
    vg: str
    name: str
    size: int
    data_percent: float
    metadata_percent: float
    zeroing: bool
    group: VolumeGroup | None = None   # its VG, from the same report (one command instead of two)
    error_when_full: bool = True       # a full pool fails writes at once (lv_when_full "error"), not queues them


@dataclass(frozen=True)
class ThinPoolFill:
    """A thin pool's size and fill as the kernel's thin-pool target counts them."""
    size: int
    data_percent: float
    metadata_percent: float


def dm_name(vg: str, lv: str, layer: str = "") -> str:
    """The device-mapper name LVM gives an LV (or one of its layers): the dashes in each name doubled."""
    return "-".join([vg.replace("-", "--"), lv.replace("-", "--")] + ([layer] if layer else []))


def parse_thin_pool_status(stdout: str) -> ThinPoolFill | None:
    """`dmsetup status` of a thin-pool target: `<start> <sectors> thin-pool <transaction> <used>/<total>
    metadata blocks <used>/<total> data blocks ...`; a failed pool says `Fail` instead: None."""
    fields = stdout.split()
    if len(fields) < 6 or fields[2] != "thin-pool" or "/" not in fields[4] or "/" not in fields[5]:
        return None
    meta_used, meta_total = (int(v) for v in fields[4].split("/"))
    data_used, data_total = (int(v) for v in fields[5].split("/"))
    if not meta_total or not data_total:
        return None
    return ThinPoolFill(int(fields[1]) * 512, 100.0 * data_used / data_total, 100.0 * meta_used / meta_total)


def lvm_config(devices: Sequence[str], state_dir: Path) -> str:
    """lvm.conf for the agent: an accept-list of the configured devices, nothing else."""
    accept = ", ".join(f'"a|{_glob_to_regex(d)}|"' for d in devices)
    return f"""# Written by the lvm-iscsi-csi agent at start; changes are overwritten.
devices {{
    global_filter = [ {accept}, "r|.*|" ]
    filter = [ "a|.*|" ]
    scan_lvs = 0
    use_devicesfile = 0
    obtain_device_list_from_udev = 0
}}
activation {{
    # LVM makes its own device nodes and never waits on udev: in a pod, /run/udev is absent and udev's
    # semaphores live in the host's IPC namespace, so a thin pool's activation otherwise fails with
    # "/dev/mapper/<vg>-<pool>_tmeta: open failed" (seen in the Kubernetes end-to-end run).
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
    auto_activation_volume_list = [ ]
}}
global {{
    event_activation = 0
}}
backup {{
    backup = 1
    backup_dir = "{state_dir}/lvm/backup"
    archive = 0
    archive_dir = "{state_dir}/lvm/archive"
}}
"""


def _glob_to_regex(glob: str) -> str:
    if "|" in glob or '"' in glob:
        raise ValueError(f"device pattern {glob!r} may not hold '|' or '\"'")
    out = []
    for ch in glob:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) if ch in ".+()[]{}^$\\" else ch)
    return "^" + "".join(out) + "$"


def _num(value: str) -> int:
    return int(float(value)) if value else 0


def _pct(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


class Lvm:
    """The agent's LVM. `system_dir` holds the lvm.conf written by `configure`."""

    def __init__(self, system_dir: Path, changes_at_once: int = CHANGES_AT_ONCE):
        self.system_dir = system_dir
        self._turns = threading.BoundedSemaphore(changes_at_once)

    def configure(self, devices: Sequence[str], state_dir: Path) -> None:
        self.system_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("backup", "archive"):
            (state_dir / "lvm" / sub).mkdir(parents=True, exist_ok=True)
        write_atomic(self.system_dir / "lvm.conf", lvm_config(devices, state_dir), mode=0o644)

    def _run(self, argv: list[str], ok_codes: Iterable[int] = (0,)) -> runner.Result:
        env = {"LVM_SYSTEM_DIR": str(self.system_dir), "LVM_SUPPRESS_FD_WARNINGS": "1"}
        if argv[0] not in CHANGES:
            return runner.run(argv, ok_codes=ok_codes, env=env)
        left = runner.seconds_left()
        if not self._turns.acquire(timeout=None if left is None else max(0.0, left)):
            # the caller has given up: a change started now would run to its end for nobody
            raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED, f"{described(argv)} not started: the call's deadline "
                                  "passed while other LVM changes ran; nothing was done")
        try:
            # A change runs to its end past the RPC's deadline (runner.py): lvextend or a snapshot's lvcreate
            # killed while it holds the LV suspended would leave every I/O to it, and every later LVM command,
            # waiting.
            return runner.run(argv, ok_codes=ok_codes, env=env, finish=True)
        finally:
            self._turns.release()

    @staticmethod
    def _report(stdout: str, kind: str) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for part in json.loads(stdout).get("report", []):
            rows.extend(part.get(kind, []))
        return rows

    # ------------------------------------------------------------------------------------ reads

    def vg(self, name: str) -> VolumeGroup | None:
        try:
            out = self._run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VG_FIELDS, name])
        except CommandError as exc:
            if exc.rc == 5 and _VG_MISSING.search(exc.stderr):
                return None
            raise
        rows = self._report(out.stdout, "vg")
        if not rows:
            return None
        r = rows[0]
        return VolumeGroup(r["vg_name"], _num(r["vg_size"]), _num(r["vg_free"]), _num(r["vg_extent_size"]),
                           _num(r["lv_count"]))

    def lv(self, vg: str, name: str) -> LogicalVolume | None:
        try:
            out = self._run(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS,
                             f"{vg}/{name}"])
        except CommandError as exc:
            if is_missing(exc):
                return None
            raise
        rows = self._report(out.stdout, "lv")
        return _lv(rows[0]) if rows else None

    def lvs(self, vg: str, select: str | None = None) -> list[LogicalVolume]:
        argv = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS]
        if select:
            argv += ["--select", select]
        try:
            out = self._run(argv + [vg])
        except CommandError as exc:
            if exc.rc == 5 and _VG_MISSING.search(exc.stderr):
                return []
            raise
        return [_lv(r) for r in self._report(out.stdout, "lv")]

    def thin_pool(self, vg: str, pool: str) -> ThinPoolState | None:
        try:
            out = self._run(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", POOL_FIELDS,
                             f"{vg}/{pool}"])
        except CommandError as exc:
            if is_missing(exc):
                return None
            raise
        rows = self._report(out.stdout, "lv")
        if not rows or not rows[0]["lv_attr"].startswith("t"):
            return None
        r = rows[0]
        group = VolumeGroup(r["vg_name"], _num(r["vg_size"]), _num(r["vg_free"]), _num(r["vg_extent_size"]),
                            _num(r["lv_count"])) if "vg_size" in r else None
        return ThinPoolState(r["vg_name"], r["lv_name"], _num(r["lv_size"]), _pct(r["data_percent"]) or 0.0,
                             _pct(r["metadata_percent"]) or 0.0, r.get("zero", "") in ("zero", "1"), group,
                             r.get("lv_when_full", "") == "error")

    def thin_pool_fill(self, vg: str, pool: str) -> ThinPoolFill | None:
        """The pool's fill from the kernel (`dmsetup status` of its -tpool device): a constant cost, where an
        LVM report reads the metadata of every LV in the VG. None when the pool is not active (or failed)."""
        try:
            out = runner.run(["dmsetup", "status", dm_name(vg, pool, "tpool")])
        except CommandError as exc:
            if exc.rc == 1 and _DM_MISSING.search(exc.stderr):
                return None
            raise
        return parse_thin_pool_status(out.stdout)

    # ------------------------------------------------------------------------------------ writes

    def create(self, vg: str, name: str, size: int, tags: Sequence[str], thin_pool: str = "") -> None:
        argv = ["lvcreate", "--yes", "--name", name, "--activate", "y", "--setactivationskip", "n"]
        for t in tags:
            argv += ["--addtag", t]
        if thin_pool:
            argv += ["--virtualsize", f"{size}b", "--thin", f"{vg}/{thin_pool}"]
        else:
            argv += ["--size", f"{size}b", "--wipesignatures", "y", "--zero", "y", vg]
        self._run(argv)

    def remove(self, vg: str, name: str) -> None:
        try:
            self._run(["lvremove", "--yes", f"{vg}/{name}"])
        except CommandError as exc:
            if is_missing(exc):
                return
            raise

    def extend(self, vg: str, name: str, size: int) -> None:
        self._run(["lvextend", "--yes", "--size", f"{size}b", f"{vg}/{name}"])

    def snapshot(self, vg: str, origin: str, name: str, tags: Sequence[str], activate: bool) -> None:
        """A thin snapshot (no size: it shares the origin's pool). Snapshots kept for users stay inactive
        and skipped by activation; a volume made from one is active like any volume."""
        argv = ["lvcreate", "--yes", "--snapshot", "--name", name]
        argv += ["--setactivationskip", "n", "--activate", "y"] if activate else \
            ["--setactivationskip", "y", "--activate", "n"]
        for t in tags:
            argv += ["--addtag", t]
        self._run(argv + [f"{vg}/{origin}"])

    def cow_snapshot(self, vg: str, origin: str, name: str, size: int, tags: Sequence[str]) -> None:
        """A copy-on-write snapshot of a thick LV with `size` bytes for the origin's changes (it becomes
        invalid when they need more). Active, as a COW snapshot of an active origin must be."""
        argv = ["lvcreate", "--yes", "--snapshot", "--name", name, "--size", f"{size}b",
                "--setactivationskip", "n", "--activate", "y"]
        for t in tags:
            argv += ["--addtag", t]
        self._run(argv + [f"{vg}/{origin}"])

    def split_snapshot(self, vg: str, name: str) -> None:
        """Separates a COW snapshot from its origin: what remains is a plain LV holding the origin's older
        data, to be zeroed before its extents are freed (`lvconvert --splitsnapshot`)."""
        self._run(["lvconvert", "--yes", "--splitsnapshot", f"{vg}/{name}"])

    def add_tag(self, vg: str, name: str, tag: str) -> None:
        self._run(["lvchange", "--addtag", tag, f"{vg}/{name}"])

    def del_tag(self, vg: str, name: str, tag: str) -> None:
        self._run(["lvchange", "--deltag", tag, f"{vg}/{name}"])

    def activate(self, vg: str, name: str) -> None:
        self.activate_all(vg, [name])

    def activate_all(self, vg: str, names: list[str]) -> None:
        """One lvchange for many LVs of a VG (the agent's start: LVM reads the VG's metadata once, not once per
        LV). LVM activates every LV it can and fails the command if any one failed."""
        self._run(["lvchange", "--activate", "y", "--ignoreactivationskip", *(f"{vg}/{n}" for n in names)])

    def set_zeroing(self, vg: str, pool: str) -> None:
        self._run(["lvchange", "--zero", "y", f"{vg}/{pool}"])

    def set_error_when_full(self, vg: str, pool: str) -> None:
        self._run(["lvchange", "--errorwhenfull", "y", f"{vg}/{pool}"])

    def rename(self, vg: str, name: str, new: str) -> None:
        self._run(["lvrename", vg, name, new])

    def zero_out(self, path: str, offset: int, length: int) -> None:
        """Overwrites a range of a thick LV with zeros (WRITE ZEROES where the disk has it, else written)."""
        runner.run(["blkdiscard", "--zeroout", "--offset", str(offset), "--length", str(length), path])


def _lv(r: dict[str, str]) -> LogicalVolume:
    tags = tuple(t for t in r.get("lv_tags", "").split(",") if t)
    return LogicalVolume(r["vg_name"], r["lv_name"], _num(r["lv_size"]), tags, r.get("pool_lv", ""),
                         r.get("lv_attr", ""), _pct(r.get("data_percent", "")), _pct(r.get("metadata_percent", "")),
                         r.get("origin", ""), _time(r.get("lv_time", "")))


def _time(value: str) -> float:
    """lv_time as LVM prints it ("2026-11-26 03:34:34 +0000") -> seconds since the epoch; 0 if unknown."""
    try:
        return datetime.datetime.strptime(value, "%Y-%m-%d %H:%M:%S %z").timestamp()
    except (TypeError, ValueError):
        return 0.0
