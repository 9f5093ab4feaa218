"""Statistics shared by the benches (bench.py, scale.py, stage.py)."""

from __future__ import annotations

import ast
import math
import re
from collections import defaultdict

# csi.runner's debug line for each external command (bench/hook turns them on in a daemon)
RAN = re.compile(r" ran (\[.*\]) rc=-?\d+ in ([\d.]+)s$", re.M)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, interpolated linearly between the two nearest ranks."""
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def tally(events) -> dict[str, tuple[int, float]]:
    """(label, seconds) events -> label: (calls, seconds)."""
    out: dict[str, tuple[int, float]] = defaultdict(lambda: (0, 0.0))
    for label, seconds in events:
        n, total = out[label]
        out[label] = (n + 1, total + seconds)
    return dict(out)


def commands(log_text: str, label) -> dict[str, tuple[int, float]]:
    """The external commands a daemon's log shows it ran: label(argv) -> (calls, seconds)."""
    return tally((label(ast.literal_eval(m[1])), float(m[2])) for m in RAN.finditer(log_text))


def log_size(node, daemon: str) -> int:
    """Bytes in a lab daemon's log now (a LabNode's). Read through the guest: it wrote the file over hostfs and
    its view is the complete one."""
    return int(node.run(["stat", "-c", "%s", str(node.log_path(daemon))], timeout=30, check=True).stdout)


def log_since(node, daemon: str, offset: int) -> str:
    return node.run(["tail", "-c", f"+{offset + 1}", str(node.log_path(daemon))], timeout=60, check=True).stdout
