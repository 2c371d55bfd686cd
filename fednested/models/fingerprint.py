"""Counting parameters and fingerprinting a model's weights (to tell versions apart and prove nothing changed)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (each shared tensor once); only those with requires_grad when trainable_only."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (bitwise identity, not numerical closeness)."""
    digest = hashlib.sha256()
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    contiguous = tensor.detach().to("cpu").contiguous()
    # view as bytes so every dtype (bf16 included) hashes its exact bit pattern; numpy has no bf16
    digest.update(contiguous.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and persistent buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor_sha256(tensor).encode())
    return digest.hexdigest()
