"""WireGuard configs joining the federation's sites to the control plane's hub: one hub config with a [Peer] per site,
one config per site pointing at the hub. Keys are made here (X25519, base64 of the raw 32 bytes, as `wg genkey`),
so no private key crosses the network; each site's file must reach its site over a channel you trust.

`plan_vpn` draws the keys and addresses; `render_hub_config` / `render_site_config` are pure functions of the plan.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fednested.infra.endpoint import Endpoint

HUB_FILE = "wg-hub.conf"
# wg-quick names the interface after the file: at most 15 characters of [a-zA-Z0-9_=+.-] before `.conf`.
SITE_FILE_PREFIX = "wg-site-"
MAX_SITES = 9999

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class VpnConfigError(ValueError):
    """Options the VPN configs cannot be made from; the message names the option and what to do."""


@dataclass(frozen=True)
class VpnOptions:
    """A hub-and-spoke WireGuard network: the hub (the control plane's host) and `sites` edge sites."""

    sites: int = field(metadata={"help": "How many site configs to make."})
    hub_endpoint: Endpoint = field(metadata={"help": "HOST:PORT sites reach the hub at (its UDP ListenPort)."})
    network: IPNetwork = field(metadata={"help": "The VPN's addresses: the hub takes the first, sites the next."})
    persistent_keepalive_s: int = field(
        default=25, metadata={"help": "Keepalive from sites (seconds; 0: none), so NAT keeps the path to them open."}
    )
    preshared_keys: bool = field(
        default=True, metadata={"help": "A preshared key per site (a symmetric layer on top of X25519)."}
    )
    site_allowed_ips: tuple[IPNetwork, ...] = field(
        default=(),
        metadata={
            "help": "What sites route into the tunnel; default: the hub's address only (sites never see each other)."
        },
    )

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= MAX_SITES:
            raise VpnConfigError(f"--sites: must be from 1 to {MAX_SITES}, got {self.sites}")
        # The hub, the sites, and for IPv4 the network and broadcast addresses.
        needed = self.sites + 1 + (2 if self.network.version == 4 else 1)
        if self.network.num_addresses < needed:
            raise VpnConfigError(
                f"--network {self.network}: {self.network.num_addresses} addresses cannot hold the hub and "
                f"{self.sites} sites; use a larger network (a shorter prefix)"
            )
        if not 0 <= self.persistent_keepalive_s <= 65535:
            raise VpnConfigError(f"--keepalive: must be 0 to 65535 seconds, got {self.persistent_keepalive_s}")


@dataclass(frozen=True)
class KeyPair:
    """A WireGuard key pair, both halves base64 of the raw 32 bytes."""

    private: str
    public: str


def generate_key_pair() -> KeyPair:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair(private=base64.b64encode(private).decode(), public=base64.b64encode(public).decode())


def public_key_of(private_key: str) -> str:
    """The public half of a base64 private key (what `wg pubkey` prints)."""
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key, validate=True))
    return base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


@dataclass(frozen=True)
class Node:
    """The hub or one site: its name, VPN address, keys, and (sites) the key it shares with the hub."""

    name: str
    address: IPAddress
    keys: KeyPair
    preshared_key: str | None = None


@dataclass(frozen=True)
class VpnPlan:
    hub: Node
    sites: tuple[Node, ...]


def site_name(index: int) -> str:
    return f"site-{index:03d}"


def config_file_name(node: Node, hub: Node) -> str:
    return HUB_FILE if node is hub else f"wg-{node.name}.conf"


def plan_vpn(options: VpnOptions) -> VpnPlan:
    """Addresses in order (hub first) and fresh keys for every node."""
    base = options.network.network_address
    hub = Node(name="hub", address=base + 1, keys=generate_key_pair())
    sites = tuple(
        Node(
            name=site_name(index),
            address=base + 1 + index,
            keys=generate_key_pair(),
            preshared_key=base64.b64encode(secrets.token_bytes(32)).decode() if options.preshared_keys else None,
        )
        for index in range(1, options.sites + 1)
    )
    return VpnPlan(hub=hub, sites=sites)


def _header(role: str) -> list[str]:
    return [
        f"# fednested VPN {role}, written by `fednested infra generate-vpn-config`.",
        "# It holds a private key: keep it mode 0600 and copy it only to its own machine.",
    ]


def render_hub_config(options: VpnOptions, plan: VpnPlan) -> str:
    lines = [
        *_header("hub"),
        "[Interface]",
        f"Address = {plan.hub.address}/{options.network.prefixlen}",
        f"ListenPort = {options.hub_endpoint.port}",
        f"PrivateKey = {plan.hub.keys.private}",
    ]
    for site in plan.sites:
        lines += ["", "[Peer]", f"# {site.name}", f"PublicKey = {site.keys.public}"]
        if site.preshared_key is not None:
            lines.append(f"PresharedKey = {site.preshared_key}")
        # A site may send from its own address only.
        lines.append(f"AllowedIPs = {site.address}/{site.address.max_prefixlen}")
    return "\n".join(lines) + "\n"


def render_site_config(options: VpnOptions, plan: VpnPlan, site: Node) -> str:
    allowed = options.site_allowed_ips or (
        ipaddress.ip_network(f"{plan.hub.address}/{plan.hub.address.max_prefixlen}"),
    )
    lines = [
        *_header(site.name),
        "[Interface]",
        f"Address = {site.address}/{options.network.prefixlen}",
        f"PrivateKey = {site.keys.private}",
        "",
        "[Peer]",
        "# hub",
        f"PublicKey = {plan.hub.keys.public}",
    ]
    if site.preshared_key is not None:
        lines.append(f"PresharedKey = {site.preshared_key}")
    lines += [f"Endpoint = {options.hub_endpoint}", f"AllowedIPs = {', '.join(str(net) for net in allowed)}"]
    if options.persistent_keepalive_s:
        lines.append(f"PersistentKeepalive = {options.persistent_keepalive_s}")
    return "\n".join(lines) + "\n"


def write_vpn_configs(options: VpnOptions, directory: Path) -> tuple[VpnPlan, list[Path]]:
    """Plan the VPN and write its configs (mode 0600) into `directory` (made 0700); refuses to overwrite any file,
    since a config replaced on one side only would cut that site off."""
    plan = plan_vpn(options)
    files = {config_file_name(plan.hub, plan.hub): render_hub_config(options, plan)}
    for site in plan.sites:
        files[config_file_name(site, plan.hub)] = render_site_config(options, plan, site)
    existing = [name for name in files if (directory / name).exists()]
    if existing:
        raise VpnConfigError(
            f"--out {directory}: {', '.join(existing[:3])}{' …' if len(existing) > 3 else ''} already exist; "
            "pick an empty directory (replacing keys on one side only would cut sites off)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    for name, text in files.items():
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        written.append(path)
    return plan, written
