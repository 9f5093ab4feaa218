"""`lvm-iscsi-csi status`: its exit code is 1 for every kind of trouble it reports, 0 only when nothing needs
attention (issue 12, defect 7: an abnormal volume was printed and the exit code stayed 0)."""

from __future__ import annotations

import io

import pytest

from csi import errors, status
from csi.config import StorageNode
from csi.proto import agent_pb2 as apb

GiB = 1 << 30


class Agent:
    """One agent as status sees it: answers GetInfo, ListVolumes and Orphans, or fails a chosen call."""

    def __init__(self, name: str):
        self.node = StorageNode(name, f"{name}:7600", "zone-a")
        self.pools = [apb.Pool(name="thin", vg="vg", thin_pool="tp", physical_total_bytes=10 * GiB,
                               overprovision_ratio=4.0, available_bytes=30 * GiB, data_percent=10.0,
                               metadata_percent=5.0, max_fill_percent=90.0, warn_fill_percent=80.0,
                               volume_count=1),
                      apb.Pool(name="thick", vg="vg", physical_total_bytes=4 * GiB, available_bytes=2 * GiB,
                               data_percent=50.0, max_fill_percent=90.0, warn_fill_percent=80.0)]
        self.volumes = [apb.Volume(name="pvc-1", pool="thin", vg="vg", lv="c1-pvc-1-0123456789", size_bytes=GiB,
                                   healthy=True, exported=True, ready=True, created_unix=1_790_000_000)]
        self.orphans: list[apb.Orphan] = []
        self.failing: set[str] = set()
        self.not_ready_reason = ""

    def info(self, timeout=None, reconnect=True):
        return self.call("GetInfo", apb.GetInfoRequest(), timeout)

    def call(self, method, request, timeout=None, reconnect=True):
        if method in self.failing:
            raise errors.unavailable(f"storage node {self.node.name} is unreachable")
        if method == "GetInfo":
            return apb.AgentInfo(node_name=self.node.name, pools=self.pools, ready=not self.not_ready_reason,
                                 not_ready_reason=self.not_ready_reason)
        if method == "ListVolumes":
            return apb.ListVolumesResponse(volumes=self.volumes)
        if method == "Orphans":
            return apb.OrphansResponse(orphans=self.orphans)
        if method == "ExamineLeg":   # an agent from before it
            raise errors.CsiError(errors.Code.UNIMPLEMENTED, "Method not found!")
        raise AssertionError(method)


class Agents:
    def __init__(self, *agents: Agent):
        self._agents = {a.node.name: a for a in agents}

    def all(self):
        return [self._agents[n] for n in sorted(self._agents)]

    def each(self, fn):
        out = {}
        for a in self.all():
            try:
                out[a.node.name] = fn(a)
            except errors.CsiError as exc:
                out[a.node.name] = exc
        return out


def run(*agents: Agent) -> tuple[int, str]:
    out = io.StringIO()
    code = status.report(Agents(*agents), out, min_age=600)
    return code, out.getvalue()


def test_all_well_exits_0():
    code, text = run(Agent("s1"), Agent("s2"))
    assert code == 0, text
    assert "ok" in text and "ABNORMAL" not in text


def test_a_copy_in_progress_is_shown_and_is_no_trouble():
    s2 = Agent("s2")
    s2.volumes[0].healthy, s2.volumes[0].ready, s2.volumes[0].copy_running = False, False, True
    s2.volumes[0].condition = "content being copied: 45%"
    code, text = run(Agent("s1"), s2)
    assert "content being copied: 45%" in text and "ABNORMAL" not in text
    assert code == 0, text


def test_a_wipe_backlog_is_shown_and_is_no_trouble():
    s2 = Agent("s2")
    s2.pools[1].wiping_volumes, s2.pools[1].wiping_bytes = 2, 3 * GiB
    code, text = run(Agent("s1"), s2)
    assert "wiping 2 volume(s), 3.0G left" in text
    assert code == 0, text


def test_an_agent_still_bringing_its_volumes_back_is_starting_and_no_trouble():
    s2 = Agent("s2")
    s2.not_ready_reason = "restoring exports after the agent's start: 120 of 500 volumes left"
    code, text = run(Agent("s1"), s2)
    rows = [line.split() for line in text.splitlines() if line.startswith("s2 ")]
    assert [r[2] for r in rows] == ["starting", "starting"], text
    assert text.count("restoring exports after the agent's start: 120 of 500 volumes left") == 2
    assert [line.split()[2] for line in text.splitlines() if line.startswith("s1 ")] == ["up", "up"]
    assert code == 0, text


def _wipe_failing(a: Agent) -> str:
    a.pools[1].wiping_volumes, a.pools[1].wiping_bytes = 1, GiB
    a.pools[1].wipe_error = "zeroing vg/c1+wipe+0123 fails: blkdiscard: Input/output error"
    return "WIPE FAILING: zeroing vg/c1+wipe+0123 fails"


def _agent_down(a: Agent) -> str:
    a.failing = {"GetInfo", "ListVolumes", "Orphans"}
    return "down"


def _pool_full(a: Agent) -> str:
    a.pools[0].data_percent = 95.0
    return "FULL"


def _pool_warning(a: Agent) -> str:
    a.pools[0].metadata_percent = 85.0
    return "WARNING"


def _volume_abnormal(a: Agent) -> str:
    a.volumes[0].healthy = False
    a.volumes[0].condition = "iSCSI target iqn.x is not exported"
    return "ABNORMAL: iSCSI target iqn.x is not exported"


def _copy_stuck(a: Agent) -> str:
    # a copy that no job runs any more: only CreateVolume's retry finishes it, and none may come
    a.volumes[0].healthy, a.volumes[0].ready = False, False
    a.volumes[0].condition = "copy not finished"
    return "ABNORMAL: copy not finished"


def _volumes_unlisted(a: Agent) -> str:
    a.failing = {"ListVolumes"}
    return "cannot list the volumes of s2"


def _orphans(a: Agent) -> str:
    a.orphans = [apb.Orphan(kind="lv", name="vg/c1-x-0123456789", reason="a volume LV without a record",
                            age_seconds=4000)]
    return "ORPHANS"


def _orphans_unknown(a: Agent) -> str:
    a.failing = {"Orphans"}
    return "cannot look for orphans on s2"


@pytest.mark.parametrize("trouble", [_agent_down, _pool_full, _pool_warning, _volume_abnormal, _copy_stuck,
                                     _volumes_unlisted, _orphans, _orphans_unknown,
                                     _wipe_failing])
def test_each_kind_of_trouble_is_reported_and_exits_1(trouble):
    s2 = Agent("s2")
    shown = trouble(s2)
    code, text = run(Agent("s1"), s2)
    assert shown in text, text
    assert code == 1, f"{trouble.__name__}: status printed the trouble but exited {code}:\n{text}"
