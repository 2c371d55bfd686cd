"""WireGuard configs: Debian's wg-quick parses every file, `wg pubkey` derives the public keys the peers name, keys
are distinct and paired hub ↔ site, and files are 0600 and never overwritten."""

from __future__ import annotations

import ipaddress
import re
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fednested.cli import app
from fednested.infra.endpoint import Endpoint
from fednested.infra.wireguard import (
    VpnConfigError,
    VpnOptions,
    public_key_of,
    write_vpn_configs,
)
from tests.fednested.infra.haproxy_process import require_tool

runner = CliRunner()


def sections(text: str) -> list[dict[str, str]]:
    """Each [Interface]/[Peer] section as {key: value} ('section' holds its name)."""
    found: list[dict[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            found.append({"section": line.strip("[]")})
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[-1][key.strip()] = value.strip()
    return found


def wg_quick_strip(path: Path) -> str:
    """What `wg-quick strip` makes of `path`: it refuses files it cannot parse and warns about loose permissions."""
    wg_quick = require_tool("wg-quick", "wireguard-tools")
    result = subprocess.run([wg_quick, "strip", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # e.g. "Warning: ... is world accessible"
    return result.stdout


def wg_pubkey(private_key: str) -> str:
    wg = require_tool("wg", "wireguard-tools")
    result = subprocess.run([wg, "pubkey"], input=private_key, capture_output=True, text=True, timeout=30, check=True)
    return result.stdout.strip()


def test_cli_writes_hub_and_site_configs_that_wireguard_tools_accept(tmp_path: Path) -> None:
    out = tmp_path / "vpn"
    result = runner.invoke(
        app,
        ["infra", "generate-vpn-config", "--sites", "3", "--hub-endpoint", "hub.example.org:51820", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    files = sorted(path.name for path in out.iterdir())
    assert files == ["wg-hub.conf", "wg-site-001.conf", "wg-site-002.conf", "wg-site-003.conf"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700

    parsed: dict[str, list[dict[str, str]]] = {}
    for name in files:
        path = out / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        stripped = wg_quick_strip(path)
        # wg-quick's own keys are gone from what `wg setconf` would get; WireGuard's own stay.
        assert "Address" not in stripped
        assert "PrivateKey" in stripped
        parsed[name] = sections(path.read_text())

    hub_interface, *hub_peers = parsed["wg-hub.conf"]
    assert hub_interface == {
        "section": "Interface",
        "Address": "10.77.0.1/24",
        "ListenPort": "51820",
        "PrivateKey": hub_interface["PrivateKey"],
    }
    hub_public = wg_pubkey(hub_interface["PrivateKey"])
    assert hub_public == public_key_of(hub_interface["PrivateKey"])
    assert len(hub_peers) == 3

    private_keys = {hub_interface["PrivateKey"]}
    for index, peer in enumerate(hub_peers, start=1):
        interface, hub = parsed[f"wg-site-{index:03d}.conf"]
        private_keys.add(interface["PrivateKey"])
        # The hub's peer entry names this site's key, address and preshared key; the site names the hub's.
        assert peer["PublicKey"] == wg_pubkey(interface["PrivateKey"])
        assert peer["AllowedIPs"] == f"10.77.0.{index + 1}/32"
        assert interface["Address"] == f"10.77.0.{index + 1}/24"
        assert hub["PublicKey"] == hub_public
        assert hub["PresharedKey"] == peer["PresharedKey"]
        assert hub["Endpoint"] == "hub.example.org:51820"
        assert hub["AllowedIPs"] == "10.77.0.1/32"
        assert hub["PersistentKeepalive"] == "25"
    assert len(private_keys) == 4
    assert len({peer["PresharedKey"] for peer in hub_peers}) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9+/]{43}=", key) for key in private_keys)


def test_without_preshared_keys_with_ipv6_and_wider_site_routes(tmp_path: Path) -> None:
    options = VpnOptions(
        sites=2,
        hub_endpoint=Endpoint("2001:db8::1", 51820),
        network=ipaddress.ip_network("fd77::/64"),
        persistent_keepalive_s=0,
        preshared_keys=False,
        site_allowed_ips=(ipaddress.ip_network("fd77::/64"), ipaddress.ip_network("192.168.50.0/24")),
    )
    _, paths = write_vpn_configs(options, tmp_path / "vpn")
    for path in paths:
        wg_quick_strip(path)
        assert "PresharedKey" not in path.read_text()
    interface, hub = sections((tmp_path / "vpn" / "wg-site-002.conf").read_text())
    assert interface["Address"] == "fd77::3/64"
    assert hub["Endpoint"] == "[2001:db8::1]:51820"
    assert hub["AllowedIPs"] == "fd77::/64, 192.168.50.0/24"
    assert "PersistentKeepalive" not in hub


def test_refuses_to_overwrite_and_to_overfill_the_network(tmp_path: Path) -> None:
    args = ["infra", "generate-vpn-config", "--sites", "1", "--hub-endpoint", "10.0.0.1:51820", "--out"]
    assert runner.invoke(app, [*args, str(tmp_path / "vpn")]).exit_code == 0
    before = (tmp_path / "vpn" / "wg-hub.conf").read_text()
    again = runner.invoke(app, [*args, str(tmp_path / "vpn")])
    assert again.exit_code == 1
    assert "wg-hub.conf, wg-site-001.conf already exist" in again.stderr
    assert (tmp_path / "vpn" / "wg-hub.conf").read_text() == before

    # A /30 holds the network address, the hub, one site and the broadcast address.
    VpnOptions(sites=1, hub_endpoint=Endpoint("h", 1), network=ipaddress.ip_network("10.0.0.0/30"))
    with pytest.raises(VpnConfigError, match="4 addresses cannot hold the hub and 2 sites"):
        VpnOptions(sites=2, hub_endpoint=Endpoint("h", 1), network=ipaddress.ip_network("10.0.0.0/30"))
    bad = runner.invoke(app, [*args[:-1], "--network", "10.0.0.1/24", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1
    assert "--network: '10.0.0.1/24' is not a network in CIDR form" in bad.stderr
    assert not (tmp_path / "x").exists()
