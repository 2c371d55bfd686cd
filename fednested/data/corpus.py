"""A seeded, synthetic multi-domain corpus for tests, the demo and forgetting measurements.

Each domain is a small templated grammar over its own vocabulary (clinical notes, vehicle telemetry, contract
clauses, recipes, Python code), so the domains are learnable and clearly told apart by a model's loss. The same seed
always yields the same records; held-out records never repeat a training record.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from fednested.data.jsonl import write_jsonl
from fednested.data.records import (
    RECORD_FORMATS,
    ChatMessage,
    ChatRecord,
    PromptCompletionRecord,
    Record,
    RecordFormat,
    TextRecord,
)

Split: TypeAlias = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")


@dataclass(frozen=True)
class CorpusSample:
    """One generated item: the request a user would make, the context it carries, and the domain text to learn."""

    request: str
    prompt: str
    completion: str


def _pick(rng: random.Random, options: tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


_SYMPTOMS = ("fever", "cough", "chest pain", "headache", "shortness of breath", "abdominal pain", "dizziness", "rash")
_DIAGNOSES = (
    "community-acquired pneumonia",
    "viral upper respiratory infection",
    "migraine without aura",
    "stable angina",
    "acute gastroenteritis",
    "benign positional vertigo",
    "contact dermatitis",
    "asthma exacerbation",
)
_DRUGS = (
    ("amoxicillin", (500, 875)),
    ("ibuprofen", (200, 400, 600)),
    ("sumatriptan", (50, 100)),
    ("metoprolol", (25, 50)),
    ("ondansetron", (4, 8)),
    ("meclizine", (12, 25)),
    ("prednisone", (10, 20, 40)),
    ("albuterol", (90, 180)),
)
_FREQUENCIES = ("once daily", "twice daily", "every 8 hours", "as needed")
_FOLLOW_UPS = (
    "follow up in clinic in one week",
    "return if symptoms worsen",
    "recheck vitals in 48 hours",
    "refer to cardiology",
    "repeat labs in two weeks",
)


def _medical(rng: random.Random) -> CorpusSample:
    age = rng.randint(18, 92)
    sex = _pick(rng, ("male", "female"))
    symptom = _pick(rng, _SYMPTOMS)
    duration = f"{rng.randint(1, 14)} {_pick(rng, ('days', 'weeks'))}"
    drug, doses = _DRUGS[rng.randrange(len(_DRUGS))]
    prompt = (
        f"Patient MRN-{rng.randint(10000, 99999)}, {age}-year-old {sex}. Chief complaint: {symptom} for {duration}."
    )
    completion = (
        f" Vitals: BP {rng.randint(100, 165)}/{rng.randint(60, 100)} mmHg, HR {rng.randint(55, 120)} bpm, "
        f"temp {rng.uniform(36.2, 39.8):.1f} C, SpO2 {rng.randint(90, 100)}%. "
        f"Assessment: {_pick(rng, _DIAGNOSES)}. "
        f"Plan: start {drug} {rng.choice(doses)} mg {_pick(rng, _FREQUENCIES)}; {_pick(rng, _FOLLOW_UPS)}."
    )
    return CorpusSample(request="Write the clinical note for this encounter.", prompt=prompt, completion=completion)


_EVENTS = ("none", "hard_brake", "lane_change", "abs_active", "idle", "overspeed", "door_open", "tpms_low")
_GEARS = ("P", "R", "N", "D1", "D2", "D3", "D4", "D5")


def _telemetry(rng: random.Random) -> CorpusSample:
    vin = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(11))
    hour, minute, second = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 50)
    prompt = (
        f"vehicle={vin} trip={rng.randint(1000, 9999)} start=2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    )
    speed = rng.randint(0, 130)
    fuel = rng.randint(5, 100)
    coolant = rng.randint(70, 105)
    lines = []
    for step in range(rng.randint(2, 4)):
        speed = max(0, min(180, speed + rng.randint(-15, 15)))
        rpm = 800 + speed * rng.randint(22, 30)
        coolant = max(60, min(118, coolant + rng.randint(-2, 3)))
        lines.append(
            f"\nts={hour:02d}:{minute:02d}:{second + step * 3:02d} speed_kph={speed} rpm={rpm} "
            f"coolant_c={coolant} fuel_pct={fuel} gear={_pick(rng, _GEARS)} event={_pick(rng, _EVENTS)}"
        )
    return CorpusSample(
        request="Log the next telemetry frames for this trip.", prompt=prompt, completion="".join(lines)
    )


_PARTIES = ("Licensee", "Licensor", "Supplier", "Customer", "Contractor", "Tenant", "Landlord", "Recipient")
_HEADINGS = ("Confidentiality", "Indemnification", "Termination", "Payment Terms", "Warranties", "Governing Law")
_OBLIGATIONS = (
    "deliver written notice to the other party",
    "remit all undisputed invoices",
    "return or destroy all Confidential Information",
    "indemnify and hold harmless the other party",
    "cure any material breach",
    "maintain commercially reasonable insurance",
)
_TRIGGERS = (
    "the Effective Date",
    "receipt of a valid invoice",
    "termination of this Agreement",
    "written request by the disclosing party",
    "the occurrence of a Force Majeure Event",
)
_CONDITIONS = (
    "such obligation shall survive the expiration of this Agreement",
    "no waiver shall be effective unless made in writing",
    "the foregoing shall not limit any remedy available at law or in equity",
    "any dispute shall be resolved by binding arbitration",
)
_NUMBER_WORDS = {5: "five", 10: "ten", 15: "fifteen", 30: "thirty", 45: "forty-five", 60: "sixty", 90: "ninety"}


def _legal(rng: random.Random) -> CorpusSample:
    party = _pick(rng, _PARTIES)
    days = rng.choice(tuple(_NUMBER_WORDS))
    prompt = f"Section {rng.randint(1, 19)}.{rng.randint(1, 9)} {_pick(rng, _HEADINGS)}."
    completion = (
        f" The {party} shall {_pick(rng, _OBLIGATIONS)} within {_NUMBER_WORDS[days]} ({days}) days after "
        f"{_pick(rng, _TRIGGERS)}, provided that {_pick(rng, _CONDITIONS)}. Notwithstanding the foregoing, the "
        f"{_pick(rng, _PARTIES)} may {_pick(rng, ('assign', 'suspend', 'terminate', 'amend'))} this Agreement "
        f"upon {_NUMBER_WORDS[rng.choice(tuple(_NUMBER_WORDS))]} days prior written notice."
    )
    return CorpusSample(request="Draft the clause for this section heading.", prompt=prompt, completion=completion)


_INGREDIENTS = (
    "flour",
    "butter",
    "garlic",
    "onion",
    "basil",
    "tomatoes",
    "olive oil",
    "sugar",
    "eggs",
    "rice",
    "lemon juice",
    "chicken stock",
)
_UNITS = ("cups", "tablespoons", "teaspoons", "grams", "cloves", "pinches")
_DISHES = ("risotto", "tart", "soup", "stew", "flatbread", "omelette", "salad", "curry")
_ADJECTIVES = ("rustic", "golden", "spiced", "creamy", "herbed", "smoky", "lemony", "roasted")
_STEP_VERBS = ("Whisk", "Chop", "Saute", "Fold in", "Simmer", "Season", "Stir", "Toast")


def _recipe(rng: random.Random) -> CorpusSample:
    dish = f"{_pick(rng, _ADJECTIVES)} {_pick(rng, _INGREDIENTS)} {_pick(rng, _DISHES)}"
    prompt = f"Recipe: {dish}. Serves {rng.randint(2, 8)}."
    ingredients = rng.sample(_INGREDIENTS, rng.randint(3, 5))
    listed = ", ".join(f"{rng.randint(1, 4)} {_pick(rng, _UNITS)} {name}" for name in ingredients)
    steps = " ".join(
        f"{index}. {_pick(rng, _STEP_VERBS)} the {name} for {rng.randint(2, 12)} minutes."
        for index, name in enumerate(ingredients, start=1)
    )
    completion = f" Ingredients: {listed}. Steps: {steps} Bake at {rng.choice((160, 180, 200, 220))} C and serve."
    return CorpusSample(request="Write out this recipe.", prompt=prompt, completion=completion)


_NOUNS = ("items", "values", "records", "scores", "names", "prices", "rows", "events")
_OPERATIONS = (
    ("sum of", "total = 0\n    for x in {arg}:\n        total += x", "total"),
    ("maximum of", "best = {arg}[0]\n    for x in {arg}:\n        if x > best:\n            best = x", "best"),
    ("count of positive", "count = 0\n    for x in {arg}:\n        if x > 0:\n            count += 1", "count"),
    ("sorted copy of", "result = sorted({arg})", "result"),
    ("unique", "seen = set()\n    for x in {arg}:\n        seen.add(x)", "len(seen)"),
)


def _code(rng: random.Random) -> CorpusSample:
    noun = _pick(rng, _NOUNS)
    description, body, result = _OPERATIONS[rng.randrange(len(_OPERATIONS))]
    name = f"{description.split()[0]}_{noun}_{rng.randint(1, 99)}"
    prompt = f"# Return the {description} {noun}.\ndef {name}({noun}):"
    scale = rng.randint(2, 9)
    completion = f"\n    {body.format(arg=noun)}\n    return {result}\n\n\nassert {name}([{scale}, 1]) is not None\n"
    return CorpusSample(request="Complete this Python function.", prompt=prompt, completion=completion)


DOMAIN_GENERATORS: dict[str, Callable[[random.Random], CorpusSample]] = {
    "medical": _medical,
    "telemetry": _telemetry,
    "legal": _legal,
    "recipes": _recipe,
    "code": _code,
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_GENERATORS)


def _as_record(sample: CorpusSample, record_format: RecordFormat) -> Record:
    if record_format == "text":
        return TextRecord(text=sample.prompt + sample.completion)
    if record_format == "prompt_completion":
        return PromptCompletionRecord(prompt=sample.prompt, completion=sample.completion)
    return ChatRecord(
        messages=(
            ChatMessage(role="user", content=f"{sample.request}\n{sample.prompt}"),
            ChatMessage(role="assistant", content=sample.completion.lstrip(" ")),
        )
    )


@dataclass(frozen=True)
class CorpusConfig:
    """Which domains, how many samples per split, and the seed that fixes every record."""

    seed: int = 0
    domains: tuple[str, ...] = DOMAINS
    train_samples: int = 200
    heldout_samples: int = 50

    def __post_init__(self) -> None:
        unknown = [name for name in self.domains if name not in DOMAIN_GENERATORS]
        if unknown:
            raise ValueError(f"unknown corpus domains {unknown}; known: {', '.join(DOMAINS)}")
        if not self.domains:
            raise ValueError("at least one domain is needed")
        if self.train_samples < 1 or self.heldout_samples < 0:
            raise ValueError("train_samples must be >= 1 and heldout_samples >= 0")


@dataclass(frozen=True)
class DomainCorpus:
    """One domain's samples, rendered on demand in any record format."""

    domain: str
    train_samples: tuple[CorpusSample, ...] = field(repr=False)
    heldout_samples: tuple[CorpusSample, ...] = field(repr=False)

    def records(self, split: Split, record_format: RecordFormat = "text") -> list[Record]:
        samples = self.train_samples if split == "train" else self.heldout_samples
        return [_as_record(sample, record_format) for sample in samples]

    def mixed_records(self, split: Split) -> list[Record]:
        """The split with its samples spread over the three formats in turn (each sample appears once)."""
        samples = self.train_samples if split == "train" else self.heldout_samples
        return [_as_record(sample, RECORD_FORMATS[index % len(RECORD_FORMATS)]) for index, sample in enumerate(samples)]


