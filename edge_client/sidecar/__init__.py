"""The edge sidecar: a static local policy, an outbound filter every payload passes, and a hash-chained audit log
that stays on the device (see docs/adr/0003-edge-sidecar.md)."""

from edge_client.sidecar.audit import AuditChainError, AuditEntry, AuditLog, ChainReport, verify_chain
from edge_client.sidecar.outbound import (
    OutboundApproval,
    OutboundRefused,
    OutboundRequest,
    Sidecar,
    TensorInfo,
    check_outbound,
    safetensors_header,
)
from edge_client.sidecar.pii import MetadataScrubber
from edge_client.sidecar.policy import PolicyError, SidecarPolicy, compile_policy, example_policy, load_policy

__all__ = [
    "AuditChainError",
    "AuditEntry",
    "AuditLog",
    "ChainReport",
    "MetadataScrubber",
    "OutboundApproval",
    "OutboundRefused",
    "OutboundRequest",
    "PolicyError",
    "Sidecar",
    "SidecarPolicy",
    "TensorInfo",
    "check_outbound",
    "compile_policy",
    "example_policy",
    "load_policy",
    "safetensors_header",
    "verify_chain",
]
