"""Where a replicated volume's two legs go (csi/controller/replicas.py): a pair of storage nodes in one zone (or
the class's replicaZones), or, for a volume made from a replicated source, the seed's own thin pool and one
other node (csi/controller/replica_sources.py)."""

from __future__ import annotations

import dataclasses

from csi import errors
from csi.controller import scheduler
from csi.controller.journal import Entry
from csi.controller.replicas import IN_SYNC


def place(replicas, key, name, params, required, limit, requisite, preferred) -> Entry:
    """Leg 0 where the scheduler puts a plain volume; leg 1 on another node of leg 0's zone (or of the class's
    `replicaZones`, for workers that reach the storage nodes of both; leg 0's zone first). A zone with one
    node that fits is left out and the choice made again, so a pair is found wherever one exists."""
    svc = replicas.svc
    candidates, down = svc._candidates()
    wanted_thin = params.thin if params.thin is not None else (None if params.pool else True)
    alone: dict[str, str] = {}    # zone -> the one node in it that had room
    while True:
        pool = [c for c in candidates if c.zone not in alone]
        try:
            first = scheduler.choose(pool, required=required, limit=limit, pool=params.pool, thin=wanted_thin,
                                     requisite_zones=requisite, preferred_zones=preferred, down=down)
        except errors.CsiError as exc:
            if not alone or exc.code != errors.Code.RESOURCE_EXHAUSTED:
                raise
            raise errors.exhausted("replicas 2 needs two storage nodes with room in one zone; " + "; ".join(
                f"in zone {z or '(none)'} only {n} has" for z, n in sorted(alone.items())) +
                ("; down and not considered: " + ", ".join(sorted(n for n, _ in down)) if down else "")) from None
        zone = first.candidate.zone
        zones = [zone, *(z for z in params.replica_zones if z != zone)]
        try:
            second = scheduler.choose([c for c in pool if c.node != first.candidate.node and c.zone in zones],
                                      required=required, limit=limit, pool=params.pool, thin=wanted_thin,
                                      requisite_zones=zones, preferred_zones=[zone], down=down)
        except errors.CsiError as exc:
            if exc.code != errors.Code.RESOURCE_EXHAUSTED:
                raise
            alone[zone] = first.candidate.node
            continue
        return _entry_of(replicas, key, name, (first, second))

def place_seeded(replicas, key, name, params, required, requisite, preferred, seed) -> Entry:
    """A volume made from a replicated source: its seed leg in the source's own thin pool (a thin snapshot
    there), the other leg blank on another node. The seed is leg 0 (whose zone is the volume's) when its zone
    is one the claim allows; else leg 1, beside a leg 0 in an allowed zone, if the class's replicaZones let a
    second leg be in the seed's zone."""
    svc = replicas.svc
    candidates, down = svc._candidates()
    at_seed = [c for c in candidates if c.node == seed.node and c.pool == seed.pool]
    if not at_seed:
        raise errors.unavailable(f"storage node {seed.node}, which holds the source, does not answer now")
    try:
        seeded = scheduler.choose(at_seed, required=required, pool=seed.pool, thin=True)
    except errors.CsiError as exc:
        raise errors.CsiError(exc.code, f"the leg made from {seed.text} goes into the source's own thin pool "
                              f"({seed.pool} on {seed.node}), and: {exc.message}") from None
    zone = seeded.candidate.zone
    others = [c for c in candidates if c.node != seed.node]
    wanted_thin = params.thin if params.thin is not None else (None if params.pool else True)
    seed_first = requisite is None or zone in requisite
    if seed_first:
        where = dict(requisite_zones=[zone, *(z for z in params.replica_zones if z != zone)],
                     preferred_zones=[zone])
    elif zone in params.replica_zones:
        where = dict(requisite_zones=requisite, preferred_zones=preferred)
    else:
        raise errors.exhausted(f"the source's data is on {seed.node} in zone {zone or '(none)'}, outside the "
                               f"zones the claim allows ({', '.join(requisite)}), and the class's replicaZones "
                               "do not let a second leg be there")
    try:
        blank = scheduler.choose(others, required=required, pool=params.pool, thin=wanted_thin, down=down,
                                 **where)
    except errors.CsiError as exc:
        raise errors.CsiError(exc.code, f"the other leg of a replicated volume made from {seed.text}: "
                              f"{exc.message}") from None
    pair = (seeded, blank) if where["preferred_zones"] == [zone] else (blank, seeded)
    entry = _entry_of(replicas, key, name, pair)
    entry.legs[pair.index(seeded)]["seed"] = dataclasses.asdict(seed)   # a retry makes it from this seed
    entry.source = seed.text
    return entry

def _entry_of(replicas, key: str, name: str, pair) -> Entry:
    # One size for both legs: the larger of the two pools' rounding, so neither leg is the smaller.
    size = max(p.size for p in pair)
    legs = []
    for p in pair:
        replicas.svc.agents.consume(p.candidate.node, p.candidate.pool, size)
        legs.append({"node": p.candidate.node, "pool": p.candidate.pool, "state": IN_SYNC, "size": size,
                     "vg": replicas._vg_of(p.candidate.node, p.candidate.pool)})
    return Entry(key, "volume", name, pair[0].candidate.node, pool=pair[0].candidate.pool, vg=legs[0]["vg"],
                 legs=legs)
