"""Apache Ranger-format access policies for datasets: parse Ranger's policy JSON (admin exports, bare lists, single
`RangerPolicy` objects), decide whether a principal may read or write a dataset path, and write the JSON back.

The evaluation follows Ranger's policy engine (RangerPolicyEngineImpl / RangerDefaultPolicyEvaluator /
RangerPathResourceMatcher) for the parts of the model we accept; what we do not evaluate (conditions, validity
schedules, security zones, masking and row-filter policies) is refused when the file is read, never ignored, so a
policy can never be more permissive here than in Ranger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

# The service-def of our datasets: what a policy may name.

SERVICE_TYPE: Final = "fednested"
DATASET_RESOURCE: Final = "dataset"
ACCESS_TYPES: Final[tuple[str, ...]] = ("read", "write")
PATH_SEPARATOR: Final = "/"
# Ranger's two priorities: an override policy's decision beats every normal policy's.
PRIORITY_NORMAL: Final = 0
PRIORITY_OVERRIDE: Final = 1
# Ranger's built-in principals: the `public` group holds every user; `{USER}` in users stands for whoever asks.
GROUP_PUBLIC: Final = "public"
USER_CURRENT: Final = "{USER}"

# Registered in Ranger admin (`POST /service/public/v2/api/servicedef`) so its UI and validation know our resources.
# A dataset is a path like `/tier1/medical/train.jsonl`; `isRecursive` on a policy value also covers everything below
# it, and `*`/`?` are wildcards. Matching is case-sensitive, like file paths.
SERVICE_DEF: Final[Mapping[str, Any]] = {
    "name": SERVICE_TYPE,
    "label": "fednested datasets",
    "description": "Tier-1 training datasets of a fednested federation, addressed by path",
    "options": {"enableDenyAndExceptionsInPolicies": "true"},
    "resources": [
        {
            "itemId": 1,
            "name": DATASET_RESOURCE,
            "type": "path",
            "level": 10,
            "mandatory": True,
            "lookupSupported": False,
            "recursiveSupported": True,
            "excludesSupported": True,
            "matcher": "org.apache.ranger.plugin.resourcematcher.RangerPathResourceMatcher",
            "matcherOptions": {"wildCard": "true", "ignoreCase": "false", "pathSeparatorChar": PATH_SEPARATOR},
            "label": "Dataset path",
            "description": "Absolute dataset path, e.g. /tier1/medical/train.jsonl",
        }
    ],
    "accessTypes": [
        {"itemId": 1, "name": "read", "label": "Read"},
        {"itemId": 2, "name": "write", "label": "Write"},
    ],
    "policyConditions": [],
    "contextEnrichers": [],
    "enums": [],
    "configs": [],
}

# Bounds on what a file or a request may hold: a policy file is operator input and must not stall a job.

MAX_FILE_BYTES: Final = 16 * 1024 * 1024
MAX_POLICIES: Final = 10_000
MAX_LIST_ENTRIES: Final = 1_000
MAX_NAME_CHARS: Final = 1_024
MAX_PATH_CHARS: Final = 4_096

ItemKind = Literal["policyItems", "denyPolicyItems", "allowExceptions", "denyExceptions"]
ITEM_KINDS: Final[tuple[ItemKind, ...]] = ("policyItems", "denyPolicyItems", "allowExceptions", "denyExceptions")
# Fields of RangerPolicy that only other policy types or engine features use; a non-empty one is refused.
_UNSUPPORTED_LISTS: Final = {
    "conditions": "conditions are not supported",
    "validitySchedules": "validity schedules are not supported",
    "dataMaskPolicyItems": "data-mask policy items are not supported (access policies only)",
    "rowFilterPolicyItems": "row-filter policy items are not supported (access policies only)",
}


class PolicyFileError(ValueError):
    """A policy document that is not valid Ranger policy JSON for our service-def: names the file and JSON path."""

    def __init__(self, source: str, json_path: str, problem: str) -> None:
        super().__init__(f"{source}: {json_path}: {problem}")
        self.source = source
        self.json_path = json_path
        self.problem = problem


class UnsupportedPolicyError(PolicyFileError):
    """Valid Ranger JSON that uses a feature this evaluator does not implement (conditions, schedules, zones, ...).

    Refused rather than ignored: dropping a condition that restricts an allow item would widen access."""


# The model.


@dataclass(frozen=True)
class PolicyResource:
    """One resource of a policy: its values (with `*`/`?` wildcards), `isExcludes` and `isRecursive`."""

    values: tuple[str, ...]
    is_excludes: bool = False
    is_recursive: bool = False

    def matches(self, value: str) -> bool:
        """Whether the requested `value` is covered: any of `values` matches it, inverted by `is_excludes`."""
        hit = any(_path_value_matches(pattern, value, recursive=self.is_recursive) for pattern in self.values)
        return hit != self.is_excludes

    def to_ranger_json(self) -> dict[str, Any]:
        return {"values": list(self.values), "isExcludes": self.is_excludes, "isRecursive": self.is_recursive}


@dataclass(frozen=True)
class ItemAccess:
    """An access type an item names; Ranger only grants (or denies) it when `is_allowed` is true."""

    type: str
    is_allowed: bool = True


@dataclass(frozen=True)
class PolicyItem:
    """Who (users, groups, roles) an allow, deny or exception item applies to, and for which accesses."""

    accesses: tuple[ItemAccess, ...]
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    delegate_admin: bool = False

    def applies_to(self, principal: Principal, access: str) -> bool:
        """Ranger's item match: the access is listed (case-insensitively, `isAllowed`) and the principal is named
        by user (or `{USER}`), by one of its groups (or `public`) or by one of its roles."""
        if not any(entry.is_allowed and entry.type.lower() == access for entry in self.accesses):
            return False
        if principal.user in self.users or USER_CURRENT in self.users:
            return True
        if GROUP_PUBLIC in self.groups or not principal.groups.isdisjoint(self.groups):
            return True
        return not principal.roles.isdisjoint(self.roles)

    def to_ranger_json(self) -> dict[str, Any]:
        return {
            "accesses": [{"type": entry.type, "isAllowed": entry.is_allowed} for entry in self.accesses],
            "users": list(self.users),
            "groups": list(self.groups),
            "roles": list(self.roles),
            "conditions": [],
            "delegateAdmin": self.delegate_admin,
        }


@dataclass(frozen=True)
class AccessPolicy:
    """A Ranger access policy as this evaluator understands it.

    `resource_sets` holds `resources` first, then each of Ranger's `additionalResources`; the policy applies when any
    set matches. `extra` keeps every other field of the JSON (guid, version, description, labels, ...) verbatim so
    that an exported file round-trips.
    """

    name: str
    resource_sets: tuple[Mapping[str, PolicyResource], ...]
    id: int | None = None
    service: str | None = None
    policy_priority: int = PRIORITY_NORMAL
    is_enabled: bool = True
    is_deny_all_else: bool = False
    policy_items: tuple[PolicyItem, ...] = ()
    deny_policy_items: tuple[PolicyItem, ...] = ()
    allow_exceptions: tuple[PolicyItem, ...] = ()
    deny_exceptions: tuple[PolicyItem, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How decisions and errors name the policy: `policy 12 'tier1-readers'`."""
        return f"policy {self.id if self.id is not None else '-'} {self.name!r}"

    def items(self, kind: ItemKind) -> tuple[PolicyItem, ...]:
        return {
            "policyItems": self.policy_items,
            "denyPolicyItems": self.deny_policy_items,
            "allowExceptions": self.allow_exceptions,
            "denyExceptions": self.deny_exceptions,
        }[kind]

    def matches_resource(self, resource: Mapping[str, str]) -> bool:
        """Whether any resource set covers `resource`: every resource the set names must be requested and match."""
        return any(
            all(name in resource and spec.matches(resource[name]) for name, spec in resource_set.items())
            for resource_set in self.resource_sets
        )

    def to_ranger_json(self) -> dict[str, Any]:
        """The policy as Ranger's JSON (`RangerPolicy`), with the fields it was read with that we do not interpret."""
        document: dict[str, Any] = dict(self.extra)
        if self.id is not None:
            document["id"] = self.id
        if self.service is not None:
            document["service"] = self.service
        items: dict[str, Any] = {kind: [item.to_ranger_json() for item in self.items(kind)] for kind in ITEM_KINDS}
        document.update(
            name=self.name,
            serviceType=SERVICE_TYPE,
            policyType=0,
            policyPriority=self.policy_priority,
            isEnabled=self.is_enabled,
            isDenyAllElse=self.is_deny_all_else,
            resources={name: spec.to_ranger_json() for name, spec in self.resource_sets[0].items()},
            additionalResources=[
                {name: spec.to_ranger_json() for name, spec in resource_set.items()}
                for resource_set in self.resource_sets[1:]
            ],
            zoneName="",
            **{key: [] for key in _UNSUPPORTED_LISTS},
            **items,
        )
        return document


