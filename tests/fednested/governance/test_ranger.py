"""The Ranger-format dataset policy evaluator against its own table of cases, the files it refuses (each naming the
file and JSON path), export/import round trips, and pushes to a loopback HTTP recorder standing in for Ranger admin."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from apache_ranger.model.ranger_policy import RangerPolicy
from apache_ranger.utils import type_coerce
from typer.testing import CliRunner

from fednested.cli import app
from fednested.governance import ranger
from fednested.governance.ranger import (
    SERVICE_DEF,
    PolicyFileError,
    Principal,
    UnsupportedPolicyError,
    decide,
    dump_policies,
    load_policy_file,
    parse_policies,
    write_policy_file,
)
from fednested.governance.ranger_admin import RangerAdminError, push_policies

runner = CliRunner()


def item(*accesses: str, users: Sequence[str] = (), groups: Sequence[str] = (), roles: Sequence[str] = ()) -> Any:
    return {
        "accesses": [{"type": access, "isAllowed": True} for access in accesses],
        "users": list(users),
        "groups": list(groups),
        "roles": list(roles),
    }


def policy(
    policy_id: int,
    name: str,
    values: Sequence[str] = ("/tier1/med",),
    *,
    recursive: bool = False,
    excludes: bool = False,
    allow: Sequence[Any] = (),
    deny: Sequence[Any] = (),
    allow_exceptions: Sequence[Any] = (),
    deny_exceptions: Sequence[Any] = (),
    priority: int = 0,
    enabled: bool = True,
    deny_all_else: bool = False,
    additional: Sequence[Sequence[str]] = (),
) -> Any:
    return {
        "id": policy_id,
        "name": name,
        "service": "fednested-prod",
        "policyPriority": priority,
        "isEnabled": enabled,
        "isDenyAllElse": deny_all_else,
        "resources": {"dataset": {"values": list(values), "isExcludes": excludes, "isRecursive": recursive}},
        "additionalResources": [{"dataset": {"values": list(extra)}} for extra in additional],
        "policyItems": list(allow),
        "denyPolicyItems": list(deny),
        "allowExceptions": list(allow_exceptions),
        "denyExceptions": list(deny_exceptions),
    }


@dataclass(frozen=True)
class Case:
    """One request against a set of policies and the decision Ranger's semantics give it."""

    id: str
    policies: Sequence[Any]
    resource: str
    allowed: bool
    decided_by: str | None = None  # the deciding policy's name; None: the default deny
    item: tuple[str, int | None] | None = None
    user: str = "svc-tier1"
    groups: frozenset[str] = field(default_factory=frozenset)
    roles: frozenset[str] = field(default_factory=frozenset)
    access: str = "read"


MED = "/tier1/med"
READERS = policy(1, "readers", allow=[item("read", users=["svc-tier1"])])

