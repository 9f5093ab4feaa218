"""bench/stage.py's pure parts: the label of each node plugin command, and the table's medians, ratio, target and
profile. The bench itself runs on the UML lab (bench/run --parts stage)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import stage  # noqa: E402  (bench/ is not a package)
import stats  # noqa: E402

IQN = "iqn.2026-11.dev.csi.lvm-iscsi:vg.lv"


def test_command_label_names_what_each_iscsiadm_call_does_whatever_volume_it_names():
    assert stage.command_label(["iscsiadm", "-m", "node", "-T", IQN, "-p", "10.0.0.1:3260", "-o", "new"]) \
        == "iscsiadm -m node -o new"
    assert stage.command_label(["iscsiadm", "-m", "node", "-T", IQN, "-p", "p", "-o", "update", "-n", "k", "-v",
                                "v"]) == "iscsiadm -m node -o update"
    assert stage.command_label(["iscsiadm", "-m", "node", "-T", IQN, "-p", "p", "--login"]) == "iscsiadm --login"
    assert stage.command_label(["iscsiadm", "-m", "session"]) == "iscsiadm -m session"
    assert stage.command_label(["nsenter", "--mount=/proc/1/ns/mnt", "--", "iscsiadm", "-m", "session"]) \
        == "iscsiadm -m session"
    assert stage.command_label(["/sbin/mkfs.ext4", "-q", "/dev/sdb"]) == "mkfs.ext4"


def test_commands_are_summed_per_label_from_the_runners_debug_lines():
    text = ("2026-12-05 01:00:00 DEBUG csi.runner: ran ['blkid', '-p', '/dev/sdb'] rc=2 in 0.050s\n"
            "2026-12-05 01:00:01 DEBUG csi.runner: ran ['iscsiadm', '-m', 'node', '-o', 'update'] rc=0 in 0.100s\n"
            "2026-12-05 01:00:01 DEBUG csi.runner: ran ['iscsiadm', '-m', 'node', '-o', 'update'] rc=0 in 0.200s\n"
            "2026-12-05 01:00:02 INFO csi.server: NodeStageVolume ok in 1.000s\n")
    got = stats.commands(text, stage.command_label)
    assert got == {"blkid": (1, 0.05), "iscsiadm -m node -o update": (2, 0.30000000000000004)}


def rows(table: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ")}


def test_render_gives_medians_the_ratio_the_target_and_where_the_time_goes():
    out = stage.Samples()
    for step, driver, raw in zip(stage.STEPS, ([1.2, 1.0, 5.0], [0.5] * 3, [0.8] * 3, [0.4] * 3),
                                 ([1.0, 0.9, 0.8], [0.3] * 3, [0.4] * 3, [0.2] * 3)):
        out.driver[step] = driver
        out.raw[step] = raw
    out.commands = [{"mkfs.ext4": (1, 0.3), "iscsiadm --login": (1, 0.2)}, {"mkfs.ext4": (1, 0.5)},
                    {"mkfs.ext4": (1, 0.4)}]
    out.raw_parts = [{"login": 0.2, "device": 0.1, "mkfs": 0.4, "mount": 0.1, "total": 0.8}] * 3
    r = rows(stage.render(out, 3))
    assert r[stage.STEPS[0]] == ["1.20", "0.90", "1.33", "<= 1.2: **NOT met**"]
    assert r[stage.STEPS[2]] == ["0.80", "0.40", "2.00", ""]
    assert r["command `mkfs.ext4`"] == ["1", "0.400"]
    assert r["command `iscsiadm --login`"] == ["0.333333", "0.067"]
    assert r["all external commands"] == ["", "0.467"]
    assert r["client-measured total"] == ["", "2.400"]
    assert r["by hand: mkfs"] == ["", "0.400"]
    out.driver[stage.STEPS[0]] = [1.0, 1.0, 1.0]
    assert rows(stage.render(out, 3))[stage.STEPS[0]][3] == "<= 1.2: **met**"
