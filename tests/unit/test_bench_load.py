"""bench/load.py's pure parts: the table's medians, p95s, ratio and targets, and the sidecar-like retry that
counts what it retried. The bench itself runs on the UML lab (bench/run --parts load)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import load  # noqa: E402  (bench/ is not a package)


def a_run(created, raw, publish, unpublish=(0.1,)):
    r = load.Run(created=created, deleted=created / 2, raw=raw)
    r.latency["CreateVolume"] = [1.0, 2.0, 3.0]
    r.latency["ControllerPublishVolume while made"] = list(publish)
    r.latency["ControllerUnpublishVolume while made"] = list(unpublish)
    r.retries = Counter({"CreateVolume: ABORTED": 2})
    return r


def rows(table: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| ")}


def test_render_gives_medians_p95s_the_ratio_and_whether_the_targets_are_met():
    table = load.render(100, [a_run(120.0, 100.0, [0.1] * 19 + [5.0]), a_run(140.0, 90.0, [0.2] * 20)])
    r = rows(table)
    made = r["all 100 CreateVolume at once, until the last returned (s)"]
    assert made == ["130.0 (120.0, 140.0)", "95.0", "1.37", "<= 1.5: **met**"]
    pub = r["ControllerPublishVolume while made"]
    assert pub[0] == "40" and pub[1].startswith("0.20 / ") and pub[1].endswith(" / 5.00")
    assert pub[2] == "p95 <= 2: **met**"
    assert r["ControllerUnpublishVolume while made"][2] == "p95 <= 2: **met**"
    assert r["ControllerPublishVolume while deleted"] == ["0", "-", ""]
    assert "Retries: CreateVolume: ABORTED 4." in table
    assert "Errors (retried as the sidecars retry them): none." in table
    assert "Peak resident memory" not in table
    slow = load.render(10, [a_run(200.0, 100.0, [3.0] * 10)], [("agent", "guest s", 50 * 1024, 60 * 1024),
                                                              ("controller", "host", 40 * 1024, 45 * 1024)])
    assert "Peak resident memory after the runs: agent 60.0 MiB, controller 45.0 MiB." in slow
    assert "| 2.00 | <= 1.5: **NOT met** |" in slow and "p95 <= 2: **NOT met**" in slow


class Failure(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "it broke"


def test_a_call_is_retried_after_a_transient_code_only(monkeypatch):
    monkeypatch.setattr(load.time, "sleep", lambda s: None)
    bench = object.__new__(load.LoadBench)
    bench._mutex = load.threading.Lock()
    run, answers = load.Run(), [grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, None]

    def call():
        code = answers.pop(0)
        if code:
            raise Failure(code)
    assert bench.retried(run, "ControllerPublishVolume", call) >= 0
    assert run.retries == Counter({"ControllerPublishVolume: ABORTED": 1, "ControllerPublishVolume: INTERNAL": 1,
                                   "ControllerPublishVolume: UNAVAILABLE": 1})
    assert run.errors == Counter({"ControllerPublishVolume: INTERNAL: it broke": 1})
    with pytest.raises(grpc.RpcError):
        bench.retried(run, "CreateVolume", lambda: (_ for _ in ()).throw(Failure(grpc.StatusCode.INVALID_ARGUMENT)))
