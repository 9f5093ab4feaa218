"""ListVolumes and ListSnapshots across the storage nodes, one bounded page at a time.

Order: storage node, then (vg, lv), which is also the order of each agent's own pages; a CSI page token is
the ID of the last entry of the page before. A page asks only the agents it needs, each for at most what is
left of the page (plus one, to know whether more follow). An agent that cannot answer fails the call: a
partial page would tell the external-attacher that the missing volumes are detached.
"""

from __future__ import annotations

from typing import Callable

from csi import capabilities, errors, ids
from csi.controller.agents import Agents
from csi.proto import agent_pb2 as apb

AGENT_PAGE = 500


def keep_volume(node: str, vol) -> bool:
    """ListVolumes shows a replicated volume once, where its leg 0 is: its other legs are not volumes."""
    return not capabilities.is_replica_leg(vol.attributes) or capabilities.replica_leg(vol.attributes) == 0


def walk(agents: Agents, kind: str, max_entries: int, token: str, default_page: int,
         nodes: list[str] | None = None, keep: Callable[[str, object], bool] = lambda node, item: True
         ) -> tuple[list[tuple[str, object]], str]:
    """(node, agent Volume or Snapshot) of one page, and the next page's token ("" after the last)."""
    if max_entries < 0:
        raise errors.invalid("max_entries must not be negative")
    after = None
    if token:
        after = ids.parse_id(token, kind=kind)
        if after is None:
            raise errors.aborted(f"starting_token {token[:100]!r} is not one this driver gave out")
    method, field, request = ("ListVolumes", "volumes", apb.ListVolumesRequest) if kind == "volume" else \
        ("ListSnapshots", "snapshots", apb.ListSnapshotsRequest)
    size = max_entries or default_page
    if nodes is None:
        nodes = [c.node.name for c in agents.all() if not agents.is_retired(c.node.name)]
    out: list[tuple[str, object]] = []
    for node in sorted(nodes):
        if after is not None and node < after.node:
            continue
        start = (after.vg, after.lv) if after is not None and node == after.node else None
        agent_token = f"{start[0]}/{start[1]}" if start else ""
        client = agents.get(node)
        while len(out) <= size:
            try:
                resp = client.call(method, request(max_entries=min(size + 1 - len(out), AGENT_PAGE),
                                                   starting_token=agent_token))
            except errors.CsiError as exc:
                raise errors.unavailable(f"cannot list {kind}s: {exc.message}") from None
            # An agent of the version before paging answers everything, unordered, with no token.
            items = sorted(getattr(resp, field), key=lambda i: (i.vg, i.lv))
            out += [(node, i) for i in items if (start is None or (i.vg, i.lv) > start) and keep(node, i)]
            if not resp.next_token:
                break
            agent_token = resp.next_token
        if len(out) > size:
            break
    page = out[:size]
    next_token = ""
    if len(out) > size:
        last_node, last = page[-1]
        next_token = ids.LvRef(last_node, last.vg, last.lv, kind).encode()
    return page, next_token
