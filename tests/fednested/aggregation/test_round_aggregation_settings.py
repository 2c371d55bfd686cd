"""A round's config object → aggregation settings; bad values are named with what is expected."""

from datetime import timedelta
from typing import Any

import pytest

from fednested.aggregation.aggregate import AggregationConfig
from fednested.aggregation.privacy import PrivacyConfig
from fednested.aggregation.server_optimizers import ServerOptimizerConfig
from fednested.aggregation.settings import MAX_WAIT_S, ROUND_SETTING_KEYS, RoundAggregationSettings, RoundSettingsError


def test_empty_config_gives_the_defaults() -> None:
    settings = RoundAggregationSettings.from_mapping({})
    assert settings == RoundAggregationSettings()
    assert settings.aggregation.method == "weighted_mean"
    assert settings.max_wait is None


def test_every_known_key_is_read_and_unknown_keys_are_left_alone() -> None:
    settings = RoundAggregationSettings.from_mapping(
        {
            "aggregation_method": "trimmed_mean",
            "clip_norm": 2,
            "trim_fraction": 0.2,
            "server_learning_rate": 0.5,
            "staleness_exponent": 1.0,
            "weight_by_routed_tokens": False,
            "weight_by_examples": True,
            "weight_by_reliability": False,
            "max_staleness": 2,
            "max_payload_bytes": 4096,
            "max_delta_norm": 10,
            "max_total_norm": None,
            "max_wait_s": 90,
            "min_updates_at_deadline": 2,
            "norm_bound_multiplier": 3,
            "max_update_share": 0.25,
            "claim_history_factor": 2,
            "min_cohort_fraction": 0.75,
            "local_steps": 50,
        }
    )
    aggregation = settings.aggregation
    assert (aggregation.method, aggregation.clip_norm, aggregation.trim_fraction) == ("trimmed_mean", 2.0, 0.2)
    assert aggregation.server_learning_rate == 0.5
    weighting = aggregation.weighting
    assert (weighting.staleness_exponent, weighting.by_routed_tokens, weighting.by_examples) == (1.0, False, True)
    assert weighting.by_reliability is False
    assert (settings.limits.max_bytes, settings.limits.max_delta_norm, settings.limits.max_total_norm) == (
        4096,
        10.0,
        None,
    )
    assert (settings.max_staleness, settings.max_wait, settings.min_updates_at_deadline) == (
        2,
        timedelta(seconds=90),
        2,
    )
    assert aggregation.norm_bound_multiplier == 3.0
    assert weighting.max_update_share == 0.25
    assert (settings.claim_history_factor, settings.min_cohort_fraction) == (2.0, 0.75)


def test_new_keys_have_their_documented_defaults() -> None:
    # The robust default bench-federated selected (docs/benchmarks/federated.md).
    settings = RoundAggregationSettings.from_mapping({})
    assert settings.aggregation.method == "weighted_mean"
    assert settings.aggregation.norm_bound_multiplier == 2.0
    assert (settings.aggregation.min_cosine, settings.aggregation.direction_scope) == (-0.02, "update")
    assert settings.aggregation.clip_norm is None
    assert settings.aggregation.weighting.max_update_share == 0.4
    assert (settings.claim_history_factor, settings.min_cohort_fraction) == (4.0, 1.0)


def test_bounds_can_be_switched_off_with_null_and_edges_are_accepted() -> None:
    settings = RoundAggregationSettings.from_mapping(
        {"norm_bound_multiplier": None, "max_update_share": None, "max_wait_s": MAX_WAIT_S}
    )
    assert settings.aggregation.norm_bound_multiplier is None
    assert settings.aggregation.weighting.max_update_share is None
    assert settings.max_wait == timedelta(days=30)
    edges = RoundAggregationSettings.from_mapping(
        {"norm_bound_multiplier": 1, "max_update_share": 1, "min_cohort_fraction": 1, "claim_history_factor": 1}
    )
    assert edges.aggregation.norm_bound_multiplier == 1.0
    assert edges.aggregation.weighting.max_update_share == 1.0
    assert (edges.min_cohort_fraction, edges.claim_history_factor) == (1.0, 1.0)


