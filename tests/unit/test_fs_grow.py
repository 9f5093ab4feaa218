"""The grow after a stage (csi/node/mount.py grow_filesystem): skipped when the filesystem's superblock says it
fills its device, run when it does not or when the superblock cannot be read. The superblocks are made by this
machine's real mkfs.ext4 and mkfs.xfs on sparse files (the tools of deploy/packages.txt, which scripts/setup
installs); a block device needs root and a kernel, the on-disk format is the same."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from csi.node import mount
from tests.unit.test_mkfs_options import _tool

MiB = 1 << 20
REAL_RUN = subprocess.run     # fake_run replaces subprocess.run for the code under test, not for making images


def image(tmp_path: Path, fs: str, size: int, *args: str) -> Path:
    path = tmp_path / f"{fs}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    REAL_RUN([_tool(f"mkfs.{fs}"), "-q", *args, str(path)], check=True, capture_output=True,
                   env={**os.environ, "LC_ALL": "C"})
    return path


def grow(path: Path, by: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + by)


@pytest.mark.parametrize("fs,size,args,blocks", [
    ("ext4", 64 * MiB, ("-F", "-b", "4096"), (16384, 4096)),
    ("ext4", 64 * MiB, ("-F", "-b", "1024", "-O", "^64bit"), (65536, 1024)),
    ("xfs", 320 * MiB, (), (81920, 4096)),
])
def test_a_filesystem_that_fills_its_device_is_not_grown_one_that_does_not_is(tmp_path, fake_run, fs, size, args,
                                                                               blocks):
    dev = image(tmp_path, fs, size, *args)
    assert mount.filesystem_blocks(dev, fs) == blocks
    mount.grow_filesystem(dev, fs, tmp_path / "mnt")
    assert fake_run.calls == []
    grow(dev, 64 * MiB)          # a restore or clone bigger than its source, or an expansion
    fake_run.on("resize2fs")
    fake_run.on("xfs_growfs")
    mount.grow_filesystem(dev, fs, tmp_path / "mnt")
    assert fake_run.calls == [["resize2fs", str(dev)] if fs == "ext4" else ["xfs_growfs", str(tmp_path / "mnt")]]


def test_the_high_half_of_a_64bit_ext4_block_count_is_read(tmp_path):
    dev = image(tmp_path, "ext4", 64 * MiB, "-F", "-b", "4096", "-O", "64bit")
    with open(dev, "r+b") as f:          # as a filesystem of 2^32 + 16384 blocks would say
        f.seek(1024 + 0x150)
        f.write((1).to_bytes(4, "little"))
    assert mount.filesystem_blocks(dev, "ext4") == ((1 << 32) + 16384, 4096)


def test_the_high_half_of_the_block_count_counts_only_with_the_64bit_feature(tmp_path):
    dev = image(tmp_path, "ext4", 64 * MiB, "-F", "-b", "4096", "-O", "^64bit")
    with open(dev, "r+b") as f:          # a field a filesystem without the feature does not use
        f.seek(1024 + 0x150)
        f.write((1).to_bytes(4, "little"))
    assert mount.filesystem_blocks(dev, "ext4") == (16384, 4096)


@pytest.mark.parametrize("fs,size,offset,value", [
    ("ext4", 64 * MiB, 1024 + 0x18, (7).to_bytes(4, "little")),      # log block size 7: 128 KiB blocks
    ("xfs", 320 * MiB, 4, (3000).to_bytes(4, "big")),                # not a power of two
    ("xfs", 320 * MiB, 4, (1 << 17).to_bytes(4, "big")),             # 128 KiB
])
def test_a_block_size_no_such_filesystem_has_is_no_superblock_and_the_grow_runs(tmp_path, fake_run, fs, size,
                                                                                offset, value):
    """Else a block bigger than the device would make any size look like "fills": never grown."""
    dev = image(tmp_path, fs, size, *(("-F",) if fs == "ext4" else ()))
    with open(dev, "r+b") as f:
        f.seek(offset)
        f.write(value)
    assert mount.filesystem_blocks(dev, fs) is None
    fake_run.on("resize2fs")
    fake_run.on("xfs_growfs")
    mount.grow_filesystem(dev, fs, tmp_path / "mnt")
    assert len(fake_run.calls) == 1


def test_no_superblock_of_that_filesystem_means_the_grow_runs(tmp_path, fake_run):
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(64 * MiB)
    xfs = image(tmp_path, "xfs", 320 * MiB)
    assert mount.filesystem_blocks(blank, "ext4") is None and mount.filesystem_blocks(xfs, "ext4") is None
    assert mount.filesystem_blocks(tmp_path / "gone", "xfs") is None
    fake_run.on("resize2fs")
    mount.grow_filesystem(blank, "ext4", tmp_path / "mnt")
    mount.grow_filesystem(tmp_path / "gone", "ext4", tmp_path / "mnt")
    assert fake_run.calls == [["resize2fs", str(blank)], ["resize2fs", str(tmp_path / "gone")]]
