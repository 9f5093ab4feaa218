"""The storage node's own addresses (`ip -j addr show`), and the one that a portal CIDR picks among them.

A storage node with a dedicated storage network exports its volumes there, not on the address Kubernetes knows it
by: the agent is given the network (--portal-cidr 10.20.0.0/24) and finds its own address in it at start. Every
storage node can then share one setting while each gets its own portal address.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from csi import runner


@dataclass(frozen=True)
class HostAddress:
    interface: str
    ip: str
    prefixlen: int
    scope: str

    def __str__(self) -> str:
        return f"{self.ip}/{self.prefixlen} on {self.interface}"


def parse_ip_addr(text: str) -> list[HostAddress]:
    """The addresses in `ip -j addr show` output, in its order."""
    out = []
    for link in json.loads(text or "[]"):
        for a in link.get("addr_info") or []:
            if a.get("family") in ("inet", "inet6") and a.get("local"):
                out.append(HostAddress(link.get("ifname", "?"), a["local"], int(a.get("prefixlen", 0)),
                                       a.get("scope", "")))
    return out


def host_addresses() -> list[HostAddress]:
    return parse_ip_addr(runner.run(["ip", "-j", "addr", "show"], timeout=10).stdout)


def parse_cidr(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise ValueError(f"--portal-cidr {cidr[:100]!r} is not a network (e.g. 10.20.0.0/24)") from None


def address_in(cidr: str, addresses: list[HostAddress]) -> str:
    """The one address of this host inside `cidr`; ValueError saying what it found when that is not exactly one.

    Link-local addresses (fe80::/10, 169.254/16) do not count: an initiator could not reach them without
    naming an interface."""
    network = parse_cidr(cidr)
    usable = [a for a in addresses if a.scope not in ("link", "host") or network.is_loopback]
    found = [a for a in usable if ipaddress.ip_address(a.ip) in network]
    if len(found) == 1:
        return found[0].ip
    mine = ", ".join(str(a) for a in usable) or "none"
    if not found:
        raise ValueError(f"--portal-cidr {network}: this host has no address in it (its addresses: {mine}). "
                         "Give the storage network's interface an address in that network, or correct the CIDR "
                         "(chart value agent.portalCidr)")
    raise ValueError(f"--portal-cidr {network}: this host has {len(found)} addresses in it "
                     f"({', '.join(str(a) for a in found)}) and the portal must be one: remove the extra address "
                     "(or move it out of that network), or choose a CIDR that holds exactly one address of each "
                     "storage node")


def portal_for(cidr: str, port: int, addresses: list[HostAddress] | None = None) -> str:
    """ip:port (IPv6 in brackets) of this host's portal in `cidr`."""
    ip = address_in(cidr, host_addresses() if addresses is None else addresses)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
