"""bench/randio.py's pure parts: fio's JSON as fio 3.33 (Debian 12) printed it here, the argv both sides run,
and the table's ratios and verdicts. The bench itself runs on the UML lab (bench/run --parts randio)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).resolve().parent / "recorded"
sys.path.insert(0, str(REPO / "bench"))
import randio  # noqa: E402  (bench/ is not a package)


def test_parse_reads_the_side_the_job_did_with_latency_in_microseconds():
    r = randio.parse((RECORDED / "fio_randread.json").read_text(), "randread")
    assert r.iops == pytest.approx(13231.884058) and r.mbps == pytest.approx(54.197797)
    assert r.mean_us == pytest.approx(74.497704498) and r.p99_us == pytest.approx(158.72)
    w = randio.parse((RECORDED / "fio_write.json").read_text(), "write")
    assert w.iops > 0 and w.mbps == pytest.approx(w.iops * 1.048576, rel=0.02)   # 1 MiB blocks
    assert w.p99_us >= w.mean_us * 0.5 > 0


def test_both_sides_run_the_same_flags_but_the_file():
    job = randio.JOBS[0]
    over = randio.fio_argv(job, "/var/lib/kubelet/pods/x/volumeDevices/randio", 10)
    here = randio.fio_argv(job, "/dev/csi-vg/lv", 10)
    assert [a for a in over if not a.startswith("--filename=")] == [a for a in here if not a.startswith("--filename=")]
    assert {"--direct=1", "--ioengine=libaio", "--rw=randread", "--bs=4k", "--iodepth=1"} <= set(over)
    assert randio.fio_argv(job, "/mnt/fio.dat", 10, size=64 << 20)[-1] == f"--size={64 << 20}"


def test_render_gives_ratios_and_says_whether_each_target_is_met():
    def cells(iscsi_iops: float, local_iops: float):
        over, here = randio.Cell(), randio.Cell()
        over.runs.append(randio.Result(iscsi_iops, iscsi_iops * 0.004, 300, 900))
        here.runs.append(randio.Result(local_iops, local_iops * 0.004, 200, 500))
        return over, here
    table = {j.name: cells(700 if j.depth == 1 else 900, 1000) for j in randio.JOBS}
    text = randio.render(table, table, 512 << 20, 1, 10)
    qd1 = next(line for line in text.splitlines() if line.startswith("| 4 KiB random read, QD1 |"))
    qd32 = next(line for line in text.splitlines() if line.startswith("| 4 KiB random write, QD32 |"))
    assert "| 0.70 |" in qd1 and ">= 0.6: **met**" in qd1
    assert "| 0.90 |" in qd32 and ">= 0.8: **met**" in qd32
    table = {j.name: cells(500, 1000) for j in randio.JOBS}
    assert randio.render(table, table, 512 << 20, 1, 10).count("NOT met") == 8   # 4 targets, 2 tables


def test_render_sets_the_write_latency_against_the_network_round_trip():
    over, here = randio.Cell(), randio.Cell()
    over.runs.append(randio.Result(2000, 8.0, 450, 900))
    here.runs.append(randio.Result(5000, 20.0, 190, 400))
    table = {j.name: (over, here) for j in randio.JOBS}
    text = randio.render(table, table, 512 << 20, 1, 10, rtt=[(130.0, 300.0), (120.0, 280.0), (200.0, 500.0)])
    assert "mean 130 us, p99 300 us" in text and "adds 260 us to the local one: 2.0x that round trip" in text
