"""The targets this node plugin logged in to: one small file per target IQN in <state dir>/logins/.

An entry is written before the login and removed only after the logout, so it covers every session and
node record the plugin may have made, even across a crash or a reboot. The start-up clean-up logs out only
targets of this ledger: the target IQNs of two releases of the driver on one worker look alike (they share
the IQN prefix), and each release has its own state directory (the default one is named after the driver
name), so neither logs out the other's sessions.

Entries are JSON, versioned, 0600 and written atomically, like the stage records beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

from csi.fsutil import remove, write_atomic

VERSION = 1


class LoginLedger:
    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, iqn: str) -> Path:
        # Target IQNs come from ids.target_iqn ([a-z0-9.:-]); anything else would not be one file here.
        if not iqn or "/" in iqn or iqn in (".", "..") or iqn.startswith("."):
            raise ValueError(f"{iqn!r} cannot name a ledger entry")
        return self.directory / iqn

    def add(self, iqn: str) -> None:
        path = self._path(iqn)
        if not path.exists():
            write_atomic(path, json.dumps({"version": VERSION, "iqn": iqn}), mode=0o600)

    def remove(self, iqn: str) -> None:
        try:
            path = self._path(iqn)
        except ValueError:
            return   # never an entry
        remove(path)

    def targets(self) -> set[str]:
        """Every target IQN in the ledger (an entry's file name is its IQN)."""
        if not self.directory.is_dir():
            return set()
        # names starting with "." are write_atomic's temporary files
        return {p.name for p in self.directory.iterdir() if not p.name.startswith(".") and p.is_file()}