CASES = [
    Case("user allowed", [READERS], MED, True, "readers", ("policyItems", 0)),
    Case("other access not granted", [READERS], MED, False, access="write"),
    Case("user not named", [READERS], MED, False, user="svc-other"),
    Case("no policies", [], MED, False),
    Case("other dataset", [READERS], "/tier1/law", False),
    Case(
        "group allowed",
        [policy(2, "g", allow=[item("write", users=["x"]), item("read", groups=["ml"])])],
        MED,
        True,
        "g",
        ("policyItems", 1),
        groups=frozenset({"ml", "ops"}),
    ),
    Case(
        "role allowed",
        [policy(3, "r", allow=[item("read", roles=["trainer"])])],
        MED,
        True,
        "r",
        ("policyItems", 0),
        roles=frozenset({"trainer"}),
    ),
    Case(
        "public group",
        [policy(4, "pub", allow=[item("read", groups=["public"])])],
        MED,
        True,
        "pub",
        ("policyItems", 0),
    ),
    Case(
        "{USER} macro", [policy(5, "any", allow=[item("read", users=["{USER}"])])], MED, True, "any", ("policyItems", 0)
    ),
    Case("access type case-insensitive", [policy(6, "up", allow=[item("READ", users=["svc-tier1"])])], MED, True, "up"),
    Case(
        "isAllowed false grants nothing",
        [
            policy(
                7,
                "off",
                allow=[{"accesses": [{"type": "read", "isAllowed": False}], "users": ["svc-tier1"]}],
            )
        ],
        MED,
        False,
    ),
    Case(
        "deny item beats allow item of the same policy",
        [policy(8, "both", allow=[item("read", users=["svc-tier1"])], deny=[item("read", groups=["contractors"])])],
        MED,
        False,
        "both",
        ("denyPolicyItems", 0),
        groups=frozenset({"contractors"}),
    ),
    Case(
        "deny in a later policy beats an earlier allow",
        [READERS, policy(9, "embargo", deny=[item("read", users=["svc-tier1"])])],
        MED,
        False,
        "embargo",
        ("denyPolicyItems", 0),
    ),
    Case(
        "allow exception removes the allow",
        [policy(10, "ex", allow=[item("read", groups=["ml"])], allow_exceptions=[item("read", users=["svc-tier1"])])],
        MED,
        False,
        groups=frozenset({"ml"}),
    ),
    Case(
        "allow exception for someone else leaves the allow",
        [policy(11, "ex2", allow=[item("read", groups=["ml"])], allow_exceptions=[item("read", users=["intern"])])],
        MED,
        True,
        "ex2",
        ("policyItems", 0),
        groups=frozenset({"ml"}),
    ),
    Case(
        "deny exception removes the deny",
        [
            policy(
                12,
                "dx",
                allow=[item("read", users=["svc-tier1"])],
                deny=[item("read", groups=["ml"])],
                deny_exceptions=[item("read", users=["svc-tier1"])],
            )
        ],
        MED,
        True,
        "dx",
        ("policyItems", 0),
        groups=frozenset({"ml"}),
    ),
    Case(
        "* spans separators in a non-recursive value",
        [policy(13, "star", ["/tier1/*"], allow=[item("read", users=["svc-tier1"])])],
        "/tier1/med/train/a.jsonl",
        True,
        "star",
    ),
    Case(
        "? matches one character",
        [policy(14, "q", ["/tier1/med/part-?.jsonl"], allow=[item("read", users=["svc-tier1"])])],
        "/tier1/med/part-3.jsonl",
        True,
        "q",
    ),
    Case(
        "? does not match two characters",
        [policy(15, "q2", ["/tier1/med/part-?.jsonl"], allow=[item("read", users=["svc-tier1"])])],
        "/tier1/med/part-10.jsonl",
        False,
    ),
    Case(
        "value * matches every dataset",
        [policy(16, "all", ["*"], allow=[item("read", users=["svc-tier1"])])],
        "/anything/at/all",
        True,
        "all",
    ),
    Case(
        "isExcludes covers what is not listed",
        [policy(17, "not-secret", ["/tier1/secret"], excludes=True, allow=[item("read", users=["svc-tier1"])])],
        MED,
        True,
        "not-secret",
    ),
    Case(
        "isExcludes leaves out what is listed",
        [policy(18, "not-secret2", ["/tier1/secret"], excludes=True, allow=[item("read", users=["svc-tier1"])])],
        "/tier1/secret",
        False,
    ),
    Case(
        "isRecursive covers what is below",
        [policy(19, "rec", [MED], recursive=True, allow=[item("read", users=["svc-tier1"])])],
        "/tier1/med/train/a.jsonl",
        True,
        "rec",
    ),
    Case(
        "isRecursive does not cover a sibling with the same prefix",
        [policy(20, "rec2", [MED], recursive=True, allow=[item("read", users=["svc-tier1"])])],
        "/tier1/medical/a.jsonl",
        False,
    ),
    Case(
        "not recursive: only the value itself",
        [policy(21, "flat", [MED], allow=[item("read", users=["svc-tier1"])])],
        "/tier1/med/a.jsonl",
        False,
    ),
    Case(
        "recursive wildcard matches an ancestor",
        [policy(22, "recw", ["/tier1/*/train"], recursive=True, allow=[item("read", users=["svc-tier1"])])],
        "/tier1/med/train/shard-0.jsonl",
        True,
        "recw",
    ),
    Case(
        "additionalResources: a second resource set",
        [policy(23, "two-sets", ["/tier1/law"], additional=[[MED]], allow=[item("read", users=["svc-tier1"])])],
        MED,
        True,
        "two-sets",
    ),
    Case(
        "override allow beats a normal deny",
        [
            policy(24, "normal-deny", deny=[item("read", users=["svc-tier1"])]),
            policy(25, "override-allow", priority=1, allow=[item("read", users=["svc-tier1"])]),
        ],
        MED,
        True,
        "override-allow",
        ("policyItems", 0),
    ),
    Case(
        "override deny beats a normal allow",
        [READERS, policy(26, "override-deny", priority=1, deny=[item("read", users=["svc-tier1"])])],
        MED,
        False,
        "override-deny",
        ("denyPolicyItems", 0),
    ),
    Case(
        "deny over allow within the override priority",
        [
            policy(27, "o-allow", priority=1, allow=[item("read", users=["svc-tier1"])]),
            policy(28, "o-deny", priority=1, deny=[item("read", users=["svc-tier1"])]),
        ],
        MED,
        False,
        "o-deny",
    ),
    Case(
        "deny-all-else denies whom it does not allow",
        [READERS, policy(29, "only-auditors", deny_all_else=True, allow=[item("read", groups=["auditors"])])],
        MED,
        False,
        "only-auditors",
        ("isDenyAllElse", None),
    ),
    Case(
        "deny-all-else allows whom it allows",
        [policy(30, "only-auditors2", deny_all_else=True, allow=[item("read", groups=["auditors"])])],
        MED,
        True,
        "only-auditors2",
        groups=frozenset({"auditors"}),
    ),
    Case(
        "disabled deny policy is ignored",
        [READERS, policy(31, "old-embargo", enabled=False, deny=[item("read", users=["svc-tier1"])])],
        MED,
        True,
        "readers",
    ),
    Case(
        "disabled allow policy is ignored",
        [policy(32, "old-grant", enabled=False, allow=[item("read", users=["svc-tier1"])])],
        MED,
        False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_decision_table(case: Case) -> None:
    policies = parse_policies({"policies": list(case.policies)}, source="table")
    principal = Principal(user=case.user, groups=case.groups, roles=case.roles)
    decision = decide(policies, principal, case.resource, case.access)
    assert decision.allowed is case.allowed, decision.reason
    assert decision.policy_name == case.decided_by, decision.reason
    if case.item is not None:
        assert (decision.item_kind, decision.item_index) == case.item
    if case.decided_by is None:
        assert decision.item_kind is None
        assert decision.reason.startswith(f"no policy allows {case.access} on dataset {case.resource}")
    audit = decision.to_json()
    assert json.loads(json.dumps(audit)) == audit
    assert audit["outcome"] == ("allowed" if case.allowed else "denied")
    assert audit["resource"] == {"dataset": case.resource}


def test_the_table_covers_the_required_semantics() -> None:
    assert len(CASES) >= 25
    assert {case.allowed for case in CASES} == {True, False}


def test_decision_names_policy_item_and_principal() -> None:
    policies = parse_policies([policy(41, "embargo", deny=[item("read", groups=["ml"])])])
    decision = decide(policies, Principal("svc-tier1", groups=frozenset({"ml"})), MED, "read")
    assert decision.to_json() == {
        "outcome": "denied",
        "access": "read",
        "resource": {"dataset": MED},
        "principal": {"user": "svc-tier1", "groups": ["ml"], "roles": []},
        "policy": {"id": 41, "name": "embargo"},
        "item": {"kind": "denyPolicyItems", "index": 0},
        "reason": (
            "policy 41 'embargo' denyPolicyItems[0] denies read on dataset /tier1/med to user svc-tier1 groups ml"
        ),
    }


@pytest.mark.parametrize(
    ("resource", "access", "problem"),
    [
        ("/tier1/med/../secret/a.jsonl", "read", "not canonical"),
        ("/tier1//med", "read", "not canonical"),
        ("/tier1/med/", "read", "not canonical"),
        ("tier1/med", "read", "must be absolute"),
        ("/tier1/med", "delete", "not one of the service-def's access types"),
    ],
)
def test_requests_that_could_dodge_a_policy_are_refused(resource: str, access: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decide(parse_policies([READERS]), Principal("svc-tier1"), resource, access)


def test_hostile_wildcards_are_matched_in_bounded_time() -> None:
    pattern = "/" + "*a" * 200 + "b"
    policies = parse_policies([policy(42, "slow", [pattern], allow=[item("read", users=["svc-tier1"])])])
    started = time.perf_counter()
    decision = decide(policies, Principal("svc-tier1"), "/" + "a" * 1000, "read")
    assert not decision.allowed
    assert time.perf_counter() - started < 5.0


# Unsupported features: refused when the file is read, naming policy, item and JSON path.


@pytest.mark.parametrize(
    ("mutate", "json_path", "message"),
    [
        (
            lambda p: p["denyPolicyItems"].append({**item("read", users=["x"]), "conditions": [{"type": "ip-range"}]}),
            "$.policies[0].denyPolicyItems[0].conditions",
            "conditions are not supported: policy 7 'cond' item denyPolicyItems[0]",
        ),
        (
            lambda p: p.update(conditions=[{"type": "expression", "values": ["true"]}]),
            "$.policies[0].conditions",
            "conditions are not supported: policy 7 'cond'",
        ),
        (
            lambda p: p.update(validitySchedules=[{"startTime": "2026/01/01 00:00:00"}]),
            "$.policies[0].validitySchedules",
            "validity schedules are not supported",
        ),
        (lambda p: p.update(zoneName="finance"), "$.policies[0].zoneName", "security zones are not supported"),
        (lambda p: p.update(policyType=1), "$.policies[0].policyType", "only access policies"),
        (
            lambda p: p["policyItems"].append(item("read", users=["{OWNER}"])),
            "$.policies[0].policyItems[0].users[0]",
            "macro '{OWNER}' is not supported",
        ),
    ],
)
def test_unsupported_features_are_refused_not_ignored(
    tmp_path: Path, mutate: Any, json_path: str, message: str
) -> None:
    document = policy(7, "cond")
    mutate(document)
    path = tmp_path / "policies.json"
    path.write_text(json.dumps({"policies": [document]}))
    with pytest.raises(UnsupportedPolicyError) as raised:
        load_policy_file(path)
    assert raised.value.source == str(path)
    assert raised.value.json_path == json_path
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"{path}: {json_path}: ")


# Files that are not valid Ranger policy JSON for our service-def.


def _with(document: Any, **changes: Any) -> Any:
    return {**document, **changes}


@pytest.mark.parametrize(
    ("content", "json_path", "problem"),
    [
        ("{ not json", "$", "not JSON: Expecting property name enclosed in double quotes at line 1 column 3"),
        ('"a string"', "$", "expected Ranger's export object"),
        ('{"policies": {"name": "x"}}', "$.policies", "expected a list of policies, got an object"),
        (json.dumps([{"resources": {"dataset": {"values": ["/a"]}}}]), "$[0].name", "expected a non-empty string"),
        (
            json.dumps({"policies": [READERS, _with(READERS, name="t", resources={"table": {"values": ["x"]}})]}),
            "$.policies[1].resources",
            "mandatory resource 'dataset' is missing",
        ),
        (
            json.dumps([_with(READERS, resources={"dataset": {"values": ["/a"]}, "table": {"values": ["x"]}})]),
            "$[0].resources.table",
            "unknown resource 'table'",
        ),
        (
            json.dumps([_with(READERS, policyItems=[item("delete", users=["u"])])]),
            "$[0].policyItems[0].accesses[0].type",
            "unknown access type 'delete'",
        ),
        (
            json.dumps([_with(READERS, resources={"dataset": {"values": ["/a"], "isRecursive": "yes"}})]),
            "$[0].resources.dataset.isRecursive",
            "expected true or false, got a string",
        ),
        (
            json.dumps([_with(READERS, resources={"dataset": {"values": []}})]),
            "$[0].resources.dataset.values",
            "at least one value",
        ),
        (json.dumps([_with(READERS, serviceType="hdfs")]), "$[0].serviceType", "service type 'hdfs'"),
        (json.dumps([_with(READERS, policyPriority=5)]), "$[0].policyPriority", "expected 0 (normal) or 1"),
        (json.dumps([_with(READERS, id="one")]), "$[0].id", "expected an integer, got a string"),
        (
            json.dumps([_with(READERS, policyItems=[{**item("read"), "users": ["u", 3]}])]),
            "$[0].policyItems[0].users[1]",
            "expected a string, got a number",
        ),
        (json.dumps([READERS, READERS]), "$[1].name", "policy name 'readers' repeats $[0]"),
    ],
)
def test_bad_files_name_the_file_and_json_path(tmp_path: Path, content: str, json_path: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PolicyFileError) as raised:
        load_policy_file(path)
    assert not isinstance(raised.value, UnsupportedPolicyError)
    assert raised.value.json_path == json_path
    assert problem in raised.value.problem
    assert str(raised.value) == f"{path}: {json_path}: {raised.value.problem}"


def test_unreadable_oversized_and_non_utf8_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(PolicyFileError, match=r"missing\.json: \$: cannot read the file: No such file"):
        load_policy_file(missing)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"name": "caf\xe9"}]')
    with pytest.raises(PolicyFileError, match=r"not UTF-8 text \(byte 14\)"):
        load_policy_file(latin)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PolicyFileError, match=r"deep\.json: \$: JSON nested too deeply"):
        load_policy_file(deep)
    big = tmp_path / "big.json"
    big.write_text(json.dumps([READERS]))
    monkeypatch.setattr(ranger, "MAX_FILE_BYTES", 100)
    with pytest.raises(PolicyFileError, match=r"file is \d+ bytes; a policy file may have at most 100"):
        load_policy_file(big)


