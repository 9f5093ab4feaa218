"""The placement journal: where each volume and snapshot of this cluster is (being) placed.

Before the controller asks an agent to create a volume, it records the placement here, create-if-absent: a
retry reads the record and goes to the same storage node, and two controllers (HA, or a stale leader) cannot
place one name twice. So CreateVolume needs only the agent it places on, not every agent of the cluster.
The record goes when the volume goes, and holds what a volume needs beyond its ID (a replicated volume's legs).

Records are keyed by the LV name, which both sides of the API can compute: CreateVolume from the request name
(ids.lv_name), DeleteVolume from the volume ID. They hold no secret.

Two stores, one contract (`Journal`): FileJournal, one small file per record under a state directory (the demo,
csi-sanity, the lab tiers); and KubeJournal (kubejournal.py), one ConfigMap per record in the driver's
namespace. `claim` is the atomic create-if-absent; `update` is guarded by the record's version.

Adoption: volumes made before the journal existed have no record. Until one complete scan of every agent has
been recorded (`adopted()`), a name missing from the journal may still exist on some agent, so CreateVolume
asks every agent first, as it did before the journal.
"""

from __future__ import annotations

import abc
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from csi import errors
from csi.fsutil import fsync_dir, remove, write_atomic

FORMAT = 1


class Conflict(Exception):
    """The record changed since it was read (another controller wrote it): read it again."""


