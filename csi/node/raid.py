"""md RAID1 over the legs of a replicated volume, through mdadm (and md's sysfs, read only).

- Metadata 1.2 (4 KiB from the start of each leg, the data from DATA_OFFSET on) and an internal write-intent
  bitmap, so a leg that comes back resyncs only the regions written while it was away. Not 1.0 (at the end, data
  at offset 0): md cannot move a 1.0 superblock to the new end of a grown leg while a bitmap sits before it, and
  a leg grown while its array is not assembled (an expansion of a volume no pod uses) would show no superblock
  at all; a 1.2 superblock stays where it is, and the array grows with `--size=max`.
- Every leg is marked failfast: md fails a leg on its first I/O error instead of retrying it, so a storage node
  that dies holds the writer no longer than the leg's iSCSI replacement timeout (csi/node/replicated.py).
- The array's name is `lvmiscsi:<hash of the volume>` (ids.md_name): the homehost part is the driver's own, and
  the udev rule written by `install_udev_rule` keeps udev's incremental assembly (mdadm --incremental, Debian's
  64-md-raid-assembly.rules) off every device that carries it, on workers and on storage nodes: only the node
  plugin assembles these arrays, and only at stage.
- What a leg knows: `mdadm --examine` prints its superblock's "Array State" (A = active, . = missing): a leg that
  shows the other member missing went on alone, so it holds every write the other has (csi/node/replicated.py
  uses that to prove a lone leg current). mdadm has no machine-readable form of that line; --export lacks it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from csi import errors, ids, runner
from csi.runner import CommandError

log = logging.getLogger(__name__)

MDADM_TIMEOUT = 60.0
DATA_OFFSET = "1M"      # the superblock, the bitmap and the bad block log before the data (controller: MD_RESERVE)
UDEV_RULE_NAME = "63-lvm-iscsi-csi-md.rules"
# The runtime rules directory: highest priority, emptied at boot, and written again by each start of the agent
# and the node plugin.
UDEV_RULES_DIR = Path("/run/udev/rules.d")
SYSFS_BLOCK = Path("/sys/block")
DEV_MD = Path("/dev/md")
# mdadm makes the /dev/md/<name> link itself rather than leave it to udev: the host's udev names the link from
# mdadm's map (/run/mdadm/map), which in the node plugin's container is the container's own unless the host's is
# mounted (the chart mounts it); without it udev made /dev/md/lvmiscsi:<hash> and mdadm timed out waiting for its
# name (found by the Kubernetes tier). /dev is the host's: the link outlives the container. mdadm leaves removing
# the link at --stop to udev, and a host without md's udev rules would keep it: `stop` removes it, and `status`
# takes a link for this array only if md's map says that md device is this array (an md number is reused).
MDADM_ENV = {"MDADM_NO_UDEV": "1"}
MDADM_MAP = Path("/run/mdadm/map")


def _mdadm(args: list[str], ok_codes: tuple[int, ...] = (0,)) -> runner.Result:
    return runner.run(["mdadm", *args], ok_codes=ok_codes, timeout=MDADM_TIMEOUT, env=MDADM_ENV)


def udev_rule() -> str:
    # 64-md-raid-assembly.rules skips any device with SYSTEMD_READY=0 before it looks at ID_FS_TYPE.
    return ("# lvm-iscsi-csi: the legs of replicated volumes are assembled by the node plugin at stage, never by\n"
            "# udev's incremental assembly (written by the agent and the node plugin at start).\n"
            f'SUBSYSTEM=="block", ENV{{ID_FS_TYPE}}=="linux_raid_member", '
            f'ENV{{ID_FS_LABEL}}=="{ids.MD_HOMEHOST}:*", ENV{{SYSTEMD_READY}}="0"\n')


def install_udev_rule(rules_dir: Path = UDEV_RULES_DIR) -> Path:
    """Writes the rule (if it differs) and has udevd reload its rules. Returns the rule's path."""
    path = Path(rules_dir) / UDEV_RULE_NAME
    text = udev_rule()
    try:
        same = path.read_text() == text
    except OSError:
        same = False
    if not same:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)
        except OSError as exc:
            log.error("cannot write %s (%s): udev on this host may assemble the legs of replicated volumes by "
                      "itself, which would keep them from their export or their stage", path, exc)
            return path
        # udevd also notices a changed rules directory by itself (a container may not reach its control socket)
        try:
            runner.run(["udevadm", "control", "--reload"], ok_codes=(0, 1, 2), timeout=30)
        except CommandError as exc:
            log.info("udevadm control --reload: %s", exc)
    return path


