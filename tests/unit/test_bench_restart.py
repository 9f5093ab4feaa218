"""bench/restart.py's pure parts: the table's medians, ratio and target, and the count of the driver's targets
in a storage node's configfs. The bench itself runs on the UML lab (bench/run --parts restart)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import restart  # noqa: E402  (bench/ is not a package)


def raw(total: float, activate: float) -> dict[str, float]:
    return {"total": total, "activate": activate, "export": total - activate}


def test_render_gives_medians_the_ratio_and_whether_the_target_is_met():
    table = restart.render([(0, [4.0, 5.0, 6.0], [raw(0.5, 0.5)] * 3, [4.0, 5.0, 6.0]),
                            (500, [60.0, 70.0, 80.0], [raw(40.0, 10.0), raw(50.0, 12.0), raw(45.0, 11.0)],
                             [7.0, 9.0, 8.0]),
                            (900, [200.0], [raw(100.0, 30.0)], [12.0])], runs=3)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    assert rows["0"][0].startswith("5.0 (4.0, 5.0, 6.0)") and rows["0"][-2] == ""   # no target without volumes
    assert rows["500"][1:] == ["45.0", "11.0 / 34.0", "1.56", "<= 1.5: **NOT met**", "8.0"]
    assert rows["900"][3:] == ["2.00", "<= 1.5: **NOT met**", "12.0"]
    ok = restart.render([(500, [60.0], [raw(45.0, 11.0)], [3.0])], runs=1)
    assert "| 1.33 | <= 1.5: **met** | 3.0 |" in ok


def test_targets_counts_only_the_drivers_iqns():
    class Node:
        def run(self, argv, timeout=None):
            class R:
                stdout = ("discovery_auth\niqn.2026-11.dev.csi.lvm-iscsi:csi-vg.a\n"
                          "iqn.2026-11.dev.csi.lvm-iscsi:csi-vg.b\niqn.2003-01.org.other:x\nlio_version\n")
            return R()
    assert restart.targets(Node()) == 2
