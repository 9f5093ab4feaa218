"""GetCapacity for replicated volumes (StorageClass `replicas: "2"`): two legs on two storage nodes, one of them in
the volume's zone (the other may be in the class's replicaZones), each MD_RESERVE larger than the volume."""

from __future__ import annotations

from typing import Sequence

from csi.controller.replicas import MD_RESERVE


def capacity(own: dict[str, tuple[int, int]], other: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """GetCapacity for replicated volumes: (available_capacity, maximum_volume_size) from the storage nodes of
    the volume's zone (`own`) and of the class's replicaZones (`other`), each node -> (bytes free in all its
    matching pools, in its largest). A volume needs two legs on two nodes, one of them in its own zone: the
    largest is the best pair's smaller node, and the total at most half of all, all but the fullest node's
    share (it cannot pair with itself), and what the own zone holds."""
    nodes = {**other, **own}
    largest = max((min(own[a][1], nodes[b][1]) for a in own for b in nodes if b != a), default=0)
    if largest <= MD_RESERVE:
        return 0, 0
    total_all = sum(free for free, _ in nodes.values())
    total = min(total_all // 2, total_all - max(free for free, _ in nodes.values()),
                sum(free for free, _ in own.values()))
    return max(0, total - MD_RESERVE), largest - MD_RESERVE


def capacity_in_zone(by_zone: dict[str, dict[str, tuple[int, int]]], zone: str,
                     replica_zones: Sequence[str]) -> tuple[int, int]:
    """`capacity` for volumes of `zone` (by_zone: zone -> node -> as `capacity` takes them): the second leg may
    also go to the class's replicaZones."""
    other = {n: v for z in replica_zones if z != zone for n, v in by_zone.get(z, {}).items()}
    return capacity(by_zone.get(zone, {}), other)


def capacity_any_zone(by_zone: dict[str, dict[str, tuple[int, int]]],
                      replica_zones: Sequence[str]) -> tuple[int, int]:
    """GetCapacity for replicated volumes asked without a topology: a volume still pairs only within its zone
    (and the class's replicaZones), never two nodes of two other zones. Each zone as `capacity` counts it; the
    sum is bounded by all the nodes taken together, since a replicaZones node may serve several zones."""
    per_zone = [capacity_in_zone(by_zone, zone, replica_zones) for zone in by_zone]
    everything = {n: v for nodes in by_zone.values() for n, v in nodes.items()}
    return (min(sum(total for total, _ in per_zone), capacity(everything, {})[0]),
            max((largest for _, largest in per_zone), default=0))
