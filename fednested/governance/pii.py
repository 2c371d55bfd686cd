"""PII redaction of the free text the control plane stores (audit payloads, rejection and approval reasons, task
errors), with Microsoft Presidio's analyzer and anonymizer, entirely offline.

Why not `AnalyzerEngine()`: its default NLP engine loads spaCy's `en_core_web_lg` and, when that is not installed,
downloads it (`spacy.cli.download`) at construction. Here the analyzer is built from parts: Presidio's `NoOpNlpEngine`
(no model, no tokens) and an explicit registry of pattern recognisers (e-mail, phone, credit card, IBAN, IP) plus the
configured custom entities. A spaCy pipeline is used for named entities (PERSON, LOCATION, ...) only when the
configuration names one that is already installed or saved on disk; one that is missing is a configuration error,
never a download. The e-mail recogniser's domain check (`tldextract`) would fetch the public-suffix list over HTTP on
first use: it is replaced by an extractor that reads only the list tldextract ships.

What is stored is the redacted text (`<EMAIL_ADDRESS>` in place of the address) and, beside it, how many of each
entity type were replaced; the values themselves are never kept or logged. A text longer than `max_chars` is cut to
`max_chars` before analysis and marked as cut, so one huge message costs a bounded time and nothing unanalysed is
stored.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine
    from presidio_anonymizer import AnonymizerEngine

# The entity types the pattern recognisers find, in Presidio's names (the placeholders the stored text shows).
BUILTIN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS")
# python-phonenumbers matches numbers written in these regions' national formats (international "+..." ones are
# matched whatever the region); Presidio's own default list.
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")
# Where the counts go in a redacted audit payload: `{"_redacted": {"EMAIL_ADDRESS": 1}}`.
REDACTED_KEY = "_redacted"
MAX_JSON_DEPTH = 64
_ENTITY_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_CONFIG_KEYS = {"enabled", "max_chars", "score_threshold", "entities", "phone_regions", "ner_model", "custom"}
_CUSTOM_KEYS = {"entity", "regex", "deny_list", "score"}


class PiiConfigError(ValueError):
    """The redaction configuration (FEDNESTED_PII_REDACTION) is unusable; the message names the key and the source."""


@dataclass(frozen=True)
class CustomEntity:
    """An organisation's own identifier: a regular expression and/or a deny list of exact words (case-insensitive)."""

    entity: str
    regex: str = ""
    deny_list: tuple[str, ...] = ()
    score: float = 0.85


@dataclass(frozen=True)
class RedactionConfig:
    """What is redacted and how. Frozen (hashable) so that one analyzer is built per distinct configuration."""

    enabled: bool = field(default=True, metadata={"help": "false: text is stored as given (not recommended)"})
    max_chars: int = field(default=10_000, metadata={"help": "longer texts are cut to this before analysis"})
    score_threshold: float = field(default=0.35, metadata={"help": "findings scored below this are kept as text"})
    entities: tuple[str, ...] = field(default=BUILTIN_ENTITIES, metadata={"help": "built-in entity types to redact"})
    phone_regions: tuple[str, ...] = field(default=DEFAULT_PHONE_REGIONS, metadata={"help": "national phone formats"})
    ner_model: str = field(
        default="", metadata={"help": "an installed spaCy package name or a saved pipeline's directory; '' for none"}
    )
    custom: tuple[CustomEntity, ...] = field(default=(), metadata={"help": "the organisation's own entities"})


@dataclass(frozen=True)
class Redacted:
    """A redacted text and how many of each entity type it had; `truncated` when it was cut to `max_chars`."""

    text: str
    entities: dict[str, int]
    truncated: bool = False


def load_config(raw: str, *, source: str) -> RedactionConfig:
    """Parse FEDNESTED_PII_REDACTION: empty or `on` (the defaults), `off`, inline JSON (`{...}`) or a JSON file path.

    Everything is checked here, once, so a bad value stops the process at start-up rather than at the first audit.
    """
    text = raw.strip()
    if text in ("", "on", "true", "1"):
        return RedactionConfig()
    if text in ("off", "false", "0"):
        return RedactionConfig(enabled=False)
    if not text.startswith(("{", "[")):
        path = Path(text)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise PiiConfigError(f"{source}: cannot read the redaction config file {path}: {error}") from error
        source = f"{source} ({path})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PiiConfigError(
            f"{source}: not valid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    if not isinstance(value, dict):
        raise PiiConfigError(f"{source}: expected a JSON object, got {type(value).__name__}")
    return _config_from_json(value, source=source)