def _generate_domain(config: CorpusConfig, domain: str) -> DomainCorpus:
    generate = DOMAIN_GENERATORS[domain]
    # A string seed is hashed with SHA-512 by `random`, so streams are stable across processes and Python builds.
    train_rng = random.Random(f"fednested-corpus:{config.seed}:{domain}:train")
    train = tuple(generate(train_rng) for _ in range(config.train_samples))
    seen = {sample.prompt + sample.completion for sample in train}
    heldout_rng = random.Random(f"fednested-corpus:{config.seed}:{domain}:heldout")
    heldout: list[CorpusSample] = []
    attempts = 0
    while len(heldout) < config.heldout_samples:
        attempts += 1
        if attempts > 100 * (config.heldout_samples + 1):
            raise ValueError(
                f"domain {domain!r} cannot produce {config.heldout_samples} held-out samples unseen in train"
            )
        sample = generate(heldout_rng)
        key = sample.prompt + sample.completion
        if key not in seen:
            seen.add(key)
            heldout.append(sample)
    return DomainCorpus(domain=domain, train_samples=train, heldout_samples=tuple(heldout))


def generate_corpus(config: CorpusConfig | None = None) -> dict[str, DomainCorpus]:
    """Generate every configured domain; the result depends on `config` only."""
    config = config or CorpusConfig()
    return {domain: _generate_domain(config, domain) for domain in config.domains}


def write_corpus(corpus: dict[str, DomainCorpus], directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<directory>/<domain>/<split>.<format>.jsonl`` for every domain, split and format; returns the paths."""
    written = []
    for domain, domain_corpus in corpus.items():
        for split in SPLITS:
            for record_format in RECORD_FORMATS:
                path = Path(directory) / domain / f"{split}.{record_format}.jsonl"
                write_jsonl(path, domain_corpus.records(split, record_format))
                written.append(path)
    return written
