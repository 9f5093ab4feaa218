"""Fakes for the unit tier: a runner that records every argv and replays recorded real output."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from csi import runner

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> str:
    return (RECORDED / name).read_text()


def recorded_failure(name: str) -> tuple[int, str, str]:
    """(rc, stdout, stderr) of a command recorded failing in a real kernel (see recorded/README)."""
    return int(recorded(f"{name}.rc").strip()), "", recorded(f"{name}.stderr")


class FakeRunner:
    """Replaces runner.run's process start: answers come from `responses`, matched by argv prefix (the
    longest prefix wins; among equals, the latest registered); every call is recorded with its full argv and environment."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.envs: list[dict[str, str]] = []
        self.timeouts: list[float | None] = []
        self.responses: list[tuple[tuple[str, ...], Callable[[list[str]], tuple[int, str, str]]]] = []

    def on(self, *prefix: str, rc: int = 0, stdout: str = "", stderr: str = "", fn=None) -> None:
        self.responses.append((prefix, fn or (lambda argv: (rc, stdout, stderr))))

    def __call__(self, argv, *, input=None, capture_output=True, text=True, timeout=None, env=None, check=False,
                 stdin=None):
        argv = list(argv)
        self.calls.append(argv)
        self.envs.append(env or {})
        self.timeouts.append(timeout)
        best = None
        for prefix, fn in self.responses:
            if tuple(argv[:len(prefix)]) == prefix and (best is None or len(prefix) >= len(best[0])):
                best = (prefix, fn)
        if best is None:
            raise AssertionError(f"unexpected command {argv}")
        rc, out, err = best[1](argv)
        import subprocess
        return subprocess.CompletedProcess(argv, rc, out, err)


@pytest.fixture
def fake_run(monkeypatch) -> FakeRunner:
    fake = FakeRunner()
    monkeypatch.setattr(runner.subprocess, "run", fake)
    return fake
