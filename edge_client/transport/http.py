"""REST client for the device protocol (docs/api/device-protocol.md): enroll, champion info and artifact downloads,
payload upload (claim check) and version reports. Every request first passes the sidecar; nothing else sends."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin

import httpx

from edge_client.errors import EdgeClientError
from edge_client.sidecar import OutboundRequest, Sidecar
from edge_client.sidecar.audit import canonical_json
from edge_client.state import fsync_dir
from fednested.observability.tracing import inject_headers

API_PREFIX = "/api/v1/"
AUTH_SCHEME = "Token"
SHA256_HEADER = "X-Content-SHA256"
MANIFEST_NAME = "manifest.json"
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ControlPlaneError(EdgeClientError):
    """A request to the control plane failed. `status` is None when no HTTP answer came back at all."""

    def __init__(self, method: str, url: str, status: int | None, detail: str, *, code: str | None = None) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.detail = detail
        self.code = code
        answer = f"HTTP {status}" if status is not None else "no answer"
        coded = f" [{code}]" if code else ""
        super().__init__(f"{method} {url}: {answer}{coded}: {detail}")


class ControlPlaneUnavailable(ControlPlaneError):
    """Unreachable, timed out, or a 5xx/429: worth retrying later with backoff."""


class ControlPlaneRejected(ControlPlaneError):
    """The control plane understood and refused (4xx): retrying the same request cannot help."""


class DownloadCorrupt(EdgeClientError):
    """A downloaded file does not match the sha256 or size it was announced with; it was deleted, never used."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"download {url}: {problem}; the file was discarded")


@dataclass(frozen=True)
class EnrollmentGrant:
    """What enrollment answered: the id and token, and the certificates when the control plane has a CA."""

    client_id: str
    api_token: str
    certificate: str | None
    ca_certificate: str | None


@dataclass(frozen=True)
class CertificateGrant:
    certificate: str
    ca_certificate: str | None


@dataclass(frozen=True)
class ArtifactRef:
    name: str
    sha256: str
    bytes: int
    url: str


@dataclass(frozen=True)
class ChampionInfo:
    """What the API says about the champion; the manifest it points to is checked against `manifest_sha256`."""

    version_id: str
    parent_version: str | None
    manifest_sha256: str
    manifest_url: str
    files: tuple[ArtifactRef, ...]


@dataclass(frozen=True)
class PayloadReceipt:
    """The claim check: where the control plane stored the payload, and the sha256/bytes it verified."""

    uri: str
    sha256: str
    bytes: int
    created: bool


def _error_detail(response: httpx.Response) -> tuple[str, str | None]:
    """(detail, code) from an error body: `{"detail", "code"}`, or DRF's per-field `{"field": ["message"]}`."""
    try:
        body = response.json()
    except ValueError:
        return (response.text[:200] or response.reason_phrase), None
    if not isinstance(body, dict):
        return str(body)[:200], None
    code = body.get("code")
    code_text = str(code) if code is not None else None
    if "detail" in body:
        return str(body["detail"]), code_text
    parts = []
    for field_name, messages in body.items():
        if field_name == "code":
            continue
        text = "; ".join(str(m) for m in messages) if isinstance(messages, list) else str(messages)
        parts.append(f"{field_name}: {text}")
    return ("; ".join(parts) or response.reason_phrase), code_text


def _require(body: Any, key: str, kind: type, where: str) -> Any:
    """A field of a 2xx response; a missing or mistyped one is a protocol mismatch, reported as such."""
    if (
        not isinstance(body, dict)
        or not isinstance(body.get(key), kind)
        or isinstance(body.get(key), bool) != (kind is bool)
    ):
        raise ControlPlaneRejected("-", where, None, f"response field {key!r} is missing or not {kind.__name__}")
    return body[key]


