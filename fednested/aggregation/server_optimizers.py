"""Server optimisers for the middle loop (Reddi et al., 2021, "Adaptive Federated Optimization"): the aggregated
client delta Δ_t of each (param, expert) is treated as a pseudo-gradient and turned into the step added to W_e.

    fedavg    step = η·Δ
    fedavgm   m ← β1·m + Δ                                       step = η·m
    fedadam   m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²          step = η·m / (√v + τ)
    fedyogi   m as fedadam;          v ← v − (1−β2)·Δ²·sign(v − Δ²)  step = η·m / (√v + τ)

with m₀ = 0 and v₀ = τ² (Reddi et al. require v₋₁ ≥ τ²). As in the paper there is no bias correction. The state
(m, v and a step count per key) lives in fp32 — these are running averages of fp32 deltas, float64 would double a
state that is already up to twice the experts' size — and is saved with the version it produced (`save_server_state`),
so that the next aggregation onto that version resumes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from fednested.aggregation.aggregate import MAX_SERVER_LEARNING_RATE
from fednested.aggregation.factors import MAX_HEADER_BYTES, FactorFileError, parse_safetensors_header
from fednested.deltas import DeltaError, DeltaKey, parse_delta_key

ServerOptimizerName = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
SERVER_OPTIMIZERS: tuple[ServerOptimizerName, ...] = get_args(ServerOptimizerName)
# Which moments each optimiser keeps per key (fedavg keeps none, so it has no state at all).
MOMENTS: dict[ServerOptimizerName, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("m",),
    "fedadam": ("m", "v"),
    "fedyogi": ("m", "v"),
}

STATE_FORMAT = "fednested.server_optimizer/1"
# A state file is at most twice the experts' fp32 size; 8 GiB is far above any model this project serves and keeps a
# corrupt or hostile size from being read into memory.
DEFAULT_MAX_STATE_BYTES = 8 * 1024**3


class ServerOptimizerStateError(ValueError):
    """Optimiser state that cannot be used; the message names the file (or key) and what is wrong."""


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """Which server optimiser, and its hyperparameters (Reddi et al.'s η, β1, β2, τ)."""

    name: ServerOptimizerName = "fedavg"
    # η: the existing round key server_learning_rate. FedAvg's η is 1; beyond 100 any honest step overflows.
    learning_rate: float = 1.0
    # β1 of fedavgm, fedadam and fedyogi.
    momentum: float = 0.9
    # β2 of fedadam and fedyogi.
    beta2: float = 0.99
    # τ: how adaptive fedadam/fedyogi are (small τ: per-coordinate step sizes; large τ: close to momentum SGD).
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimiser {self.name!r} is not one of {', '.join(SERVER_OPTIMIZERS)}")
        checks: tuple[tuple[str, float, bool, str], ...] = (
            (
                "learning_rate",
                self.learning_rate,
                0 < self.learning_rate <= MAX_SERVER_LEARNING_RATE,
                f"in (0, {MAX_SERVER_LEARNING_RATE:g}]",
            ),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("beta2", self.beta2, 0 <= self.beta2 < 1, "in [0, 1)"),
            ("tau", self.tau, self.tau > 0, "> 0"),
        )
        for field_name, value, ok, expected in checks:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok:
                raise ValueError(f"server optimiser {field_name} must be a finite number {expected}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, *, where: str) -> ServerOptimizerConfig:
        """The config `to_dict` wrote; ServerOptimizerStateError naming `where` for anything else."""
        known = {item.name for item in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != known:
            raise ServerOptimizerStateError(f"{where}: optimizer must be an object with keys {sorted(known)}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as error:
            raise ServerOptimizerStateError(f"{where}: {error}") from None


class ServerOptimizer:
    """Turns each aggregated delta Δ into the step added to its expert weight, keeping state per (param, expert).

    State is lazy per key, like SparseAdam: only keys that receive a delta are stepped and their moments decay. An
    expert no device trained in this window gets no step at all — with dense momentum it would keep moving on its old
    momentum, i.e. change although nobody sent anything for it, which a routed MoE makes the common case.
    """

    def __init__(
        self,
        config: ServerOptimizerConfig,
        moments: Mapping[str, Tensor] | None = None,
        steps: Mapping[str, int] | None = None,
        *,
        resumed: bool = False,
        note: str | None = None,
    ) -> None:
        self.config = config
        # Whether this optimiser continues saved state, and why not when it could have (see resume_server_optimizer).
        self.resumed = resumed
        self.note = note
        self._m: dict[DeltaKey, Tensor] = {}
        self._v: dict[DeltaKey, Tensor] = {}
        self._steps: dict[DeltaKey, int] = {}
        wanted = MOMENTS[config.name]
        for name, tensor in (moments or {}).items():
            key, kind = _split_moment_name(name, where="moments")
            if kind not in wanted:
                raise ServerOptimizerStateError(f"moment {name!r}: {config.name} keeps no {kind!r} moment")
            if not bool(torch.isfinite(tensor).all()):
                raise ServerOptimizerStateError(f"moment {name!r} holds NaN or infinite values")
            (self._m if kind == "m" else self._v)[key] = tensor.detach().to(torch.float32).clone()
        for key, count in (steps or {}).items():
            _check_key(key, where="steps")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ServerOptimizerStateError(f"steps[{key!r}] must be an integer >= 1, got {count!r}")
            self._steps[key] = count
        for key in set(self._m) | set(self._v) | set(self._steps):
            for kind in wanted:
                if key not in (self._m if kind == "m" else self._v):
                    raise ServerOptimizerStateError(
                        f"key {key!r} has no {kind!r} moment ({config.name} keeps {wanted})"
                    )
            if key not in self._steps:
                raise ServerOptimizerStateError(f"key {key!r} has moments but no step count")
            if key in self._m and key in self._v and self._m[key].shape != self._v[key].shape:
                raise ServerOptimizerStateError(
                    f"key {key!r}: m has shape {list(self._m[key].shape)} but v has {list(self._v[key].shape)}"
                )
            if key in self._v and bool((self._v[key] < 0).any()):
                raise ServerOptimizerStateError(f"key {key!r}: v holds negative values (a second moment is >= 0)")
        if not wanted and self._steps:
            raise ServerOptimizerStateError(f"{config.name} keeps no state, but step counts were given")

    def step(self, key: DeltaKey, delta: Tensor) -> Tensor:
        """The step to add to W_e for the aggregated delta Δ of `key` (η included: merge it with eta = 1)."""
        _check_key(key, where="step")
        delta = delta.detach().to(torch.float32)
        if not bool(torch.isfinite(delta).all()):
            raise ValueError(f"aggregated delta {key!r} holds NaN or infinite values")
        config = self.config
        if config.name == "fedavg":
            return delta * config.learning_rate
        for store, kind in ((self._m, "m"), (self._v, "v")):
            if key in store and store[key].shape != delta.shape:
                raise ServerOptimizerStateError(
                    f"server optimiser state for {key!r}: moment {kind} has shape {list(store[key].shape)} but the "
                    f"aggregated delta has {list(delta.shape)} (the expert changed shape; drop the state to restart)"
                )
        beta1 = config.momentum
        previous_m = self._m.get(key, torch.zeros_like(delta))
        if config.name == "fedavgm":
            m = previous_m * beta1 + delta
            result = m * config.learning_rate
            v = None
        else:
            m = previous_m * beta1 + delta * (1 - beta1)
            previous_v = self._v.get(key, torch.full_like(delta, config.tau**2))
            squared = delta.square()
            if config.name == "fedadam":
                v = previous_v * config.beta2 + squared * (1 - config.beta2)
            else:
                v = previous_v - squared * (1 - config.beta2) * torch.sign(previous_v - squared)
            result = m * config.learning_rate / (v.sqrt() + config.tau)
        # Checked before the state changes: an overflow must not leave this key's moments half-updated.
        if not bool(torch.isfinite(result).all()):
            raise ValueError(f"server optimiser step for {key!r} overflowed (|Δ| up to {float(delta.abs().max()):g})")
        self._m[key] = m
        if v is not None:
            self._v[key] = v
        self._steps[key] = self._steps.get(key, 0) + 1
        return result

    @property
    def steps(self) -> dict[str, int]:
        """How many steps each key has taken with this state (empty for fedavg, which keeps none)."""
        return dict(self._steps)

    def moments(self) -> dict[str, Tensor]:
        """The state tensors by name: "<key>#m" and "<key>#v" (what the state file holds)."""
        named = {f"{key}#m": tensor for key, tensor in self._m.items()}
        named.update({f"{key}#v": tensor for key, tensor in self._v.items()})
        return dict(sorted(named.items()))


def _check_key(key: str, *, where: str) -> None:
    try:
        parse_delta_key(key)
    except DeltaError as error:
        raise ServerOptimizerStateError(f"{where}: {error}") from None


def _split_moment_name(name: str, *, where: str) -> tuple[DeltaKey, str]:
    key, _, kind = name.rpartition("#")
    if kind not in ("m", "v") or not key:
        raise ServerOptimizerStateError(f"{where}: tensor {name[:200]!r} is not named '<param>/expert=<e>#m' or '#v'")
    _check_key(key, where=f"{where}: tensor {name[:200]!r}")
    return key, kind


@dataclass(frozen=True)
class ServerOptimizerState:
    """What one state file holds: the version it belongs to, the optimiser that wrote it, its moments and steps."""

    version_id: str
    config: ServerOptimizerConfig
    moments: dict[str, Tensor]
    steps: dict[str, int]


def save_server_state(optimizer: ServerOptimizer, path: Path, *, version_id: str) -> str:
    """Write the optimiser's state as the state of `version_id` to `path`; returns the file's sha256 (hex).

    A safetensors file (the moments, fp32) whose metadata carries the format tag, the version, the optimiser config
    and the step counts. Written under a temporary name in the same directory and moved into place, so a crash
    leaves either the old file or the new one, never half of one. fedavg's empty state is still a valid file: it
    records which optimiser produced the version.
    """
    from safetensors.torch import save_file

    metadata = {
        "format": STATE_FORMAT,
        "version_id": version_id,
        "optimizer": json.dumps(optimizer.config.to_dict(), sort_keys=True),
        "steps": json.dumps(optimizer.steps, sort_keys=True),
    }
    tensors = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in optimizer.moments().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        save_file(tensors, temporary, metadata=metadata)
        digest = _sha256(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_server_state(
    path: Path,
    *,
    expected_version: str,
    sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_STATE_BYTES,
) -> ServerOptimizerState:
    """The state `save_server_state` wrote for `expected_version`, checked before any of it is used.

    Raises ServerOptimizerStateError naming the file for: a missing file, one over `max_bytes` (refused before
    reading), a sha256 other than `sha256`, a file that is not safetensors or lacks our format tag or has malformed
    metadata, state that belongs to another version, a moment that is not "<key>#m"/"<key>#v" of a valid delta key
    or holds NaN/inf, and moments and step counts that do not match the optimiser (see ServerOptimizer).
    """
    where = f"server optimiser state {path.name}"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ServerOptimizerStateError(f"{where}: no such file ({path})") from None
    if size > max_bytes:
        raise ServerOptimizerStateError(f"{where}: {size} bytes is over the limit of {max_bytes} bytes")
    if sha256 is not None:
        found = _sha256(path)
        if found != sha256.lower():
            raise ServerOptimizerStateError(
                f"{where}: sha256 is {found}, expected {sha256} (the file changed since it was recorded)"
            )
    with path.open("rb") as handle:
        head = handle.read(min(size, 8 + MAX_HEADER_BYTES))
    try:
        # Our bounded reader first: it refuses dtypes and offsets the safetensors loader would choke on.
        spans = parse_safetensors_header(head, file_size=size, where=where)
    except FactorFileError as error:
        raise ServerOptimizerStateError(f"not a safetensors file: {error}") from None
    header = json.loads(head[8 : 8 + int.from_bytes(head[:8], "little")].decode("utf-8"))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT:
        found_format = metadata.get("format") if isinstance(metadata, dict) else None
        raise ServerOptimizerStateError(f"{where}: format is {found_format!r}, expected {STATE_FORMAT!r}")
    version_id = metadata.get("version_id")
    if not isinstance(version_id, str):
        raise ServerOptimizerStateError(f"{where}: metadata has no version_id")
    if version_id != expected_version:
        raise ServerOptimizerStateError(f"{where} belongs to version {version_id!r}, not {expected_version!r}")
    try:
        raw_config = json.loads(metadata.get("optimizer", ""))
        raw_steps = json.loads(metadata.get("steps", ""))
    except (TypeError, ValueError, RecursionError) as error:
        raise ServerOptimizerStateError(f"{where}: metadata optimizer/steps is not JSON: {str(error)[:200]}") from None
    config = ServerOptimizerConfig.from_dict(raw_config, where=where)
    if not isinstance(raw_steps, dict):
        raise ServerOptimizerStateError(f"{where}: metadata steps must be an object, got {type(raw_steps).__name__}")
    for name, span in spans.items():
        if span.dtype != "F32":
            raise ServerOptimizerStateError(f"{where}: tensor {name[:200]!r} is {span.dtype}, the state is F32")
        _split_moment_name(name, where=where)
    from safetensors.torch import load_file

    try:
        moments = load_file(path)
    except Exception as error:  # safetensors raises its own error type for files it cannot read
        raise ServerOptimizerStateError(f"{where}: cannot be read: {str(error)[:200]}") from None
    try:
        ServerOptimizer(config, moments, raw_steps)
    except ServerOptimizerStateError as error:
        raise ServerOptimizerStateError(f"{where}: {error}") from None
    return ServerOptimizerState(version_id=version_id, config=config, moments=moments, steps=dict(raw_steps))


def resume_server_optimizer(
    config: ServerOptimizerConfig, state: ServerOptimizerState | None
) -> tuple[ServerOptimizer, str | None]:
    """The optimiser for the next aggregation: `state` continued when it was written by the same optimiser (the new
    η/β/τ apply from now on, the moments are kept), else a fresh one; and a note saying why it did not continue
    (None when it did with unchanged hyperparameters, or there was no state and the optimiser is fedavg)."""
    if state is None:
        note = None if config.name == "fedavg" else f"{config.name} starts from zero moments: no saved state"
        return ServerOptimizer(config, note=note), note
    if state.config.name != config.name:
        note = (
            f"the federation switched its server optimiser from {state.config.name} to {config.name}: the saved "
            f"state of {state.version_id} ({len(state.moments)} moment tensors) is dropped and {config.name} starts "
            f"from zero moments"
        )
        return ServerOptimizer(config, note=note), note
    changed = [
        f"{item.name} {getattr(state.config, item.name)!r} → {getattr(config, item.name)!r}"
        for item in fields(ServerOptimizerConfig)
        if getattr(state.config, item.name) != getattr(config, item.name)
    ]
    note = f"{config.name} continues the state of {state.version_id} with {', '.join(changed)}" if changed else None
    return ServerOptimizer(config, state.moments, state.steps, resumed=True, note=note), note
