"""Which iscsiadm the node plugin runs, the image's (default) or the host's own (`--iscsiadm host`, the chart's
`node.iscsiadm: host`), and the start-up check that compares the image's with the host's.

iscsiadm talks to the host's iscsid over an abstract unix socket, in structures of its own open-iscsi release:
an iscsiadm of another release than the iscsid can hang a login or misread a reply, which is why democratic-csi
and Longhorn run the host's iscsiadm; hosts also keep their node records in different places (Debian
/etc/iscsi, Red Hat /var/lib/iscsi). In host mode every iscsiadm runs in the host's mount namespace
(`nsenter --target 1 --mount`): the host's binary, libraries, configuration and records. The host's PID 1 must
be in view for that, and for the check: the chart shares the host's PID namespace with the node plugin.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from csi import runner
from csi.runner import CommandError

log = logging.getLogger(__name__)

MODES = ("image", "host")
HOST_PREFIX = ("nsenter", "--target", "1", "--mount", "--")
_VERSION = re.compile(r"iscsiadm version (\S+)")


def prefix(mode: str) -> tuple[str, ...]:
    """What goes before every iscsiadm argv in this mode."""
    if mode not in MODES:
        raise ValueError(f"iscsiadm mode {mode!r}: one of {', '.join(MODES)}")
    return HOST_PREFIX if mode == "host" else ()


def host_in_view(proc: Path = Path("/proc")) -> bool:
    """True when PID 1 lives in another mount namespace than this process: the host's init, seen from a pod
    that shares the host's PID namespace. False in a pod of its own PID namespace (PID 1 is the pod's) and when
    this process runs on the host itself (where the image's tools are the host's anyway)."""
    try:
        return os.readlink(proc / "1" / "ns" / "mnt") != os.readlink(proc / "self" / "ns" / "mnt")
    except OSError:
        return False


def parse_version(text: str) -> str | None:
    """'iscsiadm version 2.1.8' -> '2.1.8'."""
    m = _VERSION.search(text)
    return m.group(1) if m else None


def version(argv_prefix: tuple[str, ...] = ()) -> str | None:
    """The version of the iscsiadm that `argv_prefix` runs; None when it cannot be run or does not say."""
    try:
        return parse_version(runner.run([*argv_prefix, "iscsiadm", "--version"], timeout=20).stdout)
    except (CommandError, OSError) as exc:
        log.debug("iscsiadm --version%s: %s", f" through {' '.join(argv_prefix)}" if argv_prefix else "", exc)
        return None


@dataclass(frozen=True)
class Check:
    problem: str | None    # what keeps the node plugin from working (Probe reports it: not ready)
    warning: str | None    # what an operator should change
    summary: str           # one line for the start-up log


def check(mode: str, image: str | None, host: str | None, host_visible: bool) -> Check:
    """The start-up verdict from the versions found: `image` of the image's iscsiadm, `host` of the host's
    (None: not installed, or the host not in view)."""
    if mode == "host":
        if not host_visible:
            return Check(None, "node.iscsiadm is host, but PID 1 shares this process's mount namespace: unless the "
                               "node plugin runs directly on the host, its pod lacks hostPID and the image's "
                               "iscsiadm runs", f"iscsiadm: the host's (through nsenter), version {host or '?'}")
        if host is None:
            return Check("node.iscsiadm is host, but the host has no working iscsiadm: install open-iscsi on "
                         "the host, or set node.iscsiadm: image", None, "iscsiadm: the host's, not found")
        return Check(None, None, f"iscsiadm: the host's (through nsenter), version {host}")
    if image is None:
        return Check("iscsiadm is not installed in the image (open-iscsi)", None, "iscsiadm: the image's, not found")
    if not host_visible:
        return Check(None, None, f"iscsiadm: the image's, version {image} (the host's not in view: not compared)")
    if host is None:
        return Check(None, None, f"iscsiadm: the image's, version {image} (the host has none: nothing to compare)")
    if host != image:
        return Check(None, f"the image's iscsiadm is {image} and the host's is {host}: an iscsiadm of another "
                           "open-iscsi release than the host's iscsid can hang logins; set node.iscsiadm: host (the "
                           "chart) so that the host's own iscsiadm runs",
                     f"iscsiadm: the image's, version {image}, the host's {host}")
    return Check(None, None, f"iscsiadm: the image's, version {image}, the same as the host's")


def startup_check(mode: str) -> Check:
    """Runs the check and logs its verdict."""
    visible = host_in_view()
    result = check(mode, version(), version(HOST_PREFIX) if visible or mode == "host" else None, visible)
    log.info("%s", result.summary)
    if result.warning:
        log.warning("%s", result.warning)
    if result.problem:
        log.error("%s", result.problem)
    return result
