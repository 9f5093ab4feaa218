"""Mounts, filesystems and block devices on the worker: mountinfo read directly, tools through the runner."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from csi import errors, fsutil, runner

RC_BLKID_NOTHING = 2
RC_BLKID_AMBIVALENT = 8   # low-level probing found more than one valid-looking superblock


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fs_type: str
    options: tuple[str, ...]                 # this mount's own (ro/rw as mounted)
    super_options: tuple[str, ...] = ()      # the filesystem's, shared by every mount of it

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def forced_read_only(self) -> bool:
        """Mounted read-write, but the filesystem itself is read-only now: the kernel turned it so after I/O
        errors (ext4's errors=remount-ro or an aborted journal), e.g. a storage outage longer than open-iscsi's
        replacement timeout. ext4 says `abort` (an aborted journal, Linux 6.1 as in the lab), `ro`, or from
        6.15 `emergency_ro`. Writes fail until it is unmounted, checked and mounted again. (Kernels 6.6 to 6.14
        shut ext4 down without saying so here: see ext4_errors; an xfs shutdown never shows here: see
        root_io_error.)"""
        return not self.read_only and bool({"ro", "abort", "emergency_ro"} & set(self.super_options))


def root_io_error(path: str) -> str:
    """The I/O error that listing the root directory of the filesystem mounted at path fails with, or "". A
    filesystem that shut itself down fails every open and read with EIO: xfs does so after I/O errors (a
    storage outage longer than open-iscsi's replacement timeout), and says so nowhere else (not in mountinfo,
    not in sysfs). Only called while the volume's iSCSI session is logged in: through a session that is down,
    a directory not in the cache would wait for the storage instead of answering."""
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return os.strerror(exc.errno)
    return ""


def ext4_errors(device: str) -> int:
    """Errors the kernel recorded on a mounted ext4 filesystem since its last check (sysfs errors_count; e2fsck
    resets it); 0 when not ext4 or unknown."""
    try:
        return int((Path("/sys/fs/ext4") / os.path.basename(os.path.realpath(device)) / "errors_count")
                   .read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace") \
        if "\\" in field else field


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if len(a) < 6 or len(b) < 2:
            continue
        out.append(Mount(_unescape(b[1]), _unescape(a[4]), b[0], tuple(a[5].split(",")),
                         tuple(b[2].split(",")) if len(b) > 2 else ()))
    return out


def mounts() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mount_at(path: Path) -> Mount | None:
    """The topmost mount whose mount point is exactly `path`."""
    target = os.path.realpath(path)
    found = [m for m in mounts() if m.target == target]
    return found[-1] if found else None


@dataclass(frozen=True)
class Signatures:
    """What blkid's low-level probe found on a device: a superblock (`type`: a filesystem, an LVM or RAID
    member, LUKS, swap, ...; `usage` says which kind) and a partition table (`pt_type`: dos, gpt, ...)."""
    type: str = ""
    usage: str = ""
    pt_type: str = ""
    ambivalent: bool = False

    @property
    def blank(self) -> bool:
        return not (self.type or self.pt_type or self.ambivalent)

    def describe(self) -> str:
        found = []
        if self.type:
            found.append(f"{self.type!r} ({self.usage})" if self.usage else repr(self.type))
        if self.pt_type:
            found.append(f"a {self.pt_type!r} partition table")
        if self.ambivalent:
            found.append("more than one signature (blkid cannot tell which is valid)")
        return " and ".join(found) or "no signature"


def parse_blkid_export(text: str) -> dict[str, str]:
    """`blkid -o export` output: KEY=value lines, special characters in values escaped with a backslash."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            out[key] = re.sub(r"\\(.)", r"\1", value)
    return out


def probe(device: Path) -> Signatures:
    """Every signature blkid finds on the whole device: superblocks and partition tables (`-p`: low-level
    probing, no cache). Exit code 2 means nothing at all was found, unless blkid says it could not read the
    device (`error: <device>: <reason>`, exit code 2 too): that is no answer, and never a blank device."""
    r = runner.run(["blkid", "-p", "-o", "export", str(device)],
                   ok_codes=(0, RC_BLKID_NOTHING, RC_BLKID_AMBIVALENT))
    if r.rc == RC_BLKID_AMBIVALENT:
        return Signatures(ambivalent=True)
    if r.rc == RC_BLKID_NOTHING:
        if "error:" in r.stderr:
            raise errors.unavailable(f"blkid cannot read {device}, so whether it holds data is not known: "
                                     f"{r.stderr.strip()[-200:]}")
        return Signatures()
    fields = parse_blkid_export(r.stdout)
    return Signatures(fields.get("TYPE", ""), fields.get("USAGE", ""), fields.get("PTTYPE", ""))


def mkfs(device: Path, fs: str, options: Sequence[str] = ()) -> None:
    """options: checked argv items (csi/mkfs_options.py mkfs_args), placed before the device."""
    if fs == "ext4":
        runner.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                    *options, str(device)], timeout=600)
    elif fs == "xfs":
        runner.run(["mkfs.xfs", "-q", *options, str(device)], timeout=600)
    else:
        raise ValueError(f"unsupported filesystem {fs}")


