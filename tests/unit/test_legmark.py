"""`lvm-iscsi-csi mark-replica-leg`, run as an operator runs it (the CLI's argv) against a journal: a dry run by
default, refused while the leg's node answers (outdated) or does not (in-sync), never both legs outdated."""

from __future__ import annotations

import pytest

from csi import cli, legmark
from csi.controller.journal import Entry
from tests.unit.test_retire import answering_agent, operator_fleet

KEY = "c1-pvc-9-0123456789"
VOLUME = f"r1:{KEY}"


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    """(argv prefix, journal, pki, write_nodes): a replicated volume with legs on s1 and s2, both in sync."""
    monkeypatch.setattr(legmark, "ANSWER_WAIT", 1.0)   # a closed port is down within it
    return operator_fleet(tmp_path, "mark-replica-leg", [Entry(KEY, "volume", "pvc-9", "s1", state="ready", legs=[
        {"node": "s1", "pool": "thin", "vg": "vg", "state": "in-sync"},
        {"node": "s2", "pool": "thin", "vg": "vg", "state": "in-sync"}])])


def states(journal) -> list[str]:
    return [leg["state"] for leg in journal.get(KEY).legs]


def test_a_dry_run_says_what_is_given_up_and_changes_nothing(fleet, capsys):
    argv, journal, _, _ = fleet
    assert cli.main(argv + [VOLUME, "s2", "outdated"]) == 0
    out = capsys.readouterr().out
    assert "served from the leg on s1 alone" in out and "given up" in out and "dry run" in out
    assert states(journal) == ["in-sync", "in-sync"]


def test_a_leg_whose_node_is_down_is_outdated_and_never_both(fleet, capsys):
    argv, journal, _, _ = fleet
    assert cli.main(argv + [VOLUME, "s2", "outdated", "--yes"]) == 0
    assert states(journal) == ["in-sync", "outdated"]
    assert "next ControllerPublishVolume" in capsys.readouterr().out
    assert cli.main(argv + [VOLUME, "s2", "outdated", "--yes"]) == 0          # again: already so
    assert "already recorded outdated" in capsys.readouterr().out
    assert cli.main(argv + [VOLUME, "s1", "outdated", "--yes"]) == 1          # both: nothing would serve it
    assert "no leg to serve it" in capsys.readouterr().out
    assert cli.main(argv + [VOLUME, "s2", "in-sync", "--yes"]) == 1           # s2 does not answer: not resynced
    assert states(journal) == ["in-sync", "outdated"]


def test_bad_input_is_refused_clearly(fleet, capsys):
    argv, _, _, _ = fleet
    assert cli.main(argv + [f"v1:s1:vg:{KEY}", "s1", "outdated"]) == 2
    assert "not the ID of a replicated volume" in capsys.readouterr().out
    assert cli.main(argv + [VOLUME, "s3", "outdated"]) == 1
    assert "no leg on s3; its legs: 0 on s1 (in-sync), 1 on s2 (in-sync)" in capsys.readouterr().out
    assert cli.main(argv + ["r1:c1-nothing-here", "s1", "outdated"]) == 1
    assert "no record" in capsys.readouterr().out


def test_a_node_that_answers_is_not_outdated_and_is_marked_in_sync_again(fleet, capsys):
    argv, journal, pki, write_nodes = fleet
    assert cli.main(argv + [VOLUME, "s2", "outdated", "--yes"]) == 0
    with answering_agent(pki, "s2") as port:
        write_nodes(port)
        journal.update(_with_state(journal, 1, "in-sync"))
        assert cli.main(argv + [VOLUME, "s2", "outdated", "--yes"]) == 1
        assert "s2 answers" in capsys.readouterr().out
        journal.update(_with_state(journal, 1, "outdated"))
        assert cli.main(argv + [VOLUME, "s2", "in-sync", "--yes"]) == 0
    assert states(journal) == ["in-sync", "in-sync"]


def _with_state(journal, index: int, state: str) -> Entry:
    entry = journal.get(KEY)
    entry.legs[index]["state"] = state
    return entry
