"""Every call the edge client makes is an operation of the published OpenAPI schema, with matching bodies: the
client's methods run against the control plane (pytest-django's live server, real services) through an httpx
transport that records each exchange; each request must be an operation of /api/v1/schema/ with valid path
parameters and a body its request schema accepts, and each answer (errors included) must match that operation's
responses.

Which methods send is read from the client itself (a method that calls `_send` or streams), so a call added to
the client without a case here fails the test rather than going unchecked.
"""

import inspect
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import schemathesis
import torch
import yaml
from safetensors.torch import save

from apps.federation import identity
from apps.federation.services import issue_enrollment_token
from apps.registry.models import ModelVersion
from apps.registry.services import create_model_family, move_alias
from edge_client.sidecar import AuditLog, Sidecar, example_policy, load_policy
from edge_client.transport.http import MANIFEST_NAME, ControlPlaneClient, ControlPlaneRejected
from fednested.identity.ca import CertificateAuthority
from fednested.identity.keys import generate_private_key, make_csr
from tests.conftest import Member
from tests.contract.conftest import CHECKS, CONFIG

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]

ADAPTERS = {
    "model.layers.0.mlp.experts.down_proj/expert=1/lora_A": torch.ones(4, 8),
    "model.layers.0.mlp.experts.down_proj/expert=1/lora_B": torch.zeros(16, 4),
}


@dataclass(frozen=True)
class Exchange:
    """One request the client sent and the answer it got, read in full."""

    request: httpx.Request
    body: bytes
    response: httpx.Response


