"""`fednested infra ...`: write the edge's deployment files — the HAProxy config in front of the control plane and
the WireGuard configs of the hub and its sites — and push a new CRL into a running HAProxy."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from fednested.cli.errors import fail
from fednested.infra.endpoint import EndpointError, parse_endpoint
from fednested.infra.haproxy import (
    HAProxyOptions,
    InfraConfigError,
    check_config,
    check_tls_files,
    push_crl,
    read_proxy_secret,
    render_haproxy_config,
    write_certificate_bundle,
    write_private_file,
)
from fednested.infra.wireguard import VpnConfigError, VpnOptions, config_file_name, write_vpn_configs

infra_app = typer.Typer(help="Deployment files of the federation's edge: HAProxy (mTLS) and WireGuard.")


def _help(options: type[Any], name: str) -> str:
    """The help text the options dataclass declares for `name`, so the CLI never restates it."""
    return str(options.__dataclass_fields__[name].metadata["help"])


def _default(options: type[Any], name: str) -> Any:
    return options.__dataclass_fields__[name].default


@infra_app.command("generate-haproxy-config")
def generate_haproxy_config(
    bind: Annotated[str, typer.Option("--bind", metavar="HOST:PORT", help=_help(HAProxyOptions, "bind"))],
    backend: Annotated[str, typer.Option("--backend", metavar="HOST:PORT", help=_help(HAProxyOptions, "backend"))],
    server_cert: Annotated[
        Path,
        typer.Option(
            "--server-cert",
            metavar="PEM",
            help="HAProxy's certificate: a bundle (certificate then key), or the certificate alone with --server-key.",
        ),
    ],
    ca_file: Annotated[Path, typer.Option("--ca-file", metavar="PEM", help=_help(HAProxyOptions, "ca_file"))],
    crl_file: Annotated[Path, typer.Option("--crl-file", metavar="PEM", help=_help(HAProxyOptions, "crl_file"))],
    proxy_secret_file: Annotated[
        Path,
        typer.Option(
            "--proxy-secret-file",
            metavar="PATH",
            help="File holding the proxy secret (the file Django reads as FEDNESTED_PROXY_SECRET_FILE).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="Where to write haproxy.cfg (mode 0600).")],
    server_key: Annotated[
        Path | None,
        typer.Option(
            "--server-key",
            metavar="PEM",
            help="HAProxy's private key; the certificate and key are then written as one bundle next to --out.",
        ),
    ] = None,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            "--max-body-bytes", envvar="FEDNESTED_MAX_REQUEST_BYTES", help=_help(HAProxyOptions, "max_body_bytes")
        ),
    ] = _default(HAProxyOptions, "max_body_bytes"),
    max_upload_bytes: Annotated[
        int,
        typer.Option(
            "--max-upload-bytes", envvar="FEDNESTED_MAX_UPDATE_BYTES", help=_help(HAProxyOptions, "max_upload_bytes")
        ),
    ] = _default(HAProxyOptions, "max_upload_bytes"),
    admin_socket: Annotated[
        Path | None, typer.Option("--admin-socket", metavar="PATH", help=_help(HAProxyOptions, "admin_socket"))
    ] = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Validate the result with `haproxy -c` (needs haproxy).")
    ] = True,
) -> None:
    """Write the HAProxy config that terminates TLS in front of the control plane (client certificates of devices
    checked against the CA and CRL) and check it."""
    try:
        bind_endpoint = parse_endpoint(bind, what="--bind")
        backend_endpoint = parse_endpoint(backend, what="--backend")
        secret = read_proxy_secret(proxy_secret_file)
        bundle = server_cert
        if server_key is not None:
            bundle = write_certificate_bundle(server_cert, server_key, out.with_name(f"{out.stem}-server.pem"))
        options = HAProxyOptions(
            bind=bind_endpoint,
            backend=backend_endpoint,
            certificate_bundle=bundle.absolute(),
            ca_file=ca_file.absolute(),
            crl_file=crl_file.absolute(),
            proxy_secret=secret,
            max_body_bytes=max_body_bytes,
            max_upload_bytes=max_upload_bytes,
            admin_socket=admin_socket.absolute() if admin_socket is not None else None,
        )
        warnings = check_tls_files(options)
        write_private_file(out, render_haproxy_config(options))
    except (EndpointError, InfraConfigError) as error:
        fail(str(error))
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    if server_key is not None:
        typer.echo(f"wrote {bundle} (certificate and key for HAProxy's `crt`, mode 0600)")
    typer.echo(f"wrote {out} (mode 0600: it holds the proxy secret)")
    if check:
        if shutil.which("haproxy") is None:
            typer.echo("not checked: haproxy is not installed here (--no-check to skip this note)", err=True)
        else:
            try:
                check_config(out)
            except InfraConfigError as error:
                fail(str(error))
            typer.echo(f"checked: `haproxy -c -f {out}` accepts it")
    typer.echo(f"run it with: haproxy -f {out} -db")


@infra_app.command("push-crl")
def push_crl_command(
    admin_socket: Annotated[Path, typer.Option("--admin-socket", metavar="PATH", help="HAProxy's admin socket.")],
    crl_file: Annotated[
        Path, typer.Option("--crl-file", metavar="PEM", help="The CRL file, by the path HAProxy's config names.")
    ],
) -> None:
    """Make a running HAProxy refuse newly revoked certificates now: load the CRL file's current content."""
    try:
        push_crl(admin_socket, crl_file.absolute())
    except InfraConfigError as error:
        fail(str(error))
    typer.echo(f"HAProxy now checks client certificates against {crl_file.absolute()}")