# Import and export.

# What Ranger admin's exportJson writes for one of our policies, every field included.
ADMIN_EXPORT: dict[str, Any] = {
    "metaDataInfo": {"Host name": "ranger-admin", "Exported by": "admin", "Export time": "12/07/2026 14:00:00"},
    "policies": [
        {
            **policy(
                101,
                "tier1-medical-readers",
                ["/tier1/med", "/tier1/shared/*"],
                recursive=True,
                allow=[{**item("read", users=["svc-tier1"], groups=["ml"]), "conditions": [], "delegateAdmin": False}],
                deny=[{**item("read", "write", roles=["contractor"]), "conditions": [], "delegateAdmin": False}],
            ),
            "guid": "1f1d2c5e-7a8b-4c1d-9e2f-3a4b5c6d7e8f",
            "isAuditEnabled": True,
            "version": 3,
            "description": "Tier-1 core updates read the medical corpus",
            "resourceSignature": "9c1e",
            "policyLabels": ["tier1"],
            "options": {},
            "serviceType": "fednested",
            "policyType": 0,
            "zoneName": "",
            "conditions": [],
            "validitySchedules": [],
            "dataMaskPolicyItems": [],
            "rowFilterPolicyItems": [],
            "createdBy": "Admin",
            "updatedBy": "Admin",
            "createTime": 1796652000000,
            "updateTime": 1796655600000,
        }
    ],
}


