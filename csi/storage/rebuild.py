"""When the agent's state directory is lost (a disk replaced, a wrong host path): the volume records are
rebuilt from what each LV says about itself, so that no volume is lost, or taken for an orphan, because its
record is.

The state directory holds a marker (`agent.json`). An agent that starts without a marker and without any
record, while volume LVs of its cluster exist, has lost its state: for each such LV it rebuilds the record
from the LV's tags (request name, attributes, which every volume carries in its `attrs` tag, added at start
to volumes made before it existed), its pool (its thin pool, or its VG's thick pool), size and creation time;
the target IQN is derived. Grants come back from the kernel when LIO still has the target's ACLs (the agent
restarted, the node did not reboot: the CHAP secrets are read back from LIO); otherwise none, and each
attached node gets a new grant with its next ControllerPublishVolume. Snapshots have no record: nothing to
rebuild. What cannot be rebuilt is said in the log and listed in the marker (`unrebuilt`), and `cleanup`
never removes it: a volume whose content was still being copied in (its source is not in its tags; the
retried CreateVolume, if it comes, copies again), or an LV whose pool this agent does not have.

A marker without records is a node with no volumes; records without a marker are a state directory of an
agent before the marker existed: neither is rebuilt.
"""

from __future__ import annotations

import json
import logging
import time

from csi import ids
from csi.fsutil import write_atomic
from csi.storage import tags
from csi.storage.lvm import LogicalVolume
from csi.storage.records import Grant, VolumeRecord

log = logging.getLogger(__name__)

MARKER = "agent.json"
VERSION = 1


def marker(service) -> dict:
    try:
        data = json.loads((service.config.state_dir / MARKER).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def unrebuilt(service) -> set[str]:
    """vg/lv of the volumes whose lost records could not be rebuilt: never removed as orphans."""
    return set(marker(service).get("unrebuilt") or [])


def ensure(service, lvs: dict[tuple[str, str], LogicalVolume]) -> dict[str, int]:
    """Rebuilds the records when the state directory was lost; writes the marker. Returns counts."""
    counts = {"rebuilt": 0, "grants_from_lio": 0, "not_rebuilt": 0}
    cfg = service.config
    path = cfg.state_dir / MARKER
    if path.exists():
        return counts
    volumes = {key: lv for key, lv in lvs.items() if service._ours(lv)}
    problems: dict[str, str] = {}
    if volumes and not any(True for _ in service.records.all()):
        log.warning("the state directory %s holds no volume record while %d volume LV(s) of cluster %s are in "
                    "its VGs: it was lost or replaced; rebuilding the records from the LV tags", cfg.state_dir,
                    len(volumes), cfg.cluster_id)
        for (vg, name), lv in sorted(volumes.items()):
            problem = _rebuild(service, lv, counts)
            if problem:
                problems[f"{vg}/{name}"] = problem
                log.error("could not rebuild the record of volume %s/%s: %s; it is kept as it is, and cleanup "
                          "never removes it", vg, name, problem)
        counts["not_rebuilt"] = len(problems)
        log.warning("rebuilt %d volume record(s) from LV tags (%d grant(s) read back from LIO; any other attached "
                    "node gets a new grant with its next ControllerPublishVolume); not rebuilt: %s",
                    counts["rebuilt"], counts["grants_from_lio"], ", ".join(sorted(problems)) or "none")
    write_atomic(path, json.dumps({"version": VERSION, "node": cfg.node_name, "cluster": cfg.cluster_id,
                                   "created": time.time(), "unrebuilt": sorted(problems),
                                   "why": problems}, indent=1, sort_keys=True), mode=0o600)
    return counts


def _rebuild(service, lv: LogicalVolume, counts: dict[str, int]) -> str:
    """Saves a record for one volume LV from its tags; returns why not, or "" when done."""
    if lv.tag(tags.CONTENT) == "copy":
        return "its content was still being copied in, from a source its tags do not name"
    pool = service._pool_of(lv.vg, lv)
    if pool is None:
        return f"it is in no pool of this agent ({lv.pool or 'thick'} in {lv.vg})"
    attributes = tags.attributes_of(lv)
    if attributes is None:
        log.warning("volume %s/%s has no attributes tag: its record is rebuilt without them (filesystem, "
                    "access modes, mutual CHAP and wipe policy unknown)", lv.vg, lv.name)
        attributes = {}
    iqn = ids.target_iqn(lv.vg, lv.name)
    grants = {}
    for a in service.lio.acl_access(iqn):
        grants[a.initiator] = Grant(a.initiator, a.read_only, a.chap_user, a.chap_secret, a.mutual_user,
                                    a.mutual_secret)
    counts["grants_from_lio"] += len(grants)
    rec = VolumeRecord(name=tags.decode_name(lv.tag(tags.NAME) or "") or lv.name, pool=pool.name, vg=lv.vg,
                       lv=lv.name, size=lv.size, attributes=attributes, target_iqn=iqn, grants=grants,
                       created=lv.created or time.time())
    service.records.save(rec)
    counts["rebuilt"] += 1
    log.info("rebuilt the record of %s/%s (%r, pool %s, %d grant(s))", lv.vg, lv.name, rec.name, pool.name,
             len(grants))
    return ""
