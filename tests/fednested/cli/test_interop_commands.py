"""`fednested import hf` and `fednested export onnx` through Typer's CliRunner: a sharded Qwen2-MoE checkpoint
imported into an artifact store, exported by version id and checked; bad inputs exit 1 naming the file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fednested.cli import app
from fednested.models import build_config, get_preset

runner = CliRunner()
VOCAB = 96


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    # one decoder layer: the export's time is tracing time, which grows with the layers
    config = build_config(replace(get_preset("tiny"), num_layers=1), "qwen2_moe", vocab_size=VOCAB)
    source = tmp_path / "Qwen-tiny-MoE"
    AutoModelForCausalLM.from_config(config).save_pretrained(source, max_shard_size="300KB")
    assert len(list(source.glob("model-*.safetensors"))) > 1
    return source


@pytest.mark.slow
def test_import_then_export_by_version_id_from_the_store(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime", reason="needs requirements/interop.txt")
    store = tmp_path / "store"
    imported = runner.invoke(app, ["import", "hf", str(checkpoint), "--out", str(store / "versions" / "qwen-v1"),
                                   "--version-id", "qwen-v1"])  # fmt: skip
    assert imported.exit_code == 0, imported.output
    assert "wrote version qwen-v1 (qwen2_moe, " in imported.stdout
    assert json.loads((store / "versions" / "qwen-v1" / "manifest.json").read_text())["version_id"] == "qwen-v1"

    monkeypatch.setenv("FEDNESTED_ARTIFACT_ROOT", str(store))
    out = tmp_path / "exports" / "qwen.onnx"
    exported = runner.invoke(app, ["export", "onnx", "--version", "qwen-v1", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    report = json.loads((tmp_path / "exports" / "qwen.check.json").read_text())
    assert report["version_id"] == "qwen-v1"
    assert report["max_abs_error"] <= 1e-4
    assert f"max abs error {report['max_abs_error']:.3g} ≤ 0.0001" in exported.stdout
    assert out.stat().st_size > 0


def test_import_of_a_checkpoint_with_a_missing_shard_exits_1_naming_it(tmp_path: Path, checkpoint: Path) -> None:
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    shard.unlink()
    result = runner.invoke(app, ["import", "hf", str(checkpoint), "--out", str(tmp_path / "v")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {shard}: missing: shard listed in model.safetensors.index.json")
    assert not (tmp_path / "v").exists()


def test_export_of_a_tampered_version_exits_1_naming_the_file(tmp_path: Path, checkpoint: Path) -> None:
    version = tmp_path / "v"
    assert runner.invoke(app, ["import", "hf", str(checkpoint), "--out", str(version)]).exit_code == 0
    config = version / "config.json"
    config.write_text(config.read_text().replace('"num_experts": 4', '"num_experts": 5'))
    result = runner.invoke(app, ["export", "onnx", "--version-dir", str(version), "--out", str(tmp_path / "v.onnx")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {config}: sha256 mismatch")
    assert not (tmp_path / "v.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one of --version ID (a version in the artifact store) or --version-dir DIR"),
        (["--version", "v1", "--version-dir", "x"], "give exactly one of --version ID"),
        (["--version", "../etc", "--store", "{store}"], "--version '../etc' is not a plain version id"),
        (["--version", "v9", "--store", "{store}"], "holds no version 'v9'"),
    ],
)
def test_export_needs_one_resolvable_version(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "versions").mkdir()
    result = runner.invoke(app, ["export", "onnx", *[arg.format(store=tmp_path) for arg in args]])
    assert result.exit_code == 1
    assert message in result.stderr
