"""LIO's one lock (csi/storage/lio_lock.py): reentrant, and a grant or revoke waiting goes before the exports
and unexports of a hundred volumes made or deleted at once."""

from __future__ import annotations

import threading
import time

from csi.storage.lio_lock import TurnLock


def test_a_quick_turn_goes_before_every_ordinary_waiter_but_never_before_the_holder():
    lock, order = TurnLock(), []

    def ordinary(i):
        with lock:
            order.append(f"bulk{i}")

    def quick():
        with lock.quick(), lock:
            order.append("quick")
            with lock:              # reentrant
                order.append("again")

    lock.acquire()
    bulk = [threading.Thread(target=ordinary, args=(i,)) for i in range(5)]
    for t in bulk:
        t.start()
    time.sleep(0.2)                 # the five are waiting
    q = threading.Thread(target=quick)
    q.start()
    time.sleep(0.2)
    assert order == []              # the holder keeps it
    lock.release()
    for t in [*bulk, q]:
        t.join(10)
    assert order[:2] == ["quick", "again"] and sorted(order[2:]) == [f"bulk{i}" for i in range(5)], order


def test_the_lock_is_reentrant_and_only_its_holder_releases_it():
    lock = TurnLock()
    refused = []

    def release_from_elsewhere():
        try:
            lock.release()
        except RuntimeError as exc:
            refused.append(str(exc))
    with lock, lock:
        other = threading.Thread(target=release_from_elsewhere)
        other.start()
        other.join(10)
    assert refused == ["released by a thread that does not hold it"]
    got = threading.Event()
    t = threading.Thread(target=lambda: (lock.acquire(), got.set(), lock.release()))
    t.start()
    t.join(10)
    assert got.is_set()             # released fully after the two levels


def test_outside_quick_a_thread_waits_as_any_other():
    lock = TurnLock()
    with lock.quick():
        pass
    assert not getattr(lock._local, "quick", False)
