"""The portal address picked from a network (--portal-cidr, chart value agent.portalCidr): csi/storage/netaddr.py.

recorded/ip_addr.json is real `ip -j addr show` output (iproute2 6.1.0, Debian 12), recorded in a throw-away
network namespace laid out as a storage node with a dedicated storage network: eno1 the node's management
address (192.168.10.21/24, fd00:10::21/64), eno2 the storage network (10.20.0.11/24, fd00:20::11/64), eno3 a
network with a second (secondary) address, 10.30.0.11 and 10.30.0.12; every interface up, so each also has
its IPv6 link-local address; peer1-3 are the far ends of the veth pairs, with link-local addresses only.
"""

from __future__ import annotations

import pytest

from csi.config import AgentConfig, ConfigError
from csi.storage import netaddr
from csi.storage.lio import Portal
from tests.unit.conftest import recorded

ADDRESSES = netaddr.parse_ip_addr(recorded("ip_addr.json"))


def test_parse_reads_every_address_of_every_interface():
    assert [(a.interface, a.ip, a.prefixlen, a.scope) for a in ADDRESSES if a.scope != "link"] == [
        ("lo", "127.0.0.1", 8, "host"), ("lo", "::1", 128, "host"),
        ("eno1", "192.168.10.21", 24, "global"), ("eno1", "fd00:10::21", 64, "global"),
        ("eno2", "10.20.0.11", 24, "global"), ("eno2", "fd00:20::11", 64, "global"),
        ("eno3", "10.30.0.11", 24, "global"), ("eno3", "10.30.0.12", 24, "global")]
    assert len([a for a in ADDRESSES if a.scope == "link"]) == 6


@pytest.mark.parametrize("cidr,portal", [
    ("10.20.0.0/24", "10.20.0.11:3260"),
    ("10.20.0.0/16", "10.20.0.11:3260"),
    ("10.20.0.99/24", "10.20.0.11:3260"),      # host bits set: the network they name
    ("192.168.10.0/24", "192.168.10.21:3260"),
    ("fd00:20::/64", "[fd00:20::11]:3260"),
    ("10.30.0.12/32", "10.30.0.12:3260"),
])
def test_the_one_address_in_the_network_is_the_portal(cidr, portal):
    assert netaddr.portal_for(cidr, 3260, ADDRESSES) == portal
    assert Portal.parse(portal)   # what AgentConfig makes of it


def test_no_address_in_the_network_is_an_error_listing_what_the_host_has():
    with pytest.raises(ValueError) as err:
        netaddr.address_in("10.99.0.0/16", ADDRESSES)
    text = str(err.value)
    assert "--portal-cidr 10.99.0.0/16: this host has no address in it" in text
    assert "10.20.0.11/24 on eno2" in text and "fd00:20::11/64 on eno2" in text
    assert "fe80" not in text and "127.0.0.1" not in text and "agent.portalCidr" in text


def test_several_addresses_in_the_network_is_an_error_naming_them():
    with pytest.raises(ValueError) as err:
        netaddr.address_in("10.30.0.0/24", ADDRESSES)
    text = str(err.value)
    assert "this host has 2 addresses in it (10.30.0.11/24 on eno3, 10.30.0.12/24 on eno3)" in text
    assert "the portal must be one" in text


@pytest.mark.parametrize("cidr", ["fe80::/10", "127.0.0.0/8x", "10.20.0.0/33", "storage", ""])
def test_link_local_loopback_and_nonsense_are_refused(cidr):
    with pytest.raises(ValueError):
        netaddr.address_in(cidr, ADDRESSES)


def test_loopback_counts_when_asked_for_by_name():
    # A single-node lab exports on 127.0.0.1: a loopback network names it on purpose.
    assert netaddr.address_in("127.0.0.0/8", ADDRESSES) == "127.0.0.1"


def _agent_yaml(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("pools: [{name: thin, vg: vg, thinPool: tp}]\ndevices: [/dev/sdb]\n")
    return str(path)


def _build(tmp_path, **kw):
    return AgentConfig.build(node_name="storage-1", listen="0.0.0.0:7600", state_dir=str(tmp_path),
                             cluster_id="c1", tls_dir=str(tmp_path), config_file=_agent_yaml(tmp_path), **kw)


def test_agent_config_finds_its_portal_with_ip_addr(fake_run, tmp_path):
    fake_run.on("ip", "-j", "addr", "show", stdout=recorded("ip_addr.json"))
    config = _build(tmp_path, portals=[], portal_cidrs=["10.20.0.0/24"], portal_port=3261)
    assert config.portals == (Portal("10.20.0.11", 3261),)
    assert fake_run.calls == [["ip", "-j", "addr", "show"]]
    # beside explicit portals, and once only when both name the same address
    config = _build(tmp_path, portals=["192.168.10.21:3260", "10.20.0.11:3260"], portal_cidrs=["10.20.0.0/24"])
    assert config.portals == (Portal("192.168.10.21", 3260), Portal("10.20.0.11", 3260))


def test_agent_config_without_a_portal_address_stops_with_the_reason(fake_run, tmp_path):
    fake_run.on("ip", "-j", "addr", "show", stdout=recorded("ip_addr.json"))
    with pytest.raises(ConfigError, match="10.30.0.0/24: this host has 2 addresses"):
        _build(tmp_path, portals=[], portal_cidrs=["10.30.0.0/24"])
    with pytest.raises(ConfigError, match="--portal .* or --portal-cidr"):
        _build(tmp_path, portals=[])


def test_explicit_portals_need_no_ip_command(fake_run, tmp_path):
    assert _build(tmp_path, portals=["10.0.0.5:3260"]).portals == (Portal("10.0.0.5", 3260),)
    assert fake_run.calls == []


def test_the_cli_takes_a_portal_cidr_instead_of_a_portal():
    from csi import cli
    a = cli.parser().parse_args(["agent", "--node-name", "s1", "--config", "c.yaml", "--tls-dir", "t",
                                 "--portal-cidr", "10.20.0.0/24", "--portal-port", "3261"])
    assert (a.portal, a.portal_cidr, a.portal_port) == (None, ["10.20.0.0/24"], 3261)
