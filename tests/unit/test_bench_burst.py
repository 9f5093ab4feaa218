"""bench/stage_burst.py's pure parts: the outcome of each call and the table. The bench itself runs on the UML lab
(bench/run --parts burst)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import stage_burst  # noqa: E402  (bench/ is not a package)


def rows(table: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ")}


def test_every_stage_succeeding_meets_the_target_with_its_percentiles():
    out = stage_burst.Outcome()
    for i in range(1, 101):
        out.record("NodeStageVolume", i / 10, None)       # 0.1 .. 10.0 s
        out.record("NodeUnstageVolume", 0.5, None)
    out.wall = {"NodeStageVolume": 12.34, "NodeUnstageVolume": 3.0}
    r = rows(stage_burst.render(out, 100))
    assert r["NodeStageVolume"] == ["100", "none", "5.05", "9.50", "10.00", "12.3",
                                    "none reaches its deadline: **met**"]
    assert r["NodeUnstageVolume"] == ["100", "none", "0.50", "0.50", "0.50", "3.0", ""]


def test_a_stage_that_failed_is_counted_by_its_code_and_the_target_is_not_met():
    out = stage_burst.Outcome()
    for i in range(98):
        out.record("NodeStageVolume", 1.0, None)
    out.record("NodeStageVolume", 120.0, "DEADLINE_EXCEEDED")
    out.record("NodeStageVolume", 3.0, "ABORTED")
    r = rows(stage_burst.render(out, 100))
    assert r["NodeStageVolume"][:2] == ["98", "ABORTED 1, DEADLINE_EXCEEDED 1"]
    assert r["NodeStageVolume"][-1] == "none reaches its deadline: **NOT met**"
    assert r["NodeUnstageVolume"][:5] == ["0", "none", "-", "-", "-"]      # a burst that did not run


def test_the_profile_lists_the_commands_the_costliest_first():
    out = stage_burst.Outcome()
    out.record("NodeStageVolume", 1.0, None)
    out.commands = {"mkfs.ext4": (10, 5.0), "iscsiadm --login": (10, 8.0)}
    r = rows(stage_burst.render(out, 1))
    assert r["`iscsiadm --login`"] == ["10", "0.800", "8.0"] and r["`mkfs.ext4`"] == ["10", "0.500", "5.0"]
    table = stage_burst.render(out, 1)
    assert table.index("`iscsiadm --login`") < table.index("`mkfs.ext4`")


def test_the_lab_rate_by_hand_is_a_row_of_its_own():
    out = stage_burst.Outcome()
    out.record("NodeStageVolume", 1.0, None)
    out.raw_stages, out.raw_total = [0.5, 0.7, 0.9], 2.2
    r = rows(stage_burst.render(out, 1))
    assert r["by hand, one after another (the lab's own rate)"] == ["3", "", "0.70", "0.88", "0.90", "2.2", ""]
