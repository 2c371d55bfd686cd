"""Why an edge update was refused: one fixed set of codes shared by validation, the ingest worker and the API.

The codes are stored in the database and shown to operators, so they only ever grow; never rename or reuse one.
"""

from __future__ import annotations

from enum import StrEnum


class RejectionCode(StrEnum):
    """Reason an update envelope or its payload was refused (stored as the update's rejection reason)."""

    MALFORMED = "malformed"
    UNKNOWN_CLIENT = "unknown_client"
    REVOKED_CLIENT = "revoked_client"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_BASE_VERSION = "unknown_base_version"
    TOO_STALE = "too_stale"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    SHA256_MISMATCH = "sha256_mismatch"
    OVERSIZED = "oversized"
    BAD_TENSOR_NAMES = "bad_tensor_names"
    BAD_SHAPES = "bad_shapes"
    BAD_DTYPE = "bad_dtype"
    NON_FINITE = "non_finite"
    NORM_EXCEEDED = "norm_exceeded"
    NOT_ON_LINEAGE = "not_on_lineage"
    IMPLAUSIBLE_CLAIM = "implausible_claim"
    UNKNOWN_ROUND = "unknown_round"
    ROUND_CLOSED = "round_closed"
    NOT_IN_COHORT = "not_in_cohort"
    NOT_OWNER = "not_owner"
    CONFLICT = "conflict"
    INVALID_UPDATE_ID = "invalid_update_id"
    SHA256_MISSING = "sha256_missing"
    INCOMPLETE_BODY = "incomplete_body"
    WINDOW_UNUSABLE = "window_unusable"
    NOT_CHECKED = "not_checked"
    DUPLICATE_UPDATE = "duplicate_update"
    PRIVACY_BUDGET_SPENT = "privacy_budget_spent"

    @property
    def description(self) -> str:
        """One line for operators: what the code means and what the client should do about it."""
        return REJECTION_DESCRIPTIONS[self]


REJECTION_DESCRIPTIONS: dict[RejectionCode, str] = {
    RejectionCode.MALFORMED: "the envelope or payload could not be decoded or does not match its schema",
    RejectionCode.UNKNOWN_CLIENT: "no enrolled device has this client id; enroll the device first",
    RejectionCode.REVOKED_CLIENT: "the device's enrollment was revoked; its updates are no longer accepted",
    RejectionCode.BAD_SIGNATURE: "the envelope signature does not verify against the device's enrolled key",
    RejectionCode.UNKNOWN_BASE_VERSION: "the update was trained on a model version the registry does not know",
    RejectionCode.TOO_STALE: "the base version is too many versions behind the champion; pull the new snapshot",
    RejectionCode.REPLAYED: "an update with this update id was already received; it is applied at most once",
    RejectionCode.EXPIRED: "the envelope was created too long ago (or in the future): outside the replay window",
    RejectionCode.SHA256_MISMATCH: "the downloaded payload's sha256 differs from the one in the envelope",
    RejectionCode.OVERSIZED: "the payload is larger than the size limit",
    RejectionCode.BAD_TENSOR_NAMES: "the payload holds tensors that are not adapters of existing experts",
    RejectionCode.BAD_SHAPES: "an adapter tensor's shape does not match the base model and adapter config",
    RejectionCode.BAD_DTYPE: "an adapter tensor has a dtype that is not accepted",
    RejectionCode.NON_FINITE: "an adapter tensor holds NaN or infinite values",
    RejectionCode.NORM_EXCEEDED: "the update's delta norm is above the per-tensor or total limit",
    RejectionCode.NOT_ON_LINEAGE: "the base version is not the champion or one of its ancestors; pull the champion",
    RejectionCode.IMPLAUSIBLE_CLAIM: "the routed-token or example counts cannot come from the training it reports",
    RejectionCode.UNKNOWN_ROUND: "the envelope names a round the control plane does not know",
    RejectionCode.ROUND_CLOSED: "the synchronous round the update was made for is no longer open",
    RejectionCode.NOT_IN_COHORT: "the device is not in the cohort of the synchronous round it names",
    RejectionCode.NOT_OWNER: "the update id or payload belongs to another device; mint a new update id",
    RejectionCode.CONFLICT: "the update id already names other bytes or another envelope; an id names one update",
    RejectionCode.INVALID_UPDATE_ID: "the update id is not a UUID",
    RejectionCode.SHA256_MISSING: "the upload did not declare its sha256 (X-Content-SHA256)",
    RejectionCode.INCOMPLETE_BODY: "the upload ended before its declared Content-Length",
    RejectionCode.WINDOW_UNUSABLE: "the window's settings cannot be used (an operator must fix them); resend later",
    RejectionCode.NOT_CHECKED: "recorded before every envelope was checked once; resend it",
    RejectionCode.DUPLICATE_UPDATE: "its adapters are identical to another update's (this device's or another's); "
    "an update counts once, whoever sends it",
    RejectionCode.PRIVACY_BUDGET_SPENT: "the federation's differential-privacy budget would be exceeded by this "
    "window; an operator must raise the budget or stop noised rounds",
}

# Rejections that say something about the device itself (what it sent), as opposed to timing or the server's state
# (a base that became too stale, a closed round, a revoked device, unusable settings): only these lower its
# reliability, so a slow honest device is not punished twice.
DEVICE_FAULTS: frozenset[RejectionCode] = frozenset(
    {
        RejectionCode.MALFORMED,
        RejectionCode.BAD_SIGNATURE,
        RejectionCode.SHA256_MISMATCH,
        RejectionCode.OVERSIZED,
        RejectionCode.BAD_TENSOR_NAMES,
        RejectionCode.BAD_SHAPES,
        RejectionCode.BAD_DTYPE,
        RejectionCode.NON_FINITE,
        RejectionCode.NORM_EXCEEDED,
        RejectionCode.IMPLAUSIBLE_CLAIM,
        RejectionCode.NOT_OWNER,
        RejectionCode.CONFLICT,
        RejectionCode.REPLAYED,
        RejectionCode.INVALID_UPDATE_ID,
        RejectionCode.SHA256_MISSING,
        RejectionCode.INCOMPLETE_BODY,
        RejectionCode.DUPLICATE_UPDATE,
    }
)


class UpdateRejected(Exception):
    """An update refused for `code`; `message` says what was wrong and where (tensor name, field, client id)."""

    def __init__(self, code: RejectionCode, message: str, *, client_id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.client_id = client_id
        where = f"client {client_id}: " if client_id else ""
        super().__init__(f"{code.value}: {where}{message}")
