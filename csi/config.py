"""Configuration of each role: frozen dataclasses, built once at start from flags and YAML, validated then.

Nothing here runs at import time; a wrong value stops the process at start with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from csi import ids
from csi.storage import netaddr
from csi.storage.lio import Portal


class ConfigError(ValueError):
    pass


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top")
    return data


def _only(data: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


# ---------------------------------------------------------------------------------------------- agent

@dataclass(frozen=True)
class PoolConfig:
    name: str
    vg: str
    thin_pool: str = ""
    overprovision_ratio: float = 1.0
    max_fill_percent: float = 90.0
    warn_fill_percent: float = 80.0

    @property
    def thin(self) -> bool:
        return bool(self.thin_pool)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PoolConfig":
        _only(d, {"name", "vg", "thinPool", "overprovisionRatio", "maxFillPercent", "warnFillPercent"}, "pool")
        try:
            pool = cls(name=str(d["name"]), vg=str(d["vg"]), thin_pool=str(d.get("thinPool") or ""),
                       overprovision_ratio=float(d.get("overprovisionRatio", 1.0)),
                       max_fill_percent=float(d.get("maxFillPercent", 90.0)),
                       warn_fill_percent=float(d.get("warnFillPercent", 80.0)))
        except KeyError as exc:
            raise ConfigError(f"pool: {exc.args[0]} is required") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"pool {d.get('name')}: {exc}") from None
        if not pool.name or not all(c.isalnum() or c in "-_." for c in pool.name):
            raise ConfigError(f"pool name {pool.name!r}: letters, digits, '-', '_' and '.'")
        for what in ("vg", "thin_pool"):
            value = getattr(pool, what)
            if value:
                try:
                    ids.check_lvm_name(value, what)
                except Exception as exc:  # noqa: BLE001 - a CsiError here is a config error
                    raise ConfigError(str(exc)) from None
        if pool.overprovision_ratio < 1.0 or (not pool.thin and pool.overprovision_ratio != 1.0):
            raise ConfigError(f"pool {pool.name}: overprovisionRatio must be >= 1, and 1 for a thick pool")
        if not 0 < pool.warn_fill_percent <= pool.max_fill_percent <= 100:
            raise ConfigError(f"pool {pool.name}: need 0 < warnFillPercent <= maxFillPercent <= 100")
        return pool


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    listen: str
    portals: tuple[Portal, ...]
    state_dir: Path
    cluster_id: str
    tls_dir: Path
    pools: tuple[PoolConfig, ...]
    devices: tuple[str, ...]
    wipe_thick: bool = True

    def pool(self, name: str) -> PoolConfig | None:
        return next((p for p in self.pools if p.name == name), None)

    @classmethod
    def build(cls, *, node_name: str, listen: str, portals: list[str], state_dir: str, cluster_id: str,
              tls_dir: str, config_file: str, portal_cidrs: list[str] = (), portal_port: int = 3260
              ) -> "AgentConfig":
        """portals: ip:port each; portal_cidrs: networks in which this host's own address is a portal (at
        portal_port), found now with `ip addr`: exactly one address per network, or a ConfigError."""
        data = _load_yaml(Path(config_file))
        _only(data, {"pools", "devices", "wipeThick"}, config_file)
        pools = tuple(PoolConfig.from_dict(p) for p in data.get("pools") or [])
        if not pools:
            raise ConfigError(f"{config_file}: at least one pool is required")
        if len({p.name for p in pools}) != len(pools):
            raise ConfigError(f"{config_file}: pool names must be unique")
        devices = tuple(str(d) for d in data.get("devices") or [])
        if not devices:
            raise ConfigError(f"{config_file}: 'devices' must list the PV devices LVM may scan (e.g. /dev/sdb)")
        try:
            ids.check_cluster_id(cluster_id)
            ids.check_node_name(node_name)
            if not 0 < portal_port < 65536:
                raise ValueError(f"--portal-port {portal_port}: expected 1-65535")
            if portal_cidrs:
                addresses = netaddr.host_addresses()
                portals = [*portals, *(netaddr.portal_for(c, portal_port, addresses) for c in portal_cidrs)]
            parsed = tuple(dict.fromkeys(Portal.parse(p) for p in portals))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not parsed:
            raise ConfigError("at least one --portal (ip:port) or --portal-cidr (a network) is required")
        return cls(node_name, listen, parsed, Path(state_dir), cluster_id, Path(tls_dir), pools, devices,
                   bool(data.get("wipeThick", True)))


# ---------------------------------------------------------------------------------------------- controller

@dataclass(frozen=True)
class StorageNode:
    name: str
    address: str
    zone: str


@dataclass(frozen=True)
class ControllerConfig:
    driver_name: str
    cluster_id: str
    storage_nodes: tuple[StorageNode, ...]     # from the static file; empty with discovery from Kubernetes
    tls_dir: Path
    default_size: int = 1 << 30
    # Where the storage nodes come from: the static file above, or Nodes with this label (Kubernetes).
    storage_node_label: str = ""
    agent_port: int = 7600
    # The placement journal: a directory (outside a cluster), or ConfigMaps in this namespace.
    journal_dir: Path | None = None
    journal_namespace: str = ""
    adoption_settle: float = 0.0
    # Which node an initiator name belongs to: this file (nodes: [{name, iqn}]), else the CSINode objects.
    node_directory: Path | None = None

    def node(self, name: str) -> StorageNode | None:
        return next((n for n in self.storage_nodes if n.name == name), None)

    @classmethod
    def build(cls, *, driver_name: str, cluster_id: str, storage_nodes_file: str, tls_dir: str,
              default_size: str, storage_node_label: str = "", agent_port: int = 7600,
              journal_dir: str = "", journal_namespace: str = "", adoption_settle: float = 0.0,
              node_directory: str = "") -> "ControllerConfig":
        if bool(storage_nodes_file) == bool(storage_node_label):
            raise ConfigError("give exactly one of --storage-nodes (a file) and --storage-node-label (Kubernetes)")
        if bool(journal_dir) == bool(journal_namespace):
            raise ConfigError("give exactly one of --journal-dir (a directory) and --journal-namespace (Kubernetes)")
        nodes = load_storage_nodes(storage_nodes_file) if storage_nodes_file else ()
        try:
            ids.check_cluster_id(cluster_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 0 < agent_port < 65536:
            raise ConfigError(f"--agent-port {agent_port}: not a port")
        if adoption_settle < 0:
            raise ConfigError("--adoption-settle must not be negative")
        return cls(driver_name, cluster_id, nodes, Path(tls_dir), parse_size(default_size),
                   storage_node_label, agent_port, Path(journal_dir) if journal_dir else None, journal_namespace,
                   adoption_settle, Path(node_directory) if node_directory else None)


def load_storage_nodes(path: str) -> tuple[StorageNode, ...]:
    """The static list of storage nodes (the lab, the demo, a cluster without discovery)."""
    data = _load_yaml(Path(path))
    _only(data, {"storageNodes"}, path)
    nodes = []
    for item in data.get("storageNodes") or []:
        _only(item, {"name", "address", "zone"}, "storageNodes[]")
        try:
            nodes.append(StorageNode(ids.check_node_name(str(item["name"])), str(item["address"]),
                                     str(item.get("zone") or "")))
        except KeyError as exc:
            raise ConfigError(f"storageNodes[]: {exc.args[0]} is required") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if len({n.name for n in nodes}) != len(nodes):
        raise ConfigError(f"{path}: storage node names must be unique")
    return tuple(nodes)


# ---------------------------------------------------------------------------------------------- node

@dataclass(frozen=True)
class NodeConfig:
    driver_name: str
    node_name: str
    kubelet_dir: Path
    initiator_name_file: Path
    zone: str | None
    max_volumes: int
    state_dir: Path
    tls_dir: Path | None = None   # this node's certificate: asks the agents for its volumes' credentials
    iscsiadm: str = "image"       # "host": the host's own iscsiadm, through nsenter (csi/node/iscsiadm_mode.py)

    @classmethod
    def build(cls, *, driver_name: str, node_name: str, kubelet_dir: str, initiator_name_file: str,
              zone: str | None, max_volumes: int, state_dir: str | None, tls_dir: str = "",
              iscsiadm: str = "image") -> "NodeConfig":
        kubelet = Path(kubelet_dir).resolve()
        state = Path(state_dir) if state_dir else kubelet / "plugins" / driver_name / "staged"
        if max_volumes < 1:
            raise ConfigError("--max-volumes must be at least 1")
        from csi.node.iscsiadm_mode import MODES
        if iscsiadm not in MODES:
            raise ConfigError(f"--iscsiadm {iscsiadm!r}: image (the image's own) or host (the host's, through "
                              "nsenter)")
        return cls(driver_name, node_name, kubelet, Path(initiator_name_file), zone, max_volumes, state,
                   Path(tls_dir) if tls_dir else None, iscsiadm)


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """'1Gi', '512Mi', '1073741824' -> bytes (Kubernetes quantity suffixes)."""
    t = text.strip()
    num = t.rstrip("KMGTiBbkmgt")
    unit = t[len(num):].lower()
    if unit not in _UNITS or not num.isdigit():
        raise ConfigError(f"size {text!r}: expected e.g. 1Gi, 512Mi or a number of bytes")
    return int(num) * _UNITS[unit]
