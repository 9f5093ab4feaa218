"""The one lock every change to LIO runs under (csi/storage/lio.py), with quick changes served first.

rtslib objects are views of configfs paths that another thread may remove between two of rtslib's own reads (a
concurrent unexport makes a walk over the targets meet a vanished directory: FileNotFoundError), so changes take
turns. A turn is short, but a hundred volumes made or deleted at once queue a hundred exports or unexports: a
grant or a revoke (a pod waits for it) that took its chance among them waited 30 s in bench/run --parts load.
Here a thread inside `quick()` goes before every ordinary waiter (never before the holder: a change is never cut
short). Reentrant, as the lock it replaces: a change may call another."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class TurnLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._quick_waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def quick(self) -> Iterator[None]:
        """The calling thread's turns, inside this block, go before the ordinary waiters'."""
        before = getattr(self._local, "quick", False)
        self._local.quick = True
        try:
            yield
        finally:
            self._local.quick = before

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            if getattr(self._local, "quick", False):
                self._quick_waiting += 1
                try:
                    self._cond.wait_for(lambda: self._owner is None)
                finally:
                    self._quick_waiting -= 1
            else:
                self._cond.wait_for(lambda: self._owner is None and not self._quick_waiting)
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("released by a thread that does not hold it")
            self._depth -= 1
            if not self._depth:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
