"""Push policies to a Ranger admin with Apache's own Python client (`apache-ranger`, requirements/governance.txt), so
the federation's dataset policies can be kept, audited and edited where the organisation's other policies live."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from apache_ranger.client.ranger_client import RangerClient
from apache_ranger.exceptions import RangerServiceException
from apache_ranger.model.ranger_policy import RangerPolicy
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from requests.exceptions import RequestException

from fednested.governance.ranger import AccessPolicy

DEFAULT_TIMEOUT_S: Final = 30.0


class RangerAdminError(RuntimeError):
    """Ranger admin refused a policy, answered with something that is not one, or could not be reached."""


@dataclass(frozen=True)
class PushedPolicy:
    """One policy as Ranger admin stored it: its name and the id admin gave it."""

    name: str
    admin_id: int | None


class _TimeoutAdapter(HTTPAdapter):
    # The apache-ranger client sends without a timeout; a silent admin must not hang the caller for ever.
    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> Response:
        timeout = self.timeout_s if timeout is None else timeout
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)


def push_policies(
    policies: Sequence[AccessPolicy],
    *,
    url: str,
    username: str,
    password: str,
    service: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[PushedPolicy]:
    """Create each policy in Ranger admin at `url`, or update the one of the same service and name
    (`POST /service/public/v2/api/policy?updateIfExists=true`), as `username` with HTTP basic auth.

    `service` names the Ranger service (an instance of the `fednested` service-def) for policies that name none or
    overrides theirs. Our local ids are not sent: admin keeps its own. Stops at the first policy admin refuses.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RangerAdminError(f"Ranger admin URL {url!r}: expected http(s)://host[:port][/path]")
    bodies = []
    for policy in policies:
        body = policy.to_ranger_json()
        body.pop("id", None)
        if service is not None:
            body["service"] = service
        if not body.get("service"):
            raise RangerAdminError(f"{policy.label} names no Ranger service; pass the service to push it to")
        bodies.append((policy, body))
    client = RangerClient(url, (username, password))
    adapter = _TimeoutAdapter(timeout_s)
    client.session.mount("http://", adapter)
    client.session.mount("https://", adapter)
    pushed: list[PushedPolicy] = []
    for policy, body in bodies:
        try:
            stored = client.create_policy(RangerPolicy(body), {"updateIfExists": "true"})
        except RangerServiceException as error:
            raise RangerAdminError(
                f"Ranger admin at {url} refused {policy.label}: HTTP {error.statusCode}: {error.msgDesc}"
            ) from error
        except RequestException as error:
            raise RangerAdminError(
                f"Ranger admin at {url} is unreachable while pushing {policy.label}: {error}"
            ) from error
        # The client answers None (after logging) for 404 and 503 instead of raising.
        if not isinstance(stored, dict) or stored.get("name") != policy.name:
            raise RangerAdminError(
                f"Ranger admin at {url} did not answer {policy.label} with the stored policy (not found or unavailable)"
            )
        admin_id = stored.get("id")
        pushed.append(PushedPolicy(name=policy.name, admin_id=admin_id if isinstance(admin_id, int) else None))
    return pushed
