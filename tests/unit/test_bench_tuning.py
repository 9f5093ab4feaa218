"""bench/iscsi_tuning.py's pure parts: the table's ratios, and reading a node record and a session's negotiated
keys from iscsiadm's output (a stand-in node answers as iscsiadm 2.1.8 prints). The bench itself runs on the UML
lab (bench/run --parts tuning)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import iscsi_tuning  # noqa: E402  (bench/ is not a package)

IQN = "iqn.2026-11.dev.csi.lvm-iscsi:vg.lv"
RECORD = """# BEGIN RECORD 2.1.8
node.name = iqn.2026-11.dev.csi.lvm-iscsi:vg.lv
node.session.cmds_max = 128
node.session.queue_depth = 32
node.session.auth.password = ********
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
# END RECORD
"""
SESSIONS = f"""Target: iqn.2026-11.dev.csi.lvm-iscsi:other (non-flash)
\t\tMaxRecvDataSegmentLength: 1
Target: {IQN} (non-flash)
\tCurrent Portal: 10.0.0.2:3260,1
\t\t************************
\t\tNegotiated iSCSI params:
\t\t************************
\t\tHeaderDigest: None
\t\tMaxRecvDataSegmentLength: 262144
\t\tMaxXmitDataSegmentLength: 65536
\t\tFirstBurstLength: 65536
\t\tMaxBurstLength: 262144
\t\tImmediateData: Yes
\t\tInitialR2T: Yes
"""


class Node:
    """Answers run() from a table of argv prefixes."""

    def __init__(self, answers: dict[tuple[str, ...], str]):
        self.answers, self.argvs = answers, []

    def run(self, argv, timeout=60, check=False, **_):
        self.argvs.append(argv)
        for prefix, out in self.answers.items():
            if tuple(argv[:len(prefix)]) == prefix:
                return SimpleNamespace(rc=0, stdout=out, stderr="")
        raise AssertionError(f"unexpected {argv}")


def test_render_sets_each_variant_against_the_defaults_and_the_local_floor():
    iops = {}
    for i, variant in enumerate(iscsi_tuning.VARIANTS):
        for job in iscsi_tuning.JOBS:
            iops[(variant.name, job.name)] = [1000.0 * (1 + i / 10), 900.0, 5000.0]   # median: the first
    for job in iscsi_tuning.JOBS:
        iops[("local", job.name)] = [2000.0, 2000.0, 2000.0]
    text = iscsi_tuning.render(iops, {"the driver's defaults": "InitialR2T Yes"}, 512 << 20, 3, 10)
    lines = text.splitlines()
    base = next(ln for ln in lines if ln.startswith("| the driver's defaults |"))
    assert base.count("1,000 (1.00x, 0.50 local)") == len(iscsi_tuning.JOBS)
    second = next(ln for ln in lines if ln.startswith(f"| {iscsi_tuning.VARIANTS[1].name} |"))
    assert "1,100 (1.10x, 0.55 local)" in second
    assert any(ln.startswith("| the same LV on its storage node (local) | 2,000 |") for ln in lines)
    assert "- the driver's defaults: InitialR2T Yes" in lines
    refused = iscsi_tuning.VARIANTS[-1].name
    del_keys = [k for k in iops if k[0] == refused]
    for k in del_keys:
        del iops[k]
    text = iscsi_tuning.render(iops, {refused: "not measured: EINVAL"}, 512 << 20, 3, 10)
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| {refused} |"))
    assert row == f"| {refused} | " + " | ".join("-" for _ in iscsi_tuning.JOBS) + " |"
    assert f"- {refused}: not measured: EINVAL" in text.splitlines()


def test_a_session_reads_its_record_and_what_its_login_negotiated():
    worker = Node({("iscsiadm", "-m", "node"): RECORD, ("iscsiadm", "-m", "session"): SESSIONS,
                   ("readlink",): "/dev/sdb\n", ("cat", "/sys/block/sdb/device/queue_depth"): "32\n",
                   ("cat", "/sys/block/sdb/queue/scheduler"): "[mq-deadline] none\n",
                   ("cat", "/sys/block/sdb/queue/nr_requests"): "64\n"})
    session = iscsi_tuning.Session(Node({}), worker, IQN, "10.0.0.2:3260")
    record = session.record()
    assert record["node.session.queue_depth"] == "32" and record["node.session.cmds_max"] == "128"
    assert record["node.conn[0].iscsi.MaxRecvDataSegmentLength"] == "262144"
    assert session.disk_queue("scheduler") == "mq-deadline" and session.disk_queue("nr_requests") == "64"
    assert session.negotiated() == ("MaxRecvDataSegmentLength 262144, MaxXmitDataSegmentLength 65536, "
                                    "FirstBurstLength 65536, MaxBurstLength 262144, ImmediateData Yes, "
                                    "InitialR2T Yes; queue_depth 32, mq-deadline, nr_requests 64")
    assert ["iscsiadm", "-m", "node", "-T", IQN, "-p", "10.0.0.2:3260"] in worker.argvs
