"""REST API authentication: by hashed API token (`Authorization: Token <plaintext>`, or `Bearer <plaintext>`), and,
behind HAProxy, by the device client certificate HAProxy verified (fednested.infra.haproxy sets the headers)."""

import hmac
import logging
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from apps.accounts.choices import Role
from apps.accounts.models import ApiToken, User
from apps.accounts.refusals import CredentialsRefused
from apps.accounts.services import record_api_token_use
from apps.accounts.tokens import secret_sha256
from apps.federation.choices import DeviceStatus
from apps.federation.identity import live_certificate
from apps.federation.models import EdgeDevice
from apps.governance.actors import Actor
from fednested.aggregation import RejectionCode
from fednested.identity.ca import DEVICE_UNIT
from fednested.infra.haproxy import (
    CLIENT_CERTIFICATE_REQUIRED,
    CLIENT_CN_HEADER,
    CLIENT_OU_HEADER,
    CLIENT_SERIAL_HEADER,
    PROXY_SECRET_HEADER,
)

logger = logging.getLogger(__name__)

KEYWORDS = (b"token", b"bearer")
# `ssl_c_serial,hex`: the serial's DER bytes in hex (20 bytes at most for certificates that follow RFC 5280).
SERIAL_HEX = re.compile(r"^[0-9A-Fa-f]{1,64}$")


class ApiTokenAuthentication(BaseAuthentication):
    """Looks the token up by its SHA-256; revoked tokens and inactive users are refused with a 401."""

    def authenticate(self, request: Request) -> tuple[Any, ApiToken] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() not in KEYWORDS:
            return None
        if len(parts) != 2:
            raise AuthenticationFailed("Authorization header must be 'Token <token>' with no spaces in the token")
        try:
            plaintext = parts[1].decode("ascii")
        except UnicodeDecodeError as exc:
            raise AuthenticationFailed("API token contains non-ASCII characters") from exc
        token = ApiToken.objects.select_related("user").filter(key_sha256=secret_sha256(plaintext)).first()
        if token is None:
            raise CredentialsRefused("unknown API token", actor=Actor.anonymous(), reason="unknown_token")
        # From here on the token names its owner: a refusal is recorded against that party (apps.accounts.refusals).
        if token.revoked_at is not None:
            raise CredentialsRefused(
                f"API token {token.key_prefix}… was revoked at {token.revoked_at.isoformat()}",
                actor=Actor.of_user(token.user),
                reason="token_revoked",
            )
        if not token.user.is_active:
            raise CredentialsRefused(
                f"user {token.user.username!r} is deactivated",
                actor=Actor.of_user(token.user),
                reason="user_deactivated",
            )
        if token.user.role == Role.DEVICE and settings.FEDNESTED_DEVICES_REQUIRE_CERTIFICATE:
            raise CredentialsRefused(
                f"device {token.user.username!r} must authenticate with its client certificate (through HAProxy), "
                "not an API token: this control plane sets FEDNESTED_DEVICES_REQUIRE_CERTIFICATE",
                actor=Actor.of_user(token.user),
                code=CLIENT_CERTIFICATE_REQUIRED,
            )
        record_api_token_use(token)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
        return "Token"


@dataclass(frozen=True)
class ClientCertificate:
    """`request.auth` of a device authenticated by its certificate: the client id (CN) and the serial (hex)."""

    client_id: str
    serial_hex: str


def _proxy_secret_matches(request: Request) -> bool:
    secret: str = settings.FEDNESTED_PROXY_SECRET
    presented = request.headers.get(PROXY_SECRET_HEADER, "")
    return bool(secret) and bool(presented) and hmac.compare_digest(presented.encode(), secret.encode())


