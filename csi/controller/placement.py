"""Where a volume or snapshot goes, and where a retry finds it: the journal plus the agents.

find():  the journal's record of the name; before adoption (journal.py), a name missing from it is looked
         for on every agent, as before the journal, and recorded when found.
claim(): records a new placement, create-if-absent; when another controller recorded the name first, its
         record wins and the caller goes where it says.
adopt(): the scan that records what agents already hold (volumes made before the journal), repeated after a
         settle time so that a controller of the previous version, still finishing a call during a rolling
         upgrade, cannot create a volume behind the scan's back; then the journal is marked adopted.
"""

from __future__ import annotations

import logging
import threading
import time

from csi import capabilities as caps
from csi import errors, ids, runner
from csi.controller.agents import Agents
from csi.controller.journal import Conflict, Entry, Journal
from csi.proto import agent_pb2 as apb

log = logging.getLogger(__name__)

PAGE = 500
ADOPT_RETRY = 30.0


class Placement:
    def __init__(self, journal: Journal, agents: Agents, cluster_id: str, adoption_settle: float = 0.0):
        self.journal = journal
        self.agents = agents
        self.cluster_id = cluster_id
        self.settle = adoption_settle
        self._adopted = False

    # ---- look-up

    def adopted(self) -> bool:
        if not self._adopted:
            self._adopted = self.journal.adopted()
        return self._adopted

    def find(self, kind: str, name: str) -> Entry | None:
        key = ids.lv_name(self.cluster_id, name, kind=kind)
        entry = self.journal.get(key)
        if entry is not None or self.adopted():
            return entry
        return self._scan_for(kind, name, key)

    def _scan_for(self, kind: str, name: str, key: str) -> Entry | None:
        """Before adoption: ask every agent (an unreachable one might hold the name: UNAVAILABLE)."""
        if kind == "volume":
            ask = lambda a: a.call("GetVolume", apb.GetVolumeRequest(name=name))  # noqa: E731
        else:
            ask = lambda a: a.call("GetSnapshot", apb.GetSnapshotRequest(name=name))  # noqa: E731
        clients = [c for c in self.agents.all() if not self.agents.is_retired(c.node.name)]
        found = []
        for node, result in self.agents.each(ask, clients).items():
            if isinstance(result, errors.CsiError):
                if result.code == errors.Code.NOT_FOUND:
                    continue
                raise errors.unavailable(f"cannot rule out that {kind} {name!r} exists (the placement journal "
                                         f"is still being adopted): {result.message}")
            found.append((node, result))
        if not found:
            return None
        node, obj = found[0]
        if kind == "volume" and caps.is_replica_leg(obj.attributes):
            # Legs of a replicated volume whose record was lost: recorded as that volume again, never as a
            # plain one on the node of whichever leg answered first.
            legs = sorted(found, key=lambda f: caps.replica_leg(f[1].attributes))
            entry = Entry(key, kind, name, legs[0][0], pool=legs[0][1].pool, vg=legs[0][1].vg, state="ready",
                          legs=[{"node": n, "pool": v.pool, "vg": v.vg, "state": "in-sync", "size": v.size_bytes}
                                for n, v in legs])
            return self.journal.claim(entry)
        if kind == "volume":
            entry = Entry(key, kind, name, node, pool=obj.pool, vg=obj.vg, source=obj.attributes.get("source", ""),
                          state="ready")
        else:
            entry = Entry(key, kind, name, node, vg=obj.vg,
                          source="volume:" + ids.LvRef(node, obj.source_vg, obj.source_lv).encode(), state="ready")
        return self.journal.claim(entry)

    # ---- changes

    def claim(self, entry: Entry) -> Entry:
        return self.journal.claim(entry)

    def made(self, entry: Entry) -> None:
        """The agent holds it now: the record says so (ready), so that a leaked 'placing' record is told apart."""
        if entry.state == "ready":
            return
        entry.state = "ready"
        try:
            self.journal.update(entry)
        except Conflict:
            pass   # another controller wrote it since; it says at least as much

    def forget(self, kind: str, lv: str) -> None:
        self.journal.delete(lv)

    # ---- adoption

    def start_adoption(self) -> None:
        if self.adopted():
            return
        threading.Thread(target=self._adopt_until_done, name="journal-adoption", daemon=True).start()

    def _adopt_until_done(self) -> None:
        scans = 0
        while True:
            try:
                with runner.deadline(600):
                    counted = self.scan()
                scans += 1
                log.info("placement journal: scan %d of every storage node recorded %d volume(s) and snapshot(s)",
                         scans, counted)
                if scans >= 2 or self.settle <= 0:
                    self.journal.mark_adopted()
                    self._adopted = True
                    log.info("placement journal adopted: new names no longer need every storage node")
                    return
                time.sleep(self.settle)
            except Exception as exc:  # noqa: BLE001 - retried until every agent answered once
                log.warning("placement journal adoption not complete (%s); retrying in %.0fs", exc, ADOPT_RETRY)
                time.sleep(ADOPT_RETRY)

    def scan(self) -> int:
        """Records every volume and snapshot that every (non-retired) agent holds; raises if one cannot answer."""
        counted = 0
        for client in self.agents.all():
            node = client.node.name
            if self.agents.is_retired(node):
                continue
            for vol in pages(client, "ListVolumes", "volumes"):
                key = ids.lv_name(self.cluster_id, vol.name)
                if key != vol.lv or caps.is_replica_leg(vol.attributes):
                    # A replicated volume's record is claimed before its legs exist: nothing to adopt, and a
                    # leg recorded as a plain volume would be deleted or published alone.
                    continue
                self.journal.claim(Entry(key, "volume", vol.name, node, pool=vol.pool, vg=vol.vg,
                                         source=vol.attributes.get("source", ""), state="ready"))
                counted += 1
            for snap in pages(client, "ListSnapshots", "snapshots"):
                key = ids.lv_name(self.cluster_id, snap.name, kind="snapshot")
                if key != snap.lv:
                    continue
                self.journal.claim(Entry(key, "snapshot", snap.name, node, vg=snap.vg, state="ready",
                                         source="volume:" + ids.LvRef(node, snap.source_vg, snap.source_lv).encode()))
                counted += 1
        return counted


def pages(client, method: str, field: str, page: int = PAGE):
    """Every item of an agent's paged listing (ListVolumes, ListSnapshots)."""
    request = apb.ListVolumesRequest if method == "ListVolumes" else apb.ListSnapshotsRequest
    token = ""
    while True:
        resp = client.call(method, request(max_entries=page, starting_token=token))
        yield from getattr(resp, field)
        token = resp.next_token
        if not token:
            return