def test_every_key_read_is_documented() -> None:
    assert {
        "norm_bound_multiplier",
        "max_update_share",
        "claim_history_factor",
        "min_cohort_fraction",
        "max_wait_s",
    } <= set(ROUND_SETTING_KEYS)
    assert MAX_WAIT_S == 2_592_000


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"aggregation_method": "krum"}, "unknown aggregation method 'krum'"),
        ({"clip_norm": "big"}, r"'clip_norm' must be a number > 0, or null for no clipping, got 'big'"),
        ({"clip_norm": -1}, "clip_norm must be None or a finite number > 0"),
        (
            {"max_staleness": True},
            r"'max_staleness' must be an integer >= 0 \(versions behind the champion\), got True",
        ),
        ({"max_staleness": -1}, "'max_staleness' must be an integer >= 0"),
        ({"max_payload_bytes": 1.5}, "'max_payload_bytes' must be an integer > 0, got 1.5"),
        ({"max_payload_bytes": 0}, "max_bytes must be > 0"),
        ({"server_learning_rate": float("inf")}, r"'server_learning_rate' must be a number in \(0, 100\].*got inf"),
        ({"server_learning_rate": 1e308}, r"server_learning_rate must be in \(0, 100\], got 1e\+308"),
        ({"max_wait_s": 0}, r"'max_wait_s' must be a number of seconds in \(0, 2592000\] \(30 days\)"),
        ({"max_wait_s": 1e300}, r"'max_wait_s' must be a number of seconds in \(0, 2592000\]"),
        ({"max_wait_s": MAX_WAIT_S + 1}, r"'max_wait_s' must be a number of seconds in \(0, 2592000\]"),
        ({"max_wait_s": float("inf")}, r"'max_wait_s' must be a number of seconds in \(0, 2592000\].*, got inf"),
        ({"max_update_share": 0}, r"max_update_share must be None or a number in \(0, 1\], got 0.0"),
        ({"max_update_share": 1.5}, r"max_update_share must be None or a number in \(0, 1\], got 1.5"),
        ({"max_update_share": "half"}, r"'max_update_share' must be a number in \(0, 1\].*, got 'half'"),
        ({"norm_bound_multiplier": 0.5}, "norm_bound_multiplier must be None or a finite number >= 1, got 0.5"),
        ({"norm_bound_multiplier": True}, r"'norm_bound_multiplier' must be a number >= 1 .*, got True"),
        ({"min_cohort_fraction": 0}, r"'min_cohort_fraction' must be a number in \(0, 1\].*, got 0.0"),
        ({"min_cohort_fraction": 1.01}, r"'min_cohort_fraction' must be a number in \(0, 1\].*, got 1.01"),
        ({"min_cohort_fraction": None}, r"'min_cohort_fraction' must be a number in \(0, 1\].*, got None"),
        ({"claim_history_factor": 0.5}, r"'claim_history_factor' must be a number >= 1.*, got 0.5"),
        ({"claim_history_factor": "4"}, r"'claim_history_factor' must be a number >= 1.*, got '4'"),
        ({"min_updates_at_deadline": 0}, "'min_updates_at_deadline' must be an integer >= 1"),
        ({"weight_by_examples": "yes"}, "'weight_by_examples' must be true or false, got 'yes'"),
    ],
)
def test_bad_values_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(RoundSettingsError, match=message) as caught:
        RoundAggregationSettings.from_mapping(config, where="round 'r1' config")
    assert str(caught.value).startswith("round 'r1' config: ")


def test_server_optimizer_defaults_to_the_benchmarks_fedavgm_and_dp_to_no_noise() -> None:
    settings = RoundAggregationSettings.from_mapping({})
    assert settings.server_optimizer == ServerOptimizerConfig(name="fedavgm", learning_rate=1.0, momentum=0.5)
    assert settings == RoundAggregationSettings()
    assert settings.privacy is None
    assert RoundAggregationSettings.from_mapping({"dp": None}).privacy is None
    # Another optimiser named alone gets the paper's β1, and an adaptive one a step size per weight, not η = 1.
    assert RoundAggregationSettings.from_mapping({"server_optimizer": "fedavg"}).server_optimizer == (
        ServerOptimizerConfig(name="fedavg", learning_rate=1.0, momentum=0.9)
    )
    adam = RoundAggregationSettings.from_mapping({"server_optimizer": "fedadam"})
    assert (adam.server_optimizer.learning_rate, adam.server_optimizer.momentum) == (0.01, 0.9)
    assert adam.aggregation.server_learning_rate == 0.01


