"""cinder-scheduler's job: filters, then a weigher, then a deterministic tie-break.

Filters: requested pool (name), requested provisioning type, zone (the request's accessibility
requirements), enough capacity for the size rounded to the pool's extent. Weigher: most bytes available.
Tie-break: preferred-zone order first, then node name, then pool name, so the same inputs always give the
same placement. Pure: unit-tested without agents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from csi import errors


@dataclass(frozen=True)
class Candidate:
    node: str
    zone: str
    pool: str
    thin: bool
    available: int
    extent: int


@dataclass(frozen=True)
class Placement:
    candidate: Candidate
    size: int


def round_up(size: int, extent: int) -> int:
    return -(-size // extent) * extent if extent > 0 else size


def choose(candidates: Iterable[Candidate], *, required: int, limit: int = 0, pool: str = "",
           thin: bool | None = None, requisite_zones: Sequence[str] | None = None,
           preferred_zones: Sequence[str] = (), near: str = "", down: Sequence[tuple[str, str]] = ()) -> Placement:
    """The best pool for a volume of at least `required` bytes (and at most `limit`, when set).

    `near` names the storage node that holds the volume's content source: after the preferred zones, it
    comes first, since a restore there needs no copy across the network. `down` lists (node, zone) of the
    storage nodes left out because they do not answer: named in the refusal, so an operator knows why."""
    pool_out = type_out = zone_out = limit_out = 0
    eligible = 0        # pools that pass the pool, type and zone filters
    largest = 0
    fitting: list[Placement] = []
    for c in candidates:
        if pool and c.pool != pool:
            pool_out += 1
            continue
        if thin is not None and c.thin != thin:
            type_out += 1
            continue
        if requisite_zones is not None and c.zone not in requisite_zones:
            zone_out += 1
            continue
        eligible += 1
        size = round_up(required, c.extent)
        if limit and size > limit:
            limit_out += 1
            continue
        largest = max(largest, c.available)
        if size <= c.available:
            fitting.append(Placement(c, size))
    if fitting:
        rank = {z: i for i, z in enumerate(preferred_zones)}
        return min(fitting, key=lambda p: (rank.get(p.candidate.zone, len(rank)), p.candidate.node != near,
                                           -p.candidate.available, p.candidate.node, p.candidate.pool))
    if limit_out and limit_out == eligible:
        raise errors.out_of_range(f"{required} bytes rounded up to the pools' extent size exceeds the limit {limit}")
    reasons = []
    if pool_out:
        reasons.append(f"{pool_out} pool(s) are not pool {pool!r}")
    if type_out:
        reasons.append(f"{type_out} pool(s) are not {'thin' if thin else 'thick'}")
    if zone_out:
        reasons.append(f"{zone_out} pool(s) are outside the zones {', '.join(requisite_zones or [])}")
    if limit_out:
        reasons.append(f"{limit_out} pool(s) would round the size above the limit {limit}")
    reasons.append(f"the largest space available in the remaining pools is {largest} bytes, "
                   f"{required} requested")
    missing = sorted(n for n, z in down if requisite_zones is None or z in requisite_zones)
    if missing:
        reasons.append(f"storage node(s) down and not considered: {', '.join(missing)}")
    raise errors.exhausted("no storage pool can hold this volume: " + "; ".join(reasons))
