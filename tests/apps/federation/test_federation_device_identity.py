"""Device identity on the control plane: keys from CSRs, certificates from the federation CA, idempotent enrollment
retries, renewal, revocation (keys, CRL, pending updates) — through the real services and API."""

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.utils import timezone
from rest_framework.test import APIClient

from apps.accounts.choices import Role
from apps.accounts.models import ApiToken, User
from apps.federation import identity
from apps.federation.identity import device_public_keys, live_certificate, publish_crl, refresh_crl_if_due
from apps.federation.models import DeviceKey, EdgeDevice, EnrollmentToken
from apps.federation.services import enroll_device, issue_enrollment_token, revoke_device
from apps.governance.models import AuditEvent
from fednested.identity.ca import CertificateAuthority
from fednested.identity.keys import generate_private_key, make_csr, public_key_fingerprint
from tests.device_keys import DEVICE_KEYS, device_csr


@pytest.fixture
def engineer(user_factory: Any) -> User:
    return user_factory("eric-engineer", Role.ENGINEER)[0]


@pytest.fixture
def ca(tmp_path: Path, settings: Any) -> Iterator[CertificateAuthority]:
    """A real CA on disk, configured as the control plane's (FEDNESTED_CA_DIR), with its CRL beside it."""
    authority = CertificateAuthority.init(tmp_path / "ca")
    settings.FEDNESTED_CA_DIR = str(tmp_path / "ca")
    settings.FEDNESTED_CRL_PATH = str(tmp_path / "ca" / "crl.pem")
    identity._load_ca.cache_clear()
    yield authority
    identity._load_ca.cache_clear()


def _enroll_body(token: str, client_id: str, csr: str) -> dict[str, str]:
    return {"token": token, "client_id": client_id, "csr": csr}


@pytest.mark.django_db
def test_enrollment_registers_the_csr_key_and_without_a_ca_issues_no_certificate(engineer: User) -> None:
    _, token = issue_enrollment_token(actor=engineer)
    enrollment = enroll_device(token=token, client_id="car-1", csr=device_csr("car-1"))
    key = DeviceKey.objects.get(device=enrollment.device)
    assert key.fingerprint == public_key_fingerprint(DEVICE_KEYS["car-1"].public_key())
    assert (key.certificate_pem, key.serial, key.not_after) == ("", "", None)
    assert device_public_keys(enrollment.device) == [DEVICE_KEYS["car-1"].public_key()]
    assert "PRIVATE" not in key.public_key_pem


