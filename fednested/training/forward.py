"""The packed forward pass and its token-level loss, shared by training and evaluation.

The LM head runs only on positions that have a target: prompt tokens, chat context and padding never pay for the
vocabulary projection. Losses are returned as a sum with a token count, so callers can weight micro-batches and
domains exactly by tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fednested.config.training import Precision
from fednested.data.encoding import IGNORE_INDEX
from fednested.data.packing import PackedBatch


@dataclass(frozen=True)
class _CausalLmParts:
    decoder: nn.Module
    head: nn.Module
    config: Any


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers are injected into it in place), or `model` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        base = get_base_model()
        if isinstance(base, nn.Module):
            return base
    return model


def causal_lm_parts(model: nn.Module) -> _CausalLmParts:
    """Split a transformers causal LM (optionally PEFT-wrapped) into decoder stack and LM head."""
    base = _unwrap_peft(model)
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(
            f"{type(base).__name__} is not a transformers causal LM with a decoder and an output embedding "
            "(get_decoder()/get_output_embeddings())"
        )
    return _CausalLmParts(decoder=decoder, head=head, config=getattr(base, "config", None))


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """Pick the compute precision: `auto` means bf16 autocast on CUDA devices with bf16 support, fp32 on CPU.

    On CPU bf16 autocast was measured (docs/benchmarks.md) and does not pay for itself, although bf16 GEMMs alone
    run 2-3x faster there: a training step of the small preset ran 2.8x slower on a quiet AMX Xeon, and on a shared
    AVX512-BF16 EPYC between 0.7x and 1.2x of fp32 from run to run; on both it peaked at about 900 MB more RSS
    (oneDNN keeps a primitive per matmul shape, and routed expert batches change shape every step), which is what
    an edge device can least afford. `precision="bf16"` still forces it. The choice depends on the device type
    only, so `auto` keeps runs bitwise reproducible.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# Largest fp32 logits block the loss materialises at once: 4 Mi elements (16 MB). A packed micro-batch of 512 targets
# over a 2,041-token vocabulary (the benchmarks) fits in one block and takes the unchunked path bitwise; a 32k-256k
# vocabulary (real checkpoints) would otherwise hold [targets, vocab] fp32 logits, their softmax and their gradient
# (hundreds of MB to GBs) at once, more than a 4-bit base of a few hundred M parameters weighs.
LOSS_CHUNK_ELEMENTS = 4 * 1024 * 1024


def packed_loss_sum(
    model: nn.Module,
    batch: PackedBatch,
    *,
    precision: Literal["fp32", "bf16"] = "fp32",
    chunk_elements: int = LOSS_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's targets, and how many targets there were.

    `attention_mask` stays None so transformers builds a block-diagonal causal mask from the restarting position
    ids: attention never crosses a record boundary inside a packed row. The LM head and the loss run over chunks of
    target rows whose logits hold at most `chunk_elements` values; under autograd each chunk is checkpointed, so
    the backward recomputes one chunk's logits at a time instead of keeping every chunk's alive.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be at least 1, got {chunk_elements}")
    parts = causal_lm_parts(model)
    with torch.autocast(device_type=batch.input_ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outputs = parts.decoder(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        )
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
        has_target = batch.targets != IGNORE_INDEX
        targets = batch.targets[has_target]
        # Boolean indexing is a host sync, but it removes the vocabulary projection for every non-target position.
        hidden = hidden[has_target]
    rows = max(1, chunk_elements // _vocab_size(parts))
    count = int(targets.numel())
    if count <= rows:
        return _loss_sum(parts, hidden, targets, precision), count
    # Recompute pays one more head forward per chunk; it is needed only when something upstream wants a gradient.
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(parameter.requires_grad for parameter in parts.head.parameters())
    )
    loss_sum: torch.Tensor | None = None
    for start in range(0, count, rows):
        chunk_hidden, chunk_targets = hidden[start : start + rows], targets[start : start + rows]
        if needs_grad:
            part = checkpoint(_loss_sum, parts, chunk_hidden, chunk_targets, precision, use_reentrant=False)
            assert isinstance(part, torch.Tensor)
        else:
            part = _loss_sum(parts, chunk_hidden, chunk_targets, precision)
        loss_sum = part if loss_sum is None else loss_sum + part
    assert loss_sum is not None  # count > rows >= 1, so the loop ran
    return loss_sum, count


def _vocab_size(parts: _CausalLmParts) -> int:
    out_features = getattr(parts.head, "out_features", None)
    if isinstance(out_features, int) and out_features > 0:
        return out_features
    vocab = getattr(parts.config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    raise TypeError(
        f"cannot tell the vocabulary size of {type(parts.head).__name__}: no out_features or config.vocab_size"
    )


def _loss_sum(
    parts: _CausalLmParts, hidden: torch.Tensor, targets: torch.Tensor, precision: Literal["fp32", "bf16"]
) -> torch.Tensor:
    """Summed cross-entropy of `targets` given the final hidden states of their positions."""
    with torch.autocast(device_type=hidden.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = parts.head(hidden)
    logits = logits.float()
    scaling = getattr(parts.config, "logits_scaling", None)  # Granite-family models divide logits by this
    if isinstance(scaling, (int, float)) and scaling not in (0, 1):
        logits = logits / scaling
    softcap = getattr(parts.config, "final_logit_softcapping", None)  # Gemma-family models cap logits
    if isinstance(softcap, (int, float)) and softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, targets, reduction="sum")
