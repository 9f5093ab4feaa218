"""Small shared pieces of the lab: its error, the result of a guest command, host commands."""

import subprocess
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "csilab0"  # in a lab's namespace: the switch every node is plugged into, and the host side


class LabError(Exception):
    """Anything the lab could not do: a host command, a boot, a guest request."""


@dataclass(frozen=True)
class GuestResult:
    """What one command run in a guest returned."""

    rc: int
    stdout: str
    stderr: str

    def check(self, what: str = "command") -> "GuestResult":
        if self.rc != 0:
            raise LabError(f"{what} failed with rc {self.rc}: {self.stderr.strip()[-2000:]}")
        return self


def run_host(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command on the host (argv list, no shell); LabError with argv and stderr on failure."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{argv}: {e}") from e
    if check and done.returncode != 0:
        raise LabError(f"{argv} failed with rc {done.returncode}: {done.stderr.strip()}")
    return done


def tail(path: Path, lines: int = 40, start: int = 0) -> str:
    """The last lines of a log file from byte offset start, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