def test_an_admin_export_round_trips_field_for_field(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(ADMIN_EXPORT))
    policies = load_policy_file(path)
    assert [p.name for p in policies] == ["tier1-medical-readers"]
    assert policies[0].extra["guid"] == "1f1d2c5e-7a8b-4c1d-9e2f-3a4b5c6d7e8f"
    exported = dump_policies(policies)
    assert exported["policies"] == ADMIN_EXPORT["policies"]
    assert exported["metaDataInfo"]["Exported by"] == "fednested"

    out = tmp_path / "out.json"
    write_policy_file(out, policies)
    assert load_policy_file(out) == policies
    write_policy_file(out, policies, layout="list")
    assert isinstance(json.loads(out.read_text()), list)
    assert load_policy_file(out) == policies
    assert not list(tmp_path.glob(".*.partial"))


def test_round_trip_keeps_every_decision() -> None:
    for case in CASES:
        original = parse_policies(list(case.policies))
        again = parse_policies(dump_policies(original))
        assert again == original
        principal = Principal(user=case.user, groups=case.groups, roles=case.roles)
        assert decide(again, principal, case.resource, case.access) == decide(
            original, principal, case.resource, case.access
        )


def test_a_single_ranger_policy_object_is_read() -> None:
    (single,) = parse_policies(READERS, source="one.json")
    assert single.name == "readers"
    assert single.resource_sets[0]["dataset"].values == (MED,)


