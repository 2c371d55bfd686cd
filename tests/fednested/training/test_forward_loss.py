"""The packed loss over vocabulary chunks: same value and gradients as one block, never the full logits at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from peft import PeftModel

from fednested.adapters import ExpertLoraConfig, attach_expert_adapters, trainable_parameters
from fednested.data.encoding import IGNORE_INDEX
from fednested.data.packing import PackedBatch
from fednested.models import build_model
from fednested.training.forward import packed_loss_sum

VOCAB = 300
ROWS, SEQ = 2, 32


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _adapted() -> PeftModel:
    model = attach_expert_adapters(build_model("tiny", "mixtral", vocab_size=VOCAB, seed=0), ExpertLoraConfig(rank=4))
    # non-zero B factors, so the adapters change the logits and their gradients flow through the loss
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


def _batch() -> PackedBatch:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    targets = torch.randint(0, VOCAB, (ROWS, SEQ), generator=generator)
    targets[:, :5] = IGNORE_INDEX  # a prompt-like prefix without targets
    position_ids = torch.arange(SEQ).repeat(ROWS, 1)
    target_tokens = int((targets != IGNORE_INDEX).sum())
    return PackedBatch(input_ids, position_ids, targets, real_tokens=ROWS * SEQ, target_tokens=target_tokens)


def _loss_and_grads(model: PeftModel, batch: PackedBatch, chunk_elements: int) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, count = packed_loss_sum(model, batch, chunk_elements=chunk_elements)
    assert count == batch.target_tokens
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in trainable_parameters(model) if p.grad is not None]


def test_chunked_loss_matches_one_block_in_value_and_gradients() -> None:
    model, batch = _adapted(), _batch()
    whole, whole_grads = _loss_and_grads(model, batch, chunk_elements=10**9)
    # 7 target rows per chunk: 54 targets become 8 chunks, the last one short
    chunked, chunked_grads = _loss_and_grads(model, batch, chunk_elements=7 * VOCAB)
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert len(whole_grads) == len(chunked_grads) > 0
    for expected, actual in zip(whole_grads, chunked_grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)
    assert any(float(grad.abs().max()) > 0 for grad in chunked_grads)


def test_no_saved_tensor_holds_more_than_one_chunk_of_logits() -> None:
    model, batch = _adapted(), _batch()
    rows = 7
    saved: list[torch.Size] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = packed_loss_sum(model, batch, chunk_elements=rows * VOCAB)
    vocab_wide = [shape for shape in saved if shape and shape[-1] == VOCAB]
    # the LM head's weight [vocab, hidden] is the only vocabulary-wide tensor the graph keeps: no logits at all
    assert all(shape[0] <= rows or shape == torch.Size([VOCAB, 128]) for shape in vocab_wide), vocab_wide
    loss.backward()  # the recomputation runs chunk by chunk and still reaches the adapters
    assert all(p.grad is not None for p in trainable_parameters(model))

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        packed_loss_sum(model, batch, chunk_elements=10**9)
    # without chunking the [targets, vocab] logits are kept for the backward: the check above can fail
    assert torch.Size([batch.target_tokens, VOCAB]) in saved


def test_a_non_positive_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_elements must be at least 1, got 0"):
        packed_loss_sum(_adapted(), _batch(), chunk_elements=0)
