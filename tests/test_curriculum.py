"""The actor's curriculum: which tasks a rollout actor draws, by `actor.hop_weights` and `actor.tasks`. The draw
needs no engine, tool server or buffer, so none is built."""

from __future__ import annotations

from collections import Counter

import pytest

from longhaul.actors.rollout_actor import RolloutActor
from longhaul.actors.tool_service import TaskInfo
from longhaul.config import ActorConfig, AgentConfig

TASKS = [TaskInfo(f"t{hops}-{i}", f"question {i}", hops, "train") for hops in (1, 2, 16) for i in range(5)]


def _actor(hop_weights: dict[int, float], seed: int = 0, tasks: int | None = None) -> RolloutActor:
    return RolloutActor("actor-0", engine=None, tools=None, chat=None, store=None, tasks=TASKS, agent=AgentConfig(),
                        config=ActorConfig(hop_weights=hop_weights, tasks=tasks), seed=seed)


def test_without_weights_every_task_is_equally_likely():
    actor = _actor({})
    draws = Counter(actor._draw().hops for _ in range(6000))
    assert set(draws) == {1, 2, 16}
    assert all(abs(count / 6000 - 1 / 3) < 0.03 for count in draws.values()), draws


def test_hop_weights_set_the_odds_and_a_hop_count_left_out_is_never_drawn():
    actor = _actor({1: 3, 16: 1})
    draws = Counter(actor._draw().hops for _ in range(8000))
    assert set(draws) == {1, 16}
    assert draws[1] / 8000 == pytest.approx(0.75, abs=0.02)


def test_the_draw_is_a_function_of_the_seed():
    first, second, other = _actor({1: 1, 2: 1}, seed=3), _actor({1: 1, 2: 1}, seed=3), _actor({1: 1, 2: 1}, seed=4)
    draws = [first._draw() for _ in range(20)]
    assert draws == [second._draw() for _ in range(20)]
    assert draws != [other._draw() for _ in range(20)]


def test_weights_that_leave_no_task_are_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"actor.hop_weights=\{8: 1.0\} gives no task"):
        _actor({8: 1.0})


def test_a_task_limit_keeps_the_first_drawable_tasks_in_task_id_order():
    # By id, not by hop count: "t16-…" sorts before "t2-…", and the 1-hop tasks have no weight.
    limited = _actor({2: 1, 16: 1}, tasks=3)
    assert {limited._draw().task_id for _ in range(300)} == {"t16-0", "t16-1", "t16-2"}
    unweighted = _actor({}, tasks=7)
    assert {unweighted._draw().task_id for _ in range(600)} == {"t1-0", "t1-1", "t1-2", "t1-3", "t1-4", "t16-0",
                                                                  "t16-1"}


def test_a_task_limit_above_the_drawable_tasks_keeps_them_all():
    actor = _actor({1: 1}, tasks=100)
    assert {actor._draw().task_id for _ in range(300)} == {f"t1-{i}" for i in range(5)}
