"""Certificates of the test Kafka broker's TLS listener, and the broker properties that use them.

Run by scripts/services/kafka.sh on every start with the cached virtualenv's Python: makes the CA once per services
directory (`--ca-dir`, kept across restarts so certificates issued from it stay valid), then issues afresh the broker's
certificate and the control plane's client certificate into `--out`, and prints the broker's TLS properties.
Tests issue device certificates from the same CA themselves (tests/fednested/messaging/test_kafka_acls.py).
"""

import argparse
import os
import sys
from pathlib import Path

from fednested.identity.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority
from fednested.identity.keys import IdentityError
from fednested.messaging.acls import CONTROL_PLANE_SERVICE, principal_mapping_rules

BROKER_SERVICE = "kafka-broker"


def open_ca(directory: Path) -> CertificateAuthority:
    if (directory / CA_KEY_FILE).exists() or (directory / CA_CERT_FILE).exists():
        return CertificateAuthority.load(directory)
    return CertificateAuthority.init(directory, common_name="fednested test services CA")


def broker_keystore(ca: CertificateAuthority, out: Path) -> Path:
    """Kafka's PEM keystore file: the unencrypted PKCS#8 key, then the certificate chain (leaf first)."""
    key_path, cert_path = ca.write_service(
        BROKER_SERVICE, out, dns_names=["localhost"], ip_addresses=["127.0.0.1"], server=True, client=False
    )
    keystore = out / f"{BROKER_SERVICE}.keystore.pem"
    keystore.unlink(missing_ok=True)
    fd = os.open(keystore, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key_path.read_bytes() + cert_path.read_bytes() + ca.certificate_path.read_bytes())
    return keystore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ca-dir", type=Path, required=True, help="the CA directory (created on first use)")
    parser.add_argument("--out", type=Path, required=True, help="where the broker and client certificates go")
    args = parser.parse_args()
    try:
        ca = open_ca(args.ca_dir)
        keystore = broker_keystore(ca, args.out)
        ca.write_service(CONTROL_PLANE_SERVICE, args.out, server=False, client=True)
    except (IdentityError, OSError) as error:
        print(f"kafka tls: {error}", file=sys.stderr)
        return 1
    # The key is unencrypted (mode 0600 in a 0700 directory), so no ssl.key.password.
    print("ssl.keystore.type=PEM")
    print(f"ssl.keystore.location={keystore}")
    print("ssl.truststore.type=PEM")
    print(f"ssl.truststore.location={ca.certificate_path}")
    print("ssl.client.auth=required")
    print(f"ssl.principal.mapping.rules={principal_mapping_rules()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
