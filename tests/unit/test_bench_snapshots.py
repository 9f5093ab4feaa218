"""bench/snapshots.py's table: medians and ratios of each operation, the copy's rate across storage nodes, and the
agents' memory after the run. The bench itself runs on the UML lab (bench/run --parts snapshots)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import snapshots  # noqa: E402  (bench/ is not a package)

MiB = 1 << 20


def test_the_table_gives_medians_ratios_the_copy_rate_and_both_agents_memory():
    rows = [snapshots.Row("CreateSnapshot", "lvcreate", [0.9, 0.8, 1.0], [0.5, 0.4, 0.6]),
            snapshots.Row("other node", "TCP", [30.0, 20.0, 25.0], [20.0, 25.0, 30.0])]
    memory = [("agent", "guest storage-1", 70 * 1024, 75 * 1024), ("agent", "guest storage-2", 80 * 1024, 96 * 1024)]
    table = snapshots.render(rows, 1024 * MiB, 3, memory)
    assert "| CreateSnapshot | 0.90 | 0.50 | 1.80 | lvcreate |" in table
    assert "| other node | 25.00 | 25.00 | 1.00 | TCP |" in table
    assert "the driver moved 42.9 MB/s" in table and "the plain TCP stream 42.9 MB/s" in table
    assert "| agent | guest storage-1 | 70.0 | 75.0 |" in table and "| agent | guest storage-2 | 80.0 | 96.0 |" in table
    assert "Resident memory" not in snapshots.render(rows, 1024 * MiB, 3)