@pytest.mark.django_db
def test_enrollment_with_a_ca_returns_a_short_lived_client_certificate_naming_the_client_id(
    engineer: User, ca: CertificateAuthority, settings: Any
) -> None:
    settings.FEDNESTED_DEVICE_CERT_VALIDITY_S = 3600
    _, token = issue_enrollment_token(actor=engineer)
    response = APIClient().post("/api/v1/enroll/", _enroll_body(token, "car-1", device_csr("car-1")), format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["repeated"] is False
    certificate = x509.load_pem_x509_certificate(body["key"]["certificate_pem"].encode())
    certificate.verify_directly_issued_by(ca.certificate)
    assert body["ca_certificate"] == ca.certificate_path.read_text()
    subject = {attribute.oid: attribute.value for attribute in certificate.subject}
    assert subject[NameOID.COMMON_NAME] == "car-1"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "device"
    assert certificate.public_key() == DEVICE_KEYS["car-1"].public_key()
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(minutes=60) <= lifetime <= timedelta(minutes=66)  # plus the clock-skew allowance
    device = EdgeDevice.objects.get(client_id="car-1")
    assert live_certificate(device, format(certificate.serial_number, "X"))
    assert not live_certificate(device, "ab" * 8)


@pytest.mark.django_db
def test_csrs_that_do_not_prove_the_client_id_and_key_are_refused_and_keep_the_token(engineer: User) -> None:
    _, token = issue_enrollment_token(actor=engineer)
    client = APIClient()
    wrong_name = make_csr(generate_private_key(), "car-2").decode()
    cases = {
        "not a csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "another client id": wrong_name,
        "tampered": wrong_name.replace(wrong_name.splitlines()[3], wrong_name.splitlines()[3][::-1]),
        "oversized": "A" * 20_000,
    }
    for what, csr in cases.items():
        response = client.post("/api/v1/enroll/", _enroll_body(token, "car-1", csr), format="json")
        assert response.status_code == 400, what
        assert "csr" in response.json(), (what, response.json())
    assert EnrollmentToken.objects.get().used_at is None
    # A key already registered for another device cannot be enrolled again.
    enroll_device(token=token, client_id="car-1", csr=device_csr("car-1"))
    _, second = issue_enrollment_token(actor=engineer)
    stolen = make_csr(DEVICE_KEYS["car-1"], "car-2").decode()
    with pytest.raises(ValidationError) as taken:
        enroll_device(token=second, client_id="car-2", csr=stolen)
    assert taken.value.error_dict["csr"][0].code == "key_in_use"


@pytest.mark.django_db
def test_a_retried_enrollment_with_the_same_token_and_key_gets_the_same_identity_back(
    engineer: User, ca: CertificateAuthority
) -> None:
    _, token = issue_enrollment_token(actor=engineer)
    csr = device_csr("car-1")
    client = APIClient()
    first = client.post("/api/v1/enroll/", _enroll_body(token, "car-1", csr), format="json")
    assert first.status_code == 201
    # The answer was lost: the device retries with the same token and key.
    again = client.post("/api/v1/enroll/", _enroll_body(token, "car-1", csr), format="json")
    assert again.status_code == 200, again.content
    assert again.json()["repeated"] is True
    assert again.json()["key"]["serial"] == first.json()["key"]["serial"]
    assert EdgeDevice.objects.count() == 1
    # Exactly one live API token: the first answer's is revoked, the retry's works.
    device = EdgeDevice.objects.get()
    assert ApiToken.objects.filter(user=device.user, revoked_at__isnull=True).count() == 1
    for answer, expected in ((first, 401), (again, 200)):
        me = APIClient()
        me.credentials(HTTP_AUTHORIZATION=f"Token {answer.json()['api_token']}")
        assert me.get("/api/v1/me/").status_code == expected
    assert AuditEvent.objects.filter(verb="federation.device.enrollment_repeated").count() == 1
    # Someone else holding the token but not the key, or another client id, gets "token used".
    for body in (_enroll_body(token, "car-1", device_csr("car-1")), _enroll_body(token, "car-2", device_csr("car-2"))):
        refused = client.post("/api/v1/enroll/", body, format="json")
        assert (refused.status_code, refused.json()["code"]) == (400, "token_used")


@pytest.mark.django_db
def test_a_retry_after_the_retry_window_or_of_a_revoked_device_is_token_used(engineer: User, settings: Any) -> None:
    settings.FEDNESTED_ENROLLMENT_RETRY_S = 60
    _, token = issue_enrollment_token(actor=engineer)
    csr = device_csr("car-1")
    enrollment = enroll_device(token=token, client_id="car-1", csr=csr)
    EnrollmentToken.objects.update(used_at=timezone.now() - timedelta(seconds=61))
    with pytest.raises(ValidationError, match="already used"):
        enroll_device(token=token, client_id="car-1", csr=csr)
    EnrollmentToken.objects.update(used_at=timezone.now())
    revoke_device(enrollment.device, actor=engineer, reason="lost")
    with pytest.raises(ValidationError, match="already used"):
        enroll_device(token=token, client_id="car-1", csr=csr)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_of_one_enrollment_on_postgresql_all_get_the_same_device(engineer: User) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the race needs concurrent transactions: run with DATABASE_URL=postgres://… (make test)")
    _, token = issue_enrollment_token(actor=engineer)
    csr = device_csr("car-1")
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def enroll() -> None:
        try:
            start.wait()
            outcomes.append("repeated" if enroll_device(token=token, client_id="car-1", csr=csr).repeated else "new")
        except ValidationError as exc:
            outcomes.append("; ".join(exc.messages))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=enroll) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["new"] + ["repeated"] * 5
    device = EdgeDevice.objects.get()
    assert ApiToken.objects.filter(user=device.user, revoked_at__isnull=True).count() == 1