def load_module() -> None:
    """md's RAID1 personality, loaded before the first stage (a kernel loads it on demand too, but not every
    container can make it do so)."""
    try:
        runner.run(["modprobe", "raid1"], timeout=30)
    except CommandError as exc:
        log.warning("modprobe raid1: %s; replicated volumes will not stage here unless the kernel has it",
                    exc.stderr.strip()[-200:] or exc)


def md_device(key: str) -> Path:
    """The /dev/md/<name> link of a replicated volume's array on this node."""
    return DEV_MD / ("csi-" + ids.md_name(key).split(":", 1)[1])


@dataclass(frozen=True)
class Superblock:
    uuid: str
    name: str            # homehost:name
    events: int
    array_state: str     # "AA", "A.", ".A", ... as --examine prints it; "" when mdadm did not print one
    recovering: bool = False   # this leg is being rebuilt (its "Recovery Offset"): not the array's data yet


def went_on_alone(sb) -> bool:
    """Whether a leg's superblock (a Superblock, or the agent's LegSuperblock) shows another member failed
    while this one is not being rebuilt: md went on writing to this leg alone, so it holds every write the
    other has (md writes that into the superblock before completing any write the failed leg missed)."""
    return "." in sb.array_state and not sb.recovering


def parse_examine(export: str, human: str) -> Superblock:
    """`mdadm --examine --export` (KEY=value) and `mdadm --examine` (its "Array State : AA ..." line)."""
    fields = dict(line.split("=", 1) for line in export.splitlines() if "=" in line)
    m = re.search(r"^\s*Array State : ([A-Za-z.]+)", human, re.M)
    return Superblock(fields.get("MD_UUID", ""), fields.get("MD_NAME", ""), int(fields.get("MD_EVENTS", "0") or 0),
                      m.group(1) if m else "", re.search(r"^\s*Recovery Offset : ", human, re.M) is not None)


def examine(device: Path) -> Superblock | None:
    """The md superblock on a leg, None when it has none. mdadm exits 1 for that and for a device it cannot
    read: only its "No md superblock detected" means none."""
    export = _mdadm(["--examine", "--export", str(device)], ok_codes=(0, 1))
    if export.rc != 0:
        if "No md superblock detected" in export.stderr:
            return None
        raise errors.unavailable(f"cannot read the md superblock of {device}: {export.stderr.strip()[-200:]}")
    if "MD_UUID=" not in export.stdout:
        raise errors.precondition(f"{device} carries an md superblock mdadm does not describe: "
                                  f"{export.stdout.strip()[-200:]}")
    human = _mdadm(["--examine", str(device)])
    return parse_examine(export.stdout, human.stdout)


def create(key: str, devices: list[Path]) -> Path:
    """A new RAID1 of blank legs. --assume-clean: blank legs read the same (a thin LV reads zeros; a thick one
    what its pool's wipe left, zeros too unless the class turned wiping off): nothing to copy between them."""
    md = md_device(key)
    _mdadm(["--create", str(md), "--run", "--level=1", f"--raid-devices={len(devices)}", "--metadata=1.2",
            f"--data-offset={DATA_OFFSET}", "--bitmap=internal", f"--name={ids.md_name(key)}", "--assume-clean",
            "--failfast", *map(str, devices)])
    return md


def create_from_seed(key: str, seed: Path) -> Path:
    """A new RAID1 of a volume made from a replicated source: the seed leg holds the source's data from
    DATA_OFFSET on (the source array's superblock and bitmap before it, overwritten here: --run takes the
    leg without asking), the other leg is missing until `add` copies the seed to it in full."""
    md = md_device(key)
    _mdadm(["--create", str(md), "--run", "--level=1", "--raid-devices=2", "--metadata=1.2",
            f"--data-offset={DATA_OFFSET}", "--bitmap=internal", f"--name={ids.md_name(key)}", "--failfast",
            str(seed), "missing"])
    return md


def assemble(key: str, devices: list[Path], read_only: bool = False) -> Path:
    """--readonly for a read-only stage: md then writes nothing to the legs (no superblock update, no resync)."""
    md = md_device(key)
    _mdadm(["--assemble", str(md), "--run", *(["--readonly"] if read_only else []), *map(str, devices)])
    return md