@dataclass
class Entry:
    key: str                    # the LV name (volumes and snapshots: ids.lv_name of the request name)
    kind: str                   # "volume" | "snapshot"
    name: str                   # the CSI request name
    node: str                   # the storage node it is placed on
    pool: str = ""
    vg: str = ""
    source: str = ""            # "snapshot:<id>" / "volume:<id>" for volumes with a content source
    state: str = "placing"      # "placing": the agent may not have it yet; "ready": the agent made it
    # A replicated volume's legs, in leg order: {"node", "pool", "vg", "state": "in-sync" | "outdated"}. `node`
    # and `pool` above are leg 0's. Empty for a plain volume (and in records written before replicas existed).
    legs: list[dict] = field(default_factory=list)
    # Legs replaced by others (replace-replica-leg), as `legs` held them: their LVs may still exist on nodes
    # that were down; the controller deletes them once those answer (or are retired).
    replaced: list[dict] = field(default_factory=list)
    # A replicated volume detached from every node with both legs in sync: md's event count then (both legs
    # showed it). Spent (cleared) by the next publish, before it grants anything (csi/controller/replica_sources.py).
    clean: int | None = None
    # Legs a publish could not grant (their node did not answer): {"leg", "initiator", "node", "read_only"}, granted
    # once the node answers (csi/controller/late_grants.py).
    ungranted: list[dict] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    version: str = ""           # the store's own version of the record (not part of its content)
    format: int = FORMAT

    def content(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("version")
        return data

    @classmethod
    def from_content(cls, data: dict, version: str) -> "Entry":
        if data.get("format") != FORMAT:
            raise ValueError(f"journal record format {data.get('format')!r} is not {FORMAT}: written by "
                             "another version of the driver; left alone")
        known = {f.name for f in dataclasses.fields(cls)} - {"version"}
        return cls(**{k: v for k, v in data.items() if k in known}, version=version)


class Journal(Protocol):
    def get(self, key: str) -> Entry | None: ...

    def claim(self, entry: Entry) -> Entry:
        """Stores entry unless a record of its key exists; returns the stored record (the existing one, if
        any: the caller compares)."""

    def update(self, entry: Entry) -> Entry:
        """Replaces the record if it is still at entry.version; raises Conflict otherwise."""

    def delete(self, key: str) -> None: ...

    def entries(self) -> Iterator[Entry]: ...

    def adopted(self) -> bool:
        """Whether a complete scan of every agent has been recorded (see the module doc)."""

    def mark_adopted(self) -> None: ...

    def retired(self) -> set[str]:
        """Storage nodes an administrator retired for good: their volumes are gone with them."""

    def retire(self, node: str) -> None: ...

    def known_nodes(self) -> list[tuple[str, str, str]]: ...

    def remember_nodes(self, nodes: list[tuple[str, str, str]]) -> None: ...


class JournalState(abc.ABC):
    """The journal's small shared state (adoption, storage nodes known and retired) over a store's
    _read_state() and _change_state(change), which applies change(state) atomically."""

    @abc.abstractmethod
    def _read_state(self) -> dict: ...

    @abc.abstractmethod
    def _change_state(self, change) -> None: ...

    def adopted(self) -> bool:
        return bool(self._read_state().get("adopted"))

    def mark_adopted(self) -> None:
        self._change_state(lambda s: s.update(adopted=time.time()))

    def retired(self) -> set[str]:
        return set(self._read_state().get("retired", []))

    def retire(self, node: str) -> None:
        self._change_state(lambda s: s.update(retired=sorted(set(s.get("retired", [])) | {node})))

    def known_nodes(self) -> list[tuple[str, str, str]]:
        """(name, address, zone) of every storage node ever listed and not retired."""
        state = self._read_state()
        retired = set(state.get("retired", []))
        return [(n, v.get("address", ""), v.get("zone", "")) for n, v in sorted(state.get("known", {}).items())
                if n not in retired]

    def remember_nodes(self, nodes: list[tuple[str, str, str]]) -> None:
        def change(state):
            known = state.setdefault("known", {})
            for name, address, zone in nodes:
                known[name] = {"address": address, "zone": zone}
        self._change_state(change)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _decode(text: str, version: str, where: str) -> Entry:
    try:
        return Entry.from_content(json.loads(text), version)
    except (ValueError, TypeError) as exc:
        raise errors.internal(f"journal record {where} cannot be read: {exc}") from None


class FileJournal(JournalState):
    """One JSON file per record (0600, written atomically), named by a digest of its key. create-if-absent is
    a hard link of a fully written temporary file (fails if the name exists); updates run under an flock."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._records = self.directory / "records"
        self._records.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._lock_path = self.directory / ".lock"

    def _path(self, key: str) -> Path:
        return self._records / f"{digest(key)}.json"

    def _locked(self):
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _read(self, path: Path) -> Entry | None:
        try:
            st = path.stat()
            text = path.read_text()
        except FileNotFoundError:
            return None
        return _decode(text, f"{st.st_mtime_ns}-{st.st_ino}", str(path))

    def get(self, key: str) -> Entry | None:
        return self._read(self._path(key))

    def claim(self, entry: Entry) -> Entry:
        path = self._path(entry.key)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.claim")
        write_atomic(tmp, json.dumps(entry.content(), sort_keys=True), mode=0o600)
        try:
            os.link(tmp, path)
            fsync_dir(path.parent)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        stored = self._read(path)
        if stored is None:   # removed between the link and the read: a delete raced us; claim again
            return self.claim(entry)
        return stored

    def update(self, entry: Entry) -> Entry:
        path = self._path(entry.key)
        fd = self._locked()
        try:
            current = self._read(path)
            if current is None or current.version != entry.version:
                raise Conflict(f"journal record of {entry.key} changed since it was read")
            write_atomic(path, json.dumps(entry.content(), sort_keys=True), mode=0o600)
        finally:
            self._unlock(fd)
        stored = self._read(path)
        return stored if stored is not None else entry

    def delete(self, key: str) -> None:
        remove(self._path(key))

    def entries(self) -> Iterator[Entry]:
        for path in sorted(self._records.glob("*.json")):
            entry = self._read(path)
            if entry is not None:
                yield entry

    # ---- small state beside the records

    def _read_state(self) -> dict:
        try:
            return json.loads((self.directory / "state.json").read_text())
        except FileNotFoundError:
            return {}

    def _change_state(self, change) -> None:
        fd = self._locked()
        try:
            state = self._read_state()
            change(state)
            write_atomic(self.directory / "state.json", json.dumps(state, sort_keys=True), mode=0o600)
        finally:
            self._unlock(fd)
