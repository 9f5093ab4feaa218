"""The README's main command, `scripts/demo`, as it runs: the whole lifecycle on a throw-away storage node. It once
broke silently (issue 13 took the CHAP user out of publish_context and the demo still printed it: a KeyError)
because nothing ran it; this does, on real parts, and reads what it printed."""

from __future__ import annotations

import io

from csi.demo import demo


def test_the_demo_runs_every_step_and_leaves_nothing(tmp_path):
    out = io.StringIO()
    assert demo(tmp_path / "demo", out=out) == 0, out.getvalue()[-3000:]
    text = out.getvalue()
    assert "demo OK: every step succeeded and nothing was left behind" in text, text[-3000:]
    for step in ("CreateVolume", "ControllerPublishVolume", "NodeStageVolume", "read back", "DeleteVolume",
                 "check nothing is left"):
        assert f"\n{step} " in text, step
    assert "sha256 matches" in text and "chapSecret" not in text
