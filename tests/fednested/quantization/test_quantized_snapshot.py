"""int8 / NF4 edge snapshots: packed weights in memory, adapters trainable on top, deltas merge into fp32."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fednested.adapters import AdapterError, ExpertLoraConfig, attach_expert_adapters, trainable_parameters
from fednested.checkpoints import (
    CheckpointError,
    FileEntry,
    file_sha256,
    load_version,
    read_manifest,
    save_version,
)
from fednested.deltas import DeltaError, expert_deltas, merge_expert_deltas
from fednested.models import build_model
from fednested.quantization import (
    BlockwiseQuantized,
    QuantizationError,
    QuantizedExperts,
    QuantizedLinear,
    load_quantized_version,
    model_memory_bytes,
    quantization_error,
    quantize_base,
    quantized_bits,
)
from fednested.quantization.snapshot import quantized_linear

VOCAB = 4096
# Relative Frobenius error of the expert weights we accept per bit width (measured: 0.011 and 0.092 on tiny).
MAX_RELATIVE_ERROR = {8: 0.02, 4: 0.12}


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def token_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(seed))


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def expert_bytes(model: torch.nn.Module) -> int:
    total = 0
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            total += sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return total


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_quantized_base_holds_packed_weights_and_stays_close(family: str, bits: int) -> None:
    full = build_model("tiny", family)
    quantized = quantize_base(copy.deepcopy(full), bits)  # type: ignore[arg-type]
    assert quantized_bits(quantized) == bits
    # no full-precision expert stack or linear weight survives
    assert not [
        n for n, p in quantized.named_parameters() if p.dim() == 3 or n.endswith(("q_proj.weight", "lm_head.weight"))
    ]
    assert isinstance(quantized.model.layers[0].mlp.experts, QuantizedExperts)
    assert isinstance(quantized.lm_head, QuantizedLinear)
    assert all(not p.requires_grad for p in quantized.parameters())
    # packed bytes + fp32 block scales: 1 + 4/256 bytes (int8) or 0.5 + 4/64 bytes (NF4) per weight, vs 4
    ratio = expert_bytes(quantized) / expert_bytes(full)
    assert ratio == pytest.approx({8: (1 + 4 / 256) / 4, 4: (0.5 + 4 / 64) / 4}[bits], rel=1e-3)
    assert model_memory_bytes(quantized) <= {8: 0.5, 4: 0.4}[bits] * model_memory_bytes(full)
    assert max(quantization_error(full, quantized).values()) < MAX_RELATIVE_ERROR[bits]
    ids = token_batch()
    assert abs(loss_of(quantized, ids) - loss_of(full, ids)) < 0.02


@pytest.mark.parametrize("bits", [8, 4])
def test_delta_trained_on_a_quantized_base_lowers_the_full_precision_loss(bits: int) -> None:
    full = build_model("tiny", "mixtral")
    ids = token_batch(seed=3)
    before = loss_of(full, ids)
    edge = attach_expert_adapters(quantize_base(copy.deepcopy(full), bits), ExpertLoraConfig(rank=4, alpha=8))  # type: ignore[arg-type]
    frozen = {name: t.clone() for name, t in edge.state_dict().items() if ".lora_" not in name}
    optimizer = torch.optim.AdamW(trainable_parameters(edge), lr=1e-2)
    edge.train()
    losses = []
    for _ in range(6):
        loss = edge(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(edge.state_dict()[name], t) for name, t in frozen.items()), "quantized base changed"
    merge_expert_deltas(full, expert_deltas(edge))
    after = loss_of(full, ids)
    assert after < before - 0.3, (before, after)


def test_dequantizing_linear_gradient_matches_the_dequantized_weight() -> None:
    weight = torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(0))
    stack = BlockwiseQuantized(weight, 4)
    inputs = torch.randn(5, 64, requires_grad=True)
    result = quantized_linear(inputs, stack, 2)
    result.pow(2).sum().backward()
    reference_inputs = inputs.detach().clone().requires_grad_(True)
    dequantized = stack.dequantize(2)
    (reference_inputs @ dequantized.t()).pow(2).sum().backward()
    torch.testing.assert_close(result, reference_inputs @ dequantized.t())
    torch.testing.assert_close(inputs.grad, reference_inputs.grad)


def test_loading_a_version_straight_into_a_snapshot_equals_quantizing_it(tmp_path: Path) -> None:
    save_version(build_model("tiny", "qwen2_moe", seed=6), tmp_path / "v", version_id="v", parent_version=None)
    streamed, manifest = load_quantized_version(tmp_path / "v", 4, expected_version="v")
    loaded, _ = load_version(tmp_path / "v")
    quantized = quantize_base(loaded, 4)
    assert manifest.version_id == "v"
    streamed_state, quantized_state = streamed.state_dict(), quantized.state_dict()
    assert sorted(streamed_state) == sorted(quantized_state)
    assert all(torch.equal(streamed_state[k], quantized_state[k]) for k in quantized_state)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, quantized(ids).logits)


def test_the_lean_allocator_is_pinned_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fednested.quantization.snapshot as snapshot

    calls: list[str] = []
    monkeypatch.setattr(snapshot, "pin_mmap_threshold", lambda: calls.append("pinned") or True)
    save_version(build_model("tiny", "mixtral", seed=7), tmp_path / "v", version_id="v", parent_version=None)
    load_quantized_version(tmp_path / "v", 4, lean_allocator=False)
    quantize_base(build_model("tiny", "mixtral", seed=7), 8, lean_allocator=False)
    assert calls == []
    load_quantized_version(tmp_path / "v", 4)
    quantize_base(build_model("tiny", "mixtral", seed=7), 8)
    assert calls == ["pinned", "pinned"]


def test_misuse_is_refused_with_a_reason() -> None:
    with pytest.raises(QuantizationError, match="bits must be 8 or 4, got 3"):
        quantize_base(build_model(), 3)  # type: ignore[arg-type]
    quantized = quantize_base(build_model(), 8)
    with pytest.raises(QuantizationError, match="already quantized to 8 bits"):
        quantize_base(quantized, 4)
    edge = attach_expert_adapters(quantized, ExpertLoraConfig())
    with pytest.raises(QuantizationError, match="quantize the plain base model first"):
        quantize_base(edge, 4)
    with pytest.raises(AdapterError, match="cannot merge adapters into a quantized base"):
        edge.merge_adapter()
    plain_quantized = quantize_base(build_model(), 4)
    with pytest.raises(DeltaError, match="is quantized; merge into the full-precision model"):
        merge_expert_deltas(plain_quantized, {"model.layers.0.mlp.experts.down_proj/expert=0": torch.zeros(128, 256)})


def test_streaming_load_checks_expert_shapes_and_integrity(tmp_path: Path) -> None:
    save_version(build_model("tiny", "mixtral"), tmp_path / "v", version_id="v", parent_version=None)
    wider = build_model("tiny", "mixtral")
    wider.model.layers[1].mlp.experts.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 512, 96))
    save_version(wider, tmp_path / "w", version_id="w", parent_version=None)
    shutil.copy(tmp_path / "w" / "experts.safetensors", tmp_path / "v" / "experts.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.safetensors: truncated"):
        load_quantized_version(tmp_path / "v", 4)
    manifest = read_manifest(tmp_path / "v")
    path = tmp_path / "v" / "experts.safetensors"
    manifest.files["experts.safetensors"] = FileEntry(file_sha256(path), path.stat().st_size, "experts")
    (tmp_path / "v" / "manifest.json").write_text(manifest.to_json())
    with pytest.raises(
        CheckpointError,
        match=r"experts\.safetensors: other shapes: tensor 'model\.layers\.1\.mlp\.experts\.gate_up_proj' has shape "
        r"\[4, 512, 96\], the config needs \[4, 512, 128\]",
    ):
        load_quantized_version(tmp_path / "v", 4)
