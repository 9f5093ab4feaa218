"""The one place that runs external commands.

Every command is an argv list (never a shell string), runs with LC_ALL=C, keeps stderr apart from stdout, and
gets a timeout from the deadline of the RPC being served (see `deadline`), so a command never outlives the
call that started it; except a command run with `finish`, which must never be killed half-way (an LVM change:
killed while it holds a device suspended, every later I/O to that device and every later LVM command waits):
it runs to its end, bounded by FINISH_TIMEOUT (but is not started once the deadline has passed), and the call
answers late (its retry is ABORTED while the call holds its lock, then finds the work done). Failures raise
`CommandError` carrying argv, exit code and stderr.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0
# Never let a command run with less than this, even when the RPC is almost out of time: a command killed
# half-way (lvcreate, iscsiadm --login) costs more to clean up than a deadline overrun by a second.
MIN_TIMEOUT = 2.0
MAX_DEADLINE = 24 * 3600.0
FINISH_TIMEOUT = 600.0

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)


@contextlib.contextmanager
def deadline(seconds_left: float | None) -> Iterator[None]:
    """Commands run inside this block time out when `seconds_left` (from now) is spent."""
    # gRPC reports "no deadline" as None or as an enormous number of seconds: both mean no deadline here.
    if seconds_left is not None and seconds_left > MAX_DEADLINE:
        seconds_left = None
    token = _deadline.set(None if seconds_left is None else time.monotonic() + seconds_left)
    try:
        yield
    finally:
        _deadline.reset(token)


def seconds_left() -> float | None:
    """What is left of the call's deadline (negative once passed), or None outside a call with one."""
    end = _deadline.get()
    return None if end is None else end - time.monotonic()


def time_left(default: float = DEFAULT_TIMEOUT) -> float:
    end = _deadline.get()
    if end is None:
        return default
    return max(MIN_TIMEOUT, end - time.monotonic())


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """A command failed: not found, timed out, or exited with a code the caller did not accept."""

    def __init__(self, argv: Sequence[str], rc: int | None, stderr: str, stdout: str = "", reason: str = ""):
        self.argv = tuple(argv)
        self.rc = rc
        self.stderr = stderr
        self.stdout = stdout
        self.reason = reason or f"exit code {rc}"
        super().__init__(f"{described(self.argv)}: {self.reason}: {stderr.strip()[-500:]}")


# Commands that run the command after their "--" elsewhere (nsenter: the host's mount namespace for
# `--iscsiadm host`): an error names that command, with where it ran.
_WRAPPERS = {"nsenter": "in the host's namespaces"}


def described(argv: Sequence[str]) -> str:
    """The command's first three words for an error message, past a wrapper such as `nsenter ... --`."""
    argv = tuple(argv)
    where = ""
    if argv and argv[0] in _WRAPPERS and "--" in argv:
        where = f" ({_WRAPPERS[argv[0]]})"
        argv = argv[argv.index("--") + 1:]
    return f"{' '.join(argv[:3])}{' ...' if len(argv) > 3 else ''}{where}"


class CommandTimeout(CommandError):
    pass


class CommandNotFound(CommandError):
    pass


def mask(argv: Sequence[str], secrets: Iterable[str]) -> list[str]:
    hidden = {s for s in secrets if s}
    return ["***" if a in hidden else a for a in argv]


def run(argv: Sequence[str], *, timeout: float | None = None, input: str | None = None,
        ok_codes: Iterable[int] = (0,), env: dict[str, str] | None = None,
        secrets: Iterable[str] = (), finish: bool = False) -> Result:
    """Runs argv and returns its Result; raises CommandError unless the exit code is in ok_codes.

    `secrets` are argv items (CHAP passwords) that must never reach a log line or an error message. `finish`:
    the RPC's deadline does not apply (see the module's docstring); `timeout`, or FINISH_TIMEOUT, does.
    """
    argv = [str(a) for a in argv]
    secrets = tuple(secrets)
    shown = mask(argv, secrets)
    if finish:
        end = _deadline.get()
        if end is not None and end <= time.monotonic():
            # Not started at all: past the call's deadline nobody waits for its answer.
            raise CommandTimeout(shown, None, "", reason="not started: the call's deadline has passed")
        limit = timeout if timeout is not None else FINISH_TIMEOUT
    else:
        limit = min(timeout, time_left()) if timeout is not None else time_left()
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["LC_ALL"] = "C"
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=limit,
                              env=full_env, check=False, stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise CommandNotFound(shown, None, "", reason=f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired as exc:
        raise CommandTimeout(shown, None, _scrub(_text(exc.stderr), secrets), _scrub(_text(exc.output), secrets),
                             reason=f"timed out after {limit:.1f}s") from None
    took = time.monotonic() - started
    stderr = _scrub(proc.stderr, secrets)
    log.debug("ran %s rc=%d in %.3fs", shown, proc.returncode, took)
    result = Result(tuple(shown), proc.returncode, proc.stdout, stderr)
    if proc.returncode == 127 and argv[0] in _WRAPPERS and 127 not in tuple(ok_codes):
        # the wrapper ran, the command it was to run does not exist where it looked
        raise CommandNotFound(shown, 127, stderr, reason="not installed there")
    if proc.returncode not in tuple(ok_codes):
        raise CommandError(shown, proc.returncode, stderr, _scrub(proc.stdout, secrets))
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text