@dataclass(frozen=True)
class Principal:
    """Who asks: a user name (a Tier-1 job's service principal) with its groups and roles."""

    user: str
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.user or len(self.user) > MAX_NAME_CHARS:
            raise ValueError(f"principal user must be 1 to {MAX_NAME_CHARS} characters, got {len(self.user)}")
        for label, names in (("groups", self.groups), ("roles", self.roles)):
            if len(names) > MAX_LIST_ENTRIES:
                raise ValueError(f"principal {self.user!r} has {len(names)} {label}; at most {MAX_LIST_ENTRIES}")

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "groups": sorted(self.groups), "roles": sorted(self.roles)}


DecidingItem = Literal["policyItems", "denyPolicyItems", "isDenyAllElse"]


@dataclass(frozen=True)
class Decision:
    """The outcome of one access check, with what decided it: the policy (id, name) and the item (kind, index into
    that list, as in the JSON) — `isDenyAllElse` when the policy's deny-all-else denied, nothing when no policy
    allowed it. A job records `to_json()` in its audit trail whichever way it went."""

    allowed: bool
    access: str
    resource: Mapping[str, str]
    principal: Principal
    reason: str
    policy_id: int | None = None
    policy_name: str | None = None
    item_kind: DecidingItem | None = None
    item_index: int | None = None

    @property
    def outcome(self) -> Literal["allowed", "denied"]:
        return "allowed" if self.allowed else "denied"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict for audit rows and the CLI."""
        return {
            "outcome": self.outcome,
            "access": self.access,
            "resource": dict(self.resource),
            "principal": self.principal.to_json(),
            "policy": None if self.policy_name is None else {"id": self.policy_id, "name": self.policy_name},
            "item": None if self.item_kind is None else {"kind": self.item_kind, "index": self.item_index},
            "reason": self.reason,
        }


# Evaluation.


def decide(
    policies: Iterable[AccessPolicy], principal: Principal, resource: str | Mapping[str, str], access: str
) -> Decision:
    """Whether `principal` may `access` ("read", "write") `resource` (a dataset path, or {resource name: value}).

    Ranger's order: override-priority policies first, then normal ones. Within one priority a matching deny item
    (not cancelled by a deny exception) or a deny-all-else beats any allow; an allow item (not cancelled by an allow
    exception) found at one priority is final, lower priorities cannot deny it. Disabled policies take no part.
    Nothing allowed it → denied.
    """
    request = _validated_request(resource, access)
    asked = f"{access} on {_describe(request)} to {_describe_principal(principal)}"

    def decided(allowed: bool, policy: AccessPolicy, kind: DecidingItem, index: int | None, reason: str) -> Decision:
        return Decision(
            allowed=allowed,
            access=access,
            resource=request,
            principal=principal,
            reason=reason,
            policy_id=policy.id,
            policy_name=policy.name,
            item_kind=kind,
            item_index=index,
        )

    enabled = [policy for policy in policies if policy.is_enabled]
    for priority in sorted({policy.policy_priority for policy in enabled}, reverse=True):
        allow: tuple[AccessPolicy, int] | None = None
        for policy in (p for p in enabled if p.policy_priority == priority and p.matches_resource(request)):
            deny_index = _first_applicable(policy, "denyPolicyItems", "denyExceptions", principal, access)
            if deny_index is not None:
                reason = f"{policy.label} denyPolicyItems[{deny_index}] denies {asked}"
                return decided(False, policy, "denyPolicyItems", deny_index, reason)
            allow_index = _first_applicable(policy, "policyItems", "allowExceptions", principal, access)
            if allow_index is None and policy.is_deny_all_else:
                reason = f"{policy.label} denies all else and none of its items allows {asked}"
                return decided(False, policy, "isDenyAllElse", None, reason)
            if allow_index is not None and allow is None:
                allow = (policy, allow_index)
        if allow is not None:
            policy, index = allow
            return decided(True, policy, "policyItems", index, f"{policy.label} policyItems[{index}] allows {asked}")
    return Decision(
        allowed=False,
        access=access,
        resource=request,
        principal=principal,
        reason=f"no policy allows {asked} (default deny)",
    )


def _first_applicable(
    policy: AccessPolicy, kind: ItemKind, exceptions: ItemKind, principal: Principal, access: str
) -> int | None:
    # Ranger: the first item of the list that applies decides, unless any of the list's exceptions applies too.
    index = next((i for i, item in enumerate(policy.items(kind)) if item.applies_to(principal, access)), None)
    if index is not None and any(item.applies_to(principal, access) for item in policy.items(exceptions)):
        return None
    return index


def _describe(request: Mapping[str, str]) -> str:
    return ", ".join(f"{name} {value}" for name, value in request.items())


def _describe_principal(principal: Principal) -> str:
    parts = [f"user {principal.user}"]
    if principal.groups:
        parts.append(f"groups {','.join(sorted(principal.groups))}")
    if principal.roles:
        parts.append(f"roles {','.join(sorted(principal.roles))}")
    return " ".join(parts)


def _validated_request(resource: str | Mapping[str, str], access: str) -> dict[str, str]:
    if access not in ACCESS_TYPES:
        raise ValueError(f"access {access!r} is not one of the service-def's access types {list(ACCESS_TYPES)}")
    request = {DATASET_RESOURCE: resource} if isinstance(resource, str) else dict(resource)
    if set(request) != {DATASET_RESOURCE}:
        raise ValueError(f"a request names the resource {DATASET_RESOURCE!r} only, got {sorted(request)}")
    path = request[DATASET_RESOURCE]
    # A path that is not canonical could dodge a policy (`/public/../private/x`), so it is refused, not normalized.
    if not path.startswith(PATH_SEPARATOR) or len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise ValueError(f"dataset path must be absolute and at most {MAX_PATH_CHARS} characters, got {path[:80]!r}")
    parts = path.split(PATH_SEPARATOR)[1:]
    if path != PATH_SEPARATOR and any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"dataset path {path!r} is not canonical: no empty, '.' or '..' components, no trailing '/'")
    return request


def _path_value_matches(pattern: str, path: str, *, recursive: bool) -> bool:
    """RangerPathResourceMatcher for one policy value (wildcards on, case-sensitive, separator `/`)."""
    if pattern == "*":
        return True
    if recursive and pattern.endswith(PATH_SEPARATOR):
        pattern += "*"  # Ranger: a recursive `/a/` means everything below /a (but not /a itself)
    wildcard = "*" in pattern or "?" in pattern
    if not recursive:
        # `*` also spans separators here: a non-recursive `/a/*` covers /a/b/c, exactly as in Ranger.
        return _wildcard_match(path, pattern) if wildcard else path == pattern
    if not wildcard:
        base = pattern[:-1] if pattern.endswith(PATH_SEPARATOR) else pattern
        return path == base or path.startswith(base + PATH_SEPARATOR)
    # Recursive with wildcards: the path or any ancestor of it (at element boundaries) matches the pattern.
    elements = [element for element in path.split(PATH_SEPARATOR) if element]
    if not elements:
        return _wildcard_match(path, pattern)
    prefix = PATH_SEPARATOR if path.startswith(PATH_SEPARATOR) else ""
    for element in elements:
        prefix += element
        if _wildcard_match(prefix, pattern):
            return True
        prefix += PATH_SEPARATOR
    return False


def _wildcard_match(text: str, pattern: str) -> bool:
    """`*` = any run of characters, `?` = one character, over the whole text. Greedy with one backtrack point, so
    O(len(text)·len(pattern)) at worst: no regular expression that a hostile pattern could make exponential."""
    t = p = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            t += 1
            p += 1
        elif star != -1:
            mark += 1
            t, p = mark, star + 1
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


# Reading Ranger JSON.


def load_policy_file(path: Path) -> tuple[AccessPolicy, ...]:
    """Read a policy file: Ranger admin's export (`{"policies": [...], "metaDataInfo": ...}`), a bare list of
    policies, or one policy. Raises `PolicyFileError` (or `UnsupportedPolicyError`) naming the file and JSON path."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PolicyFileError(source, "$", f"file is {size} bytes; a policy file may have at most {MAX_FILE_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise PolicyFileError(source, "$", f"cannot read the file: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise PolicyFileError(source, "$", f"not UTF-8 text (byte {error.start})") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise PolicyFileError(
            source, "$", f"not JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    except RecursionError as error:
        raise PolicyFileError(source, "$", "JSON nested too deeply for a policy file") from error
    return parse_policies(document, source=source)


def parse_policies(document: object, *, source: str = "<policies>") -> tuple[AccessPolicy, ...]:
    """Policies from a decoded JSON document (export object, bare list or a single policy object)."""
    if isinstance(document, list):
        entries, base = document, "$"
    elif isinstance(document, dict) and "policies" in document:
        entries, base = document["policies"], "$.policies"
        if not isinstance(entries, list):
            raise PolicyFileError(source, base, f"expected a list of policies, got {_json_type(entries)}")
    elif isinstance(document, dict) and "resources" in document:
        return (_parse_policy(document, source, "$"),)
    else:
        raise PolicyFileError(
            source, "$", "expected Ranger's export object with `policies`, a list of policies, or one policy object"
        )
    if len(entries) > MAX_POLICIES:
        raise PolicyFileError(source, base, f"{len(entries)} policies; at most {MAX_POLICIES} per file")
    policies = tuple(_parse_policy(entry, source, f"{base}[{index}]") for index, entry in enumerate(entries))
    seen: dict[tuple[str | None, str], int] = {}
    for index, policy in enumerate(policies):
        key = (policy.service, policy.name)
        if key in seen:
            raise PolicyFileError(
                source, f"{base}[{index}].name", f"policy name {policy.name!r} repeats {base}[{seen[key]}]"
            )
        seen[key] = index
    return policies


def _parse_policy(entry: object, source: str, at: str) -> AccessPolicy:
    document = _expect_object(entry, source, at)
    name = _expect_string(document.get("name"), source, f"{at}.name")
    policy_id = document.get("id")
    if policy_id is not None and (not isinstance(policy_id, int) or isinstance(policy_id, bool)):
        raise PolicyFileError(source, f"{at}.id", f"expected an integer, got {_json_type(policy_id)}")
    label = f"policy {policy_id if policy_id is not None else '-'} {name!r}"

    def unsupported(path: str, problem: str) -> UnsupportedPolicyError:
        return UnsupportedPolicyError(source, path, f"{problem}: {label}")

    service_type = document.get("serviceType")
    if service_type not in (None, "", SERVICE_TYPE):
        raise PolicyFileError(
            source, f"{at}.serviceType", f"{label} is for service type {service_type!r}, not {SERVICE_TYPE!r}"
        )
    if document.get("policyType") not in (None, 0):
        raise unsupported(f"{at}.policyType", f"policy type {document.get('policyType')!r} (only access policies, 0)")
    if document.get("zoneName") not in (None, ""):
        raise unsupported(f"{at}.zoneName", "security zones are not supported")
    for key, problem in _UNSUPPORTED_LISTS.items():
        value = document.get(key)
        if value not in (None, []):
            raise unsupported(f"{at}.{key}", problem)
    priority = document.get("policyPriority", PRIORITY_NORMAL)
    if priority is None:
        priority = PRIORITY_NORMAL
    if priority not in (PRIORITY_NORMAL, PRIORITY_OVERRIDE) or isinstance(priority, bool):
        raise PolicyFileError(
            source, f"{at}.policyPriority", f"expected {PRIORITY_NORMAL} (normal) or {PRIORITY_OVERRIDE} (override)"
        )
    resource_sets = [_parse_resources(document.get("resources"), source, f"{at}.resources")]
    additional = document.get("additionalResources")
    if additional is not None:
        for index, resource_set in enumerate(_expect_list(additional, source, f"{at}.additionalResources")):
            resource_sets.append(_parse_resources(resource_set, source, f"{at}.additionalResources[{index}]"))
    items: dict[str, tuple[PolicyItem, ...]] = {}
    for kind in ITEM_KINDS:
        raw_items = document.get(kind)
        raw_list = [] if raw_items is None else _expect_list(raw_items, source, f"{at}.{kind}")
        items[kind] = tuple(
            _parse_item(raw, source, f"{at}.{kind}[{index}]", f"{label} item {kind}[{index}]")
            for index, raw in enumerate(raw_list)
        )
    service = document.get("service")
    if service is not None:
        service = _expect_string(service, source, f"{at}.service")
    interpreted = {"id", "name", "service", "serviceType", "policyType", "policyPriority", "isEnabled"}
    interpreted |= {"isDenyAllElse", "resources", "additionalResources", "zoneName", *_UNSUPPORTED_LISTS, *ITEM_KINDS}
    return AccessPolicy(
        name=name,
        resource_sets=tuple(resource_sets),
        id=policy_id,
        service=service,
        policy_priority=priority,
        is_enabled=_expect_bool(document.get("isEnabled"), True, source, f"{at}.isEnabled"),
        is_deny_all_else=_expect_bool(document.get("isDenyAllElse"), False, source, f"{at}.isDenyAllElse"),
        policy_items=items["policyItems"],
        deny_policy_items=items["denyPolicyItems"],
        allow_exceptions=items["allowExceptions"],
        deny_exceptions=items["denyExceptions"],
        extra={key: value for key, value in document.items() if key not in interpreted},
    )


def _parse_resources(entry: object, source: str, at: str) -> dict[str, PolicyResource]:
    document = _expect_object(entry, source, at)
    if DATASET_RESOURCE not in document:
        raise PolicyFileError(source, at, f"the service-def's mandatory resource {DATASET_RESOURCE!r} is missing")
    resources: dict[str, PolicyResource] = {}
    for name, raw in document.items():
        if name != DATASET_RESOURCE:
            raise PolicyFileError(
                source,
                f"{at}.{name}",
                f"unknown resource {name!r}; the {SERVICE_TYPE} service-def has {DATASET_RESOURCE!r}",
            )
        spec = _expect_object(raw, source, f"{at}.{name}")
        values = _expect_string_list(spec.get("values"), source, f"{at}.{name}.values")
        if not values:
            raise PolicyFileError(source, f"{at}.{name}.values", "a resource needs at least one value")
        for index, value in enumerate(values):
            if not value or len(value) > MAX_PATH_CHARS:
                raise PolicyFileError(source, f"{at}.{name}.values[{index}]", f"1 to {MAX_PATH_CHARS} characters")
        resources[name] = PolicyResource(
            values=values,
            is_excludes=_expect_bool(spec.get("isExcludes"), False, source, f"{at}.{name}.isExcludes"),
            is_recursive=_expect_bool(spec.get("isRecursive"), False, source, f"{at}.{name}.isRecursive"),
        )
    return resources


def _parse_item(entry: object, source: str, at: str, label: str) -> PolicyItem:
    document = _expect_object(entry, source, at)
    if document.get("conditions") not in (None, []):
        raise UnsupportedPolicyError(source, f"{at}.conditions", f"conditions are not supported: {label}")
    accesses: list[ItemAccess] = []
    for index, raw in enumerate(_expect_list(document.get("accesses", []), source, f"{at}.accesses")):
        access = _expect_object(raw, source, f"{at}.accesses[{index}]")
        access_type = _expect_string(access.get("type"), source, f"{at}.accesses[{index}].type")
        if access_type.lower() not in ACCESS_TYPES:
            raise PolicyFileError(
                source,
                f"{at}.accesses[{index}].type",
                f"unknown access type {access_type!r}; the {SERVICE_TYPE} service-def has {list(ACCESS_TYPES)}",
            )
        is_allowed = _expect_bool(access.get("isAllowed"), True, source, f"{at}.accesses[{index}].isAllowed")
        accesses.append(ItemAccess(type=access_type, is_allowed=is_allowed))
    principals: dict[str, tuple[str, ...]] = {}
    for key in ("users", "groups", "roles"):
        names = _expect_string_list(document.get(key, []), source, f"{at}.{key}")
        for index, name in enumerate(names):
            # Ranger's other macros ({OWNER}, ${{USER.attr}}, ...) need context we do not have: refuse, never guess.
            if ("{" in name or "}" in name) and not (key == "users" and name == USER_CURRENT):
                raise UnsupportedPolicyError(
                    source, f"{at}.{key}[{index}]", f"macro {name!r} is not supported (only {USER_CURRENT}): {label}"
                )
        principals[key] = names
    return PolicyItem(
        accesses=tuple(accesses),
        users=principals["users"],
        groups=principals["groups"],
        roles=principals["roles"],
        delegate_admin=_expect_bool(document.get("delegateAdmin"), False, source, f"{at}.delegateAdmin"),
    )


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _expect_object(value: object, source: str, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyFileError(source, at, f"expected an object, got {_json_type(value)}")
    return value


def _expect_list(value: object, source: str, at: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyFileError(source, at, f"expected a list, got {_json_type(value)}")
    if len(value) > MAX_LIST_ENTRIES:
        raise PolicyFileError(source, at, f"{len(value)} entries; at most {MAX_LIST_ENTRIES}")
    return value


def _expect_string(value: object, source: str, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyFileError(source, at, f"expected a non-empty string, got {_json_type(value)}")
    if len(value) > MAX_NAME_CHARS:
        raise PolicyFileError(source, at, f"{len(value)} characters; at most {MAX_NAME_CHARS}")
    return value


def _expect_string_list(value: object, source: str, at: str) -> tuple[str, ...]:
    entries = _expect_list(value, source, at)
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise PolicyFileError(source, f"{at}[{index}]", f"expected a string, got {_json_type(entry)}")
    return tuple(entries)


def _expect_bool(value: object, default: bool, source: str, at: str) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PolicyFileError(source, at, f"expected true or false, got {_json_type(value)}")
    return value


# Writing Ranger JSON.


def dump_policies(policies: Sequence[AccessPolicy], *, layout: Literal["export", "list"] = "export") -> Any:
    """The policies as Ranger's export document (what admin's exportJson writes and importPoliciesFromFile reads)
    or as a bare list."""
    documents = [policy.to_ranger_json() for policy in policies]
    if layout == "list":
        return documents
    exported_at = datetime.now(UTC).strftime("%m/%d/%Y %H:%M:%S")
    return {"metaDataInfo": {"Exported by": "fednested", "Export time": exported_at}, "policies": documents}


def write_policy_file(
    path: Path, policies: Sequence[AccessPolicy], *, layout: Literal["export", "list"] = "export"
) -> None:
    """Write `dump_policies` to `path` as indented JSON (written beside it first, so a reader never sees half)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(dump_policies(policies, layout=layout), indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
