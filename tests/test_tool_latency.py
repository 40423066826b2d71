"""The tool server's simulated latency: constant, or lognormal with the configured median and a long tail, drawn
reproducibly from a seed. Pure draws, no clock: nothing here sleeps."""

from __future__ import annotations

import math
import statistics

import pytest

from longhaul.actors.tool_service import ToolServicer, latency_sampler
from longhaul.config import ConfigError, ToolServiceConfig, load_config

DRAWS = 20_000


def draws(config: ToolServiceConfig, n: int = DRAWS) -> list[float]:
    sample = latency_sampler(config)
    return [sample() for _ in range(n)]


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))]


def test_constant_latency_is_the_configured_value_every_call():
    assert set(draws(ToolServiceConfig(simulated_latency_s=0.25), 100)) == {0.25}


def test_no_latency_by_default_whatever_the_distribution():
    assert set(draws(ToolServiceConfig(), 100)) == {0.0}
    assert set(draws(ToolServiceConfig(simulated_latency="lognormal"), 100)) == {0.0}


def test_lognormal_keeps_the_configured_latency_as_its_median():
    values = draws(ToolServiceConfig(simulated_latency_s=0.3, simulated_latency="lognormal",
                                     simulated_latency_sigma=1.0))
    # The sample median of 20,000 lognormal draws is within ~2 % of the true one (3 standard errors).
    assert statistics.median(values) == pytest.approx(0.3, rel=0.03)
    assert min(values) > 0


def test_lognormal_has_the_long_tail_sigma_sets():
    values = draws(ToolServiceConfig(simulated_latency_s=0.3, simulated_latency="lognormal",
                                     simulated_latency_sigma=1.0))
    # Quantile q of a lognormal is median · exp(σ · z_q): p99 = 0.3 · e^2.326 ≈ 3.1 s, ten times the median.
    assert quantile(values, 0.99) == pytest.approx(0.3 * math.exp(2.326), rel=0.1)
    assert quantile(values, 0.90) == pytest.approx(0.3 * math.exp(1.2816), rel=0.05)
    # The mean sits above the median by exp(σ²/2): the tail carries the time.
    assert statistics.fmean(values) == pytest.approx(0.3 * math.exp(0.5), rel=0.05)


def test_a_narrower_sigma_gives_a_shorter_tail():
    wide, narrow = (draws(ToolServiceConfig(simulated_latency_s=0.3, simulated_latency="lognormal",
                                            simulated_latency_sigma=sigma)) for sigma in (1.0, 0.25))
    assert quantile(narrow, 0.99) < 0.6 < quantile(wide, 0.99)


def test_same_seed_same_sequence_of_latencies_other_seed_another():
    config = ToolServiceConfig(simulated_latency_s=0.3, simulated_latency="lognormal", simulated_latency_seed=7)
    assert draws(config, 50) == draws(config, 50)
    assert draws(config, 50) != draws(config.model_copy(update={"simulated_latency_seed": 8}), 50)


def test_each_server_draws_its_own_sequence_from_the_seed():
    config = ToolServiceConfig(simulated_latency_s=0.3, simulated_latency="lognormal", simulated_latency_seed=3)
    first, second = ToolServicer(None, config), ToolServicer(None, config)  # the world is not consulted
    try:
        assert [first._latency() for _ in range(20)] == [second._latency() for _ in range(20)] == draws(config, 20)
    finally:
        first.close()
        second.close()


def test_config_rejects_an_unknown_distribution_and_a_negative_sigma():
    with pytest.raises(ConfigError, match="tools.simulated_latency"):
        load_config(overrides=["tools.simulated_latency=pareto"])
    with pytest.raises(ConfigError, match="tools.simulated_latency_sigma"):
        load_config(overrides=["tools.simulated_latency_sigma=-1"])
