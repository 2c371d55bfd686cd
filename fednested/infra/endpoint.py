"""`HOST:PORT` endpoints as the infra commands take them (`--bind`, `--backend`, `--hub-endpoint`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# A DNS name: labels of letters, digits and hyphens. Anything else (spaces, quotes, `#`) could break the config
# file it is written into.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class EndpointError(ValueError):
    """An endpoint that is not `HOST:PORT`; the message names the option and what was wrong."""


@dataclass(frozen=True)
class Endpoint:
    """A host (IPv4, IPv6 or DNS name) and a TCP/UDP port."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def parse_endpoint(text: str, *, what: str) -> Endpoint:
    """`HOST:PORT` (IPv6 as `[ADDR]:PORT`) → Endpoint; EndpointError naming `what` otherwise."""
    raw = text.strip()
    if raw.startswith("["):
        host, separator, port_text = raw[1:].partition("]:")
        if not separator:
            raise EndpointError(f"{what}: {text!r} is not [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise EndpointError(f"{what}: {host!r} inside [...] is not an IPv6 address") from None
    else:
        host, separator, port_text = raw.rpartition(":")
        if not separator or not host:
            raise EndpointError(f"{what}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:8443; IPv6 as [::1]:8443)")
        if ":" in host:
            raise EndpointError(f"{what}: write the IPv6 address {host!r} in brackets: [{host}]:{port_text}")
        if not _is_ipv4(host) and not _HOSTNAME.match(host):
            raise EndpointError(f"{what}: {host!r} is neither an IPv4 address nor a DNS name")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise EndpointError(f"{what}: port {port_text!r} must be a number from 1 to 65535")
    return Endpoint(host=host, port=int(port_text))


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True
