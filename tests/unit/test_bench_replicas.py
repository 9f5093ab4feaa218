"""bench/replicas.py's pure parts: /proc/mdstat read as the kernel of the UML lab printed it, and the table's
ratios and per-GiB figures. The bench itself runs on the UML lab (bench/run --parts replicas)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import replicas  # noqa: E402  (bench/ is not a package)
from randio import Cell, Result  # noqa: E402

# /proc/mdstat of a worker with the replicated volume's array recovering a leg (UML, Linux 6.1)
MDSTAT = """Personalities : [raid1]
md127 : active raid1 sdb[2] sda[0]
      523264 blocks super 1.2 [2/1] [U_]
      [=======>.............]  recovery = 36.4% (190848/523264) finish=0.2min speed=21205K/sec
      bitmap: 1/1 pages [4KB], 65536KB chunk

unused devices: <none>
"""


class Worker:
    def __init__(self, mdstat: str, md: str = "/dev/md127"):
        self.mdstat, self.md = mdstat, md

    def run(self, argv, timeout=None):
        class R:
            stdout = self.md if argv[0] == "readlink" else self.mdstat
        return R()


def test_array_reads_the_member_counts_and_the_stanza_of_the_volumes_array():
    counts, stanza = replicas.array(Worker(MDSTAT), "pvc-abc")
    assert counts == "[2/1] [U_]" and "recovery = 36.4%" in stanza and "unused devices" not in stanza
    assert replicas.array(Worker(MDSTAT, md="/dev/md/csi-gone"), "pvc-abc") == ("", "")


def test_render_gives_ratios_and_seconds_per_gib():
    def cell(iops, mbps=1.0):
        return Cell([Result(iops, mbps, 100.0, 200.0)])
    io = {job.name: (cell(1000), cell(2000)) for job in replicas.JOBS}
    text = replicas.render(io, [7.0, 8.0, 9.0], [16.0, 18.0, 20.0], 512 << 20, 3, 10, "min 1000 / max 200000 KB/s")
    assert "| 4 KiB random write, QD1 | 1,000 | 2,000 | 0.50 |" in text
    # 256 MiB changed: the median 8 s is 32 s per GiB; a full 512 MiB leg in the median 18 s is 36 s per GiB
    assert "| 7.0, 8.0, 9.0 | 32.0 |" in text and "| 16.0, 18.0, 20.0 | 36.0 |" in text