@pytest.mark.django_db
def test_a_device_renews_its_own_certificate_only(
    engineer: User, ca: CertificateAuthority, device_factory: Any
) -> None:
    car, car_token = device_factory(engineer, "car-1")
    _, other_token = device_factory(engineer, "car-2")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {car_token}")
    renewed = client.post(
        "/api/v1/devices/car-1/certificate/", {"csr": make_csr(DEVICE_KEYS["car-1"], "car-1").decode()}, format="json"
    )
    assert renewed.status_code == 201, renewed.content
    serials = set(DeviceKey.objects.filter(device=car).values_list("serial", flat=True))
    assert len(serials) == 2
    assert renewed.json()["key"]["serial"] in serials
    # Key rotation: a CSR for a new key registers it; both keys verify until the old certificate expires.
    rotated = generate_private_key()
    response = client.post(
        "/api/v1/devices/car-1/certificate/", {"csr": make_csr(rotated, "car-1").decode()}, format="json"
    )
    assert response.status_code == 201
    assert rotated.public_key() in device_public_keys(car)
    intruder = APIClient()
    intruder.credentials(HTTP_AUTHORIZATION=f"Token {other_token}")
    refused = intruder.post(
        "/api/v1/devices/car-1/certificate/", {"csr": make_csr(DEVICE_KEYS["car-2"], "car-1").decode()}, format="json"
    )
    assert (refused.status_code, refused.json()["code"]) == (403, "not_owner")
    assert AuditEvent.objects.filter(verb="federation.device.certificate_renewed").count() == 2


@pytest.mark.django_db
def test_renewal_without_a_ca_says_so(engineer: User, device_factory: Any) -> None:
    _, token = device_factory(engineer, "car-1")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    response = client.post("/api/v1/devices/car-1/certificate/", {"csr": device_csr("car-1")}, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "no_certificate_authority"


@pytest.mark.django_db(transaction=True)
def test_revoking_a_device_revokes_its_keys_and_publishes_the_crl(
    engineer: User, ca: CertificateAuthority, device_factory: Any, settings: Any
) -> None:
    car, _ = device_factory(engineer, "car-1")
    kept, _ = device_factory(engineer, "car-2")
    serial = DeviceKey.objects.get(device=car).serial
    revoke_device(car, actor=engineer, reason="stolen")
    assert DeviceKey.objects.get(device=car).revoked_at is not None
    assert device_public_keys(car) == []
    assert not live_certificate(car, serial)
    crl = x509.load_pem_x509_crl(Path(settings.FEDNESTED_CRL_PATH).read_bytes())
    assert crl.is_signature_valid(ca.key.public_key())
    assert [entry.serial_number for entry in crl] == [int(serial, 16)]
    assert crl.get_revoked_certificate_by_serial_number(int(DeviceKey.objects.get(device=kept).serial, 16)) is None
    # Publishing again (e.g. after a restore) gives the same list.
    publish_crl()
    assert [
        entry.serial_number for entry in x509.load_pem_x509_crl(Path(settings.FEDNESTED_CRL_PATH).read_bytes())
    ] == [int(serial, 16)]


@pytest.mark.django_db
def test_the_crl_is_published_before_it_expires_and_by_command(
    ca: CertificateAuthority, settings: Any, capsys: Any
) -> None:
    """HAProxy refuses every client certificate once the CRL's next update passes: it is re-signed at half-life."""
    crl_path = Path(settings.FEDNESTED_CRL_PATH)
    assert refresh_crl_if_due() == crl_path  # missing: written
    first = crl_path.read_bytes()
    assert refresh_crl_if_due() is None  # fresh: left alone
    later = timezone.now() + identity.CRL_VALIDITY * 0.6
    assert refresh_crl_if_due(now=later) == crl_path
    assert crl_path.read_bytes() != first
    crl_path.unlink()
    call_command("publish_crl")
    assert x509.load_pem_x509_crl(crl_path.read_bytes()).is_signature_valid(ca.key.public_key())
    settings.FEDNESTED_CA_DIR = ""
    with pytest.raises(CommandError, match="no CA configured"):
        call_command("publish_crl")
