"""Fixtures shared by the messaging tests: the Kafka broker address, failing rather than skipping when the
services are required (FEDNESTED_REQUIRE_SERVICES=1, as `make test` sets it)."""

import os

import pytest


@pytest.fixture
def kafka_bootstrap_servers() -> str:
    servers = os.environ.get("FEDNESTED_KAFKA_BOOTSTRAP")
    if not servers:
        if os.environ.get("FEDNESTED_REQUIRE_SERVICES") == "1":
            pytest.fail("FEDNESTED_REQUIRE_SERVICES=1 but FEDNESTED_KAFKA_BOOTSTRAP is not set: Kafka is not running")
        pytest.skip("Kafka not running: `scripts/services.sh start && source var/services/env.sh`")
    return servers
