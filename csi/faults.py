"""Fault injection for the crash tests: the process kills itself (SIGKILL) at a named step, or pauses there.

Enabled only by the environment variables LVM_ISCSI_CSI_KILL_AT=<step> and LVM_ISCSI_CSI_PAUSE_AT=<point>,
which the Helm chart never sets; a process started with one logs a loud warning. Each side-effecting step of
the agent, the node plugin and the controller calls `step(name)`; tests/e2e/test_crash.py kills at each one,
restarts, retries the call as the sidecars would, and checks that exactly the right objects exist. A
`pause(name)` point holds the thread that reaches it until the test lets it go, so that a test can make
another call at exactly that point (an interleaving made deterministic, not left to timing).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "LVM_ISCSI_CSI_KILL_AT"
PAUSE_ENV = "LVM_ISCSI_CSI_PAUSE_AT"
PAUSE_DIR_ENV = "LVM_ISCSI_CSI_PAUSE_DIR"   # where "<point>.paused" appears and "<point>.go" is awaited
PAUSE_LIMIT = 300.0

# Every step, by role; the crash test walks this list.
AGENT_STEPS = ("create.lv", "create.record", "create.export", "copy.chunk", "copy.untagged", "delete.marked",
               "delete.revoked", "delete.unexported", "delete.lv", "wipe.renamed", "wipe.chunk", "grant.record",
               "grant.acl", "revoke.record", "snapshot.lv", "snapshot.split", "expand.lv")
NODE_STEPS = ("stage.record", "stage.login", "stage.mkfs", "stage.mount", "unstage.umount", "unstage.logout",
              "publish.mount", "expand.rescan")
CONTROLLER_STEPS = ("clone.transfer-snapshot", "create.placed", "create.made", "delete.removed", "snapshot.placed")
# The controller's steps for replicated volumes (csi/controller/replicas.py), walked by
# tests/e2e/test_crash_replicas.py.
REPLICA_STEPS = ("replicas.placed", "replicas.leg0-made", "replicas.leg1-made", "replicas.leg0-deleted",
                 "replicas.leg1-deleted")
# The node plugin's own steps for replicated volumes (csi/node/replicated.py; it also passes stage.record,
# stage.login, stage.mount, unstage.umount and unstage.logout of NODE_STEPS), walked there too.
REPLICA_NODE_STEPS = ("stage.assemble", "stage.seed-array", "unstage.stop", "reconcile.readd", "reconcile.join")


def warn_if_enabled() -> None:
    target = os.environ.get(ENV)
    if target:
        log.critical("FAULT INJECTION IS ON: this process kills itself at step %r (%s is set). Never in "
                     "production.", target, ENV)
    point = os.environ.get(PAUSE_ENV)
    if point:
        log.critical("FAULT INJECTION IS ON: this process pauses at %r (%s is set). Never in production.", point,
                     PAUSE_ENV)


def step(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.critical("fault injection: SIGKILL at %s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def pause(name: str) -> None:
    """Holds the calling thread at `name` when LVM_ISCSI_CSI_PAUSE_AT names it: writes <dir>/<name>.paused,
    then waits until <dir>/<name>.go exists (at most PAUSE_LIMIT seconds), and removes both."""
    if os.environ.get(PAUSE_ENV) != name:
        return
    directory = Path(os.environ.get(PAUSE_DIR_ENV) or "/run/lvm-iscsi-csi-faults")
    directory.mkdir(parents=True, exist_ok=True)
    paused, go = directory / f"{name}.paused", directory / f"{name}.go"
    log.critical("fault injection: paused at %s until %s exists", name, go)
    paused.write_text(str(os.getpid()))
    deadline = time.monotonic() + PAUSE_LIMIT
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    log.critical("fault injection: going on from %s%s", name, "" if go.exists() else " (waited too long)")
    for path in (paused, go):
        path.unlink(missing_ok=True)
