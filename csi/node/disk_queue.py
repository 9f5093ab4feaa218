"""The worker's block queue of an iSCSI disk: no I/O scheduler.

The kernel gives a new SCSI disk mq-deadline. For a disk whose requests go over a network to a target that
queues and orders them itself (LIO, then the storage node's own block layer), the worker's scheduler only holds
requests back: bench/iscsi_tuning.py measured `none` against it (bench/README.md). Set on each disk of a session
of this driver as the node plugin finds it (stage, a replica leg, a check of a staged volume), so a disk that a
relogin made anew gets it too; a kernel without `none` for the disk, or a sysfs that refuses, keeps its default
(logged): it is a speed-up, never a reason to fail a stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")
WANTED = "none"


def use_no_scheduler(device: Path, sys_block: Path | None = None) -> bool:
    """Sets the disk's scheduler to none when it offers it and has another; True when it was changed."""
    path = (sys_block or SYS_BLOCK) / device.name / "queue" / "scheduler"
    try:
        offered = path.read_text().split()     # e.g. "[mq-deadline] none"
    except OSError:
        return False                           # not a whole disk, or gone meanwhile
    if f"[{WANTED}]" in offered or WANTED not in offered:
        return False
    try:
        path.write_text(WANTED)
    except OSError as exc:
        log.warning("could not set the I/O scheduler of %s to %s: %s", device, WANTED, exc)
        return False
    log.debug("I/O scheduler of %s set to %s (was %s)", device, WANTED, " ".join(offered))
    return True
