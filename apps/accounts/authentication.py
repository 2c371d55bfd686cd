"""REST API authentication by hashed API token: `Authorization: Token <plaintext>` (or `Bearer <plaintext>`)."""

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from apps.accounts.models import ApiToken
from apps.accounts.services import record_api_token_use
from apps.accounts.tokens import secret_sha256

KEYWORDS = (b"token", b"bearer")


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
            raise AuthenticationFailed("unknown API token")
        if token.revoked_at is not None:
            raise AuthenticationFailed(f"API token {token.key_prefix}… was revoked at {token.revoked_at.isoformat()}")
        if not token.user.is_active:
            raise AuthenticationFailed(f"user {token.user.username!r} is deactivated")
        record_api_token_use(token)
        return token.user, token

    def authenticate_header(self, request: Request) -> str:
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
