"""The per-volume record: what rebuilds one export (target, ACLs, CHAP) after a restart or a reboot.

One small JSON file per volume, mode 0600 (it holds CHAP secrets), written atomically, versioned. LIO's
configuration does not survive a reboot, and /etc/target is not relied on: the agent re-creates each export
from these files and the LVs at start. Dumping the whole LIO configuration per call would cost seconds per
hundred exports; a record per volume costs the same at any count.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from csi.fsutil import remove, write_atomic

log = logging.getLogger(__name__)

VERSION = 2
# Version 1 records come from the driver before node-bound grants: their CHAP secrets were handed to the
# controller and put in publish_context, so Kubernetes objects (and their backups, and kube-state-metrics)
# may hold them. Read as version 2 with every grant marked exposed: the agent rotates those (access.py).
READABLE = (1, VERSION)


@dataclass
class Grant:
    initiator: str
    read_only: bool
    chap_user: str
    chap_secret: str
    mutual_user: str = ""
    mutual_secret: str = ""
    node: str = ""          # the node the initiator belongs to; only its node plugin gets the secrets
    exposed: bool = False   # the secrets may have left the storage node (see READABLE): rotate them


@dataclass
class VolumeRecord:
    name: str
    pool: str
    vg: str
    lv: str
    size: int
    attributes: dict[str, str]
    target_iqn: str
    grants: dict[str, Grant] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    # Set before the LV is removed: a record found with it at start is finished off, never re-exported.
    deleting: bool = False
    # "copying" while the content comes from another LV or node (never exported then); "ready" after.
    state: str = "ready"
    # Where the content comes from: {"node", "address", "vg", "lv", "snapshot", "size"}; empty for blank.
    source: dict = field(default_factory=dict)
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VolumeRecord":
        data = json.loads(text)
        version = data.get("version")
        if version not in READABLE:
            raise ValueError(f"record version {version} is not one this agent reads ({', '.join(map(str, READABLE))}):"
                             " written by a newer agent? left as it is")
        grants = {k: Grant(**v) for k, v in data.get("grants", {}).items()}
        if version == 1:
            for g in grants.values():
                g.exposed = True
        data.update(grants=grants, version=VERSION)
        return cls(**data)


class RecordStore:
    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, vg: str, lv: str) -> Path:
        return self.directory / vg / f"{lv}.json"

    def load(self, vg: str, lv: str) -> VolumeRecord | None:
        try:
            return VolumeRecord.from_json(self.path(vg, lv).read_text())
        except FileNotFoundError:
            return None

    def save(self, record: VolumeRecord) -> None:
        write_atomic(self.path(record.vg, record.lv), record.to_json(), mode=0o600)

    def delete(self, vg: str, lv: str) -> None:
        remove(self.path(vg, lv))

    def keys(self) -> list[tuple[str, str]]:
        """(vg, lv) of every record, from the directory alone (no file is read)."""
        if not self.directory.is_dir():
            return []
        return [(vg.name, f.name[:-5]) for vg in self.directory.iterdir() if vg.is_dir()
                for f in vg.iterdir() if f.name.endswith(".json") and not f.name.startswith(".")]

    def all(self) -> Iterator[VolumeRecord]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*/*.json")):
            try:
                yield VolumeRecord.from_json(path.read_text())
            except (ValueError, TypeError, OSError) as exc:
                # A record that cannot be read is kept for an operator, not deleted: it may hold CHAP
                # secrets and ACLs that nothing else remembers.
                log.error("cannot read volume record %s: %s", path, exc)
