"""Mounts, filesystems and block devices on the worker: mountinfo read directly, tools through the runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from csi import runner

RC_BLKID_NOTHING = 2


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fs_type: str
    options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


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
        out.append(Mount(_unescape(b[1]), _unescape(a[4]), b[0], tuple(a[5].split(","))))
    return out


def mounts() -> list[Mount]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mount_at(path: Path) -> Mount | None:
    """The topmost mount whose mount point is exactly `path`."""
    target = os.path.realpath(path)
    found = [m for m in mounts() if m.target == target]
    return found[-1] if found else None


def fs_type(device: Path) -> str | None:
    """The filesystem (or other signature) on a device, None when blkid finds nothing at all."""
    r = runner.run(["blkid", "-p", "-s", "TYPE", "-o", "value", str(device)], ok_codes=(0, RC_BLKID_NOTHING))
    return r.stdout.strip() or None if r.rc == 0 else None


def mkfs(device: Path, fs: str) -> None:
    if fs == "ext4":
        runner.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                    str(device)], timeout=600)
    elif fs == "xfs":
        runner.run(["mkfs.xfs", "-q", str(device)], timeout=600)
    else:
        raise ValueError(f"unsupported filesystem {fs}")


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
    """Grows a mounted filesystem to fill its device (online); a no-op when it already does."""
    if fs == "ext4":
        runner.run(["resize2fs", str(device)], timeout=600)
    elif fs == "xfs":
        runner.run(["xfs_growfs", str(mountpoint)], timeout=600)
    else:
        raise ValueError(f"unsupported filesystem {fs}")