class RecordingTransport(httpx.BaseTransport):
    """The real HTTP transport, keeping a copy of every exchange (answers are read in full and handed on)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.exchanges: list[Exchange] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        answer = self.inner.handle_request(request)
        content = answer.read()
        answer.close()
        copy = httpx.Response(answer.status_code, headers=answer.headers, content=content, request=request)
        copy.elapsed = timedelta(0)  # the httpx client times its own responses only; Schemathesis reads this
        self.exchanges.append(Exchange(request, body, copy))
        return httpx.Response(answer.status_code, headers=answer.headers, content=content, request=request)

    def close(self) -> None:
        self.inner.close()


def sending_methods() -> set[str]:
    """The public methods of ControlPlaneClient that send a request (directly, not through another method)."""
    return {
        name
        for name, method in inspect.getmembers(ControlPlaneClient, inspect.isfunction)
        if not name.startswith("_")
        and re.search(r"self\._send\(|self\._http\.(stream|request)\(", inspect.getsource(method))
    }


def path_parameters(template: str, raw_path: str) -> dict[str, str]:
    """The values of `template`'s {parameters} in the request's raw (percent-encoded) path, decoded."""
    pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template))
    match = re.fullmatch(pattern, raw_path)
    assert match is not None, f"{raw_path} does not match {template}"
    return {name: unquote(value) for name, value in match.groupdict().items()}


def check_exchange(schema: Any, exchange: Exchange) -> str:
    """The operation (`METHOD /template`) of one exchange, after checking its request and answer against it."""
    request = exchange.request
    raw_path = request.url.raw_path.decode("ascii").split("?", 1)[0]
    operation = schema.find_operation_by_path(request.method, raw_path)
    assert operation is not None, f"the edge client calls {request.method} {raw_path}, which the schema lacks"
    parameters = path_parameters(operation.path, raw_path)
    for parameter in operation.path_parameters:
        assert parameter.is_valid(parameters[parameter.name]), (
            f"{operation.label}: {parameter.name}={parameters[parameter.name]!r} breaks the schema"
        )
    for header in operation.headers:
        if header.is_required and header.name.lower() != "authorization":
            assert header.name in request.headers, f"{operation.label}: the client does not send {header.name}"
    alternatives = {alternative.media_type: alternative for alternative in operation.body}
    media_type = request.headers.get("content-type")
    case = operation.Case(path_parameters=parameters)
    if exchange.body:
        assert media_type in alternatives, (
            f"{operation.label}: the client sends {media_type}, the schema takes {list(alternatives)}"
        )
        if media_type == "application/json":
            body = json.loads(exchange.body)
            assert alternatives[media_type].is_valid(body), f"{operation.label}: {body} breaks the request schema"
            case = operation.Case(path_parameters=parameters, body=body, media_type=media_type)
    else:
        required = [name for name, alternative in alternatives.items() if alternative.is_required]
        assert not required, f"{operation.label}: the client sends no body, the schema requires {required}"
    case.validate_response(exchange.response, checks=CHECKS)
    return operation.label


def test_every_edge_client_call_is_an_operation_of_the_schema_with_matching_bodies(
    live_server: Any,
    cast: dict[str, Member],
    tmp_path: Path,
    settings: Any,
    stored_version_factory: Callable[..., ModelVersion],
) -> None:
    # A CA, so enrollment and renewal answer with certificates (the richer bodies).
    CertificateAuthority.init(tmp_path / "ca")
    settings.FEDNESTED_CA_DIR = str(tmp_path / "ca")
    settings.FEDNESTED_CRL_PATH = str(tmp_path / "ca" / "crl.pem")
    identity._load_ca.cache_clear()
    engineer = cast["engineer"].user
    family = create_model_family(name="tiny-moe", architecture="MixtralForCausalLM", actor=engineer)
    version = stored_version_factory(family, "v1")
    move_alias(name="champion", version=version, actor=engineer)
    _, token = issue_enrollment_token(actor=engineer, note="edge client calls")

    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(example_policy(live_server.url)))
    sidecar = Sidecar(load_policy(policy), AuditLog(tmp_path / "audit.jsonl"))
    transport = RecordingTransport()
    key = generate_private_key()
    exercised: set[str] = set()
    try:
        with ControlPlaneClient(live_server.url, sidecar, transport=transport) as api:
            grant = api.enroll(token, "edge-calls-1", csr=make_csr(key, "edge-calls-1").decode(), display_name="calls")
            # The same token again for another device: a 400 whose body must match the schema too.
            with pytest.raises(ControlPlaneRejected, match="HTTP 400"):
                api.enroll(token, "edge-calls-2", csr=make_csr(generate_private_key(), "edge-calls-2").decode())
            exercised.add("enroll")

            api.api_token = grant.api_token
            champion = api.champion()
            exercised.add("champion")
            downloads = tmp_path / "downloads"
            api.download(
                champion.manifest_url,
                downloads / MANIFEST_NAME,
                expected_sha256=champion.manifest_sha256,
                expected_bytes=None,
            )
            # The client takes plain file names only (device protocol §2, check 2); the sidecar refuses the others.
            plain = [ref for ref in champion.files if "/" not in ref.name]
            for ref in plain:
                api.download(ref.url, downloads / ref.name, expected_sha256=ref.sha256, expected_bytes=ref.bytes)
            exercised.add("download")

            update_id = str(uuid.uuid4())
            payload = save(ADAPTERS)
            assert api.upload_payload(update_id, payload).created
            assert not api.upload_payload(update_id, payload).created
            exercised.add("upload_payload")

            api.report_version(grant.client_id, "v1")
            with pytest.raises(ControlPlaneRejected, match=r"HTTP 403 \[not_owner\]"):
                api.report_version("car-0001", "v1")
            exercised.add("report_version")

            renewed = api.renew_certificate(grant.client_id, csr=make_csr(key, grant.client_id).decode())
            assert renewed.certificate.startswith("-----BEGIN CERTIFICATE-----")
            exercised.add("renew_certificate")
    finally:
        identity._load_ca.cache_clear()

    assert exercised == sending_methods(), "a method of ControlPlaneClient that sends requests has no case here"
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/v1/schema/?format=json", config=CONFIG)
    operations = [check_exchange(schema, exchange) for exchange in transport.exchanges]
    assert sorted(set(operations)) == [
        "GET /api/v1/aliases/{name}/",
        "GET /api/v1/versions/{version_id}/files/{file_name}/",
        "POST /api/v1/devices/{client_id}/certificate/",
        "POST /api/v1/devices/{client_id}/heartbeat/",
        "POST /api/v1/enroll/",
        "PUT /api/v1/updates/{update_id}/payload/",
    ]
    assert len(operations) == 2 + 1 + 1 + len(plain) + 2 + 2 + 1
