"""Group advantages as specifications: hand-computed groups, the plain-loop reference, and the degenerate groups."""

from __future__ import annotations

import math

import pytest
import torch

from longhaul.learner.advantages import group_advantages
from tests import reference

METHODS = ["grpo", "drgrpo", "rloo"]

# Two interleaved groups: a = (1, 0, 0, 1) at positions 0, 1, 3, 4; b = (2, 5) at positions 2, 5.
REWARDS = [1.0, 0.0, 2.0, 0.0, 1.0, 5.0]
GROUPS = ["a", "a", "b", "a", "a", "b"]
SQRT3 = math.sqrt(3.0)


def test_grpo_hand_computed_two_interleaved_groups():
    # a: mean 0.5, unbiased var = 4·0.25/3 = 1/3, std = 1/√3: A = ±0.5·√3 = ±0.8660 (up to eps)
    # b: mean 3.5, unbiased var = (2.25 + 2.25)/1 = 4.5, std = 3/√2: A = ∓1.5·√2/3 = ∓1/√2
    a, b = 0.5 / (1 / SQRT3 + 1e-6), 1.5 / (3 / math.sqrt(2) + 1e-6)
    expected = [a, -a, -b, -a, a, b]
    torch.testing.assert_close(group_advantages(torch.tensor(REWARDS), GROUPS), torch.tensor(expected))
    assert reference.group_advantages(REWARDS, GROUPS, "grpo") == pytest.approx(expected)


def test_drgrpo_hand_computed_is_mean_centred_only():
    # a: r − 0.5; b: r − 3.5
    expected = [0.5, -0.5, -1.5, -0.5, 0.5, 1.5]
    assert group_advantages(torch.tensor(REWARDS), GROUPS, "drgrpo").tolist() == expected
    assert reference.group_advantages(REWARDS, GROUPS, "drgrpo") == pytest.approx(expected)


def test_rloo_hand_computed_subtracts_the_mean_of_the_others():
    # a: 1 − (0 + 0 + 1)/3 = 2/3 and 0 − (1 + 0 + 1)/3 = −2/3; b: 2 − 5 = −3 and 5 − 2 = 3
    expected = [2 / 3, -2 / 3, -3.0, -2 / 3, 2 / 3, 3.0]
    torch.testing.assert_close(group_advantages(torch.tensor(REWARDS), GROUPS, "rloo"), torch.tensor(expected))
    assert reference.group_advantages(REWARDS, GROUPS, "rloo") == pytest.approx(expected)


def test_grpo_uses_the_unbiased_std_and_eps_in_the_denominator():
    # (0, 2): mean 1, unbiased std √2 (the biased one would be 1); a huge eps shows it is added to the std
    out = group_advantages(torch.tensor([0.0, 2.0]), ["g", "g"], eps=1.0)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0]) / (math.sqrt(2.0) + 1.0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, 1e7 + 0.3])
def test_all_equal_group_rewards_give_exactly_zero(method, dtype, value):
    # In float64, seven copies of 0.1, 0.7 or 1e7 + 0.3 average to a value 1e-17..1e-9 off: the advantage must still be
    # exactly 0 (GRPO would otherwise divide that rounding error by a std of the same size and return ±1).
    rewards = torch.full((7,), value, dtype=dtype)
    out = group_advantages(rewards, ["g"] * 7, method)
    assert torch.equal(out, torch.zeros(7, dtype=dtype))


@pytest.mark.parametrize("method", METHODS)
def test_a_group_of_one_gets_zero_and_leaves_the_other_groups_alone(method):
    rewards = torch.tensor([3.0, 1.0, 0.0, 1.0, 0.0])
    groups = ["lonely", "x", "x", "y", "y"]
    out = group_advantages(rewards, groups, method)
    assert out[0].item() == 0.0
    torch.testing.assert_close(out[1:], group_advantages(rewards[1:], groups[1:], method))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_degenerate_groups_give_no_nan_gradient(method):
    rewards = torch.tensor([3.0, 1.0, 1.0, 0.0, 2.0], requires_grad=True)
    group_advantages(rewards, ["one", "same", "same", "z", "z"], method).sum().backward()
    assert torch.isfinite(rewards.grad).all()


@pytest.mark.parametrize("method", METHODS)
def test_advantages_sum_to_zero_within_each_group(method):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g)
    groups = ["p", "q", "r"] * 4
    out = group_advantages(rewards, groups, method)
    for group in ("p", "q", "r"):
        members = torch.tensor([i for i, gid in enumerate(groups) if gid == group])
        assert abs(out[members].sum().item()) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_matches_the_reference_on_random_groups(seed, method):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 8, 5, 8, 3, 1]
    ids = [f"task-{k}" for k, size in enumerate(sizes) for _ in range(size)]
    order = torch.randperm(len(ids), generator=g).tolist()  # groups arrive interleaved
    ids = [ids[i] for i in order]
    rewards = torch.rand(len(ids), generator=g)
    rewards[: len(ids) // 2] = (rewards[: len(ids) // 2] > 0.5).float()  # half binary, like pass/fail rewards
    expected = reference.group_advantages(rewards.tolist(), ids, method)
    torch.testing.assert_close(group_advantages(rewards, ids, method), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_keeps_a_float_dtype_and_promotes_integer_rewards_to_float32():
    assert group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), ["g", "g"]).dtype == torch.float64
    assert group_advantages(torch.tensor([0.0, 1.0], dtype=torch.bfloat16), ["g", "g"]).dtype == torch.bfloat16
    out = group_advantages(torch.tensor([0, 1, 1, 0]), ["g"] * 4, "drgrpo")
    assert out.dtype == torch.float32 and out.tolist() == [-0.5, 0.5, 0.5, -0.5]


def test_no_rewards_give_no_advantages():
    assert group_advantages(torch.zeros(0), []).shape == (0,)


@pytest.mark.parametrize(("rewards", "groups", "method", "message"), [
    (torch.zeros(3), ["g", "g"], "grpo", "group ids"),
    (torch.zeros(2, 2), ["g", "g"], "grpo", r"\[N\]"),
    (torch.zeros(2), ["g", "g"], "ppo", "grpo, drgrpo, rloo"),
])
def test_rejects_mismatched_lengths_shapes_and_unknown_methods(rewards, groups, method, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, groups, method)
