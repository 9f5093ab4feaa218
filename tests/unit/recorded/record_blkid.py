"""Records what `blkid -p -o export` prints for the signatures a LUN can carry, on a real kernel (one UML lab
node): blkid_<case>.stdout and blkid_<case>.rc beside this file. Run as root from the checkout:

    .venv/bin/python -m tests.unit.recorded.record_blkid

Each case is a loop device over a fresh sparse file, given its signature by the real tool (sfdisk from
Debian's fdisk, mkfs.*, pvcreate); the device name in the output is replaced by /dev/sdb, what the node
plugin probes.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from csi.lab import Lab, preflight

HERE = Path(__file__).parent
DEVICE = "/dev/sdb"

CASES = {
    "blank": [],
    "ext4": [["mkfs.ext4", "-q", "-F", "{dev}"]],
    "xfs": [["mkfs.xfs", "-q", "{dev}"]],
    "gpt": [["sh", "-c", "echo 'label: gpt\n,32M' | sfdisk -q {dev}"]],
    "dos": [["sh", "-c", "echo 'label: dos\n,32M' | sfdisk -q {dev}"]],
    "lvm2_member": [["pvcreate", "-q", "{dev}"]],
    # A whole-disk ext4 that someone partitioned afterwards: sfdisk keeps the ext4 superblock (--wipe never).
    "ext4_dos": [["mkfs.ext4", "-q", "-F", "{dev}"],
                 ["sh", "-c", "echo 'label: dos\n,32M' | sfdisk -q --wipe never {dev}"]],
}


def main() -> int:
    problem = preflight()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="record-blkid-") as tmp, \
            Lab(Path(tmp), name="recblkid", subnet="10.213.250") as lab:
        node = lab.add_node("worker-1", role="worker")
        lab.boot_all(timeout=300)
        for case, steps in CASES.items():
            image = node.workdir / f"{case}.img"
            node.run(["truncate", "-s", "400M", str(image)], check=True)
            dev = node.run(["losetup", "-f", "--show", str(image)], check=True).stdout.strip()
            try:
                for step in steps:
                    node.run([a.replace("{dev}", dev) for a in step], timeout=120, check=True)
                r = node.run(["blkid", "-p", "-o", "export", dev], timeout=60)
                (HERE / f"blkid_{case}.stdout").write_text(r.stdout.replace(dev, DEVICE))
                (HERE / f"blkid_{case}.rc").write_text(f"{r.rc}\n")
                print(f"{case}: rc {r.rc}\n{r.stdout}")
            finally:
                node.run(["losetup", "-d", dev])
    return 0


if __name__ == "__main__":
    sys.exit(main())
