"""Records what mdadm prints about the legs of a replicated volume's RAID1, on a real kernel (one UML lab node):
mdadm_<case>.stdout and mdadm_<case>.rc beside this file. Run as root from the checkout:

    .venv/bin/python -m tests.unit.recorded.record_mdadm

Two thin LVs stand for the two legs; the array is made as csi/node/raid.py makes it. Cases: a leg without a
superblock (examine_export_none), both legs in sync (examine_export_both, examine_both), the leg that went on
alone after the other failed (examine_alone) and the one left behind (examine_left_behind). The device names
in the output are the LVs' (/dev/csi-vg/a, /dev/csi-vg/b).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from csi.lab import Lab, preflight

HERE = Path(__file__).parent
MD = "/dev/md/csi-test"


def main() -> int:
    problem = preflight()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="record-mdadm-") as tmp, \
            Lab(Path(tmp), name="recmdadm", subnet="10.213.9") as lab:
        n = lab.add_node("storage-1", role="storage", disk_bytes=1 << 30)
        lab.boot_all(timeout=180)

        def run(argv, case=None):
            r = n.run(argv, timeout=120)
            if case:
                (HERE / f"mdadm_{case}.stdout").write_text(r.stdout)
                (HERE / f"mdadm_{case}.rc").write_text(f"{r.rc}\n")
            elif r.rc != 0:
                raise SystemExit(f"{argv}: rc {r.rc}: {r.stderr}")
            return r

        run(["modprobe", "raid1"])
        for lv in ("a", "b"):
            run(["lvcreate", "-q", "-V", "64m", "-T", "csi-vg/thinpool", "-n", lv])
        run(["mdadm", "--examine", "--export", "/dev/csi-vg/a"], "examine_export_none")
        run(["mdadm", "--create", MD, "--run", "--level=1", "--raid-devices=2", "--metadata=1.2",
             "--data-offset=1M", "--bitmap=internal", "--name=lvmiscsi:0123456789abcdef", "--assume-clean", "--failfast",
             "/dev/csi-vg/a", "/dev/csi-vg/b"])
        run(["mdadm", "--examine", "--export", "/dev/csi-vg/a"], "examine_export_both")
        run(["mdadm", "--examine", "/dev/csi-vg/a"], "examine_both")
        run(["mdadm", "--manage", MD, "--fail", "/dev/csi-vg/b"])
        run(["dd", "if=/dev/zero", f"of={MD}", "bs=1M", "count=4", "oflag=direct", "status=none"])
        run(["mdadm", "--examine", "/dev/csi-vg/a"], "examine_alone")
        run(["mdadm", "--examine", "/dev/csi-vg/b"], "examine_left_behind")
        run(["mdadm", "--stop", MD])
    return 0


if __name__ == "__main__":
    sys.exit(main())