def test_the_service_def_is_json_and_names_what_the_parser_accepts() -> None:
    assert json.loads(json.dumps(SERVICE_DEF)) == SERVICE_DEF
    assert [resource["name"] for resource in SERVICE_DEF["resources"]] == [ranger.DATASET_RESOURCE]
    assert [access["name"] for access in SERVICE_DEF["accessTypes"]] == list(ranger.ACCESS_TYPES)
    assert SERVICE_DEF["resources"][0]["recursiveSupported"] is True


# Push, against a loopback recorder: NOT a real Ranger admin. It checks what the apache-ranger client sends.


@dataclass
class Recorder:
    url: str
    requests: list[dict[str, Any]]
    answer: dict[str, Any]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    requests: list[dict[str, Any]] = []
    answer: dict[str, Any] = {"status": 200, "delay_s": 0.0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            parts = urlsplit(self.path)
            requests.append(
                {
                    "path": parts.path,
                    "query": parse_qs(parts.query),
                    "authorization": self.headers.get("Authorization"),
                    "body": body,
                }
            )
            time.sleep(answer["delay_s"])
            status = answer["status"]
            reply = {**body, "id": 500 + len(requests)} if status == 200 else {"msgDesc": "policy name conflict"}
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Recorder(url=f"http://127.0.0.1:{server.server_port}", requests=requests, answer=answer)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_sends_what_rangers_own_model_parses_back_equal(recorder: Recorder) -> None:
    policies = parse_policies(ADMIN_EXPORT, source="export.json") + parse_policies([READERS])
    pushed = push_policies(policies, url=recorder.url, username="admin", password="s3cret", service="fednested-dev")
    assert [(entry.name, entry.admin_id) for entry in pushed] == [("tier1-medical-readers", 501), ("readers", 502)]
    assert len(recorder.requests) == 2
    for sent, received in zip(policies, recorder.requests, strict=True):
        assert received["path"] == "/service/public/v2/api/policy"
        assert received["query"] == {"updateIfExists": ["true"]}
        assert received["authorization"] == "Basic " + base64.b64encode(b"admin:s3cret").decode()
        body = received["body"]
        assert "id" not in body
        assert body["service"] == "fednested-dev"
        expected = {key: value for key, value in sent.to_ranger_json().items() if key != "id"}
        expected["service"] = "fednested-dev"
        assert body == expected  # nothing of ours was lost on the way through the client's RangerPolicy model
        assert type_coerce(body, RangerPolicy) == type_coerce(expected, RangerPolicy)
        # And our parser reads back the same policy, so what admin stores decides the same way.
        (echoed,) = parse_policies(body)
        assert echoed == replace(sent, id=None, service="fednested-dev")


def test_push_errors_name_the_policy(recorder: Recorder) -> None:
    policies = parse_policies([READERS])
    recorder.answer["status"] = 400
    with pytest.raises(RangerAdminError, match=r"refused policy 1 'readers': HTTP 400: policy name conflict"):
        push_policies(policies, url=recorder.url, username="admin", password="pw")
    recorder.answer["status"] = 503
    with pytest.raises(RangerAdminError, match="did not answer policy 1 'readers' with the stored policy"):
        push_policies(policies, url=recorder.url, username="admin", password="pw")
    recorder.answer.update(status=200, delay_s=1.5)
    with pytest.raises(RangerAdminError, match="unreachable while pushing policy 1 'readers'"):
        push_policies(policies, url=recorder.url, username="admin", password="pw", timeout_s=0.3)
    unnamed = parse_policies([{key: value for key, value in READERS.items() if key != "service"}])
    with pytest.raises(RangerAdminError, match="names no Ranger service"):
        push_policies(unnamed, url=recorder.url, username="admin", password="pw")
    with pytest.raises(RangerAdminError, match="expected http"):
        push_policies(policies, url="ftp://127.0.0.1", username="admin", password="pw")


# The CLI.


def test_cli_check_decide_convert(tmp_path: Path) -> None:
    path = tmp_path / "policies.json"
    only_auditors = policy(29, "only-auditors", deny_all_else=True, allow=[item("read", groups=["auditors"])])
    path.write_text(json.dumps({"policies": [READERS, only_auditors]}))
    checked = runner.invoke(app, ["policy", "check", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "2 policies (2 enabled) for service type fednested" in checked.stdout
    assert "policy 29 'only-auditors': normal, enabled, deny-all-else; datasets /tier1/med" in checked.stdout

    args = ["policy", "decide", str(path), "--user", "svc-tier1", "--resource", MED]
    denied = runner.invoke(app, [*args, "--access", "read"])
    assert denied.exit_code == 3, denied.output
    assert json.loads(denied.stdout)["policy"] == {"id": 29, "name": "only-auditors"}
    allowed = runner.invoke(app, [*args, "--group", "auditors", "--role", "trainer"])
    assert allowed.exit_code == 0, allowed.output
    verdict = json.loads(allowed.stdout)
    assert verdict["outcome"] == "allowed"
    assert verdict["principal"] == {"user": "svc-tier1", "groups": ["auditors"], "roles": ["trainer"]}
    bad_request = runner.invoke(app, [*args, "--access", "delete"])
    assert bad_request.exit_code == 1
    assert "access 'delete' is not one of" in bad_request.stderr

    out = tmp_path / "list.json"
    converted = runner.invoke(app, ["policy", "convert", str(path), "--out", str(out), "--layout", "list"])
    assert converted.exit_code == 0, converted.output
    assert load_policy_file(out) == load_policy_file(path)

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([_with(READERS, policyItems=[item("delete", users=["u"])])]))
    refused = runner.invoke(app, ["policy", "check", str(broken)])
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"error: {broken}: $[0].policyItems[0].accesses[0].type: unknown access type")

    service_def = runner.invoke(app, ["policy", "service-def"])
    assert json.loads(service_def.stdout) == SERVICE_DEF


def test_cli_push(tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policies.json"
    path.write_text(json.dumps([READERS]))
    args = ["policy", "push", str(path), "--url", recorder.url, "--user", "admin", "--password-env", "RANGER_PW"]
    monkeypatch.delenv("RANGER_PW", raising=False)
    missing = runner.invoke(app, args)
    assert missing.exit_code == 1
    assert "--password-env RANGER_PW: that environment variable is not set" in missing.stderr
    assert recorder.requests == []

    monkeypatch.setenv("RANGER_PW", "pw")
    pushed = runner.invoke(app, [*args, "--service", "fednested-dev"])
    assert pushed.exit_code == 0, pushed.output
    assert pushed.stdout == "pushed 'readers': Ranger admin id 501\n"
    assert recorder.requests[0]["body"]["service"] == "fednested-dev"
