"""The node side of a replicated volume (volume_id "r1:<lv>"): an md RAID1 (raid.py) over the iSCSI disks of its
two legs, assembled at stage, stopped at unstage, and kept whole by a reconciler.

Failure and return:
- Each leg's session has a short replacement timeout and quick no-op pings (LEG_SETTINGS): a storage node that
  dies or is cut off fails the leg's I/O after about noop interval + noop timeout + replacement timeout
  (2 + 3 + 5 s), md fails that leg (failfast) and the writer goes on with the other, with no error.
- open-iscsi keeps trying to log in again after the replacement timeout; once the storage node is back the
  session is LOGGED_IN again with the same disk. The reconciler (`reconcile`, every RECONCILE_S and at the node
  plugin's start) re-adds such a leg: the write-intent bitmap limits the resync to what changed. A leg not
  logged in at all (a stage made while its storage node was down) is logged in and added. A leg an operator
  replaced on another storage node (replace-replica-leg) is swapped for the new one and added (replica_join.py).

Which leg is current:
- Both legs here: md's event counts pick the newest at assembly and leave a stale leg out; it is then re-added.
- One leg here: it is used only if it can be proven current: the controller's record (publish_context) marks
  the other leg outdated, or the leg's own superblock shows the other member missing (it went on alone after the
  other was cut off, so it holds every write the other has). Otherwise the stage refuses: the absent leg may
  hold writes this one missed (the worker that wrote alone to it died, then this leg's peer went down).
- By decision (README, limits): the node does not record in the controller's record that a leg is outdated
  before md goes on without it (the surviving leg's superblock records it; the node has no channel to the
  controller), so the controller's record marks legs outdated at a publish that spends a clean detach's stamp or
  by an operator's hand (`lvm-iscsi-csi mark-replica-leg`, csi/legmark.py). A leg recorded outdated is put back
  with a full recovery.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

from csi import contract, errors, faults, ids
from csi.fsutil import remove, write_atomic
from csi.node import health, mount, raid, replica_join
from csi.node.iscsi import Target
from csi.proto import csi_pb2 as csi

log = logging.getLogger(__name__)

RECONCILE_S = 5.0
ASK_EVERY = 15.0     # a degraded volume's agents asked where its away leg is (replica_join.py), at most this often
# A leg's I/O fails this soon after its storage node stops answering (defaults: 5 + 5 + 120 s).
LEG_SETTINGS = (("node.conn[0].timeo.noop_out_interval", "2"),
                ("node.conn[0].timeo.noop_out_timeout", "3"),
                ("node.session.timeo.replacement_timeout", "5"))


def key_of(volume_id: str) -> str | None:
    return ids.parse_replicated_id(volume_id)


def _leg_record(leg: contract.Leg) -> dict:
    """What the stage record keeps of a leg: enough to log in again (reconcile) and to log out (unstage)."""
    out = {"node": leg.storage_node, "vg": leg.vg, "outdated": leg.outdated}
    if leg.attachment is not None:
        att = leg.attachment
        out.update(iqn=att.iqn, portals=list(att.portals), lun=att.lun, agent=att.agent)
    return out


def _leg_target(leg: dict) -> Target:
    """The target of a granted leg as its stage record (_leg_record) keeps it."""
    return Target(leg["iqn"], tuple(leg["portals"]), leg["lun"], settings=LEG_SETTINGS)


def _session_of(leg: dict, sessions: dict):
    """A leg's session among (iqn, portal) -> session: by portal too, as legs on storage nodes with one VG name
    share a target IQN."""
    return next((sessions[(leg["iqn"], p)] for p in leg["portals"] if (leg["iqn"], p) in sessions), None)



class Replicated:
    """Stage, unstage and reconcile of replicated volumes, for NodeService (which validates and locks)."""

    def __init__(self, service):
        self.svc = service
        self._asked: dict[str, float] = {}    # key -> when its agents were last asked (replica_join.ask)

    # ---------------------------------------------------------------------------------- stage

    def _target(self, leg: contract.Leg, with_credentials: bool) -> Target:
        att = leg.attachment
        target = Target(att.iqn, att.portals, att.lun, settings=LEG_SETTINGS)
        return self.svc._with_credentials(target, att, leg.ref) if with_credentials else target

    def stage(self, volume_id: str, ctx, staging: Path, access, mkfs_opts) -> None:
        key = key_of(volume_id)
        legs = contract.parse_replicated(ctx, key)
        md = raid.md_device(key)
        if not access.block:
            existing = mount.mount_at(staging)
            if existing is not None:
                if md.exists() and Path(existing.source).resolve() == md.resolve():
                    return
                raise errors.precondition(f"{staging} already has {existing.source} mounted, which is not this "
                                          f"volume's array {md}; unmount it first")
        if raid.status(key) is not None and (self.svc._record(volume_id) or {}).get("legs"):
            # Assembled by an earlier attempt of this stage: its record names what is logged in, which may be
            # newer than this publish_context (a leg that joined since: replica_join.py).
            return self._stage_rest(volume_id, legs, staging, access, mkfs_opts)
        legs = self._current_legs(key, legs)     # asked only when something will be logged in from them
        for leg in legs:
            if leg.attachment is not None:
                self.svc.ledger.add(leg.attachment.iqn)
        write_atomic(self.svc._record_path(volume_id), json.dumps(
            {"volume_id": volume_id, "replicated": True, "key": key, "staging": str(staging), "block": access.block,
             "read_only": access.read_only,
             "legs": [_leg_record(leg) for leg in legs]}), mode=0o600)
        faults.step("stage.record")
        self._stage_rest(volume_id, legs, staging, access, mkfs_opts)

    def _current_legs(self, key: str, legs: list[contract.Leg]) -> list[contract.Leg]:
        """publish_context's legs, one replaced by the leg that took its place since the publish, or granted
        since (replica_join.py): Kubernetes keeps the publish_context it has across restarts of the pod."""
        if self.svc.config.tls_dir is None:
            return legs
        found = replica_join.ask(self.svc.config.tls_dir, key, [_leg_record(leg) for leg in legs],
                                 candidates={leg.index for leg in legs},
                                 askers={leg.index for leg in legs if leg.attachment is not None})
        if found is None:
            return legs
        i, new = found
        old = legs[i]
        same = new.storage_node == old.storage_node
        log.warning("replica leg %d of %s: %s since its publish", i, key,
                    "granted" if same else f"replaced, {old.storage_node} -> {new.storage_node}")
        out = list(legs)
        out[i] = dataclasses.replace(new, outdated=new.outdated or (same and old.outdated), seed=same and old.seed,
                                     replaces=())
        return out

    def _stage_rest(self, volume_id: str, legs: list[contract.Leg], staging: Path, access, mkfs_opts) -> None:
        try:
            device = self._assemble(key_of(volume_id), legs, access.read_only)
            faults.step("stage.assemble")
            if access.block:
                return
            staging.mkdir(parents=True, exist_ok=True)
            found, formatted = self.svc._filesystem(legs[0].ref, device, access, mkfs_opts)
            mount.mount(device, staging, found, self.svc._options(found, access))
            faults.step("stage.mount")
            if not access.read_only and not formatted:
                mount.grow_filesystem(device, found, staging)
        except Exception:
            self.unstage(volume_id, staging)
            raise

    def _login_all(self, legs: list[contract.Leg]) -> tuple[dict[int, Path], list[str]]:
        here, away = {}, []
        for leg in legs:
            if leg.attachment is None:
                away.append(f"leg {leg.index} on {leg.storage_node}: its agent did not answer when the volume was "
                            "published to this node")
                continue
            try:
                self.svc.iscsi.login(self._target(leg, with_credentials=True))
                faults.step("stage.login")
                here[leg.index] = self.svc.iscsi.wait_for_device(self._target(leg, with_credentials=False))
            except errors.CsiError as exc:
                if exc.code not in (errors.Code.UNAVAILABLE, errors.Code.DEADLINE_EXCEEDED):
                    raise
                log.warning("replica leg %d of %s on %s is not reachable: %s", leg.index, leg.lv,
                            leg.storage_node, exc.message)
                away.append(f"leg {leg.index} on {leg.storage_node}: {exc.message}")
        return here, away

    def _assemble(self, key: str, legs: list[contract.Leg], read_only: bool) -> Path:
        md = raid.md_device(key)
        if raid.status(key) is not None:
            return md        # assembled by an earlier attempt of this stage
        here, away = self._login_all(legs)
        blocks = {i: raid.examine(dev) for i, dev in here.items()}
        sbs = {i: sb for i, sb in blocks.items() if sb is not None}
        seed = next((leg for leg in legs if leg.seed), None)
        if seed is not None and not any(sb.name == ids.md_name(key) for sb in sbs.values()):
            return self._create_from_seed(key, seed, here, sbs, away, read_only)
        for i, sb in sbs.items():
            raid.refuse_foreign(key, here[i], sb)
        if len({sb.uuid for sb in sbs.values()}) > 1:
            raise errors.precondition(f"the legs of {key} carry the superblocks of two different arrays: nothing "
                                      "was assembled or written")
        blank = set()
        for i in set(here) - set(sbs):
            found = mount.probe(here[i])
            if not found.blank:
                # Not this volume's leg as md made it (or unreadable): never written to, never a new array's.
                raise errors.precondition(f"replica leg {i} of {key} ({here[i]}) holds {found.describe()} and no md "
                                          "superblock: nothing was assembled or written")
            blank.add(i)
        if not sbs:
            if len(blank) < len(legs):
                raise errors.unavailable("a new replicated volume needs both legs to create its array: "
                                         + "; ".join(away))
            if read_only:
                raise errors.precondition("the volume is blank and published read-only: its array cannot be "
                                          "created; write to it once through a writable claim")
            log.info("creating the RAID1 of %s over %s", key, ", ".join(map(str, here.values())))
            return raid.create(key, [here[leg.index] for leg in legs])
        current = self._current(key, legs, sbs, blank, away)
        log.info("assembling the RAID1 of %s from %s%s", key, ", ".join(str(here[i]) for i in current),
                 " read-only" if read_only else "")
        raid.assemble(key, [here[i] for i in current], read_only)
        if read_only:
            return md        # md writes nothing: no re-add, no resync, no growth
        for i in sorted(set(here) - set(current)):
            log.info("re-adding replica leg %d (%s) of %s", i, here[i], key)
            raid.readd(key, here[i], outdated=any(leg.outdated for leg in legs if leg.index == i))
        if len(here) == len(legs):
            raid.grow(key)   # legs grown while the array was not assembled (an expansion of an unused volume)
        return md

    def _create_from_seed(self, key: str, seed: contract.Leg, here: dict[int, Path], sbs: dict, away: list[str],
                          read_only: bool) -> Path:
        """The first stage of a volume made from a replicated source (no leg carries its own array yet): its
        array is created from the seed leg, which holds the source's data under the source array's superblock,
        and the other legs, new and blank, are added for a full copy (csi/controller/replica_sources.py)."""
        if seed.outdated or seed.index not in here:
            raise errors.unavailable(
                f"replicated volume {key} was made from a source whose data is on leg {seed.index} "
                f"({seed.storage_node}), and that leg is " + ("recorded outdated" if seed.outdated else
                                                              "not reachable: " + "; ".join(away)))
        others = sorted(i for i in here if i != seed.index)
        for i in others:
            if i in sbs or not mount.probe(here[i]).blank:
                raise errors.precondition(f"replica leg {i} of {key} ({here[i]}) is not blank, but a volume made "
                                          "from a source has one new leg besides its seed: nothing was assembled "
                                          "or written")
        if read_only:
            raise errors.precondition("the volume was made from a source and was never staged writable: its array "
                                      "cannot be created read-only; use it once through a writable claim")
        log.info("creating the RAID1 of %s from its seed leg %d (%s)", key, seed.index, here[seed.index])
        md = raid.create_from_seed(key, here[seed.index])
        faults.step("stage.seed-array")
        for i in others:
            log.info("adding replica leg %d (%s) of %s for a full copy of the seed", i, here[i], key)
            raid.add(key, here[i])
        return md

    @staticmethod
    def _current(key: str, legs: list[contract.Leg], sbs: dict, blank: set[int], away: list[str]) -> list[int]:
        """The legs to assemble from (sbs: the superblock of each leg here that has one; blank: legs here that
        hold nothing at all): never a leg that may have missed writes another holds."""
        outdated = {leg.index for leg in legs if leg.outdated}
        with_sb = [i for i in sbs if i not in outdated]
        if not with_sb:
            raise errors.precondition(f"no leg of replicated volume {key} here can be proven current ("
                                      + "; ".join(away or ["the reachable legs are marked outdated"]) + ")")
        if len(with_sb) == len(legs):
            return with_sb       # md's event counts choose between them
        others = [leg.index for leg in legs if leg.index not in with_sb]
        if all(i in outdated or i in blank for i in others):
            return with_sb       # the other legs hold nothing newer: recorded outdated, or blank
        # One leg here, the other away and not known outdated: only a leg that went on alone is provably current.
        alone = [i for i in with_sb if raid.went_on_alone(sbs[i])]
        if alone:
            return alone
        raise errors.unavailable(
            f"replicated volume {key}: only leg {with_sb[0]} is reachable, and nothing proves it holds the latest "
            "writes (its superblock shows both legs in sync, so the other leg may have gone on alone since). "
            "Bring the other storage node back; " + "; ".join(away))

    # ---------------------------------------------------------------------------------- unstage

    def unstage(self, volume_id: str, staging: Path) -> None:
        """umount, stop the array, log out of both legs: every step tried, problems raised once."""
        key = key_of(volume_id)
        rec = self.svc._record(volume_id) or {}
        problems = []
        if mount.mount_at(staging) is not None:
            try:
                mount.umount(staging)
                faults.step("unstage.umount")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"umount {staging}: {exc}")
        if problems:
            raise errors.internal("; ".join(problems))   # still mounted: stopping the array would lose writes
        try:
            raid.stop(key)
            faults.step("unstage.stop")
        except Exception as exc:  # noqa: BLE001
            raise errors.internal(f"stopping the array of {volume_id}: {exc}") from None
        iqns = list(dict.fromkeys([leg["iqn"] for leg in rec.get("legs", []) if leg.get("iqn")] +
                                  [r["iqn"] for r in rec.get(replica_join.RETIRED, [])]))
        for iqn in iqns:
            try:
                self.svc.iscsi.logout(iqn)
                faults.step("unstage.logout")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"logout {iqn}: {exc}")
        if problems:
            raise errors.internal("; ".join(problems))
        remove(self.svc._record_path(volume_id))
        for iqn in iqns:
            self.svc.ledger.remove(iqn)

    def expand(self, volume_id: str, rec: dict, required: int, wait_size) -> tuple[Path, int]:
        """Both legs' disks learn their new size (a rescan), then the array grows to the smaller (md moves
        the superblock of metadata 1.0 to the new end). Every leg must be in the array: growing a degraded array
        would leave the missing leg too small to be re-added."""
        key = key_of(volume_id)
        array = raid.status(key)
        if array is None:
            raise errors.precondition(f"volume {volume_id}: its array is not assembled on this node")
        legs = [leg for leg in rec.get("legs", []) if leg.get("iqn")]
        if array.degraded or len(legs) < len(rec.get("legs", [])):
            raise errors.unavailable(f"volume {volume_id} runs on one leg: it grows once both legs are in the "
                                     "array again (the node plugin re-adds a leg whose storage node is back)")
        for leg in legs:
            disk = self.svc.iscsi.wait_for_device(_leg_target(leg), timeout=5)
            self.svc.iscsi.rescan(leg["iqn"])
            faults.step("expand.rescan")
            wait_size(disk, required)
        raid.grow(key)
        md = raid.md_device(key)
        return md, wait_size(md, required)

    def device(self, volume_id: str) -> Path:
        return raid.md_device(key_of(volume_id))

    # ---------------------------------------------------------------------------------- reconcile

    def records(self) -> list[dict]:
        out = []
        for path in sorted(self.svc.config.state_dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if rec.get("replicated"):
                out.append(rec)
        return out

    def reconcile(self) -> None:
        """Puts back every leg md runs without, once its session carries I/O again."""
        # assembled read-only: md writes nothing, so no leg is put back
        records = [rec for rec in self.records() if not rec.get("read_only")]
        if not records:
            return   # no `iscsiadm -m session` every RECONCILE_S on a worker with no replicated volume
        sessions = {(s.iqn, s.portal): s for s in self.svc.iscsi.sessions()}
        for rec in records:
            volume_id, key = rec["volume_id"], rec["key"]
            try:
                # Asked outside the volume's lock (agents over the network, a TLS handshake each): the volume's
                # own calls (an unstage) must not meet ABORTED because of it.
                moved = self._moved_leg(key, rec, sessions)
                with self.svc.locks.hold(volume_id):
                    self._reconcile_one(volume_id, key, self.svc._record(volume_id) or rec, sessions, moved)
            except errors.CsiError as exc:
                if exc.code != errors.Code.ABORTED:   # a stage or unstage of it runs: next round
                    log.warning("reconciling %s: %s", volume_id, exc.message)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("reconciling %s: %s", volume_id, exc)

    def _away(self, key: str, rec: dict, sessions) -> set[int]:
        """The legs out of the array with no session carrying I/O (not a leg whose disk link udev has yet to
        make), or not granted here; none when the array does not run."""
        array = raid.status(key)
        if array is None:
            return set()
        in_array = {m.device for m in array.members if "faulty" not in m.state}

        def away(leg: dict) -> bool:
            if not leg.get("iqn"):
                return True
            if str(self.svc.iscsi.find_device(_leg_target(leg))) in in_array:
                return False
            session = _session_of(leg, sessions)
            return session is None or self.svc.iscsi.session_state(session) != "LOGGED_IN"
        return {i for i, leg in enumerate(rec.get("legs", [])) if away(leg)}

    def _moved_leg(self, key: str, rec: dict, sessions) -> tuple[int, contract.Leg] | None:
        """A leg away from the array that an agent of a leg in it says was replaced, or granted since
        (replica_join.py); asked at most every ASK_EVERY seconds per volume."""
        missing = self._away(key, rec, sessions)
        now = time.monotonic()
        if not missing or self.svc.config.tls_dir is None or now - self._asked.get(key, -ASK_EVERY) < ASK_EVERY:
            return None
        self._asked[key] = now
        legs = rec.get("legs", [])
        return replica_join.ask(self.svc.config.tls_dir, key, legs, missing, askers=set(range(len(legs))) - missing)

    def _reconcile_one(self, volume_id: str, key: str, rec: dict, sessions, moved=None) -> None:
        array = raid.status(key)
        if array is None:
            return
        in_array = {m.device for m in array.members if "faulty" not in m.state}
        if moved is not None:
            i, new = moved
            legs = rec.get("legs", [])
            # The record as read under the lock: switched only if that leg is still the one asked about, away.
            if i < len(legs) and i in self._away(key, rec, sessions) and \
                    replica_join.supersedes(new, legs[i]):
                rec = self._switch(volume_id, key, rec, i, new)
        if rec.get(replica_join.RETIRED) and not any(leg.get(replica_join.JOINING) for leg in rec["legs"]):
            rec = self._retire(volume_id, key, rec)      # once the leg that replaced it is in the array
        for i, leg in enumerate(rec.get("legs", [])):
            if not leg.get("iqn"):
                continue   # not granted to this node: joins once granted (replica_join.ask above)
            target = _leg_target(leg)
            session = _session_of(leg, sessions)
            if session is None:
                # Under the volume's lock: only when the agent answers at once, so a storage node that is down
                # holds the lock (and the volume's own calls) no longer than a probe.
                if health.connects(leg["agent"]):
                    self._login_again(volume_id, rec, i)
                continue
            if self.svc.iscsi.session_state(session) != "LOGGED_IN":
                continue
            device = self.svc.iscsi.find_device(target)
            if device is None or str(device) in in_array:
                continue
            if leg.get(replica_join.JOINING):
                self._join(volume_id, key, rec, i, device)
                continue
            log.warning("replica leg %d of %s (%s on %s) is back: re-adding it", i, volume_id, device, leg["node"])
            raid.readd(key, device, outdated=bool(leg.get("outdated")))
            faults.step("reconcile.readd")

    def _switch(self, volume_id: str, key: str, rec: dict, index: int, new: contract.Leg) -> dict:
        """The stage record names the new leg that replaced leg `index`, or the leg granted since the publish
        (replica_join.py), then the old leg leaves the array."""
        log.warning("replica leg %d of %s is now on %s (was %s%s): adding it to the array", index, volume_id,
                    new.storage_node, rec["legs"][index]["node"], "" if rec["legs"][index].get("iqn") else
                    ", not granted at publish")
        self.svc.ledger.add(new.attachment.iqn)
        rec = replica_join.switched(rec, index, _leg_record(new))
        write_atomic(self.svc._record_path(volume_id), json.dumps(rec), mode=0o600)
        faults.step("reconcile.join")
        raid.drop_failed(key)
        return rec

    def _retire(self, volume_id: str, key: str, rec: dict) -> dict:
        """Logs out of the targets of legs replaced since the stage (best effort: the next round tries again,
        unstage too)."""
        left = []
        for old in rec[replica_join.RETIRED]:
            try:
                self.svc.iscsi.logout_portals(old["iqn"], old["portals"])
                if old["iqn"] not in {leg.get("iqn") for leg in rec["legs"]}:
                    self.svc.ledger.remove(old["iqn"])
            except Exception as exc:  # noqa: BLE001
                log.info("logging out of %s at %s, a replaced leg of %s: %s", old["iqn"], ",".join(old["portals"]),
                         volume_id, exc)
                left.append(old)
        if left != rec[replica_join.RETIRED]:
            rec = dict(rec, **{replica_join.RETIRED: left})
            write_atomic(self.svc._record_path(volume_id), json.dumps(rec), mode=0o600)
        return rec

    def _join(self, volume_id: str, key: str, rec: dict, index: int, device: Path) -> None:
        leg = rec["legs"][index]
        sb = replica_join.joinable(key, device)
        log.warning("adding the new replica leg %d of %s (%s on %s) for a full copy", index, volume_id, device,
                    leg["node"])
        if sb is None:
            raid.drop_failed(key)
            raid.add(key, device)
        else:
            raid.readd(key, device, outdated=bool(leg.get("outdated")))
        faults.step("reconcile.readd")
        legs = list(rec["legs"])
        legs[index] = {k: v for k, v in leg.items() if k != replica_join.JOINING}
        write_atomic(self.svc._record_path(volume_id), json.dumps(dict(rec, legs=legs)), mode=0o600)

    def _login_again(self, volume_id: str, rec: dict, index: int) -> None:
        leg = rec["legs"][index]
        att = contract.Attachment(leg["iqn"], tuple(leg["portals"]), leg["lun"], leg["node"], leg["agent"])
        cleg = contract.Leg(index, leg["node"], leg["vg"], rec["key"], leg.get("outdated", False), att)
        try:
            self.svc.iscsi.login(self._target(cleg, with_credentials=True))
        except errors.CsiError as exc:
            log.info("replica leg %d of %s on %s: still not reachable (%s)", index, volume_id, leg["node"],
                     exc.message)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="replica-reconciler", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                self.reconcile()
            except Exception as exc:  # noqa: BLE001
                log.warning("replica reconciler: %s", exc)
            time.sleep(RECONCILE_S)


    def health(self, volume_id: str, rec: dict | None) -> list:
        """NodeGetVolumeHealth's entries for the array: which legs are in sync, which resyncs and how far, which
        is missing. INACCESSIBLE only when the array does not run (no leg serves it)."""
        Entry = csi.VolumeHealth.VolumeHealthEntry
        array = raid.status(key_of(volume_id))
        if array is None:
            return [Entry(status=csi.INACCESSIBLE, reason="ArrayNotAssembled",
                          message=f"the RAID1 of {volume_id} does not run on this node: it is not staged here, or "
                                  "no leg of it could be reached")]
        out = []
        devices = {m.device: m for m in array.members}
        for i, leg in enumerate((rec or {}).get("legs", [])):
            device = self.svc.iscsi.find_device(_leg_target(leg)) if leg.get("iqn") else None
            member = devices.get(str(device)) if device is not None else None
            where = f"leg {i} on storage node {leg['node']}"
            if member is None or "faulty" in member.state:
                out.append(Entry(status=csi.DEGRADED, reason="ReplicaLegMissing",
                                 message=f"{where} is out of the array ({member.state if member else 'no disk'}): "
                                         "writes go to the other leg alone; the node plugin re-adds it once its "
                                         "storage node answers again"))
            elif not member.in_sync:
                progress = array.progress()
                shown = f"{progress:.0%}" if progress is not None else "starting"
                out.append(Entry(status=csi.DEGRADED, reason="ReplicaLegResyncing",
                                 message=f"{where} is being resynced ({array.sync_action} {shown}): until it is "
                                         "done, only the other leg holds every write"))
        return out