class ControlPlaneClient:
    """One device's HTTP session with the control plane."""

    def __init__(
        self,
        base_url: str,
        sidecar: Sidecar,
        *,
        api_token: str | None = None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.sidecar = sidecar
        self.api_token = api_token
        self._timeout_s = timeout_s
        self._transport = transport
        self._http = httpx.Client(timeout=timeout_s, transport=transport, follow_redirects=False)
        # The last champion answer and its ETag: a poll sends it back and a 304 means it still holds.
        self._champion: tuple[str, ChampionInfo] | None = None

    def use_tls(self, *, ca_file: Path | None, certificate: tuple[Path, Path] | None) -> None:
        """Trust `ca_file` for the control plane's server certificate and present `certificate` (cert, key paths)
        as the client certificate (mTLS at HAProxy). Takes effect for the next request."""
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
        if certificate is not None:
            context.load_cert_chain(certfile=str(certificate[0]), keyfile=str(certificate[1]))
        self._http.close()
        self._http = httpx.Client(
            timeout=self._timeout_s, transport=self._transport, follow_redirects=False, verify=context
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def absolute(self, url_or_path: str) -> str:
        return urljoin(self.base_url, url_or_path)

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_token:
            headers["Authorization"] = f"{AUTH_SCHEME} {self.api_token}"
        # W3C trace context: the control plane's request span continues the device's trace (a random id, no data).
        headers.update(inject_headers())
        headers.update(extra or {})
        return headers

    def _send(
        self,
        kind: str,
        method: str,
        url: str,
        *,
        metadata: Mapping[str, Any] | None = None,
        body: bytes | None = None,
        body_source: Path | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        approval = self.sidecar.check(
            OutboundRequest(kind=kind, destination=url, metadata=metadata or {}, body=body, body_source=body_source)
        )
        if body is not None:
            content = body
        elif metadata is not None:
            # Send the approved (possibly scrubbed) metadata, byte for byte what the sidecar saw.
            content = canonical_json(approval.metadata)
            headers = {**(headers or {}), "Content-Type": "application/json"}
        else:
            content = None
        try:
            response = self._http.request(method, url, content=content, headers=self._headers(headers))
        except httpx.TransportError as exc:
            raise ControlPlaneUnavailable(method, url, None, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            detail, code = _error_detail(response)
            error = ControlPlaneUnavailable if response.status_code in _RETRYABLE_STATUS else ControlPlaneRejected
            raise error(method, url, response.status_code, detail, code=code)
        return response

    def enroll(self, token: str, client_id: str, *, csr: str, display_name: str | None = None) -> EnrollmentGrant:
        url = self.absolute(f"{API_PREFIX}enroll/")
        payload: dict[str, Any] = {"token": token, "client_id": client_id, "csr": csr}
        if display_name:
            payload["display_name"] = display_name
        body = self._send("enroll", "POST", url, metadata=payload).json()
        device = _require(body, "device", dict, url)
        key = _require(body, "key", dict, url)
        certificate = key.get("certificate_pem")
        ca_certificate = body.get("ca_certificate")
        return EnrollmentGrant(
            client_id=_require(device, "client_id", str, url),
            api_token=_require(body, "api_token", str, url),
            certificate=certificate if isinstance(certificate, str) and certificate else None,
            ca_certificate=ca_certificate if isinstance(ca_certificate, str) and ca_certificate else None,
        )

    def renew_certificate(self, client_id: str, *, csr: str) -> CertificateGrant:
        """A new client certificate for the key of `csr` (before the current one expires)."""
        url = self.absolute(f"{API_PREFIX}devices/{quote(client_id, safe='')}/certificate/")
        body = self._send("certificate.renew", "POST", url, metadata={"csr": csr}).json()
        key = _require(body, "key", dict, url)
        ca_certificate = body.get("ca_certificate")
        return CertificateGrant(
            certificate=_require(key, "certificate_pem", str, url),
            ca_certificate=ca_certificate if isinstance(ca_certificate, str) and ca_certificate else None,
        )

    def version_file_url(self, version_id: str, file_name: str) -> str:
        return self.absolute(f"{API_PREFIX}versions/{quote(version_id, safe='')}/files/{quote(file_name, safe='')}/")

    def champion(self) -> ChampionInfo:
        """The version the `champion` alias points at, with the files its manifest lists."""
        url = self.absolute(f"{API_PREFIX}aliases/champion/")
        held = self._champion
        response = self._send("champion.get", "GET", url, headers={"If-None-Match": held[0]} if held else None)
        if response.status_code == 304 and held is not None:
            return held[1]
        info = self._champion_info(url, response.json())
        etag = response.headers.get("ETag")
        self._champion = (etag, info) if etag else None
        return info

    def _champion_info(self, url: str, body: Any) -> ChampionInfo:
        version = _require(body, "version", dict, url)
        version_id = _require(version, "version_id", str, url)
        files = []
        for index, entry in enumerate(_require(version, "artifacts", list, url)):
            where = f"{url} version.artifacts[{index}]"
            name = _require(entry, "file_name", str, where)
            if name == MANIFEST_NAME:
                continue
            files.append(
                ArtifactRef(
                    name=name,
                    sha256=_require(entry, "sha256", str, where),
                    bytes=_require(entry, "size_bytes", int, where),
                    url=self.absolute(entry["url"]) if isinstance(entry.get("url"), str) else "",
                )
            )
        parent = version.get("parent")
        return ChampionInfo(
            version_id=version_id,
            parent_version=parent if isinstance(parent, str) else None,
            manifest_sha256=_require(version, "manifest_sha256", str, url),
            manifest_url=self.version_file_url(version_id, MANIFEST_NAME),
            files=tuple(
                ref
                if ref.url
                else ArtifactRef(ref.name, ref.sha256, ref.bytes, self.version_file_url(version_id, ref.name))
                for ref in files
            ),
        )

    def download(self, url: str, destination: Path, *, expected_sha256: str, expected_bytes: int | None) -> None:
        """Stream `url` to `destination`, hashing as it arrives; only a file that matches is renamed into place."""
        self.sidecar.check(OutboundRequest(kind="artifact.get", destination=url))
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.{os.getpid()}.part")
        digest, received = hashlib.sha256(), 0
        try:
            accept = {"Accept": "application/octet-stream, application/json;q=0.5"}
            with self._http.stream("GET", url, headers=self._headers(accept)) as response:
                if response.status_code >= 400:
                    response.read()
                    detail, code = _error_detail(response)
                    error = (
                        ControlPlaneUnavailable if response.status_code in _RETRYABLE_STATUS else ControlPlaneRejected
                    )
                    raise error("GET", url, response.status_code, detail, code=code)
                with open(tmp, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        received += len(chunk)
                        if expected_bytes is not None and received > expected_bytes:
                            raise DownloadCorrupt(url, f"more than the announced {expected_bytes} bytes")
                        digest.update(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            if expected_bytes is not None and received != expected_bytes:
                raise DownloadCorrupt(url, f"got {received} bytes, expected {expected_bytes}")
            if digest.hexdigest() != expected_sha256:
                raise DownloadCorrupt(url, f"sha256 {digest.hexdigest()} does not match the expected {expected_sha256}")
            os.replace(tmp, destination)
            fsync_dir(destination.parent)
        except httpx.TransportError as exc:
            raise ControlPlaneUnavailable("GET", url, None, f"{type(exc).__name__}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def upload_payload(self, update_id: str, body: bytes, *, body_source: Path | None = None) -> PayloadReceipt:
        """PUT the payload under its update id. Idempotent: a retry of the same bytes gets 200 and the same uri."""
        url = self.absolute(f"{API_PREFIX}updates/{quote(update_id, safe='')}/payload/")
        sha256 = hashlib.sha256(body).hexdigest()
        response = self._send(
            "update.payload",
            "PUT",
            url,
            body=body,
            body_source=body_source,
            headers={"Content-Type": "application/octet-stream", SHA256_HEADER: sha256},
        )
        receipt = response.json()
        stored_sha = _require(receipt, "sha256", str, url)
        stored_bytes = _require(receipt, "bytes", int, url)
        if stored_sha != sha256 or stored_bytes != len(body):
            raise ControlPlaneRejected(
                "PUT",
                url,
                response.status_code,
                f"server stored sha256 {stored_sha}/{stored_bytes} bytes, sent {sha256}",
            )
        return PayloadReceipt(
            uri=_require(receipt, "uri", str, url),
            sha256=stored_sha,
            bytes=stored_bytes,
            created=response.status_code == 201,
        )

    def report_version(self, client_id: str, current_version: str) -> None:
        url = self.absolute(f"{API_PREFIX}devices/{quote(client_id, safe='')}/heartbeat/")
        self._send("device.heartbeat", "POST", url, metadata={"current_version": current_version})
