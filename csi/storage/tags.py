"""The LV tags of this driver: what an LV says about itself, so that no database is needed.

Every LV of the driver carries `<prefix>/cluster=<id>` and `<prefix>/kind=volume|snapshot|transfer`, its
request name (base64url) and, for volumes, a digest of the request's attributes (a retried CreateVolume
finds its volume; a different request with the same name gets ALREADY_EXISTS). LVM allows tags of
[A-Za-z0-9_+.-/=!:&#], at most 1024 characters.
"""

from __future__ import annotations

import base64
import hashlib
import json

from csi import capabilities, ids
from csi.storage.lvm import LogicalVolume

CLUSTER = f"{ids.TAG_PREFIX}/cluster"
KIND = f"{ids.TAG_PREFIX}/kind"
NAME = f"{ids.TAG_PREFIX}/name"
REQUEST = f"{ids.TAG_PREFIX}/request"
SOURCE = f"{ids.TAG_PREFIX}/source"
CONTENT = f"{ids.TAG_PREFIX}/content"
ATTRS = f"{ids.TAG_PREFIX}/attrs"
LEG = f"{ids.TAG_PREFIX}/leg"        # on a snapshot of a replicated volume's leg: that leg's index
CREATED = f"{ids.TAG_PREFIX}/created"   # on a snapshot: seconds since the epoch when the agent made it
MAX_TAG = 1024


def tag(key: str, value: str) -> str:
    return f"{ids.TAG_PREFIX}/{key}={value}"


def attributes_digest(attributes: dict[str, str]) -> str:
    # The size is not part of it: a retry with another but compatible capacity range gets the volume.
    text = "\n".join(f"{k}={v}" for k, v in sorted(attributes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_name(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_name(encoded: str) -> str:
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode(errors="replace")


def attributes_tag(attributes: dict[str, str]) -> str | None:
    """The volume's attributes in a tag (JSON, base64url), so that its record can be rebuilt from the LV when
    the agent's state directory is lost (rebuild.py); None when they do not fit LVM's 1024 characters."""
    text = json.dumps(attributes, sort_keys=True, separators=(",", ":"))
    value = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    out = f"{ATTRS}={value}"
    return out if len(out) <= MAX_TAG else None


def attributes_of(lv: LogicalVolume) -> dict[str, str] | None:
    value = lv.tag(ATTRS)
    if not value:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except ValueError:
        return None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return None
    return data


def created(lv: LogicalVolume) -> int:
    """When the agent made the LV (its created tag), else LVM's lv_time (snapshots made before the tag)."""
    value = lv.tag(CREATED) or ""
    return int(value) if value.isdigit() else int(lv.created)


def is_ours(lv: LogicalVolume, cluster_id: str, kind: str = "volume") -> bool:
    """Ownership by exact fields: the LV's cluster tag equals this cluster's id, never a prefix of it. An LV
    being zeroed after its deletion (wipe.py) is no volume or snapshot any more, whatever its tags say."""
    return lv.tag(CLUSTER) == cluster_id and lv.tag(KIND) == kind and not ids.is_wipe_lv_name(lv.name)


def request_digests(attributes: dict[str, str]) -> set[str]:
    """Every digest an LV made for a request with these attributes may carry: today's, and the one the same
    request had before an encoding changed (so a CreateVolume retried across an upgrade finds its volume).
    Until the wipe parameter had its own value for "set to true", a class's wipe: "true" was stored as
    "true", the value that now means "not set" (keeping the digests of the requests that do not set it)."""
    out = {attributes_digest(attributes)}
    if attributes.get("wipe") == capabilities.WIPE_ON:
        out.add(attributes_digest(dict(attributes, wipe=capabilities.WIPE_UNSET)))
    return out
