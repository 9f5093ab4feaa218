"""csi/node/disk_queue.py: the scheduler file of a disk as the kernel shows it in sysfs."""

from __future__ import annotations

from pathlib import Path

from csi.node import disk_queue


def disk(tmp_path: Path, name: str, offered: str) -> Path:
    queue = tmp_path / name / "queue"
    queue.mkdir(parents=True)
    (queue / "scheduler").write_text(offered + "\n")
    return queue / "scheduler"


def test_a_disk_with_mq_deadline_gets_none(tmp_path):
    f = disk(tmp_path, "sdb", "[mq-deadline] none")
    assert disk_queue.use_no_scheduler(Path("/dev/sdb"), tmp_path)
    assert f.read_text() == "none"


def test_none_already_or_not_offered_or_no_such_disk_is_left_alone(tmp_path):
    already = disk(tmp_path, "sdc", "mq-deadline [none]")
    other = disk(tmp_path, "sdd", "[bfq]")
    assert not disk_queue.use_no_scheduler(Path("/dev/sdc"), tmp_path)
    assert not disk_queue.use_no_scheduler(Path("/dev/sdd"), tmp_path)
    assert not disk_queue.use_no_scheduler(Path("/dev/sde"), tmp_path)        # no such disk: nothing raised
    assert already.read_text() == "mq-deadline [none]\n" and other.read_text() == "[bfq]\n"


def test_a_refused_write_is_logged_not_raised(tmp_path, caplog, monkeypatch):
    f = disk(tmp_path, "sdf", "[mq-deadline] none")

    def refuse(self, text):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "write_text", refuse)
    assert not disk_queue.use_no_scheduler(Path("/dev/sdf"), tmp_path)
    assert "could not set the I/O scheduler of /dev/sdf to none" in caplog.text
    assert f.read_text() == "[mq-deadline] none\n"
