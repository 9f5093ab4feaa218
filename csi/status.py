"""`lvm-iscsi-csi status`: what `cinder service-list` and `cinder list` show, for this driver.

Agents up or down with their pools, capacity, fill level (with a warning above the pool's warn level) and
volume counts; then every volume. Never prints a CHAP secret: the agent API has none outside GrantAccess.
"""

from __future__ import annotations

import datetime
from typing import TextIO

from csi import capabilities as caps
from csi import errors, ids, runner
from csi.config import ControllerConfig
from csi.controller import fleet
from csi.controller.agents import Agents
from csi.controller.placement import pages
from csi.node import raid
from csi.proto import agent_pb2 as apb

GiB = 1 << 30


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}G"


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def table(rows: list[list[str]], out: TextIO) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


ORPHAN_MIN_AGE = 600


def _agents(config: ControllerConfig) -> Agents:
    """The storage nodes the controller knows, from the same source (a file, or the labelled Nodes) and the
    same journal (nodes that left it but were never retired)."""
    return fleet.storage_nodes(config, fleet.open_journal(config), poll=False)


def _listing(client) -> list[apb.Volume] | errors.CsiError:
    """Every volume of one agent, page by page."""
    try:
        with runner.deadline(60):
            return list(pages(client, "ListVolumes", "volumes"))
    except errors.CsiError as exc:
        return exc


def status(config: ControllerConfig, out: TextIO, min_age: int = ORPHAN_MIN_AGE) -> int:
    return report(_agents(config), out, min_age)


