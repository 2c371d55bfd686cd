"""Server optimisers (Reddi et al., 2021) against hand-computed steps; lazy state per key; the state file and every way
it can be refused; resuming with the same or another optimiser."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from fednested.aggregation.server_optimizers import (
    STATE_FORMAT,
    ServerOptimizer,
    ServerOptimizerConfig,
    ServerOptimizerState,
    ServerOptimizerStateError,
    load_server_state,
    resume_server_optimizer,
    save_server_state,
)

KEY = "model.layers.0.mlp.experts.down_proj/expert=1"
OTHER = "model.layers.1.mlp.experts.gate_up_proj/expert=0"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def test_fedavg_scales_by_eta_and_keeps_no_state() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="fedavg", learning_rate=0.5))
    close(optimizer.step(KEY, t(2.0, -4.0)), [1.0, -2.0])
    close(optimizer.step(KEY, t(2.0, -4.0)), [1.0, -2.0])
    assert optimizer.steps == {}
    assert optimizer.moments() == {}


def test_fedavgm_two_steps() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="fedavgm", learning_rate=2.0, momentum=0.5))
    # m1 = Δ1 = [1, 2]; step 2·m1
    close(optimizer.step(KEY, t(1.0, 2.0)), [2.0, 4.0])
    # m2 = 0.5·[1, 2] + [3, -2] = [3.5, -1]; step 2·m2
    close(optimizer.step(KEY, t(3.0, -2.0)), [7.0, -2.0])
    assert optimizer.steps == {KEY: 2}
    assert set(optimizer.moments()) == {f"{KEY}#m"}
    close(optimizer.moments()[f"{KEY}#m"], [3.5, -1.0])


def test_fedadam_two_steps() -> None:
    config = ServerOptimizerConfig(name="fedadam", learning_rate=1.0, momentum=0.5, beta2=0.75, tau=0.5)
    optimizer = ServerOptimizer(config)
    # v0 = τ² = 0.25. Δ1 = [2, 0.1]: m1 = 0.5·Δ1 = [1, 0.05]; v1 = 0.75·0.25 + 0.25·Δ1² = [1.1875, 0.19]
    close(optimizer.step(KEY, t(2.0, 0.1)), [1 / (math.sqrt(1.1875) + 0.5), 0.05 / (math.sqrt(0.19) + 0.5)])
    # Δ2 = 0: m2 = 0.5·m1 = [0.5, 0.025]; v2 = 0.75·v1 = [0.890625, 0.1425]
    close(optimizer.step(KEY, t(0.0, 0.0)), [0.5 / (math.sqrt(0.890625) + 0.5), 0.025 / (math.sqrt(0.1425) + 0.5)])
    close(optimizer.moments()[f"{KEY}#v"], [0.890625, 0.1425])


def test_fedyogi_two_steps() -> None:
    config = ServerOptimizerConfig(name="fedyogi", learning_rate=1.0, momentum=0.5, beta2=0.75, tau=0.5)
    optimizer = ServerOptimizer(config)
    # Δ1 = [2, 0.1]: v0 − Δ² = [−3.75, 0.24] → v1 = v0 + 0.25·4 = 1.25 and v0 − 0.25·0.01 = 0.2475
    close(optimizer.step(KEY, t(2.0, 0.1)), [1 / (math.sqrt(1.25) + 0.5), 0.05 / (math.sqrt(0.2475) + 0.5)])
    # Δ2 = 0: Yogi leaves v as it is (Adam would decay it by β2); m2 = [0.5, 0.025]
    close(optimizer.step(KEY, t(0.0, 0.0)), [0.5 / (math.sqrt(1.25) + 0.5), 0.025 / (math.sqrt(0.2475) + 0.5)])
    close(optimizer.moments()[f"{KEY}#v"], [1.25, 0.2475])


def test_state_is_lazy_per_key() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="fedavgm", learning_rate=1.0, momentum=0.5))
    optimizer.step(KEY, t(1.0))
    optimizer.step(KEY, t(1.0))
    # OTHER's first step has no momentum from KEY, and KEY's moment did not decay while OTHER stepped.
    close(optimizer.step(OTHER, t(4.0)), [4.0])
    assert optimizer.steps == {KEY: 2, OTHER: 1}
    close(optimizer.moments()[f"{KEY}#m"], [1.5])
    close(optimizer.step(KEY, t(0.0)), [0.75])


def test_shape_mismatch_names_the_key_and_both_shapes() -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="fedadam"))
    optimizer.step(KEY, torch.zeros(2, 3))
    with pytest.raises(ServerOptimizerStateError, match=r"expert=1.*moment m has shape \[2, 3\].*has \[3, 2\]"):
        optimizer.step(KEY, torch.zeros(3, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_delta_is_refused_and_leaves_the_state_alone(bad: float) -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="fedadam"))
    optimizer.step(KEY, t(1.0, 1.0))
    before = {name: tensor.clone() for name, tensor in optimizer.moments().items()}
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        optimizer.step(KEY, t(1.0, bad))
    assert optimizer.steps == {KEY: 1}
    for name, tensor in optimizer.moments().items():
        torch.testing.assert_close(tensor, before[name])


def test_a_key_that_is_not_a_delta_key_is_refused() -> None:
    with pytest.raises(ServerOptimizerStateError, match="is not '<param>/expert=<e>'"):
        ServerOptimizer(ServerOptimizerConfig(name="fedavgm")).step("lm_head.weight", t(1.0))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "sgd"}, "server optimiser 'sgd' is not one of fedavg, fedavgm, fedadam, fedyogi"),
        ({"learning_rate": 0.0}, r"learning_rate must be a finite number in \(0, 100\], got 0.0"),
        ({"learning_rate": 101.0}, r"learning_rate must be a finite number in \(0, 100\], got 101.0"),
        ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\), got 1.0"),
        ({"momentum": -0.1}, r"momentum must be a finite number in \[0, 1\), got -0.1"),
        ({"beta2": float("nan")}, r"beta2 must be a finite number in \[0, 1\), got nan"),
        ({"tau": 0.0}, "tau must be a finite number > 0, got 0.0"),
        ({"tau": float("inf")}, "tau must be a finite number > 0, got inf"),
        ({"tau": True}, "tau must be a finite number > 0, got True"),
    ],
)
def test_config_errors_name_the_field_value_and_range(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptimizerConfig(**changes)


def trained(name: str = "fedadam") -> ServerOptimizer:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name=name, learning_rate=0.1))  # type: ignore[arg-type]
    optimizer.step(KEY, torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    optimizer.step(KEY, torch.tensor([[0.0, 1.0], [2.0, -1.0]]))
    optimizer.step(OTHER, t(0.25, -0.5, 1.0))
    return optimizer


def test_save_and_load_round_trip_continues_exactly(tmp_path: Path) -> None:
    optimizer = trained()
    path = tmp_path / "state.safetensors"
    digest = save_server_state(optimizer, path, version_id="v7")
    assert len(digest) == 64
    assert [entry.name for entry in tmp_path.iterdir()] == ["state.safetensors"]  # no temporary file left behind
    state = load_server_state(path, expected_version="v7", sha256=digest)
    assert (state.version_id, state.config, state.steps) == ("v7", optimizer.config, {KEY: 2, OTHER: 1})
    assert set(state.moments) == {f"{KEY}#m", f"{KEY}#v", f"{OTHER}#m", f"{OTHER}#v"}
    resumed, note = resume_server_optimizer(optimizer.config, state)
    assert (resumed.resumed, note) == (True, None)
    delta = torch.tensor([[0.3, 0.3], [-0.7, 0.1]])
    torch.testing.assert_close(resumed.step(KEY, delta), optimizer.step(KEY, delta), rtol=0, atol=0)
    assert resumed.steps == optimizer.steps


def test_fedavg_state_is_an_empty_but_valid_file(tmp_path: Path) -> None:
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="fedavg", learning_rate=0.5))
    optimizer.step(KEY, t(1.0))
    path = tmp_path / "fedavg.safetensors"
    save_server_state(optimizer, path, version_id="v1")
    state = load_server_state(path, expected_version="v1")
    assert (state.config.name, state.config.learning_rate, state.moments, state.steps) == ("fedavg", 0.5, {}, {})


def write_state(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    version_id: str = "v1",
    **metadata: str,
) -> Path:
    """A state file as save_server_state writes it (fedadam, one step of KEY), with any metadata entry replaced."""
    content = {
        "format": STATE_FORMAT,
        "version_id": version_id,
        "optimizer": json.dumps(ServerOptimizerConfig("fedadam").to_dict()),
        "steps": json.dumps({KEY: 1}),
        **metadata,
    }
    save_file(tensors, str(path), metadata=content)
    return path


GOOD = {f"{KEY}#m": torch.ones(2), f"{KEY}#v": torch.ones(2)}


def test_the_handwritten_state_file_is_valid(tmp_path: Path) -> None:
    """The fixture the error tests change one thing of is itself accepted."""
    state = load_server_state(write_state(tmp_path / "s", GOOD), expected_version="v1")
    assert state.steps == {KEY: 1}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ServerOptimizerStateError, match=r"server optimiser state absent.safetensors: no such file"):
        load_server_state(tmp_path / "absent.safetensors", expected_version="v1")


def test_sha256_that_differs(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    digest = save_server_state(trained(), path, version_id="v1")
    with path.open("r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ServerOptimizerStateError, match=f"s.safetensors: sha256 is [0-9a-f]{{64}}, expected {digest}"):
        load_server_state(path, expected_version="v1", sha256=digest)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ServerOptimizerStateError, match=r"not a safetensors file: .*junk.safetensors: header length"):
        load_server_state(path, expected_version="v1")


def test_wrong_format_tag(tmp_path: Path) -> None:
    path = write_state(tmp_path / "s", GOOD, format="someone.else/1")
    with pytest.raises(
        ServerOptimizerStateError, match=r"format is 'someone.else/1', expected 'fednested.server_optim"
    ):
        load_server_state(path, expected_version="v1")


def test_a_plain_safetensors_file_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    save_file(GOOD, str(path))
    with pytest.raises(ServerOptimizerStateError, match="format is None"):
        load_server_state(path, expected_version="v1")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"optimizer": "{not json"}, "metadata optimizer/steps is not JSON"),
        ({"steps": "[1, 2"}, "metadata optimizer/steps is not JSON"),
        ({"steps": "[1, 2]"}, "metadata steps must be an object, got list"),
        ({"optimizer": json.dumps({"name": "fedadam"})}, "optimizer must be an object with keys"),
        ({"optimizer": json.dumps({**ServerOptimizerConfig().to_dict(), "name": "sgd"})}, "'sgd' is not one of"),
        ({"steps": json.dumps({KEY: 0})}, r"steps\[.*\] must be an integer >= 1, got 0"),
        ({"steps": json.dumps({KEY: True})}, r"steps\[.*\] must be an integer >= 1, got True"),
    ],
)
def test_malformed_metadata(tmp_path: Path, metadata: dict[str, str], message: str) -> None:
    path = write_state(tmp_path / "s", GOOD, **metadata)
    with pytest.raises(ServerOptimizerStateError, match=message):
        load_server_state(path, expected_version="v1")


def test_state_of_another_version(tmp_path: Path) -> None:
    path = write_state(tmp_path / "s.safetensors", GOOD, version_id="v1")
    with pytest.raises(ServerOptimizerStateError, match=r"s.safetensors belongs to version 'v1', not 'v2'"):
        load_server_state(path, expected_version="v2")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_moment(tmp_path: Path, bad: float) -> None:
    path = write_state(tmp_path / "s", {f"{KEY}#m": torch.tensor([1.0, bad]), f"{KEY}#v": torch.ones(2)})
    with pytest.raises(ServerOptimizerStateError, match=r"moment '.*expert=1#m' holds NaN or infinite values"):
        load_server_state(path, expected_version="v1")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("lm_head.weight#m", r"'lm_head.weight' is not '<param>/expert=<e>'"),
        (f"{KEY}#w", "is not named '<param>/expert=<e>#m' or '#v'"),
        (KEY, "is not named '<param>/expert=<e>#m' or '#v'"),
    ],
)
def test_moment_with_a_bad_name(tmp_path: Path, name: str, message: str) -> None:
    path = write_state(tmp_path / "s", {**GOOD, name: torch.ones(2)})
    with pytest.raises(ServerOptimizerStateError, match=message):
        load_server_state(path, expected_version="v1")


def test_steps_without_moments(tmp_path: Path) -> None:
    path = write_state(tmp_path / "s", GOOD, steps=json.dumps({KEY: 1, OTHER: 3}))
    with pytest.raises(ServerOptimizerStateError, match=r"key '.*gate_up_proj/expert=0' has no 'm' moment"):
        load_server_state(path, expected_version="v1", sha256=None)


def test_moments_that_do_not_fit_the_optimizer(tmp_path: Path) -> None:
    fedavgm = json.dumps(ServerOptimizerConfig("fedavgm").to_dict())
    path = write_state(tmp_path / "s", GOOD, optimizer=fedavgm)
    with pytest.raises(ServerOptimizerStateError, match="fedavgm keeps no 'v' moment"):
        load_server_state(path, expected_version="v1")
    negative = write_state(tmp_path / "n", {f"{KEY}#m": torch.ones(2), f"{KEY}#v": t(1.0, -1.0)})
    with pytest.raises(ServerOptimizerStateError, match="v holds negative values"):
        load_server_state(negative, expected_version="v1")
    mismatched = write_state(tmp_path / "x", {f"{KEY}#m": torch.ones(2), f"{KEY}#v": torch.ones(3)})
    with pytest.raises(ServerOptimizerStateError, match=r"m has shape \[2\] but v has \[3\]"):
        load_server_state(mismatched, expected_version="v1")


def test_non_float32_moment(tmp_path: Path) -> None:
    path = write_state(tmp_path / "s", {f"{KEY}#m": torch.ones(2, dtype=torch.float16), f"{KEY}#v": torch.ones(2)})
    with pytest.raises(ServerOptimizerStateError, match="is F16, the state is F32"):
        load_server_state(path, expected_version="v1")


def test_a_file_over_max_bytes_is_refused_before_reading(tmp_path: Path) -> None:
    path = write_state(tmp_path / "s", GOOD)
    size = path.stat().st_size
    with pytest.raises(ServerOptimizerStateError, match=f"{size} bytes is over the limit of {size - 1} bytes"):
        load_server_state(path, expected_version="v1", max_bytes=size - 1)
    assert load_server_state(path, expected_version="v1", max_bytes=size).version_id == "v1"


def state_of(optimizer: ServerOptimizer, version_id: str = "v3") -> ServerOptimizerState:
    return ServerOptimizerState(version_id, optimizer.config, optimizer.moments(), optimizer.steps)


def test_resume_with_the_same_optimizer_keeps_moments_and_applies_the_new_hyperparameters() -> None:
    old = trained("fedavgm")
    new_config = ServerOptimizerConfig(name="fedavgm", learning_rate=1.0, momentum=0.5)
    resumed, note = resume_server_optimizer(new_config, state_of(old))
    assert resumed.resumed
    assert resumed.note == note
    assert note == "fedavgm continues the state of v3 with learning_rate 0.1 → 1.0, momentum 0.9 → 0.5"
    m = old.moments()[f"{OTHER}#m"]
    # m ← 0.5·m + Δ, step η·m with the new η = 1
    torch.testing.assert_close(resumed.step(OTHER, torch.zeros(3)), 0.5 * m)
    assert resumed.steps[OTHER] == 2


def test_resume_with_another_optimizer_starts_fresh_and_says_why() -> None:
    resumed, note = resume_server_optimizer(ServerOptimizerConfig(name="fedyogi"), state_of(trained("fedadam")))
    assert not resumed.resumed
    assert resumed.steps == {}
    assert resumed.moments() == {}
    assert note is not None
    assert "switched its server optimiser from fedadam to fedyogi" in note
    assert "4 moment tensors" in note


def test_resume_without_state() -> None:
    fedavg, note = resume_server_optimizer(ServerOptimizerConfig(), None)
    assert (fedavg.resumed, note) == (False, None)
    adam, note = resume_server_optimizer(ServerOptimizerConfig(name="fedadam"), None)
    assert (adam.resumed, note) == (False, "fedadam starts from zero moments: no saved state")