# e2fsck's exit codes (e2fsck(8)): bits. 1: errors corrected; 2: corrected, reboot (a mounted root only);
# 4: errors left uncorrected; 8 and above: e2fsck itself failed.
E2FSCK_CORRECTED, E2FSCK_REBOOT, E2FSCK_UNCORRECTED = 1, 2, 4
E2FSCK_LIMIT = 3600.0


class FilesystemErrors(Exception):
    """e2fsck -p found errors it may not repair on its own."""


def check_ext4(device: Path) -> bool:
    """`e2fsck -p` before a read-write mount, as mount-utils does for ext*: a clean filesystem costs a
    superblock read; one the kernel marked with errors (a journal aborted by a storage outage, say) is checked
    and repaired where e2fsck -p may do so safely, so that it mounts read-write again. True when it repaired
    something; FilesystemErrors when errors remain that need a person (e2fsck's own words included)."""
    # Not bound to the RPC's deadline: e2fsck killed part-way through a repair would start over at every
    # retry of the stage. A retry meanwhile gets ABORTED on the volume's lock until this one is done.
    with runner.deadline(E2FSCK_LIMIT):
        r = runner.run(["e2fsck", "-p", str(device)], ok_codes=range(8))
    if r.rc & E2FSCK_UNCORRECTED:
        said = (r.stdout + r.stderr).strip().splitlines()[-3:]
        raise FilesystemErrors(" / ".join(said) or f"e2fsck -p exited with {r.rc}")
    return bool(r.rc & E2FSCK_CORRECTED)


def mount(source: Path | str, target: Path, fs: str | None, options: Sequence[str]) -> None:
    argv = ["mount"]
    if fs:
        argv += ["-t", fs]
    if options:
        argv += ["-o", ",".join(options)]
    runner.run(argv + ["--", str(source), str(target)])


def bind(source: Path, target: Path, read_only: bool) -> None:
    mount(source, target, None, ["bind", "ro"] if read_only else ["bind"])


def umount(target: Path) -> None:
    runner.run(["umount", "--", str(target)])


def flush(device: Path) -> None:
    runner.run(["blockdev", "--flushbufs", str(device)])


def device_size(device: Path) -> int:
    return int(runner.run(["blockdev", "--getsize64", str(device)]).stdout.strip())


def grow_filesystem(device: Path, fs: str, mountpoint: Path) -> None:
    """Grows a mounted filesystem to fill its device (online). Skipped when its superblock says it fills the
    device already (most stages of a volume: a resize2fs process costs some 0.1 s only to find nothing to do);
    a superblock that cannot be read is grown as before."""
    if _fills_device(device, fs):
        return
    if fs == "ext4":
        runner.run(["resize2fs", str(device)], timeout=600)
    elif fs == "xfs":
        runner.run(["xfs_growfs", str(mountpoint)], timeout=600)
    else:
        raise ValueError(f"unsupported filesystem {fs}")


EXT4_SUPER = 1024                 # the ext4 superblock's offset on its device
EXT4_MAGIC = 0xEF53
EXT4_INCOMPAT_64BIT = 0x80
XFS_MAGIC = b"XFSB"
XFS_BLOCK_SIZES = frozenset(1 << n for n in range(9, 17))


def filesystem_blocks(device: Path, fs: str) -> tuple[int, int] | None:
    """(blocks, block size in bytes) of the filesystem on `device` as its superblock states them, None when the
    superblock is not one of `fs`'s or cannot be read. ext4 (fs/ext4/ext4.h): s_blocks_count_lo at 0x4,
    s_log_block_size at 0x18, s_magic at 0x38, s_feature_incompat at 0x60, s_blocks_count_hi at 0x150 (with
    the 64bit feature), little-endian. xfs (xfs_format.h): sb_magicnum at 0, sb_blocksize at 4, sb_dblocks at
    8 (the data section), big-endian."""
    try:
        with open(device, "rb") as dev:
            if fs == "ext4":
                dev.seek(EXT4_SUPER)
                sb = dev.read(0x154)
                if len(sb) < 0x154 or int.from_bytes(sb[0x38:0x3A], "little") != EXT4_MAGIC:
                    return None
                blocks = int.from_bytes(sb[0x4:0x8], "little")
                if int.from_bytes(sb[0x60:0x64], "little") & EXT4_INCOMPAT_64BIT:
                    blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
                log_block = int.from_bytes(sb[0x18:0x1C], "little")
                return (blocks, 1024 << log_block) if log_block <= 6 else None     # 1 KiB to 64 KiB blocks
            if fs == "xfs":
                sb = dev.read(16)
                if len(sb) < 16 or sb[:4] != XFS_MAGIC:
                    return None
                block = int.from_bytes(sb[4:8], "big")
                # 512 B to 64 KiB, a power of two; anything else is no superblock to trust
                return (int.from_bytes(sb[8:16], "big"), block) if block in XFS_BLOCK_SIZES else None
    except OSError:
        return None
    return None


def _fills_device(device: Path, fs: str) -> bool:
    """The filesystem covers every whole block of its device: a grow would add nothing."""
    found = filesystem_blocks(device, fs)
    if not found or not found[1]:
        return False
    blocks, block = found
    try:
        size = fsutil.device_size(device)
    except OSError:
        return False
    return blocks >= size // block
