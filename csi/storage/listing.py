"""The agent's paged listings (ListVolumes, ListSnapshots): bounded messages at any number of volumes.

Order is (vg, lv); a page token is the "vg/lv" of the last item of the page before. A page reads only its own
records (the directory listing that orders them costs a name per volume, not a file), and LVM's view of the VG
(one `lvs` per VG, whose cost grows with the VG) is kept for a few seconds, so paging through N volumes costs
one listing of each VG, not one per page. max_entries 0 answers everything at once, as agents did before
paging, so a controller of the previous version still sees every volume during a rolling upgrade.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, TypeVar

from csi import errors, ids

T = TypeVar("T")
LVS_TTL = 10.0
MAX_PAGE = 1000


def parse_token(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    vg, sep, lv = token.partition("/")
    if not sep:
        raise errors.invalid(f"starting_token {token[:100]!r} is not one this agent gave out")
    ids.check_lvm_name(vg, "starting_token vg")
    ids.check_lvm_name(lv, "starting_token lv")
    return vg, lv


def page(keys: Iterable[tuple[str, str]], max_entries: int, token: str) -> tuple[list[tuple[str, str]], str]:
    """The keys of one page, in order, and the token of the next page ("" after the last)."""
    if max_entries < 0:
        raise errors.invalid("max_entries must not be negative")
    after = parse_token(token)
    ordered = sorted(k for k in keys if after is None or k > after)
    if max_entries == 0:
        return ordered, ""
    size = min(max_entries, MAX_PAGE)
    chosen = ordered[:size]
    return chosen, (f"{chosen[-1][0]}/{chosen[-1][1]}" if len(ordered) > size else "")


class RecentListing:
    """One LVM listing per VG, reused for LVS_TTL seconds by the pages of one walk through a listing."""

    def __init__(self, list_vg: Callable[[str], list[T]]):
        self._list_vg = list_vg
        self._cache: dict[str, tuple[float, list[T]]] = {}
        self._mutex = threading.Lock()

    def get(self, vg: str, fresh: bool) -> list[T]:
        with self._mutex:
            at, lvs = self._cache.get(vg, (0.0, None))
        if lvs is not None and not fresh and time.monotonic() - at < LVS_TTL:
            return lvs
        lvs = self._list_vg(vg)
        with self._mutex:
            self._cache[vg] = (time.monotonic(), lvs)
        return lvs