def _config_from_json(value: dict[str, Any], *, source: str) -> RedactionConfig:
    unknown = sorted(set(value) - _CONFIG_KEYS)
    if unknown:
        raise PiiConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(_CONFIG_KEYS)}")
    defaults = RedactionConfig()
    enabled = value.get("enabled", defaults.enabled)
    if not isinstance(enabled, bool):
        raise PiiConfigError(f"{source}: 'enabled' must be true or false")
    max_chars = value.get("max_chars", defaults.max_chars)
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or not 100 <= max_chars <= 1_000_000:
        raise PiiConfigError(f"{source}: 'max_chars' must be an integer from 100 to 1000000, got {max_chars!r}")
    threshold = value.get("score_threshold", defaults.score_threshold)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise PiiConfigError(f"{source}: 'score_threshold' must be a number from 0 to 1, got {threshold!r}")
    entities = _string_list(value, "entities", defaults.entities, source=source)
    unsupported = sorted(set(entities) - set(BUILTIN_ENTITIES))
    if unsupported:
        raise PiiConfigError(
            f"{source}: 'entities' names {unsupported}, which have no built-in recogniser here; built-in: "
            f"{list(BUILTIN_ENTITIES)} (add others under 'custom')"
        )
    regions = _string_list(value, "phone_regions", defaults.phone_regions, source=source)
    bad_regions = [region for region in regions if not re.fullmatch(r"[A-Z]{2}", region)]
    if bad_regions:
        raise PiiConfigError(f"{source}: 'phone_regions' must be two-letter region codes like 'GB', got {bad_regions}")
    ner_model = value.get("ner_model") or ""
    if not isinstance(ner_model, str):
        raise PiiConfigError(f"{source}: 'ner_model' must be a spaCy package name or a directory, or null")
    custom_raw = value.get("custom", [])
    if not isinstance(custom_raw, list) or len(custom_raw) > 100:
        raise PiiConfigError(f"{source}: 'custom' must be a list of at most 100 entities")
    custom = tuple(_custom_entity(item, index, source=source) for index, item in enumerate(custom_raw))
    return RedactionConfig(
        enabled=enabled,
        max_chars=max_chars,
        score_threshold=float(threshold),
        entities=entities,
        phone_regions=regions,
        ner_model=ner_model,
        custom=custom,
    )


def _string_list(value: dict[str, Any], key: str, default: tuple[str, ...], *, source: str) -> tuple[str, ...]:
    items = value.get(key, list(default))
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise PiiConfigError(f"{source}: '{key}' must be a list of strings")
    return tuple(items)


def _custom_entity(item: Any, index: int, *, source: str) -> CustomEntity:
    where = f"{source}: custom[{index}]"
    if not isinstance(item, dict):
        raise PiiConfigError(f"{where} must be an object like {{'entity': 'EMPLOYEE_ID', 'regex': 'EMP-[0-9]{{6}}'}}")
    unknown = sorted(set(item) - _CUSTOM_KEYS)
    if unknown:
        raise PiiConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(_CUSTOM_KEYS)}")
    entity = item.get("entity")
    if not isinstance(entity, str) or not _ENTITY_NAME.match(entity):
        raise PiiConfigError(f"{where}: 'entity' must be an upper-case name like 'EMPLOYEE_ID', got {entity!r}")
    if entity in BUILTIN_ENTITIES:
        raise PiiConfigError(f"{where}: {entity} is a built-in entity; give the custom one its own name")
    regex = item.get("regex", "")
    if not isinstance(regex, str) or len(regex) > 1000:
        raise PiiConfigError(f"{where}: 'regex' must be a string of at most 1000 characters")
    if regex:
        try:
            re.compile(regex)
        except re.error as error:
            raise PiiConfigError(f"{where}: 'regex' does not compile: {error}") from error
    deny = item.get("deny_list", [])
    if (
        not isinstance(deny, list)
        or not all(isinstance(word, str) and word.strip() for word in deny)
        or len(deny) > 10_000
    ):
        raise PiiConfigError(f"{where}: 'deny_list' must be a list of at most 10000 non-empty strings")
    if not regex and not deny:
        raise PiiConfigError(f"{where}: give a 'regex', a 'deny_list' or both")
    score = item.get("score", 0.85)
    if not isinstance(score, int | float) or isinstance(score, bool) or not 0.0 < score <= 1.0:
        raise PiiConfigError(f"{where}: 'score' must be a number in (0, 1], got {score!r}")
    return CustomEntity(entity=entity, regex=regex, deny_list=tuple(deny), score=float(score))


