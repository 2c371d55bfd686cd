"""PII redaction (fednested.governance.pii): planted values of each entity type are replaced and counted, ordinary
payloads pass unchanged, nothing is fetched from the network, and bad configurations are refused by key."""

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from fednested.governance.pii import (
    REDACTED_KEY,
    CustomEntity,
    PiiConfigError,
    RedactionConfig,
    Redactor,
    load_config,
    redact_json,
    redact_payload,
    redact_text,
)

EMAIL = "jane.doe@example.com"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"  # passes the Luhn check
IBAN = "GB82 WEST 1234 5698 7654 32"  # a valid IBAN check sum
IPV4 = "192.168.10.7"
IPV6 = "2001:db8::8a2e:370:7334"
PLANTED = (EMAIL, PHONE, CARD, IBAN, IPV4, IPV6)
TEXT = f"contact {EMAIL} or {PHONE}; card {CARD}; IBAN {IBAN}; seen from {IPV4} and {IPV6}"
COUNTS = {"CREDIT_CARD": 1, "EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "IP_ADDRESS": 2, "PHONE_NUMBER": 1}


def assert_no_planted_value(stored: str) -> None:
    squeezed = stored.replace(" ", "")
    for value in PLANTED:
        assert value not in stored, (value, stored)
        assert value.replace(" ", "") not in squeezed, (value, stored)


def test_each_planted_entity_is_replaced_by_its_type_and_counted() -> None:
    redacted = redact_text(TEXT, where="test")
    assert redacted.text == (
        "contact <EMAIL_ADDRESS> or <PHONE_NUMBER>; card <CREDIT_CARD>; IBAN <IBAN_CODE>; "
        "seen from <IP_ADDRESS> and <IP_ADDRESS>"
    )
    assert redacted.entities == COUNTS
    assert redacted.truncated is False
    assert_no_planted_value(redacted.text)


def test_ordinary_audit_payloads_and_figures_pass_unchanged() -> None:
    payload = {
        "update_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "where": "fednested.updates[3]@12345",
        "base_version": "tiny-moe-v7",
        "payload_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "decided_at": "2026-12-07T15:03:10.123456+00:00",
        "message": "expert 0.1 delta has NaN at row 3; loss 0.123456789 vs 12.3456789012 (τ=2)",
        "detail": "code: loss 2.2000 vs parent v1 2.0000 is +0.2000 nats",
        "staleness": 2,
        "loss": 0.123456789,
    }
    assert redact_json(payload, where="test") == (payload, {})
    # A card number that fails the Luhn check is a number, not a card.
    assert redact_text("order 4111 1111 1111 1112", where="test").entities == {}


def test_nested_values_are_redacted_with_keys_and_other_leaves_kept() -> None:
    value: Any = {"who": {"contact": [EMAIL, 3, None, {"ip": IPV4}]}, EMAIL: True}
    redacted, counts = redact_json(value, where="test")
    assert redacted == {"who": {"contact": ["<EMAIL_ADDRESS>", 3, None, {"ip": "<IP_ADDRESS>"}]}, EMAIL: True}
    assert counts == {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1}
    deep: Any = "x"
    for _ in range(70):
        deep = [deep]
    with pytest.raises(ValueError, match=r"PII redaction at payload\[0\]\[0\].*deeper than 64 levels"):
        redact_json(deep, where="payload")


def test_an_audit_payload_records_counts_and_adds_the_callers_own() -> None:
    data = redact_payload({"reason": f"ask {EMAIL}"}, where="test", already={"EMAIL_ADDRESS": 2, "IBAN_CODE": 1})
    assert data == {"reason": "ask <EMAIL_ADDRESS>", REDACTED_KEY: {"EMAIL_ADDRESS": 3, "IBAN_CODE": 1}}
    assert REDACTED_KEY not in redact_payload({"reason": "nothing here"}, where="test")
    with pytest.raises(ValueError, match="already has a '_redacted' key"):
        redact_payload({REDACTED_KEY: {"EMAIL_ADDRESS": 1}}, where="test")


def test_long_texts_are_cut_before_analysis_and_marked() -> None:
    config = RedactionConfig(max_chars=200)
    text = f"{EMAIL} " + "a" * 300 + f" {IPV4}"
    redacted = redact_text(text, where="test", config=config)
    assert redacted.truncated is True
    assert redacted.text.startswith("<EMAIL_ADDRESS> aaa")
    assert redacted.text.endswith(f"[truncated: {len(text) - 200} more characters not stored]")
    assert IPV4 not in redacted.text
    assert redacted.entities == {"EMAIL_ADDRESS": 1}


def test_building_and_redacting_touch_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The e-mail recogniser's domain check and the NLP engine are the two places Presidio would go online."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    redactor = Redactor(RedactionConfig(phone_regions=("GB",)))
    from presidio_analyzer.nlp_engine import NoOpNlpEngine

    assert isinstance(redactor._analyzer.nlp_engine if redactor._analyzer else None, NoOpNlpEngine)
    assert redactor.redact_text(f"mail {EMAIL} from a.b@mail.example.co.uk", where="test").entities == {
        "EMAIL_ADDRESS": 2
    }


def test_custom_entities_come_from_inline_json_or_a_file(tmp_path: Path) -> None:
    raw = {
        "custom": [
            {"entity": "EMPLOYEE_ID", "regex": r"\bEMP-[0-9]{6}\b"},
            {"entity": "PROJECT", "deny_list": ["Bluebird"], "score": 0.9},
        ],
        "max_chars": 5000,
    }
    inline = load_config(json.dumps(raw), source="FEDNESTED_PII_REDACTION")
    path = tmp_path / "pii.json"
    path.write_text(json.dumps(raw))
    assert load_config(str(path), source="FEDNESTED_PII_REDACTION") == inline
    assert inline.custom == (
        CustomEntity("EMPLOYEE_ID", regex=r"\bEMP-[0-9]{6}\b"),
        CustomEntity("PROJECT", deny_list=("Bluebird",), score=0.9),
    )
    redacted = redact_text("EMP-123456 works on bluebird with EMP-12345", where="test", config=inline)
    assert redacted.text == "<EMPLOYEE_ID> works on <PROJECT> with EMP-12345"
    assert redacted.entities == {"EMPLOYEE_ID": 1, "PROJECT": 1}


def test_off_stores_text_as_given_and_on_is_the_default() -> None:
    assert load_config("", source="X") == load_config("on", source="X") == RedactionConfig()
    off = load_config("off", source="X")
    assert redact_text(TEXT, where="test", config=off).text == TEXT


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"colour": 1}', r"X: unknown key\(s\) \['colour'\]"),
        ("[1]", "expected a JSON object"),
        ("{nope", "not valid JSON at line 1 column 2"),
        ('{"max_chars": 5}', "'max_chars' must be an integer from 100"),
        ('{"entities": ["PERSON"]}', r"'entities' names \['PERSON'\], which have no built-in recogniser"),
        ('{"phone_regions": ["uk"]}', "two-letter region codes"),
        ('{"custom": [{"entity": "EMP", "regex": "(["}]}', r"custom\[0\]: 'regex' does not compile"),
        ('{"custom": [{"entity": "EMAIL_ADDRESS", "regex": "x"}]}', "is a built-in entity"),
        ('{"custom": [{"entity": "lower", "regex": "x"}]}', "upper-case name"),
        ('{"custom": [{"entity": "EMP"}]}', "give a 'regex', a 'deny_list' or both"),
        ("/nonexistent/pii.json", "cannot read the redaction config file /nonexistent/pii.json"),
    ],
)
def test_bad_configurations_are_refused_naming_the_key(raw: str, message: str) -> None:
    with pytest.raises(PiiConfigError, match=message):
        load_config(raw, source="X")


def test_a_missing_spacy_model_is_refused_never_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import spacy.cli

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a spaCy model download was attempted")

    monkeypatch.setattr(spacy.cli, "download", no_download)
    with pytest.raises(PiiConfigError, match="ner_model 'en_core_web_lg' is neither an installed spaCy package"):
        Redactor(RedactionConfig(ner_model="en_core_web_lg"))


def test_an_installed_spacy_pipeline_adds_its_named_entities(tmp_path: Path) -> None:
    """A pipeline saved on disk stands for an installed model: an entity ruler that knows one person's name."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": "Alice Example"}])  # type: ignore[attr-defined]
    nlp.to_disk(tmp_path / "pipeline")
    redactor = Redactor(RedactionConfig(ner_model=str(tmp_path / "pipeline")))
    redacted = redactor.redact_text(f"approved by Alice Example ({EMAIL})", where="test")
    assert redacted.text == "approved by <PERSON> (<EMAIL_ADDRESS>)"
    assert redacted.entities == {"EMAIL_ADDRESS": 1, "PERSON": 1}