class ProxyClientCertificateAuthentication(BaseAuthentication):
    """A device authenticated by the client certificate HAProxy verified and named in X-Fednested-Client-* headers.

    Those headers count only on a request that also carries HAProxy's secret (FEDNESTED_PROXY_SECRET): anything a
    client sends Django directly, or through a proxy without the secret, is ignored (and logged). The certificate
    must be a live one of an active device (apps.federation.identity.live_certificate): HAProxy's CRL may lag.
    """

    def authenticate(self, request: Request) -> tuple[User, ClientCertificate] | None:
        common_name = request.headers.get(CLIENT_CN_HEADER, "").strip()
        serial = request.headers.get(CLIENT_SERIAL_HEADER, "").strip()
        unit = request.headers.get(CLIENT_OU_HEADER, "").strip()
        if not _proxy_secret_matches(request):
            if common_name or serial or unit:
                configured = bool(settings.FEDNESTED_PROXY_SECRET)
                logger.warning(
                    "ignored client certificate headers (CN %r) on %s %s from %s: %s",
                    common_name[:128],
                    request.method,
                    request.path[:200],
                    request.META.get("REMOTE_ADDR", "?"),
                    f"{PROXY_SECRET_HEADER} is missing or wrong (a client forging them, or HAProxy's secret differs "
                    "from FEDNESTED_PROXY_SECRET)"
                    if configured
                    else "FEDNESTED_PROXY_SECRET is not set, so no proxy is trusted",
                )
            return None
        if not common_name:
            # HAProxy sets the client headers only for a verified certificate: none was presented.
            return None
        if unit != DEVICE_UNIT:
            raise AuthenticationFailed(
                f"the client certificate of {common_name!r} is an OU={unit or '(none)'} certificate, not a device's "
                f"(OU={DEVICE_UNIT})",
                code="not_a_device_certificate",
            )
        if not SERIAL_HEX.match(serial):
            raise AuthenticationFailed(
                f"HAProxy sent {CLIENT_SERIAL_HEADER} {serial[:80]!r}, not a hex serial: check its config "
                "(`fednested infra generate-haproxy-config`)",
                code="malformed_client_certificate",
            )
        device = EdgeDevice.objects.select_related("user").filter(client_id=common_name).first()
        if device is None:
            raise AuthenticationFailed(
                f"the client certificate names {common_name!r}, which is not an enrolled device",
                code=RejectionCode.UNKNOWN_CLIENT.value,
            )
        # An enrolled device's certificate: a refusal from here on is recorded against that device.
        party = Actor.device(device.client_id, device.user)
        if device.status != DeviceStatus.ACTIVE:
            when = f" at {device.revoked_at.isoformat()}" if device.revoked_at else ""
            raise CredentialsRefused(
                f"device {common_name!r} was revoked{when}; it must enroll again with a new token",
                actor=party,
                code=RejectionCode.REVOKED_CLIENT.value,
            )
        if not device.user.is_active:
            raise CredentialsRefused(
                f"the account of device {common_name!r} is deactivated", actor=party, code="device_deactivated"
            )
        if not live_certificate(device, serial):
            raise CredentialsRefused(
                f"certificate {serial.lower()} is not a live certificate of device {common_name!r} (revoked, expired "
                "or unknown): renew it, or enroll again if every certificate of the device is gone",
                actor=party,
                code="certificate_not_live",
            )
        return device.user, ClientCertificate(client_id=device.client_id, serial_hex=serial.lower())

    def authenticate_header(self, request: Request) -> str:
        # DRF asks the first authentication class: without a certificate, the credential to send is a token, and
        # missing credentials stay a 401 (as with ApiTokenAuthentication first).
        return "Token"


class ApiTokenAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Describes ApiTokenAuthentication in the OpenAPI schema (an `Authorization: Token …` API key)."""

    target_class = "apps.accounts.authentication.ApiTokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "API token from enrollment or `manage.py create_user --token`, as `Token <token>`.",
        }


class ProxyClientCertificateAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Describes ProxyClientCertificateAuthentication in the OpenAPI schema. OpenAPI 3.0 has no mutual-TLS scheme:
    it appears as the header HAProxy derives from the client certificate."""

    target_class = "apps.accounts.authentication.ProxyClientCertificateAuthentication"
    name = "deviceCertificate"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": CLIENT_CN_HEADER,
            "description": "Devices: connect through HAProxy with the client certificate issued at enrollment; HAProxy "
            "verifies it and sets this header (one a client sends itself is dropped).",
        }
