"""`lvm-iscsi-csi status`: what `cinder service-list` and `cinder list` show, for this driver.

Agents up or down with their pools, capacity, fill level (with a warning above the pool's warn level) and
volume counts; then every volume. Never prints a CHAP secret: the agent API has none outside GrantAccess.
"""

from __future__ import annotations

import datetime
from typing import TextIO

from csi import errors, ids
from csi.config import ControllerConfig
from csi.controller.agents import Agents
from csi.proto import agent_pb2 as apb

GiB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}G"


def table(rows: list[list[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


ORPHAN_MIN_AGE = 600


def _agents(storage_nodes: str, tls_dir: str, server_name: str, cluster_id: str) -> Agents:
    return Agents(ControllerConfig.build(driver_name=ids.DRIVER_NAME, cluster_id=cluster_id,
                                         storage_nodes_file=storage_nodes, tls_dir=tls_dir,
                                         agent_server_name=server_name, default_size="1Gi"))


def status(storage_nodes: str, tls_dir: str, server_name: str, cluster_id: str, out: TextIO,
           min_age: int = ORPHAN_MIN_AGE) -> int:
    agents = _agents(storage_nodes, tls_dir, server_name, cluster_id)
    infos = agents.each(lambda a: a.info(timeout=20))
    lists = agents.each(lambda a: a.call("ListVolumes", apb.ListVolumesRequest(), timeout=30))
    rows = [["NODE", "ZONE", "STATE", "POOL", "TYPE", "SIZE", "USED%", "AVAILABLE", "VOLUMES", "NOTE"]]
    warnings = 0
    for client in agents.all():
        node = client.node
        info = infos[node.name]
        if isinstance(info, errors.CsiError):
            rows.append([node.name, node.zone or "-", "down", "-", "-", "-", "-", "-", "-", info.message[:60]])
            warnings += 1
            continue
        for p in info.pools:
            note = ""
            if p.thin_pool and max(p.data_percent, p.metadata_percent) >= p.max_fill_percent:
                note, warnings = "FULL: refuses new volumes", warnings + 1
            elif p.thin_pool and max(p.data_percent, p.metadata_percent) >= p.warn_fill_percent:
                note, warnings = f"WARNING: above {p.warn_fill_percent:.0f}%", warnings + 1
            kind = f"thin x{p.overprovision_ratio:g}" if p.thin_pool else "thick"
            rows.append([node.name, node.zone or "-", "up", p.name, kind, _gib(p.physical_total_bytes),
                         f"{p.data_percent:.1f}", _gib(p.available_bytes), str(p.volume_count), note])
    table(rows, out)
    out.write("\n")
    vrows = [["VOLUME ID", "NAME", "SIZE", "POOL", "ATTACHED TO", "STATE", "CREATED"]]
    for client in agents.all():
        result = lists[client.node.name]
        if isinstance(result, errors.CsiError):
            continue
        for v in result.volumes:
            created = datetime.datetime.fromtimestamp(v.created_unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
            vrows.append([ids.LvRef(client.node.name, v.vg, v.lv).encode(), v.name, _gib(v.size_bytes), v.pool,
                          ",".join(i.iqn.rsplit(":", 1)[-1] + (" (ro)" if i.read_only else "")
                                   for i in v.initiators) or "-",
                          "ok" if v.healthy else f"ABNORMAL: {v.condition}", created])
    if len(vrows) == 1:
        out.write("no volumes\n")
    else:
        table(vrows, out)
    found = _orphans(agents, min_age, remove=False)
    if found:
        out.write(f"\nORPHANS (older than {min_age}s, explained by no record; `lvm-iscsi-csi cleanup` removes "
                  "them):\n")
        table([["NODE", "KIND", "NAME", "AGE", "WHY"]] + found, out)
        warnings += 1
    return 1 if warnings else 0


def _orphans(agents: Agents, min_age: int, remove: bool) -> list[list[str]]:
    rows = []
    results = agents.each(lambda a: a.call("Orphans", apb.OrphansRequest(min_age_seconds=min_age, remove=remove),
                                           timeout=120))
    for node, result in results.items():
        if isinstance(result, errors.CsiError):
            continue
        for o in result.orphans:
            rows.append([node, o.kind, o.name, f"{o.age_seconds}s" if o.age_seconds >= 0 else "?",
                         o.reason + (" [removed]" if o.removed else "")])
    return rows


def cleanup(storage_nodes: str, tls_dir: str, server_name: str, cluster_id: str, out: TextIO, min_age: int,
            delete: bool) -> int:
    """Lists the orphans; removes them only with delete=True (dry run by default)."""
    agents = _agents(storage_nodes, tls_dir, server_name, cluster_id)
    rows = _orphans(agents, min_age, remove=delete)
    if not rows:
        out.write("no orphans\n")
        return 0
    table([["NODE", "KIND", "NAME", "AGE", "WHY"]] + rows, out)
    if not delete:
        out.write("\ndry run: nothing removed; run again with --delete to remove these\n")
    return 0
