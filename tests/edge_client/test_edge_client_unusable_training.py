"""A local run that trained nothing, or diverged, never becomes an update: the client says why instead of spooling a
NaN the outbox cannot write (which used to crash the client on every start)."""

import math
from datetime import UTC, datetime

import pytest
import torch

from edge_client.local_training import LocalTrainingResult
from edge_client.runner import training_unusable
from fednested.training.edge import TrainMetrics


def _result(metrics: TrainMetrics) -> LocalTrainingResult:
    now = datetime.now(UTC)
    adapters = {"model.layers.0.mlp.experts.down_proj/expert=0/lora_A": torch.zeros(2, 4)}
    return LocalTrainingResult(
        adapters=adapters, routed_tokens={}, examples=3, metrics=metrics, started_at=now, finished_at=now
    )


def test_a_run_without_a_step_is_unusable_and_says_which_budget() -> None:
    reason = training_unusable(_result(TrainMetrics(steps=0, stop_reason="max_seconds")))
    assert reason is not None
    assert "no optimizer step" in reason
    assert "max_seconds" in reason


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_a_diverged_run_is_unusable(loss: float) -> None:
    reason = training_unusable(_result(TrainMetrics(steps=3, loss_curve=[2.0, 1.5, loss])))
    assert reason is not None
    assert "not finite" in reason


def test_a_finite_run_with_steps_may_leave() -> None:
    assert training_unusable(_result(TrainMetrics(steps=2, loss_curve=[2.0, 1.7]))) is None