def stop(key: str) -> None:
    """Stops the array if it runs; not running is success. Its /dev/md link goes too."""
    md = md_device(key)
    if status(key) is not None:
        _mdadm(["--stop", str(md)])
    if md.is_symlink():
        md.unlink(missing_ok=True)


def _mapped(md_name: str, link: Path, map_file: Path) -> bool | None:
    """Whether mdadm's map says md device `md_name` (md127) is the array of `link`; None when the map says
    nothing of that device (no map, or an array mdadm did not start)."""
    try:
        lines = map_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[0] == md_name:
            return fields[3] == str(link)
    return None


def readd(key: str, device: Path, outdated: bool = False) -> None:
    """Puts a leg back: --re-add (the bitmap says what to resync), or --add (a full recovery) when md refuses
    the re-add (a leg that was away for longer than the bitmap covers, or a new one). A leg the controller's
    record holds outdated gets the full recovery at once, its superblock cleared first: an operator may have
    outdated a leg that holds writes the array never had (`mark-replica-leg`), and md must not take its event
    count for the newest."""
    md = md_device(key)
    drop_failed(key)
    if outdated:
        log.warning("%s: adding %s, a leg recorded outdated, for a full recovery", md, device)
        _mdadm(["--zero-superblock", str(device)])
        add(key, device)
        return
    try:
        _mdadm(["--manage", str(md), "--re-add", str(device)])
    except CommandError as exc:
        log.warning("%s: md refused to re-add %s (%s); adding it for a full recovery", md, device,
                    exc.stderr.strip()[-200:])
        add(key, device)


def drop_failed(key: str) -> None:
    """Members md failed, and members whose disk is gone, out of the array (their slot free for a leg)."""
    md = md_device(key)
    _mdadm(["--manage", str(md), "--remove", "failed"], ok_codes=(0, 1))
    _mdadm(["--manage", str(md), "--remove", "detached"], ok_codes=(0, 1))


def add(key: str, device: Path) -> None:
    """A leg into the array for a full recovery (md copies every block to it)."""
    _mdadm(["--manage", str(md_device(key)), "--failfast", "--add", str(device)])


def grow(key: str) -> None:
    """The array to the size of its legs (after they grew; nothing changes when it has it already)."""
    _mdadm(["--grow", str(md_device(key)), "--size=max"])


@dataclass(frozen=True)
class Member:
    device: str          # /dev/sdX
    state: str           # md's dev-*/state: "in_sync", "faulty", "spare", ... (comma-separated flags)

    @property
    def in_sync(self) -> bool:
        return "in_sync" in self.state.split(",") and "faulty" not in self.state.split(",")


@dataclass(frozen=True)
class Array:
    device: Path         # /dev/mdN
    members: tuple[Member, ...]
    degraded: int        # legs missing, as md counts them
    sync_action: str     # idle | resync | recover | check ...
    sync_completed: str  # "done / total" sectors, or "none"

    def progress(self) -> float | None:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.sync_completed)
        return int(m.group(1)) / int(m.group(2)) if m and int(m.group(2)) else None


def status(key: str, sysfs: Path = SYSFS_BLOCK, map_file: Path = MDADM_MAP) -> Array | None:
    """The array as md's sysfs shows it, None when it is not running here (its link dangles, names an md device
    with no array, or one md's map gives to another array)."""
    md = md_device(key)
    try:
        real = Path(md).resolve(strict=True)
    except OSError:
        return None
    base = sysfs / real.name / "md"

    def read(p: Path) -> str:
        try:
            return p.read_text().strip()
        except OSError:
            return ""
    if read(base / "array_state") in ("", "clear") or _mapped(real.name, md, map_file) is False:
        return None
    members = []
    for dev in sorted(base.glob("dev-*")):
        members.append(Member("/dev/" + dev.name[len("dev-"):], read(dev / "state")))
    degraded = read(base / "degraded")
    return Array(real, tuple(members), int(degraded) if degraded.isdigit() else 0, read(base / "sync_action"),
                 read(base / "sync_completed"))


def refuse_foreign(key: str, device: Path, sb: Superblock) -> None:
    if sb.name != ids.md_name(key):
        raise errors.precondition(f"{device} carries the md superblock of array {sb.name!r}, not this volume's "
                                  f"({ids.md_name(key)}): nothing was assembled or written")
