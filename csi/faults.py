"""Fault injection for the crash tests: the process kills itself (SIGKILL) at a named step.

Enabled only by the environment variable LVM_ISCSI_CSI_KILL_AT=<step>, which the Helm chart never sets; a
process started with it logs a loud warning. Each side-effecting step of the agent, the node plugin and the
controller calls `step(name)`; tests/e2e/test_crash.py kills at each one, restarts, retries the call as the
sidecars would, and checks that exactly the right objects exist.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "LVM_ISCSI_CSI_KILL_AT"

# Every step, by role; the crash test walks this list.
AGENT_STEPS = ("create.lv", "create.record", "create.export", "copy.chunk", "delete.marked", "delete.unexported",
               "delete.lv", "grant.record", "grant.acl", "revoke.record", "snapshot.lv", "expand.lv")
NODE_STEPS = ("stage.record", "stage.login", "stage.mkfs", "stage.mount", "unstage.umount", "unstage.logout",
              "publish.mount", "expand.rescan")
CONTROLLER_STEPS = ("clone.transfer-snapshot",)


def warn_if_enabled() -> None:
    target = os.environ.get(ENV)
    if target:
        log.critical("FAULT INJECTION IS ON: this process kills itself at step %r (%s is set). Never in "
                     "production.", target, ENV)


def step(name: str) -> None:
    if os.environ.get(ENV) == name:
        log.critical("fault injection: SIGKILL at %s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
