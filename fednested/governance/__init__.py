"""Data governance for Tier-1 jobs: which service principal may read or write which dataset, decided by
Apache Ranger-format policies (`fednested.governance.ranger`) that import from, export to and push to Ranger admin."""

from fednested.governance.ranger import (
    SERVICE_DEF,
    AccessPolicy,
    Decision,
    PolicyFileError,
    Principal,
    UnsupportedPolicyError,
    decide,
    dump_policies,
    load_policy_file,
    parse_policies,
    write_policy_file,
)

__all__ = [
    "SERVICE_DEF",
    "AccessPolicy",
    "Decision",
    "PolicyFileError",
    "Principal",
    "UnsupportedPolicyError",
    "decide",
    "dump_policies",
    "load_policy_file",
    "parse_policies",
    "write_policy_file",
]
