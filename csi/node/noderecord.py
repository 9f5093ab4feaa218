"""The node plugin's settings of a node record (CHAP among them) written into open-iscsi's record file itself.

`iscsiadm -m node -o update -n node.session.auth.password -v <secret>` puts the secret in the argv of a
process, which every process of the host can read in /proc/<pid>/cmdline while it runs; and one such process
per setting costs about 0.1 s each on a busy node. The record is the file iscsiadm reads at login ("name =
value" lines between "# BEGIN RECORD" and "# END RECORD", what `-o update` writes too): the node plugin makes it
with `iscsiadm -o new`, then rewrites it with its settings in one write, atomically and mode 0600, under the
same lock as every iscsiadm node command of the process. Debian keeps records under /etc/iscsi/nodes, Red Hat
under /var/lib/iscsi/nodes, each as <db>/<target>/<address>,<port>,<tpgt>: a directory holding one file per
iface, or (older layouts) that file itself; a record made by `iscsiadm -o new` has no tpgt and is the file
<db>/<target>/<address>,<port> (open-iscsi's idbm.c names them so: the address and the port
apart, with a comma).
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Iterable

from csi import errors
from csi.fsutil import write_atomic

AUTH_KEYS = ("node.session.auth.authmethod", "node.session.auth.username", "node.session.auth.password",
             "node.session.auth.username_in", "node.session.auth.password_in")


def portal_prefix(portal: str) -> str:
    """"10.0.0.1:3260" or "[fd00::1]:3260" -> the name open-iscsi gives the record: "10.0.0.1,3260", "fd00::1,3260"."""
    host, _, port = portal.rpartition(":")
    return f"{host.strip('[]')},{port}"


def record_entries(db_dirs: Iterable[Path], iqn: str, portal: str) -> list[Path]:
    """The record entries (directories or files) of one target and portal, in whichever database holds them."""
    out: list[Path] = []
    for db in db_dirs:
        target_dir = db / iqn
        if target_dir.parent != db or not target_dir.is_dir():
            continue   # an IQN is one path component
        prefix = portal_prefix(portal)
        # "<address>,<port>,<tpgt>" after a discovery; "<address>,<port>" alone for a record made with
        # `-o new`, which has no tpgt (-1): a plain file (seen with iscsiadm 2.1.8).
        out += sorted(e for e in target_dir.glob(f"{glob.escape(prefix)}*")
                      if (e.name == prefix or e.name.startswith(prefix + ",")) and not e.is_symlink())
    return out


def record_files(db_dirs: Iterable[Path], iqn: str, portal: str) -> list[Path]:
    """The record file(s) of one target and portal."""
    out: list[Path] = []
    for entry in record_entries(db_dirs, iqn, portal):
        if entry.is_dir():
            out += [f for f in sorted(entry.iterdir()) if f.is_file() and not f.is_symlink()]
        elif entry.is_file():
            out.append(entry)
    return out


def auth_settings(user: str, secret: str, mutual_user: str = "", mutual_secret: str = "") -> dict[str, str]:
    settings = {"node.session.auth.authmethod": "CHAP" if user else "None",
                "node.session.auth.username": user, "node.session.auth.password": secret}
    if mutual_user:
        settings.update({"node.session.auth.username_in": mutual_user,
                         "node.session.auth.password_in": mutual_secret})
    return settings


def rewrite(text: str, settings: dict[str, str]) -> str:
    """The record with every auth line and every line of a key of `settings` replaced by `settings` (lines of
    values "" are left out)."""
    for key, value in settings.items():
        if any(c in key + value for c in "\r\n") or "=" in key:
            raise errors.invalid("a node record key or value may not hold a line break, nor a key an '='")
    replaced = set(AUTH_KEYS) | set(settings)
    kept = [line for line in text.splitlines() if line.split("=", 1)[0].strip() not in replaced]
    ours = [f"{k} = {v}" for k, v in settings.items() if v]
    end = next((i for i, line in enumerate(kept) if line.strip().startswith("# END RECORD")), len(kept))
    return "\n".join(kept[:end] + ours + kept[end:]) + "\n"


def write_settings(db_dirs: Iterable[Path], iqn: str, portal: str, settings: dict[str, str]) -> None:
    files = record_files(db_dirs, iqn, portal)
    if not files:
        raise errors.internal(f"iscsiadm made no node record for {iqn} at {portal} where this plugin looks "
                              f"({', '.join(str(d) for d in db_dirs)})")
    for path in files:
        write_atomic(path, rewrite(path.read_text(), settings), mode=0o600)