class Redactor:
    """One configured analyzer and anonymizer. Building one takes a while (recognisers compile, a spaCy pipeline
    loads): use `redactor_for`, which builds one per process and configuration."""

    def __init__(self, config: RedactionConfig) -> None:
        self.config = config
        self._analyzer: AnalyzerEngine | None = None
        self._anonymizer: AnonymizerEngine | None = None
        if config.enabled:
            self._analyzer, self._anonymizer = _build_engines(config)
        self._entities = [*config.entities, *(custom.entity for custom in config.custom)]
        self._analyzes_everything = bool(config.custom or config.ner_model)
        if self._analyzer is not None and config.ner_model:
            self._entities += sorted(set(self._analyzer.get_supported_entities()) - set(self._entities))

    def redact_text(self, text: str, *, where: str) -> Redacted:
        """`text` with every finding replaced by `<ENTITY_TYPE>`, and the count per type.

        `where` names the field being redacted (e.g. "audit federation.update.rejected data.message"); it goes into
        the error raised for a value that is not text, so the caller knows which field to fix.
        """
        if not isinstance(text, str):
            raise TypeError(f"PII redaction at {where}: expected text, got {type(text).__name__}")
        truncated = len(text) > self.config.max_chars
        if truncated:
            dropped = len(text) - self.config.max_chars
            text = text[: self.config.max_chars] + f" [truncated: {dropped} more characters not stored]"
        if self._analyzer is None or self._anonymizer is None or not self._may_hold_pii(text):
            return Redacted(text=text, entities={}, truncated=truncated)
        findings = self._analyzer.analyze(
            text=text, language="en", entities=self._entities, score_threshold=self.config.score_threshold
        )
        if not findings:
            return Redacted(text=text, entities={}, truncated=truncated)
        result = self._anonymizer.anonymize(text=text, analyzer_results=findings)  # type: ignore[arg-type]
        counts = Counter(item.entity_type for item in result.items)
        return Redacted(text=result.text, entities=dict(sorted(counts.items())), truncated=truncated)

    def _may_hold_pii(self, text: str) -> bool:
        # Every built-in pattern needs a digit (phone, card, IBAN, IPv4), an "@" (e-mail) or a ":" (IPv6): a text
        # with none of them is skipped, which spares most short codes and names the phone matcher's ~0.5 ms.
        # Custom entities and a NER model can match anything, so with them every text is analysed.
        if self._analyzes_everything:
            return bool(text.strip())
        return "@" in text or ":" in text or any(character.isdigit() for character in text)

    def redact_json(self, value: Any, *, where: str) -> tuple[Any, dict[str, int]]:
        """A JSON-shaped value with every string value redacted (keys kept as they are), and the total counts.

        Keys are the payload's own vocabulary (chosen by our code), so they are kept; a value nested deeper than
        MAX_JSON_DEPTH is refused with where it was.
        """
        counts: Counter[str] = Counter()
        redacted = self._walk(value, where=where, depth=0, counts=counts)
        return redacted, dict(sorted(counts.items()))

    def _walk(self, value: Any, *, where: str, depth: int, counts: Counter[str]) -> Any:
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"PII redaction at {where}: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            found = self.redact_text(value, where=where)
            counts.update(found.entities)
            return found.text
        if isinstance(value, Mapping):
            return {
                key: self._walk(item, where=f"{where}.{key}", depth=depth + 1, counts=counts)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [
                self._walk(item, where=f"{where}[{index}]", depth=depth + 1, counts=counts)
                for index, item in enumerate(value)
            ]
        return value


def _build_engines(config: RedactionConfig) -> tuple[AnalyzerEngine, AnonymizerEngine]:
    # Imported here: presidio pulls in spaCy and phonenumbers (a second or so), which only processes that store
    # free text pay for, and parsing the configuration in the settings module must not.
    from presidio_analyzer import AnalyzerEngine, EntityRecognizer, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NlpEngine, NoOpNlpEngine, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        SpacyRecognizer,
    )
    from presidio_anonymizer import AnonymizerEngine

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail recogniser, checking the domain against tldextract's bundled suffix list only."""

        def validate_result(self, pattern_text: str) -> bool:
            return bool(_offline_tld_extractor()(pattern_text).fqdn)

    class DecimalAwarePhoneRecognizer(PhoneRecognizer):
        """Presidio's phone recogniser, less the decimal numbers python-phonenumbers takes for phone numbers
        ("loss 0.123456789"): a match that is one decimal, or part of one, is a figure, not a number to call."""

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            found = super().analyze(text, entities, nlp_artifacts)
            return [result for result in found if not _is_decimal(text, result.start, result.end)]

    nlp_engine: NlpEngine
    if config.ner_model:
        _require_installed_spacy_model(config.ner_model)
        nlp_engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": config.ner_model}])
    else:
        nlp_engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}])
    nlp_engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    builtin: dict[str, Callable[[], EntityRecognizer]] = {
        "EMAIL_ADDRESS": OfflineEmailRecognizer,
        "PHONE_NUMBER": lambda: DecimalAwarePhoneRecognizer(supported_regions=config.phone_regions),
        "CREDIT_CARD": CreditCardRecognizer,
        "IBAN_CODE": IbanRecognizer,
        "IP_ADDRESS": IpRecognizer,
    }
    for entity in config.entities:
        registry.add_recognizer(builtin[entity]())
    for custom in config.custom:
        registry.add_recognizer(
            PatternRecognizer(
                supported_entity=custom.entity,
                name=f"custom_{custom.entity.lower()}",
                patterns=[Pattern(custom.entity, custom.regex, custom.score)] if custom.regex else [],
                deny_list=list(custom.deny_list),
                deny_list_score=custom.score,
            )
        )
    if config.ner_model:
        registry.add_recognizer(
            SpacyRecognizer(supported_language="en", supported_entities=nlp_engine.get_supported_entities())
        )
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])
    return analyzer, AnonymizerEngine()  # type: ignore[no-untyped-call]