def report(agents, out: TextIO, min_age: int = ORPHAN_MIN_AGE) -> int:
    """Prints the whole report; returns 1 when any line of it needs an operator's attention, else 0."""
    infos = agents.each(lambda a: a.info(timeout=20))
    lists = agents.each(_listing)
    rows = [["NODE", "ZONE", "STATE", "POOL", "TYPE", "SIZE", "USED%", "AVAILABLE", "VOLUMES", "NOTE"]]
    trouble = 0
    for client in agents.all():
        node = client.node
        info = infos[node.name]
        health = getattr(client, "health", None)
        unlisted = "" if health is None or health.listed else \
            "no longer listed as a storage node: retire it if it is gone for good"
        if isinstance(info, errors.CsiError):
            rows.append([node.name, node.zone or "-", "down", "-", "-", "-", "-", "-", "-",
                         (unlisted or info.message)[:80]])
            trouble += 1
            continue
        if unlisted:
            trouble += 1
        starting = info.not_ready_reason if not info.ready else ""   # serving; its start brings volumes back
        for p in info.pools:
            note = _join(unlisted, starting) if starting else unlisted
            if p.thin_pool and max(p.data_percent, p.metadata_percent) >= p.max_fill_percent:
                note, trouble = "FULL: refuses new volumes", trouble + 1
            elif p.thin_pool and max(p.data_percent, p.metadata_percent) >= p.warn_fill_percent:
                note, trouble = f"WARNING: above {p.warn_fill_percent:.0f}%", trouble + 1
            if p.wipe_error:
                note, trouble = _join(note, f"WIPE FAILING: {p.wipe_error}"), trouble + 1
            elif p.wiping_volumes:
                note = _join(note, f"wiping {p.wiping_volumes} volume(s), {_gib(p.wiping_bytes)} left")
            kind = f"thin x{p.overprovision_ratio:g}" if p.thin_pool else "thick"
            rows.append([node.name, node.zone or "-", "starting" if starting else "up", p.name, kind,
                         _gib(p.physical_total_bytes),
                         f"{p.data_percent:.1f}", _gib(p.available_bytes), str(p.volume_count), note])
    table(rows, out)
    out.write("\n")
    vrows = [["VOLUME ID", "NAME", "SIZE", "POOL", "ATTACHED TO", "STATE", "CREATED"]]
    legs: list[tuple[int, str, int, apb.LegSuperblock | None]] = []    # (row, key, leg index, its superblock)
    unlisted = []
    for client in agents.all():
        result = lists[client.node.name]
        if isinstance(result, errors.CsiError):
            if not isinstance(infos[client.node.name], errors.CsiError):
                unlisted.append(f"cannot list the volumes of {client.node.name}: {result.message[:80]}")
            continue
        for v in result:
            created = datetime.datetime.fromtimestamp(v.created_unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
            if v.healthy:
                state = "ok"
            elif v.copy_running:
                state = v.condition   # a copy on its way: progress, not trouble
            else:
                state, trouble = f"ABNORMAL: {v.condition}", trouble + 1
            vid = ids.LvRef(client.node.name, v.vg, v.lv).encode()
            if caps.is_replica_leg(v.attributes):
                # One row per leg, under the volume's own ID; what the worker's md wrote on each leg says whether
                # it is in the array (below); whether an operator outdated one is in the journal.
                vid = f"{ids.replicated_volume_id(v.lv)} leg {caps.replica_leg(v.attributes)} ({vid})"
                if v.healthy:
                    legs.append((len(vrows), v.lv, caps.replica_leg(v.attributes), _examine(client, v)))
            vrows.append([vid, v.name, _gib(v.size_bytes), v.pool,
                          ",".join(i.iqn.rsplit(":", 1)[-1] + (" (ro)" if i.read_only else "")
                                   for i in v.initiators) or "-", state, created])
    for row, state in _leg_states(legs).items():
        vrows[row][5] = state
        trouble += state.startswith("OUT OF ARRAY")
    if len(vrows) == 1:
        out.write("no volumes\n")
    else:
        table(vrows, out)
    for line in unlisted:
        out.write(f"ERROR: {line}\n")
        trouble += 1
    found, failed = _orphans(agents, min_age, remove=False)
    for node, message in failed.items():
        if not isinstance(infos[node], errors.CsiError):
            out.write(f"ERROR: cannot look for orphans on {node}: {message[:80]}\n")
            trouble += 1
    if found:
        out.write(f"\nORPHANS (older than {min_age}s, explained by no record; `lvm-iscsi-csi cleanup` removes "
                  "them):\n")
        table([["NODE", "KIND", "NAME", "AGE", "WHY"]] + found, out)
        trouble += 1
    return 1 if trouble else 0


def _examine(client, v: apb.Volume) -> apb.LegSuperblock | None:
    try:
        return client.call("ExamineLeg", apb.ExamineLegRequest(vg=v.vg, lv=v.lv))
    except errors.CsiError:
        return None      # an agent from before ExamineLeg, or the LV went meanwhile: the row says "ok"


def _leg_states(legs: list[tuple[int, str, int, apb.LegSuperblock | None]]) -> dict[int, str]:
    """The STATE of each healthy leg's row that its array's superblocks say more about: a leg being rebuilt,
    one that another leg's superblock shows failed (it missed writes), one that went on alone."""
    out = {}
    for row, key, index, sb in legs:
        if sb is None or not sb.present or sb.name != ids.md_name(key):
            continue
        peers = [p for _, k, i, p in legs if k == key and i != index and p is not None and p.present]
        if sb.recovering:
            out[row] = "resyncing: being rebuilt from the other leg"
        elif raid.went_on_alone(sb):
            out[row] = "ok, the other leg out of the array"
        elif any(raid.went_on_alone(p) for p in peers):
            out[row] = "OUT OF ARRAY: missed writes (the other leg's superblock shows it failed)"
    return out


def _orphans(agents, min_age: int, remove: bool) -> tuple[list[list[str]], dict[str, str]]:
    """(rows of orphans, error message per node that could not be asked)."""
    rows, failed = [], {}
    results = agents.each(lambda a: a.call("Orphans", apb.OrphansRequest(min_age_seconds=min_age, remove=remove),
                                           timeout=120))
    for node, result in results.items():
        if isinstance(result, errors.CsiError):
            failed[node] = result.message
            continue
        for o in result.orphans:
            rows.append([node, o.kind, o.name, f"{o.age_seconds}s" if o.age_seconds >= 0 else "?",
                         o.reason + (" [removed]" if o.removed else "")])
    return rows, failed


def cleanup(config: ControllerConfig, out: TextIO, min_age: int, delete: bool) -> int:
    """Lists the orphans; removes them only with delete=True (dry run by default)."""
    rows, failed = _orphans(_agents(config), min_age, remove=delete)
    for node, message in sorted(failed.items()):
        out.write(f"ERROR: cannot look for orphans on {node}: {message}\n")
    if not rows:
        out.write("no orphans\n")
        return 1 if failed else 0
    table([["NODE", "KIND", "NAME", "AGE", "WHY"]] + rows, out)
    if not delete:
        out.write("\ndry run: nothing removed; run again with --delete to remove these\n")
    return 1 if failed else 0



