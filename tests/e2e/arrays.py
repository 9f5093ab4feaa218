"""What the replicated-volume tests look at on a worker: its md arrays in /proc/mdstat."""

from __future__ import annotations

import re

from csi import ids

# The lab's storage nodes are each in a zone of their own (storage-1 zone-a, storage-2 zone-b) and the workers
# in zone-a reach both: the class allows the second leg in zone-b.
PARAMS = {"replicas": "2", "replicaZones": "zone-b"}


def mdstat(node) -> str:
    return node.run(["cat", "/proc/mdstat"], timeout=30).stdout


def array_line(node, key: str) -> str:
    """The status line of the volume's array ("[2/2] [UU]"), "" when it does not run there."""
    md = node.run(["readlink", "-f", f"/dev/md/csi-{ids.md_name(key).split(':')[1]}"], timeout=30).stdout.strip()
    name = md.rsplit("/", 1)[-1]
    text = mdstat(node)
    m = re.search(rf"^{re.escape(name)} : .*\n\s+\d+ blocks.*(\[\d/\d\] \[[U_]+\])", text, re.M) if name else None
    return m.group(1) if m else ""


def synced(node, key: str) -> bool:
    text = mdstat(node)
    return array_line(node, key) == "[2/2] [UU]" and "recovery" not in text and "resync" not in text
