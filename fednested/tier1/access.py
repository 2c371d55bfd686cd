"""Dataset access by policy for Tier-1 jobs: every file a core update would read is decided against the Ranger-format
policies (fednested.governance.ranger) for the job's service principal, before a byte of any of them is read.

The CLI (`fednested tier1 core-update`, through the launcher) and the control plane's core_update job
(workers/training.py) both decide here, so a dataset is named the same way by both: its path inside the artifact store
as `/<relative path>` when it lies there (a policy does not depend on where a deployment mounts its store), else its
absolute path. Symlinks are resolved first, so a link cannot carry a denied file past a policy under another name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fednested.config.models import Tier1CoreUpdateSettings
from fednested.governance.ranger import Decision, Principal, decide, load_policy_file

READ = "read"


class DatasetAccessDenied(PermissionError):
    """At least one dataset is denied: the message names each, with the policy and item that denied it."""

    def __init__(self, decisions: Sequence[Decision]) -> None:
        self.decisions = list(decisions)
        denied = [decision for decision in decisions if not decision.allowed]
        super().__init__(
            "dataset access denied before reading: "
            + "; ".join(f"{decision.resource['dataset']}: {decision.reason}" for decision in denied)
        )


def principal_of(settings: Tier1CoreUpdateSettings) -> Principal:
    """The service principal a tier1 config's core update reads as."""
    return Principal(
        user=settings.principal,
        groups=frozenset(settings.principal_groups),
        roles=frozenset(settings.principal_roles),
    )


def dataset_resource(path: Path, store_root: Path | None) -> str:
    """The Ranger `dataset` resource of a file: `/<path inside the store>` when it lies in `store_root`, else its
    absolute path (both canonical, as `decide` requires)."""
    resolved = path.resolve()
    if store_root is not None:
        root = store_root.resolve()
        if resolved.is_relative_to(root) and resolved != root:
            return "/" + resolved.relative_to(root).as_posix()
    return resolved.as_posix()


def decide_dataset_access(
    policy_file: Path, principal: Principal, datasets: Sequence[Path], *, store_root: Path | None
) -> list[Decision]:
    """One read decision per dataset, in order, allowed or denied. Reads the policy file only (never a dataset);
    raises `PolicyFileError` when it is not valid Ranger policy JSON for the fednested service-def."""
    policies = load_policy_file(policy_file)
    return [decide(policies, principal, dataset_resource(path, store_root), READ) for path in datasets]


def require_allowed(decisions: Sequence[Decision]) -> None:
    """Raise `DatasetAccessDenied` unless every decision allowed its dataset."""
    if not all(decision.allowed for decision in decisions):
        raise DatasetAccessDenied(decisions)
