"""A version (optionally with an adapter update merged in) as an ONNX model, checked against PyTorch's logits.

Needs the optional packages of requirements/interop.txt (onnx, onnxscript for torch's exporter, onnxruntime for the
check); nothing else in fednested imports this module.
"""

# The exporter is torch.export-based (dynamo=True): the TorchScript exporter is deprecated in the pinned torch. Its
# graph has dynamic batch and sequence axes, so one file serves any input length up to max_position_embeddings.

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it; importing it here names it when missing)
import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

from fednested.checkpoints.updates import load_update
from fednested.checkpoints.versions import load_version
from fednested.deltas import expert_deltas_from_adapters, merge_expert_deltas

# The target of issue-level acceptance: fp32 ONNX logits within 1e-4 of PyTorch's on the same inputs.
DEFAULT_TOLERANCE = 1e-4
# (batch, sequence) of the inputs the check runs; none equals the traced example, so the dynamic axes are exercised.
DEFAULT_CHECK_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (2, 16), (3, 33))
_EXAMPLE_SHAPE = (2, 12)
# transformers' default MoE kernel (grouped_mm) is a custom op with no ONNX lowering, and the eager per-expert loop
# has data-dependent shapes torch.export refuses; batched_mm gathers each token's experts densely: same arithmetic.
EXPORT_EXPERTS_IMPLEMENTATION = "batched_mm"


class OnnxExportError(RuntimeError):
    """The export ran but its result cannot be trusted (logits too far from PyTorch's), or the inputs are unusable."""


@dataclass(frozen=True)
class SampleCheck:
    """One input the ONNX model and PyTorch both ran: its shape and the largest absolute logit difference."""

    batch: int
    sequence: int
    max_abs_error: float


@dataclass(frozen=True)
class OnnxExportReport:
    """What was exported and how closely onnxruntime reproduces PyTorch; written as JSON next to the .onnx file."""

    version_id: str
    onnx_file: str
    merged_update: str | None
    dtype: str
    opset: int
    dynamic_axes: dict[str, list[str]]
    tolerance: float
    max_abs_error: float
    within_tolerance: bool
    samples: list[SampleCheck] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def report_path(onnx_path: Path) -> Path:
    """Where the check's JSON report goes: `model.onnx` -> `model.check.json`, beside it."""
    return onnx_path.with_name(f"{onnx_path.stem}.check.json")


class _LogitsOnly(nn.Module):
    """input_ids -> logits: one tensor in, one out, no cache (what an exported causal LM serves)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, use_cache=False).logits
        return logits


def load_for_export(
    version_dir: Path, *, expected_version: str | None, update_dir: Path | None
) -> tuple[PreTrainedModel, str]:
    """(fp32 model in eval mode, version id): every file's sha256 verified; an update's adapters merged in.

    Versions are dense (save_version refuses adapter-wrapped models), so the only adapters to merge are those of an
    update trained on this version; its per-expert products are added exactly as the server merges them.
    """
    model, manifest = load_version(version_dir, expected_version=expected_version)
    nn.Module.to(model, dtype=torch.float32)  # in place; bf16 and fp16 versions export in fp32
    if update_dir is not None:
        adapters, config, _ = load_update(update_dir, base_manifest=manifest)
        merge_expert_deltas(model, expert_deltas_from_adapters(adapters, config, model))
    model.set_experts_implementation(EXPORT_EXPERTS_IMPLEMENTATION)
    nn.Module.eval(model)
    return model, manifest.version_id


def _export(module: nn.Module, vocab_size: int, max_positions: int, path: Path) -> int:
    """Write the ONNX graph of `module` to `path`; returns the opset used."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, vocab_size, _EXAMPLE_SHAPE, generator=generator)
    batch = torch.export.Dim("batch", min=1, max=1024)
    sequence = torch.export.Dim("sequence", min=2, max=max(3, max_positions))
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise OnnxExportError(f"{path}: torch.onnx.export returned no program")
    program.save(str(path))
    # the default ("") domain's opset is the one consumers ask about; the exporter adds function domains beside it
    return next(int(entry.version) for entry in program.model_proto.opset_import if entry.domain in ("", "ai.onnx"))


def check_against_torch(
    module: nn.Module, path: Path, vocab_size: int, shapes: Sequence[tuple[int, int]], *, seed: int = 0
) -> list[SampleCheck]:
    """Run the ONNX file with onnxruntime and `module` with PyTorch on random token ids of each shape."""
    options = onnxruntime.SessionOptions()
    # the check is short; one pool as large as torch's keeps it from oversubscribing a shared machine
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    checks: list[SampleCheck] = []
    for batch, sequence in shapes:
        ids = torch.randint(0, vocab_size, (batch, sequence), generator=generator)
        with torch.no_grad():
            expected = module(ids).numpy()
        (actual,) = session.run(["logits"], {"input_ids": ids.numpy()})
        if actual.shape != expected.shape:
            raise OnnxExportError(f"{path}: logits of shape {actual.shape} for input {list(ids.shape)}, "
                                  f"PyTorch gives {expected.shape}")  # fmt: skip
        checks.append(SampleCheck(batch, sequence, float(np.max(np.abs(actual - expected)))))
    return checks


def _package_versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export_version_onnx(
    version_dir: str | Path,
    out: str | Path,
    *,
    expected_version: str | None = None,
    update_dir: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_shapes: Sequence[tuple[int, int]] = DEFAULT_CHECK_SHAPES,
) -> OnnxExportReport:
    """Export a version to the ONNX file `out` (fp32, dynamic batch and sequence) and check it with onnxruntime.

    The version's files are verified (sha256) before anything is read. The report is written beside `out` as JSON
    whatever the outcome; OnnxExportError when the largest logit difference exceeds `tolerance`.
    """
    target = Path(out)
    if target.suffix != ".onnx":
        raise OnnxExportError(f"{target}: the output file must end in .onnx")
    if not check_shapes or any(batch < 1 or sequence < 2 for batch, sequence in check_shapes):
        raise OnnxExportError(f"check shapes {list(check_shapes)}: give at least one (batch ≥ 1, sequence ≥ 2)")
    model, version_id = load_for_export(
        Path(version_dir),
        expected_version=expected_version,
        update_dir=Path(update_dir) if update_dir is not None else None,
    )
    vocab_size = int(model.config.vocab_size)
    max_positions = int(model.config.max_position_embeddings)
    too_long = [shape for shape in check_shapes if shape[1] > max_positions]
    if too_long:
        raise OnnxExportError(f"check shapes {too_long} are longer than the model's {max_positions} positions")
    module = _LogitsOnly(model).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    # a stale report must not vouch for a new graph: the report is written last, once the check has run
    report_path(target).unlink(missing_ok=True)
    opset = _export(module, vocab_size, max_positions, target)
    samples = check_against_torch(module, target, vocab_size, check_shapes)
    worst = max(sample.max_abs_error for sample in samples)
    report = OnnxExportReport(
        version_id=version_id,
        onnx_file=target.name,
        merged_update=Path(update_dir).name if update_dir is not None else None,
        dtype="float32",
        opset=opset,
        dynamic_axes={"input_ids": ["batch", "sequence"], "logits": ["batch", "sequence"]},
        tolerance=tolerance,
        max_abs_error=worst,
        within_tolerance=worst <= tolerance,
        samples=samples,
        versions=_package_versions(),
    )
    report_path(target).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if not report.within_tolerance:
        raise OnnxExportError(
            f"{target}: ONNX logits differ from PyTorch's by up to {worst:.3g}, above the tolerance {tolerance:g} "
            f"(see {report_path(target).name})"
        )
    return report
