"""Which node an initiator name (the CSI node_id) belongs to, from a source the node itself cannot forge for
another node.

A grant names its node, and the agent gives the grant's CHAP credentials only to that node's plugin
(storage/access.py), so the binding must not come from the request. In a cluster it comes from the CSINode
objects: each node's kubelet writes spec.drivers[].nodeID for its own node only (NodeRestriction), so a
compromised worker can claim another's initiator name only in its own CSINode, and then the name is found
twice and refused. Outside a cluster (the lab, the demo, csi-sanity) it comes from a static file.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from csi import errors, ids
from csi.config import ConfigError, _load_yaml, _only

log = logging.getLogger(__name__)

REFRESH = 30.0


def _lower(iqn: str) -> str:
    return ids.normalize_iqn(iqn) or iqn


class StaticNodes:
    """nodes: [{name, iqn}] in a YAML file."""

    def __init__(self, path: Path):
        data = _load_yaml(path)
        _only(data, {"nodes"}, str(path))
        self._by_iqn: dict[str, list[str]] = {}
        for item in data.get("nodes") or []:
            _only(item, {"name", "iqn"}, "nodes[]")
            try:
                name, iqn = ids.check_node_name(str(item["name"])), _lower(str(item["iqn"]))
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{path}: nodes[]: {exc}") from None
            self._by_iqn.setdefault(iqn, []).append(name)

    def node_of(self, iqn: str) -> str:
        return _one(iqn, self._by_iqn.get(_lower(iqn), []))

    def iqn_of(self, node: str) -> str | None:
        return next((iqn for iqn, names in self._by_iqn.items() if node in names), None)


class CsiNodes:
    """The CSINode objects of this driver, listed again when a name is not known (a node that just joined)
    or the listing is older than REFRESH seconds."""

    def __init__(self, driver_name: str, api=None):
        if api is None:
            from kubernetes import client
            api = client.StorageV1Api()
        self.api = api
        self.driver = driver_name
        self._by_iqn: dict[str, list[str]] = {}
        self._at = 0.0
        self._mutex = threading.Lock()

    def _refresh(self) -> None:
        by_iqn: dict[str, list[str]] = {}
        try:
            listing = self.api.list_csi_node(_request_timeout=30)
        except Exception as exc:  # noqa: BLE001 - the API server away: say so, the CO retries
            raise errors.unavailable(f"cannot read the CSINode objects: {exc}") from None
        for item in listing.items:
            for d in (item.spec.drivers or []) if item.spec else []:
                if d.name == self.driver and d.node_id:
                    by_iqn.setdefault(_lower(d.node_id), []).append(item.metadata.name)
        with self._mutex:
            self._by_iqn, self._at = by_iqn, time.monotonic()

    def node_of(self, iqn: str) -> str:
        key = _lower(iqn)
        with self._mutex:
            names, fresh = self._by_iqn.get(key), time.monotonic() - self._at < REFRESH
        if names is None or not fresh:
            self._refresh()
            with self._mutex:
                names = self._by_iqn.get(key, [])
        return _one(iqn, names)


    def iqn_of(self, node: str) -> str | None:
        """The initiator name a node's CSINode gives (lower-cased), or None."""
        self._refresh()
        with self._mutex:
            return next((iqn for iqn, names in self._by_iqn.items() if node in names), None)


def _one(iqn: str, names: list[str]) -> str:
    if not names:
        raise errors.not_found(f"node {iqn!r} does not exist: no node of this driver has that initiator name")
    if len(set(names)) > 1:
        log.error("initiator name %s is claimed by nodes %s: refusing to grant it to any", iqn, sorted(set(names)))
        claimants = ", ".join(sorted(set(names)))
        raise errors.precondition(f"initiator name {iqn!r} is claimed by several nodes ({claimants}):"
                                  " no grant until only one does")
    return names[0]
