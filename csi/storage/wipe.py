"""Wiping thick LVs in the background, so that a deleted thick volume's data is never readable by the next
volume and no RPC or start-up waits for it (issue 12, defect 3; Cinder's volume_clear, made resumable).

DeleteVolume first takes the LV out of the volume namespace: `lvrename` to `<cluster>+wipe+<random>`, a name
no request name can give (`+` never appears in a volume's LV name), so a CreateVolume that reuses the name
makes a new LV and can never adopt a half-wiped one. Then it returns. A thread of the agent zeroes the LV in
steps (`blkdiscard --zeroout --offset --length`), persisting after each step how far it got
(`<state>/wipes/<vg>/<lv>.json`), and removes the LV only when all of it is zero; until then its extents stay
allocated, so its space counts as used. After a restart the wipe resumes where its progress says (from the
start if the progress is lost: safe, only slower). The backlog (LVs and bytes still to zero, and the last
failure) is in GetInfo, so `status` shows it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from csi import faults, ids, runner
from csi.fsutil import remove, write_atomic
from csi.storage import tags
from csi.storage.lvm import LogicalVolume

log = logging.getLogger(__name__)

STEP = 256 << 20            # bytes zeroed between two progress saves
STEP_TIMEOUT = 600.0        # seconds one step may take (a slow disk zeroes 256 MiB in far less)
RETRY_AFTER = 30.0          # seconds before a failed wipe is tried again
VERSION = 1


@dataclass
class Wipe:
    vg: str
    lv: str
    size: int
    done: int = 0


@dataclass(frozen=True)
class Backlog:
    volumes: int
    bytes_left: int
    error: str


class Wiper:
    def __init__(self, service, state_dir: Path):
        self.service = service
        self.directory = state_dir / "wipes"
        self._queue: dict[tuple[str, str], Wipe] = {}
        self._cond = threading.Condition()
        self._errors: dict[tuple[str, str], str] = {}
        self._not_before: dict[tuple[str, str], float] = {}   # a failed wipe waits; the others go on
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------------------------ queueing

    def retire(self, vg: str, lv: LogicalVolume) -> str:
        """Renames a thick LV out of the volume namespace and queues its wipe; returns its new name. The
        caller holds the volume's lock."""
        new = ids.wipe_lv_name(self.service.config.cluster_id)
        self.service.lvm.rename(vg, lv.name, new)
        faults.step("wipe.renamed")
        log.info("%s/%s is now %s/%s, to be zeroed before its space is freed", vg, lv.name, vg, new)
        self._enqueue(Wipe(vg, new, lv.size))
        return new

    def _enqueue(self, wipe: Wipe) -> None:
        with self._cond:
            self._queue.setdefault((wipe.vg, wipe.lv), wipe)
            self._cond.notify_all()

    def scan(self) -> int:
        """Queues every LV of this cluster in the wipe namespace: the wipes a restart cut short."""
        found = 0
        for vg in sorted({p.vg for p in self.service.config.pools}):
            for lv in self.service.lvm.lvs(vg):
                if ids.is_wipe_lv_name(lv.name) and lv.tag(tags.CLUSTER) == self.service.config.cluster_id:
                    self._enqueue(Wipe(vg, lv.name, lv.size))
                    found += 1
        if found:
            log.info("%d thick LV(s) still to be zeroed: resuming in the background", found)
        return found

    def pending(self) -> list[Wipe]:
        with self._cond:
            return [w for _, w in sorted(self._queue.items())]

    def backlog(self, vg: str) -> Backlog:
        with self._cond:
            items = [w for (g, _), w in self._queue.items() if g == vg]
            error = next((e for (g, _), e in sorted(self._errors.items()) if g == vg), "")
            return Backlog(len(items), sum(w.size - w.done for w in items), error)

    # ------------------------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wiper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.scan()
                break
            except Exception:  # noqa: BLE001 - the agent goes on serving; LVM may answer again later
                log.exception("could not look for wipes cut short; looking again in %.0fs", RETRY_AFTER)
                with self._cond:
                    self._cond.wait(timeout=RETRY_AFTER)
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    ready = [w for k, w in sorted(self._queue.items()) if self._not_before.get(k, 0.0) <= now]
                    if ready:
                        break
                    waits = [t - now for k, t in self._not_before.items() if k in self._queue]
                    self._cond.wait(timeout=min(waits, default=RETRY_AFTER))
                if self._stop:
                    return
                wipe = ready[0]
            if not self.run_one(wipe):
                with self._cond:
                    self._not_before[(wipe.vg, wipe.lv)] = time.monotonic() + RETRY_AFTER

    def run_one(self, wipe: Wipe) -> bool:
        """Zeroes one LV from where its progress says, then removes it. False when it failed (kept queued)."""
        key = (wipe.vg, wipe.lv)
        try:
            self._wipe(wipe)
        except Exception as exc:  # noqa: BLE001 - a disk error must not end the thread; status shows it
            message = getattr(exc, "message", None) or str(exc)
            log.error("zeroing %s/%s failed at %d of %d bytes (retried in %.0fs): %s", wipe.vg, wipe.lv,
                      wipe.done, wipe.size, RETRY_AFTER, message)
            with self._cond:
                self._errors[key] = f"zeroing {wipe.vg}/{wipe.lv} fails: {message[:200]}"
            return False
        with self._cond:
            self._queue.pop(key, None)
            self._errors.pop(key, None)
            self._not_before.pop(key, None)
        return True

    def _progress_path(self, vg: str, lv: str) -> Path:
        return self.directory / vg / f"{lv}.json"

    def _wipe(self, wipe: Wipe) -> None:
        lvm = self.service.lvm
        path = self._progress_path(wipe.vg, wipe.lv)
        lv = lvm.lv(wipe.vg, wipe.lv)
        if lv is None:
            remove(path)
            return   # removed already (the process died between lvremove and this file's removal)
        wipe.size = lv.size
        wipe.done = self._load(path, lv.size)
        if wipe.done:
            log.info("resuming the zeroing of %s/%s at %d of %d bytes", wipe.vg, wipe.lv, wipe.done, wipe.size)
        if not lv.active:
            lvm.activate(wipe.vg, wipe.lv)
        started = time.monotonic()
        while wipe.done < wipe.size:
            length = min(STEP, wipe.size - wipe.done)
            with runner.deadline(STEP_TIMEOUT):
                lvm.zero_out(lv.path, wipe.done, length)
            wipe.done += length
            write_atomic(path, json.dumps({"version": VERSION, "vg": wipe.vg, "lv": wipe.lv, "size": wipe.size,
                                           "done": wipe.done}), mode=0o600)
            faults.step("wipe.chunk")
        lvm.remove(wipe.vg, wipe.lv)
        remove(path)
        self.service.pool_reports.forget(wipe.vg)
        log.info("zeroed and removed %s/%s (%d bytes, %.1fs)", wipe.vg, wipe.lv, wipe.size,
                 time.monotonic() - started)

    @staticmethod
    def _load(path: Path, size: int) -> int:
        try:
            data = json.loads(path.read_text())
            done = int(data["done"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        if data.get("version") != VERSION or data.get("size") != size or not 0 <= done <= size:
            return 0
        return done
