"""Anti-forgetting safeguards: EWC with a diagonal Fisher shipped as a version file, selective freezing, distillation
from the champion, and a replay buffer mixed into the training data.

The pieces work on named parameters and named dense deltas (`ewc_penalty`, `ParameterFreeze`, `distillation_loss`),
so a full-weight (Tier-1) loop can use them as the edge adapter loop does; `EdgeSafeguards` is the edge loop's glue.
docs/forgetting-and-promotion-gate.md ("Safeguards in training") gives the maths and the choices.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fednested.adapters.lora import ExpertLoraLayer, expert_lora_layers, expert_stacks, layer_index
from fednested.adapters.routed import FrozenExpertLinear, expert_shape
from fednested.checkpoints.errors import CheckpointError, CheckpointProblem
from fednested.config.adapter import EXPERT_TARGETS
from fednested.config.training import SafeguardConfig
from fednested.data.encoding import IGNORE_INDEX, EncodedExample, encode_records
from fednested.data.packing import PackedBatch, iter_batches, pack_examples
from fednested.data.records import Record
from fednested.training.forward import causal_lm_parts, model_device, packed_loss_sum

FISHER_FILE_NAME = "fisher.safetensors"
FISHER_FORMAT = "1"
FisherInclude = Literal["experts", "experts+core"]
_PEFT_PREFIX = "base_model.model."


class FisherFileError(CheckpointError):
    """A Fisher file that cannot be used (missing, corrupt, invalid values, another version's, other shapes).

    A CheckpointError (a ValueError): the file ships with a model version and fails the way version files fail, so
    callers that already report a broken version report this one too; `path` and `reason` say which and why.
    """

    def __init__(self, path: str | Path, reason: CheckpointProblem, detail: str = "") -> None:
        super().__init__(path, reason, detail)


class SafeguardError(ValueError):
    """A safeguard was asked for but cannot run (no Fisher, no replay records, a name the model lacks); training
    refuses to start instead of training without it."""


# --------------------------------------------------------------------------------------------------------------------
# names


def canonical_name(name: str) -> str:
    """A base parameter's name as the plain model names it: no PEFT wrapper prefix, no `.base_layer` segment, so
    "base_model.model.model.layers.0.mlp.experts.base_layer.down_proj" is "model.layers.0.mlp.experts.down_proj"
    (the adapter wire keys' parameter name)."""
    name = name.removeprefix(_PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def _expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name -> fused [experts, out, in] weight of every full-precision expert stack."""
    weights: dict[str, torch.Tensor] = {}
    for name, stack in expert_stacks(model).items():
        base = stack.get_base_layer() if isinstance(stack, ExpertLoraLayer) else stack
        if isinstance(base, FrozenExpertLinear):
            raise SafeguardError(f"{name}: the experts are quantized; estimate the Fisher on the full-precision model")
        for target in EXPERT_TARGETS:
            weight = getattr(base, target)
            assert isinstance(weight, torch.Tensor)
            weights[f"{name}.{target}"] = weight
    if not weights:
        raise SafeguardError(f"{type(model).__name__} has no fused MoE expert stacks to estimate a Fisher for")
    return weights


def _core_parameters(model: nn.Module, experts: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """Canonical name -> every floating-point base parameter that is not an expert tensor or an adapter factor."""
    core: dict[str, nn.Parameter] = {}
    for name, parameter in model.named_parameters():
        canonical = canonical_name(name)
        if ".lora_" in name or canonical in experts or not parameter.is_floating_point():
            continue
        core[canonical] = parameter
    return core


def fisher_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor a Fisher file of this architecture may hold (fp or quantized base)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, stack in expert_stacks(model).items():
        base = stack.get_base_layer() if isinstance(stack, ExpertLoraLayer) else stack
        for target in EXPERT_TARGETS:
            shapes[f"{name}.{target}"] = expert_shape(base, target)
    for name, parameter in model.named_parameters():
        canonical = canonical_name(name)
        if ".lora_" not in name and canonical not in shapes and parameter.is_floating_point():
            shapes[canonical] = tuple(parameter.shape)
    return shapes


# --------------------------------------------------------------------------------------------------------------------
# the Fisher: estimate, save, load


class FisherEstimate(dict[str, torch.Tensor]):
    """A diagonal Fisher (canonical name -> tensor shaped like the weight) and the target tokens it was estimated on."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, tokens: int) -> None:
        super().__init__(tensors)
        self.tokens = tokens


def estimate_fisher(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records_by_domain: Mapping[str, Sequence[Record]],
    *,
    max_tokens: int,
    seq_len: int,
    include: Literal["experts", "experts+core"] = "experts",
) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of the expert weights (and the core's with "experts+core") on the protected
    domains: the mean over packed rows of the squared gradient of each row's mean next-token loss, per domain, then
    the mean over domains, so every protected domain weighs the same however many records it has.

    Each domain is read up to about max_tokens / len(domains) target tokens (at least one row). Row-level gradients
    (not per-token ones) keep the cost at one forward and backward per row; the estimate is then a lower bound scaled
    by the row length, which the penalty's normalisation by the Fisher's mean absorbs. The model's weights, flags and
    mode are left as they were. Returns a `FisherEstimate` (a dict) carrying the token count.
    """
    if not records_by_domain:
        raise ValueError("estimate_fisher needs at least one protected domain's records")
    if max_tokens < 1 or seq_len < 2:
        raise ValueError(f"max_tokens must be >= 1 and seq_len >= 2, got {max_tokens}, {seq_len}")
    pad_id = tokenizer.pad_token_id if isinstance(tokenizer.pad_token_id, int) else tokenizer.eos_token_id
    if not isinstance(pad_id, int):
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad rows with")
    targets: dict[str, torch.Tensor] = dict(_expert_weights(model))
    if include == "experts+core":
        targets.update(_core_parameters(model, targets))
    elif include != "experts":
        raise ValueError(f"include must be 'experts' or 'experts+core', got {include!r}")
    names = sorted(targets)
    tensors = [targets[name] for name in names]
    per_domain = max(1, max_tokens // len(records_by_domain))
    device = model_device(model)
    flags = {id(parameter): parameter.requires_grad for parameter in model.parameters()}
    was_training = model.training
    sums = [torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device) for tensor in tensors]
    tokens_total = 0
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for tensor in tensors:
            tensor.requires_grad_(True)
        model.eval()  # no dropout: the Fisher of the model as it will be served
        for domain, records in records_by_domain.items():
            if not records:
                raise ValueError(f"protected domain {domain!r} has no records to estimate the Fisher on")
            rows = pack_examples(encode_records(records, tokenizer), seq_len, pad_id=pad_id)
            domain_sums = [torch.zeros_like(total) for total in sums]
            domain_rows = 0
            domain_tokens = 0
            for batch in iter_batches(rows, 1):
                if domain_tokens >= per_domain:
                    break
                if batch.target_tokens == 0:
                    continue
                loss_sum, count = packed_loss_sum(model, batch.to(device))
                grads = torch.autograd.grad(loss_sum / count, tensors, allow_unused=True)
                for running, grad in zip(domain_sums, grads, strict=True):
                    if grad is not None:
                        running.add_(grad.detach().float().square())
                domain_rows += 1
                domain_tokens += count
            if domain_rows == 0:
                raise ValueError(f"protected domain {domain!r} holds no target tokens to estimate the Fisher on")
            for total, running in zip(sums, domain_sums, strict=True):
                total.add_(running / domain_rows)
            tokens_total += domain_tokens
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(flags[id(parameter)])
        for tensor in tensors:
            if not isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(False)
        model.train(was_training)
    domains = len(records_by_domain)
    return FisherEstimate(
        {name: (total / domains).cpu() for name, total in zip(names, sums, strict=True)}, tokens=tokens_total
    )


def _check_values(path: Path, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise FisherFileError(path, "invalid", f"tensor {name!r} is {tensor.dtype}, not a float tensor")
    if not torch.isfinite(tensor).all():
        raise FisherFileError(path, "invalid", f"tensor {name!r} holds NaN or infinite values")
    if bool((tensor < 0).any()):
        raise FisherFileError(path, "invalid", f"tensor {name!r} holds negative values (a Fisher diagonal is >= 0)")


def save_fisher_file(
    path: str | Path,
    fisher: Mapping[str, torch.Tensor],
    *,
    version_id: str,
    domains: Sequence[str],
    tokens: int | None = None,
) -> None:
    """Write `fisher` as safetensors with metadata naming the version, the protected domains, the token count (from
    `tokens`, else the FisherEstimate's) and the format; written to a temporary file and renamed, so a reader never
    sees half a file."""
    target = Path(path)
    if not fisher:
        raise FisherFileError(target, "invalid", "a Fisher file needs at least one tensor")
    for name, tensor in fisher.items():
        _check_values(target, name, tensor)
    count = tokens if tokens is not None else getattr(fisher, "tokens", None)
    metadata = {
        "format": FISHER_FORMAT,
        "version_id": version_id,
        "domains": json.dumps(list(domains)),
        "tokens": str(int(count)) if isinstance(count, int) else "unknown",
    }
    tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in fisher.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def read_fisher_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a Fisher file (version_id, domains as JSON, tokens, format); FisherFileError if unreadable."""
    source = Path(path)
    if not source.is_file():
        raise FisherFileError(source, "missing", "no Fisher file here; the version was created without one")
    try:
        with safe_open(str(source), framework="pt") as reader:
            return dict(reader.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise FisherFileError(source, "corrupt", f"not a readable safetensors file ({error})") from None


def load_fisher_file(path: str | Path, *, expected_version: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The Fisher in `path`, checked: it exists and parses, its format is known, it was estimated for
    `expected_version`, every value is finite and >= 0, and every tensor names a weight of `model` with that shape
    (all expert tensors must be there). Raises FisherFileError naming the file and the problem."""
    source = Path(path)
    metadata = read_fisher_metadata(source)
    if metadata.get("format") != FISHER_FORMAT:
        raise FisherFileError(
            source, "invalid", f"format {metadata.get('format')!r}, this code reads {FISHER_FORMAT!r}"
        )
    version = metadata.get("version_id")
    if version != expected_version:
        raise FisherFileError(
            source, "other version", f"estimated for version {version!r}, this model is version {expected_version!r}"
        )
    try:
        with safe_open(str(source), framework="pt") as reader:
            fisher = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118 (no __iter__)
    except (SafetensorError, OSError, ValueError) as error:
        raise FisherFileError(source, "corrupt", f"cannot read its tensors ({error})") from None
    shapes = fisher_shapes(model)
    for name in sorted(fisher):
        tensor = fisher[name]
        if name not in shapes:
            raise FisherFileError(source, "other shapes", f"tensor {name!r} is not a weight of this model")
        if tuple(tensor.shape) != shapes[name]:
            raise FisherFileError(
                source,
                "other shapes",
                f"tensor {name!r} has shape {list(tensor.shape)}, the model's is {list(shapes[name])}",
            )
        _check_values(source, name, tensor)
    missing = sorted(name for name in shapes if _is_expert_name(name) and name not in fisher)
    if missing:
        raise FisherFileError(source, "other shapes", f"no Fisher for expert tensor(s) {missing[:3]} ({len(missing)})")
    return {name: tensor.float() for name, tensor in fisher.items()}


def _is_expert_name(name: str) -> bool:
    return any(name.endswith(f".mlp.experts.{target}") for target in EXPERT_TARGETS)


# --------------------------------------------------------------------------------------------------------------------
# EWC


def normalised_fisher(fisher: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """`fisher[name] / mean` for `names`, the mean taken over every entry of those tensors: the penalty's λ then
    weighs a weight of average importance by 1, whatever the model size, data or row length the estimate came from."""
    if not names:
        raise SafeguardError("the EWC penalty covers no tensor")
    total = sum(float(fisher[name].double().sum()) for name in names)
    count = sum(fisher[name].numel() for name in names)
    mean = total / count
    if not mean > 0:
        raise SafeguardError("the Fisher is zero on every weight the penalty covers; it cannot weigh anything")
    return {name: fisher[name].float() / mean for name in names}


def ewc_penalty(
    deltas: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], *, strength: float
) -> torch.Tensor:
    """λ/2 · Σ F ⊙ ΔW² over named dense deltas (shaped like their Fisher tensors): differentiable in the deltas.

    A full-weight loop passes ΔW = W − W_parent per parameter; the edge passes each adapter's per-expert scale·B·A.
    """
    terms = [(fisher[name] * delta.float().square()).sum() for name, delta in deltas.items()]
    if not terms:
        raise SafeguardError("no deltas to penalise")
    return 0.5 * strength * torch.stack(terms).sum()


def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical expert-tensor name -> differentiable dense ΔW [selected experts, out, in] = scale·B·A of the active
    adapter (fednested.adapters.lora stores A [n, r, in] and B [n, out, r] per target)."""
    deltas: dict[str, torch.Tensor] = {}
    for layer in expert_lora_layers(model):
        adapter = layer.active_adapters[0]
        factors_a = layer.lora_A[adapter]
        factors_b = layer.lora_B[adapter]
        assert isinstance(factors_a, nn.ParameterDict)
        assert isinstance(factors_b, nn.ParameterDict)
        scale = float(layer.scaling[adapter])
        for target in layer.lora_targets[adapter]:
            deltas[f"{layer.module_name}.{target}"] = torch.bmm(factors_b[target], factors_a[target]) * scale
    return deltas


def adapter_fisher(model: nn.Module, fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher rows of the experts the adapters cover, normalised over every expert tensor of the file: canonical
    name -> [selected experts, out, in], matching `adapter_deltas`."""
    expert_names = sorted(name for name in fisher if _is_expert_name(name))
    normalised = normalised_fisher(fisher, expert_names)
    device = model_device(model)
    gathered: dict[str, torch.Tensor] = {}
    for layer in expert_lora_layers(model):
        adapter = layer.active_adapters[0]
        index = torch.tensor(layer.lora_experts[adapter], dtype=torch.long)
        for target in layer.lora_targets[adapter]:
            name = f"{layer.module_name}.{target}"
            if name not in normalised:
                raise SafeguardError(f"the Fisher has no tensor {name!r} for the adapters on it")
            gathered[name] = normalised[name][index].to(device)
    return gathered


# --------------------------------------------------------------------------------------------------------------------
# freezing


@dataclass
class ParameterFreeze:
    """Slices of parameters that must not change: (parameter, index along dim 0 or None for all of it).

    Their gradients are zeroed before the optimizer step (so gradient clipping and the optimizer's moments never see
    them) and their values are copied back after it, because AdamW's decoupled weight decay moves a weight even at
    zero gradient: the frozen values stay bitwise what they were.
    """

    slices: list[tuple[nn.Parameter, int | None]]
    _snapshots: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._snapshots = [self._view(parameter, index).detach().clone() for parameter, index in self.slices]

    @staticmethod
    def _view(tensor: torch.Tensor, index: int | None) -> torch.Tensor:
        return tensor if index is None else tensor[index]

    def zero_grads(self) -> None:
        for parameter, index in self.slices:
            if parameter.grad is not None:
                self._view(parameter.grad, index).zero_()

    def restore(self) -> None:
        with torch.no_grad():
            for (parameter, index), snapshot in zip(self.slices, self._snapshots, strict=True):
                self._view(parameter, index).copy_(snapshot)


def edge_frozen_slices(model: nn.Module, config: SafeguardConfig) -> list[tuple[nn.Parameter, int | None]]:
    """The adapter factor slices of the frozen layers and experts. The edge never trains the gate, so asking to
    freeze it is refused (a setting that silently did nothing would hide a config meant for full-weight training)."""
    if config.freeze_gate:
        raise SafeguardError(
            "freeze_gate is set, but edge training updates expert adapters only and never the gate; unset it"
        )
    stacks = expert_stacks(model)
    experts_per_layer = {layer_index(name): _num_experts(stack) for name, stack in stacks.items()}
    for layer in config.freeze_layers:
        if layer not in experts_per_layer:
            raise SafeguardError(
                f"freeze_layers names layer {layer}; the model's MoE layers are {sorted(experts_per_layer)}"
            )
    frozen_experts = config.frozen_experts
    for layer, expert in sorted(frozen_experts):
        if layer not in experts_per_layer or expert >= experts_per_layer[layer]:
            raise SafeguardError(
                f"freeze_experts names '{layer}:{expert}'; the model's MoE layers are {sorted(experts_per_layer)} "
                f"with {max(experts_per_layer.values(), default=0)} experts each"
            )
    slices: list[tuple[nn.Parameter, int | None]] = []
    for lora_layer in expert_lora_layers(model):
        adapter = lora_layer.active_adapters[0]
        for slot, expert in enumerate(lora_layer.lora_experts[adapter]):
            if (
                lora_layer.layer_index not in config.freeze_layers
                and (lora_layer.layer_index, expert) not in frozen_experts
            ):
                continue
            for container in (lora_layer.lora_A, lora_layer.lora_B):
                factors = container[adapter]
                assert isinstance(factors, nn.ParameterDict)
                for target in lora_layer.lora_targets[adapter]:
                    slices.append((factors[target], slot))
    return slices


def _num_experts(stack: nn.Module) -> int:
    base = stack.get_base_layer() if isinstance(stack, ExpertLoraLayer) else stack
    return expert_shape(base, EXPERT_TARGETS[0])[0]


# --------------------------------------------------------------------------------------------------------------------
# distillation


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The model as its frozen base (the edge's champion): every expert LoRA layer skips its adapters until exit.

    Sets PEFT's `_disable_adapters` flag directly: PEFT's own `enable_adapters` would also flip requires_grad on the
    factors, which the training loop owns.
    """
    layers = [module for module in model.modules() if isinstance(module, ExpertLoraLayer)]
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous, strict=True):
            layer._disable_adapters = value


def target_logits(model: nn.Module, batch: PackedBatch, *, precision: Literal["fp32", "bf16"] = "fp32") -> torch.Tensor:
    """fp32 logits at the batch's target positions only (the head trick of fednested.training.forward: no vocabulary
    projection for prompt or padding positions), with the model family's logit scaling and soft-capping."""
    parts = causal_lm_parts(model)
    with torch.autocast(device_type=batch.input_ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        outputs = parts.decoder(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
        )
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
        projected = parts.head(hidden[batch.targets != IGNORE_INDEX])
    assert isinstance(projected, torch.Tensor)
    logits = projected.float()
    scaling = getattr(parts.config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling not in (0, 1):
        logits = logits / scaling
    softcap = getattr(parts.config, "final_logit_softcapping", None)
    if isinstance(softcap, (int, float)) and softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """T² · mean over target tokens of KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al. 2015: the T²
    keeps the gradient's scale independent of T)."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(
            f"student and teacher logits must be the same [tokens, vocab], got {student.shape}, {teacher.shape}"
        )
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")
    return kl * (temperature**2) / max(student.shape[0], 1)


# --------------------------------------------------------------------------------------------------------------------
# replay


def mix_replay(
    examples: Sequence[EncodedExample], replay: Sequence[EncodedExample], fraction: float, rng: random.Random
) -> list[EncodedExample]:
    """`examples` plus round(fraction·n/(1−fraction)) replay examples, so that replay is `fraction` of the mix.

    Drawn without replacement while the replay set lasts, then again from a fresh shuffle of it.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    wanted = round(fraction * len(examples) / (1 - fraction))
    if wanted == 0:
        return list(examples)
    if not replay:
        raise SafeguardError("replay_fraction is set but the replay set is empty")
    drawn: list[EncodedExample] = []
    while len(drawn) < wanted:
        drawn.extend(rng.sample(list(replay), min(len(replay), wanted - len(drawn))))
    return [*examples, *drawn]


# --------------------------------------------------------------------------------------------------------------------
# the edge loop's glue


@dataclass
class SafeguardTerms:
    """The last values of the extra loss terms (for TrainMetrics)."""

    ewc_penalty: float | None = None
    distill_loss: float | None = None


@dataclass
class EdgeSafeguards:
    """What `train_adapters` runs for a SafeguardConfig: built (and checked) before the first step."""

    config: SafeguardConfig
    fisher: dict[str, torch.Tensor] | None
    freeze: ParameterFreeze | None
    replay_examples: list[EncodedExample]
    distill_batches: Iterator[PackedBatch] | None
    terms: SafeguardTerms = field(default_factory=SafeguardTerms)

    @classmethod
    def prepare(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: SafeguardConfig,
        *,
        fisher: Mapping[str, torch.Tensor] | None,
        replay: Sequence[Record] | None,
        seq_len: int,
        rows_per_batch: int,
        pad_id: int,
    ) -> EdgeSafeguards:
        """Check that every safeguard asked for can run, and build it; SafeguardError otherwise."""
        gathered: dict[str, torch.Tensor] | None = None
        if config.ewc_lambda > 0:
            if fisher is None:
                raise SafeguardError(
                    f"EWC is asked for (ewc_lambda={config.ewc_lambda}) but no Fisher was given: load the parent "
                    f"version's {FISHER_FILE_NAME} with load_fisher_file; training does not run without it"
                )
            gathered = adapter_fisher(model, fisher)
        slices = edge_frozen_slices(model, config)
        needs_replay = config.replay_fraction > 0 or config.distill_weight > 0
        replay_examples = encode_records(list(replay), tokenizer) if needs_replay and replay else []
        if needs_replay and not replay_examples:
            asked = "replay_fraction" if config.replay_fraction > 0 else "distill_weight"
            raise SafeguardError(f"{asked} is set but no replay records were given (the federation's replay set)")
        distill_batches = None
        if config.distill_weight > 0:
            rows = pack_examples(replay_examples, seq_len, pad_id=pad_id)
            batches = [batch for batch in iter_batches(rows, rows_per_batch) if batch.target_tokens > 0]
            if not batches:
                raise SafeguardError("distill_weight is set but the replay records hold no target tokens")
            distill_batches = itertools.cycle(batches)
        return cls(
            config=config,
            fisher=gathered,
            freeze=ParameterFreeze(slices) if slices else None,
            replay_examples=replay_examples,
            distill_batches=distill_batches,
        )

    def mix(self, examples: Sequence[EncodedExample], seed: int) -> list[EncodedExample]:
        """The training examples with the replay share mixed in (own generator: the data order's stays the same)."""
        if self.config.replay_fraction <= 0:
            return list(examples)
        return mix_replay(examples, self.replay_examples, self.config.replay_fraction, random.Random(f"replay:{seed}"))

    def add_terms(self, model: nn.Module, precision: Literal["fp32", "bf16"]) -> None:
        """Backward of the EWC penalty and the distillation term, added to the step's gradients."""
        if self.fisher is not None:
            penalty = ewc_penalty(adapter_deltas(model), self.fisher, strength=self.config.ewc_lambda)
            torch.autograd.backward(penalty)
            self.terms.ewc_penalty = float(penalty.detach())
        if self.distill_batches is not None:
            batch = next(self.distill_batches).to(model_device(model))
            with torch.no_grad(), adapters_disabled(model):
                teacher = target_logits(model, batch, precision=precision)
            student = target_logits(model, batch, precision=precision)
            loss = distillation_loss(student, teacher, temperature=self.config.distill_temperature)
            torch.autograd.backward(loss * self.config.distill_weight)
            self.terms.distill_loss = float(loss.detach())
            if not math.isfinite(self.terms.distill_loss):
                raise SafeguardError("the distillation term is not finite; lower distill_temperature or check the data")

    def before_step(self) -> None:
        if self.freeze is not None:
            self.freeze.zero_grads()

    def after_step(self) -> None:
        if self.freeze is not None:
            self.freeze.restore()