_DECIMAL = re.compile(r"\d+\.\d+")


def _is_decimal(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] is a decimal number or the digits on one side of a decimal point."""
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    return bool(_DECIMAL.fullmatch(text[start:end]) or re.fullmatch(r"\d\.", before) or re.fullmatch(r"\.\d", after))


def _require_installed_spacy_model(name: str) -> None:
    """Presidio's SpacyNlpEngine downloads a model it cannot find; we refuse instead, naming what to install."""
    import spacy.util

    if not (spacy.util.is_package(name) or Path(name).is_dir()):
        raise PiiConfigError(
            f"FEDNESTED_PII_REDACTION: ner_model {name!r} is neither an installed spaCy package nor a saved pipeline "
            "directory; nothing is downloaded at run time: install it with the deployment's packages, or leave "
            "ner_model empty (pattern recognisers only)"
        )


@functools.cache
def _offline_tld_extractor() -> Any:
    import tldextract

    # No cache directory, no suffix-list URLs: the public-suffix list tldextract ships, never a fetch.
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


@functools.cache
def redactor_for(config: RedactionConfig) -> Redactor:
    """The process's Redactor for `config`, built on first use (about a second) and reused."""
    return Redactor(config)


def redact_text(text: str, *, where: str, config: RedactionConfig | None = None) -> Redacted:
    """Redact one text with the process's Redactor for `config` (the defaults when None)."""
    return redactor_for(config or RedactionConfig()).redact_text(text, where=where)


def redact_json(value: Any, *, where: str, config: RedactionConfig | None = None) -> tuple[Any, dict[str, int]]:
    """Redact every string value of a JSON-shaped value (keys kept); returns the value and the counts."""
    return redactor_for(config or RedactionConfig()).redact_json(value, where=where)


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """Counts of several redactions added up, sorted by entity type (what `_redacted` records)."""
    total: Counter[str] = Counter()
    for each in counts:
        total.update(each)
    return dict(sorted(total.items()))


def redact_payload(
    data: Mapping[str, Any], *, where: str, config: RedactionConfig | None = None, already: Mapping[str, int] = {}
) -> dict[str, Any]:
    """An audit payload redacted, with the counts under `_redacted` (absent when nothing was found).

    `already` are the counts of redactions the caller made before (e.g. of a reason it also stores on its own row,
    then passes here redacted), so the audit event records every redaction of the change once.
    """
    if REDACTED_KEY in data:
        raise ValueError(
            f"PII redaction at {where}: the payload already has a {REDACTED_KEY!r} key; pass its counts as `already`"
        )
    redacted, counts = redact_json(dict(data), where=where, config=config)
    total = merge_counts(already, counts)
    if total:
        redacted[REDACTED_KEY] = total
    return dict(redacted)
