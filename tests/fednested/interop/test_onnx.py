"""ONNX export of a version: an update's adapters merged in, logits within 1e-4 of PyTorch's under onnxruntime on
inputs of other shapes than the traced one, and a version whose files fail their sha256 refused before export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

pytest.importorskip("onnxruntime", reason="needs requirements/interop.txt")

from fednested.adapters import ExpertLoraConfig, adapter_state_dict, attach_expert_adapters
from fednested.checkpoints import CheckpointError, save_update, save_version
from fednested.deltas import expert_deltas_from_adapters, merge_expert_deltas
from fednested.interop.onnx import export_version_onnx, report_path
from fednested.models import build_config, get_preset

VOCAB = 96
LORA = ExpertLoraConfig(rank=2, alpha=4, experts=[0, 3])


def one_layer_model(seed: int) -> PreTrainedModel:
    """The tiny Mixtral cut to one decoder layer: export time is tracing time, which grows with the layers."""
    config = build_config(replace(get_preset("tiny"), num_layers=1), "mixtral", vocab_size=VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    nn.Module.eval(model)
    return model


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
def test_export_with_merged_update_matches_pytorch(tmp_path: Path) -> None:
    import onnxruntime

    base = one_layer_model(seed=7)
    manifest = save_version(base, tmp_path / "v1", version_id="v1", parent_version=None)
    generator = torch.Generator().manual_seed(1)
    adapters = {
        key: torch.randn(value.shape, generator=generator) * 0.1
        for key, value in adapter_state_dict(attach_expert_adapters(one_layer_model(seed=0), LORA)).items()
    }
    save_update(adapters, tmp_path / "u1", base_version="v1", adapter_config=LORA, metadata={}, base_manifest=manifest)

    report = export_version_onnx(tmp_path / "v1", tmp_path / "out" / "v1.onnx", update_dir=tmp_path / "u1")

    assert report.version_id == "v1"
    assert report.merged_update == "u1"
    assert report.within_tolerance
    assert report.max_abs_error <= 1e-4
    assert [(s.batch, s.sequence) for s in report.samples] == [(1, 7), (2, 16), (3, 33)]
    written = json.loads(report_path(tmp_path / "out" / "v1.onnx").read_text())
    assert written["max_abs_error"] == report.max_abs_error
    assert written["onnx_file"] == "v1.onnx"
    # independently of the exporter's own check: the graph computes the merged model, not the base
    merged = one_layer_model(seed=7)
    merge_expert_deltas(merged, expert_deltas_from_adapters(adapters, LORA, merged))
    ids = torch.randint(0, VOCAB, (2, 21), generator=generator)
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "v1.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
    with torch.no_grad():
        want, unmerged = merged(input_ids=ids).logits.numpy(), base(input_ids=ids).logits.numpy()
    assert np.max(np.abs(logits - want)) <= 1e-4
    assert np.max(np.abs(logits - unmerged)) > 1e-3


def test_version_whose_file_fails_its_sha256_is_refused(tmp_path: Path) -> None:
    save_version(one_layer_model(seed=0), tmp_path / "v1", version_id="v1", parent_version=None)
    experts = tmp_path / "v1" / "experts.safetensors"
    data = bytearray(experts.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last weight
    experts.write_bytes(bytes(data))

    with pytest.raises(CheckpointError) as caught:
        export_version_onnx(tmp_path / "v1", tmp_path / "v1.onnx")

    assert caught.value.reason == "sha256 mismatch"
    assert caught.value.path == experts
    assert not (tmp_path / "v1.onnx").exists()
    assert not report_path(tmp_path / "v1.onnx").exists()