def test_a_round_asking_for_dp_gets_the_dp_compatible_rule_where_it_names_none() -> None:
    private = RoundAggregationSettings.from_mapping({"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}})
    assert (private.aggregation.method, private.aggregation.norm_bound_multiplier) == ("weighted_mean", None)
    assert private.aggregation.min_cosine is None
    # Naming an incompatible rule is still refused, with the reason.
    with pytest.raises(RoundSettingsError, match="norm_bound_multiplier"):
        RoundAggregationSettings.from_mapping(
            {"dp": {"noise_multiplier": 1.0, "clip_norm": 1.0}, "norm_bound_multiplier": 2.0}
        )


def test_server_optimizer_keys_are_read_and_eta_is_one_value() -> None:
    settings = RoundAggregationSettings.from_mapping(
        {
            "server_optimizer": "fedyogi",
            "server_learning_rate": 0.03,
            "server_momentum": 0.5,
            "server_beta2": 0.9,
            "server_tau": 0.01,
        }
    )
    assert settings.server_optimizer == ServerOptimizerConfig("fedyogi", 0.03, 0.5, 0.9, 0.01)
    assert settings.aggregation.server_learning_rate == 0.03
    edges = RoundAggregationSettings.from_mapping({"server_momentum": 0, "server_beta2": 0})
    assert (edges.server_optimizer.momentum, edges.server_optimizer.beta2) == (0.0, 0.0)
    with pytest.raises(RoundSettingsError, match="must be the same η"):
        RoundAggregationSettings(aggregation=AggregationConfig(server_learning_rate=0.5))


def test_dp_is_read_and_may_keep_absolute_clipping() -> None:
    settings = RoundAggregationSettings.from_mapping(
        {
            "dp": {
                "noise_multiplier": 1.1,
                "clip_norm": 0.5,
                "delta": 1e-6,
                "epsilon_budget": 8,
                "planned_aggregations": 3,
            },
            "clip_norm": 2.0,
        }
    )
    assert settings.privacy == PrivacyConfig(1.1, 0.5, 1e-6, 8.0, 3)
    assert settings.aggregation.clip_norm == 2.0


def test_every_new_key_is_documented() -> None:
    assert {"server_optimizer", "server_momentum", "server_beta2", "server_tau", "dp"} <= set(ROUND_SETTING_KEYS)
    assert "fedavg, fedavgm, fedadam, fedyogi" in ROUND_SETTING_KEYS["server_optimizer"]
    assert "noise_multiplier" in ROUND_SETTING_KEYS["dp"]
    assert "clip_norm" in ROUND_SETTING_KEYS["dp"]


DP = {"noise_multiplier": 1.0, "clip_norm": 1.0}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"server_optimizer": "adam"}, "server optimiser 'adam' is not one of fedavg, fedavgm, fedadam, fedyogi"),
        ({"server_optimizer": 1}, r"'server_optimizer' must be one of fedavg, fedavgm, fedadam, fedyogi .*, got 1"),
        ({"server_momentum": 1}, r"server optimiser momentum must be a finite number in \[0, 1\), got 1.0"),
        ({"server_momentum": True}, r"'server_momentum' must be a number in \[0, 1\).*, got True"),
        ({"server_beta2": -0.1}, r"server optimiser beta2 must be a finite number in \[0, 1\), got -0.1"),
        ({"server_tau": 0}, "server optimiser tau must be a finite number > 0, got 0.0"),
        ({"server_tau": float("nan")}, r"'server_tau' must be a number > 0.*, got nan"),
        ({"dp": {"clip_norm": 1.0}}, r"'dp': 'noise_multiplier' is required"),
        ({"dp": {"noise_multiplier": 1.0}}, r"'dp': 'clip_norm' is required"),
        ({"dp": {"noise_multiplier": 0, "clip_norm": 1}}, r"'dp': 'noise_multiplier' must be a number > 0"),
        ({"dp": {"noise_multiplier": 1, "clip_norm": -1}}, r"'dp': 'clip_norm' must be a number > 0"),
        ({"dp": {**DP, "noise": 2}}, r"'dp': unknown keys \['noise'\]"),
        ({"dp": "on"}, r"'dp' must be an object with noise_multiplier and clip_norm, got 'on'"),
        (
            {"dp": DP, "aggregation_method": "trimmed_mean"},
            "'dp' needs aggregation_method 'weighted_mean', not 'trimmed_mean': a robust rule's output is not a "
            "clipped sum",
        ),
        ({"dp": DP, "aggregation_method": "coordinate_median"}, "'dp' needs aggregation_method 'weighted_mean'"),
        ({"dp": DP, "norm_bound_multiplier": 3}, "'dp' cannot be combined with 'norm_bound_multiplier'"),
    ],
)
def test_bad_new_values_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(RoundSettingsError, match=message) as caught:
        RoundAggregationSettings.from_mapping(config, where="round 'r1' config")
    assert str(caught.value).startswith("round 'r1' config: ")


def test_dp_with_a_robust_rule_is_refused_however_the_settings_are_built() -> None:
    with pytest.raises(RoundSettingsError, match="'dp' needs aggregation_method 'weighted_mean'"):
        RoundAggregationSettings(
            aggregation=AggregationConfig(method="coordinate_median"), privacy=PrivacyConfig(1.0, 1.0)
        )
