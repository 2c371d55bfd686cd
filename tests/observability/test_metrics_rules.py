"""The Prometheus rules and the example configuration in deploy/prometheus: valid for promtool, and their unit tests
(deploy/prometheus/tests/*.test.yml: series in, recorded values and firing alerts out) pass."""

import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is missing: install Debian's `prometheus` package (scripts/services.sh packages)")
    return subprocess.run(
        [binary, *arguments], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", "fednested-rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_configuration_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    tests = sorted(str(path.relative_to(PROMETHEUS_DIR)) for path in (PROMETHEUS_DIR / "tests").glob("*.test.yml"))
    assert tests, f"no rule unit tests in {PROMETHEUS_DIR / 'tests'}"
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
