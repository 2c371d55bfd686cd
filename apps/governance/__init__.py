"""Governance: the append-only audit trail and officers' approvals of model versions."""