@infra_app.command("generate-vpn-config")
def generate_vpn_config(
    sites: Annotated[int, typer.Option("--sites", min=1, help=_help(VpnOptions, "sites"))],
    hub_endpoint: Annotated[
        str, typer.Option("--hub-endpoint", metavar="HOST:PORT", help=_help(VpnOptions, "hub_endpoint"))
    ],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="An empty directory for the configs (0700).")],
    network: Annotated[
        str, typer.Option("--network", metavar="CIDR", help=_help(VpnOptions, "network"))
    ] = "10.77.0.0/24",
    keepalive: Annotated[
        int, typer.Option("--keepalive", metavar="SECONDS", help=_help(VpnOptions, "persistent_keepalive_s"))
    ] = _default(VpnOptions, "persistent_keepalive_s"),
    preshared_keys: Annotated[
        bool, typer.Option("--preshared-keys/--no-preshared-keys", help=_help(VpnOptions, "preshared_keys"))
    ] = _default(VpnOptions, "preshared_keys"),
    site_allowed_ips: Annotated[
        list[str] | None,
        typer.Option("--site-allowed-ips", metavar="CIDR", help=_help(VpnOptions, "site_allowed_ips")),
    ] = None,
) -> None:
    """Write the hub's WireGuard config and one per site (keys made here, files mode 0600)."""
    try:
        options = VpnOptions(
            sites=sites,
            hub_endpoint=parse_endpoint(hub_endpoint, what="--hub-endpoint"),
            network=_network(network, "--network"),
            persistent_keepalive_s=keepalive,
            preshared_keys=preshared_keys,
            site_allowed_ips=tuple(_network(value, "--site-allowed-ips") for value in site_allowed_ips or ()),
        )
        plan, paths = write_vpn_configs(options, out)
    except (EndpointError, VpnConfigError) as error:
        fail(str(error))
    typer.echo(f"wrote {len(paths)} WireGuard configs to {out} (mode 0600)")
    for node in (plan.hub, *plan.sites):
        typer.echo(f"  {config_file_name(node, plan.hub):<18} {node.address!s:<16} public key {node.keys.public}")
    typer.echo(f"the hub runs `wg-quick up {out / config_file_name(plan.hub, plan.hub)}`; copy each site's file to it")


def _network(text: str, option: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise VpnConfigError(f"{option}: {text!r} is not a network in CIDR form such as 10.77.0.0/24 ({exc})") from None
