"""The autoscaling policy: one actor more when the learner starves, one fewer when actors outpace it, within the
bounds, never before a full window, and never inside the cooldown."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from longhaul.autoscale import Autoscaler
from longhaul.config import AutoscaleConfig

CONFIG = AutoscaleConfig(enabled=True, min_actors=1, max_actors=3, window_steps=4, wait_share_up=0.5,
                         wait_share_down=0.1, backlog_batches_down=2.0, cooldown_s=60.0)


def fed(waits: list[float], step_s: float = 1.0) -> Autoscaler:
    scaler = Autoscaler(CONFIG)
    for wait in waits:
        scaler.observe(wait, step_s)
    return scaler


def test_a_starved_learner_gets_one_more_actor():
    scaler = fed([2.0] * 4)  # waited 2 s for every 1 s step: share 2/3
    decision = scaler.decide(now=100.0, current=1, undelivered=0, batch_size=16)
    assert decision is not None and decision.target == 2
    assert "67%" in decision.reason


def test_a_backlog_with_a_busy_learner_removes_one_actor():
    scaler = fed([0.0] * 4)
    assert scaler.decide(now=100.0, current=3, undelivered=48, batch_size=16).target == 2  # 3 batches waiting


def test_no_decision_before_a_full_window():
    assert fed([5.0] * 3).decide(now=100.0, current=1, undelivered=0, batch_size=16) is None


def test_the_cooldown_holds_the_pool_still_and_the_window_restarts():
    scaler = fed([2.0] * 4)
    assert scaler.decide(now=100.0, current=1, undelivered=0, batch_size=16).target == 2
    for _ in range(4):
        scaler.observe(2.0, 1.0)
    assert scaler.decide(now=159.0, current=2, undelivered=0, batch_size=16) is None  # inside the 60 s cooldown
    assert scaler.decide(now=160.0, current=2, undelivered=0, batch_size=16).target == 3


@pytest.mark.parametrize(("waits", "current", "undelivered"), [
    ([2.0] * 4, 3, 0),     # starved, but already at max_actors
    ([0.0] * 4, 1, 100),   # backlog, but already at min_actors
    ([0.3] * 4, 2, 100),   # backlog, but the learner still waits 23 %: fewer actors would starve it
    ([0.3] * 4, 2, 0),     # in between: leave it
])
def test_the_bounds_and_the_dead_band_keep_the_target(waits, current, undelivered):
    assert fed(waits).decide(now=100.0, current=current, undelivered=undelivered, batch_size=16) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"min_actors": 4, "max_actors": 2}, "min_actors=4 > max_actors=2"),
    ({"wait_share_up": 0.2, "wait_share_down": 0.3}, "wait_share_down=0.3 must be below wait_share_up=0.2"),
])
def test_contradictory_bounds_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        AutoscaleConfig(**fields)
