"""The off-policy losses as specifications: hand-computed examples, the plain-loop reference on random batches (values
and autograd gradients), padding and empty masks, extreme importance ratios, and V-trace (tests/reference.py).

float32 values from the learner are compared with float64 references at float32 tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch

from longhaul.learner.losses import (
    LOSS_NAMES,
    LossOutput,
    clipped_is_loss,
    compute_loss,
    decoupled_ppo_loss,
    importance_stats,
    truncated_is_loss,
    vespo_loss,
)
from tests import reference

LN2 = math.log(2.0)
SEEDS = [0, 1, 2, 3, 4]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def leaf(rows) -> torch.Tensor:
    return t(rows).requires_grad_(True)


def close(actual: torch.Tensor, expected, **tolerance) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected.to(actual.dtype), **tolerance)


def random_batch(seed: int, rows: int = 6, length: int = 9, spread: float = 0.4):
    """Random logp/μ/π_prox/A/mask: varied lengths, a hole mid-sequence (tool output), one fully masked row, and
    NaN/−inf garbage in every padded slot, which must never matter."""
    g = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(rows, length, generator=g)
    proximal = logp + 0.1 * torch.randn(rows, length, generator=g)
    behavior = proximal + spread * torch.randn(rows, length, generator=g)
    advantages = torch.randn(rows, generator=g)
    advantages[0] = 0.0  # A = 0 picks VESPO's A ≥ 0 kernel and gives no gradient
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    mask[1, 0] = 0.0
    mask[-1] = 0.0
    logp = torch.where(mask > 0, logp, -torch.inf)
    behavior = torch.where(mask > 0, behavior, torch.nan)
    return logp, proximal, behavior, advantages, mask


def run_with_grad(fn, logp: torch.Tensor, *args, **kwargs) -> tuple[LossOutput, torch.Tensor]:
    logp = logp.clone().requires_grad_(True)
    out = fn(logp, *args, **kwargs)
    out.token_loss.sum().backward()
    return out, logp.grad


def assert_matches_reference(out: LossOutput, grad: torch.Tensor, ref: reference.RefLoss, mask: torch.Tensor) -> None:
    valid = mask > 0
    close(out.token_loss, ref.token_loss, rtol=1e-5, atol=1e-6)
    close(grad, ref.grad, rtol=1e-5, atol=1e-6)
    close(out.weights[valid], t(ref.weights)[valid], rtol=1e-5, atol=1e-7)
    assert out.clipped.tolist() == ref.clipped
    assert out.masked.tolist() == ref.masked
    assert torch.isfinite(out.token_loss).all() and torch.isfinite(grad).all()


# ---- VESPO ----------------------------------------------------------------------------------------------------

def test_vespo_hand_computed_example_follows_the_kernel():
    # row 0: token log ratios (ln 2, 0), padded third slot with garbage μ; log W = ln 2, W = 2; A = 0.5 ≥ 0 so
    #        (k, λ) = (2, 3): φ = W^k·e^{λ(1−W)} = 4·e^{−3}; loss = −φ·A·logp = 2e^{−3}·[1, 2]; d/dlogp = −φA = −2e^{−3}
    # row 1: log ratios (−ln 2, 0, 0); W = 1/2; A = −2 < 0 so (k, λ) = (3, 2): φ = (1/2)^3·e^{2·(1/2)} = e/8;
    #        loss = −(e/8)(−2)·logp = (e/4)·[−0.25, −0.75, −1]; d/dlogp = e/4
    logp = [[-1.0, -2.0, 0.0], [-0.25, -0.75, -1.0]]
    behavior = [[-1.0 - LN2, -2.0, 9.9], [-0.25 + LN2, -0.75, -1.0]]
    mask = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    advantages = [0.5, -2.0]
    phi0, phi1 = 4 * math.exp(-3), math.e / 8
    expected_loss = [[2 * math.exp(-3), 4 * math.exp(-3), 0.0], [-math.e / 16, -3 * math.e / 16, -math.e / 4]]
    expected_grad = [[-2 * math.exp(-3), -2 * math.exp(-3), 0.0], [math.e / 4] * 3]

    out, grad = run_with_grad(vespo_loss, t(logp), t(behavior), t(advantages), t(mask))
    close(out.token_loss, expected_loss)
    close(grad, expected_grad)
    close(out.weights, [[phi0] * 3, [phi1] * 3])
    assert not out.clipped.any() and not out.masked.any()

    ref = reference.vespo(logp, behavior, advantages, mask)
    close(t(ref.token_loss), expected_loss)
    close(t(ref.grad), expected_grad)


@pytest.mark.parametrize("advantage", [1.5, 0.0, -0.7])
def test_vespo_on_policy_is_exactly_reinforce(advantage):
    # log W = 0 ⇒ log φ = λ + k·0 − λ·e^0 = 0 for either (k, λ): φ = 1 and the loss is −A·logp·m, bit for bit.
    logp, _, _, _, mask = random_batch(7)
    logp = torch.where(mask > 0, logp, 0.0)
    advantages = torch.full((logp.shape[0],), advantage)
    out, grad = run_with_grad(vespo_loss, logp, logp.clone(), advantages, mask)
    assert torch.equal(out.weights, torch.ones_like(logp))
    assert torch.equal(out.token_loss, -advantage * logp * mask)
    assert torch.equal(grad, -advantage * mask)


def test_vespo_kernel_peaks_at_k_over_lambda_and_vanishes_far_from_the_behaviour_policy():
    # φ(W) = W^k·e^{λ(1−W)} has its maximum at W = k/λ: 2/3 for A ≥ 0, 3/2 for A < 0; a sequence whose weight is
    # far from 1 either way (very stale) contributes almost nothing, which is VESPO's answer to staleness.
    log_w = torch.tensor([math.log(2 / 3), math.log(3 / 2), 0.0, 5.0, -5.0])
    logp = torch.zeros(len(log_w), 1) - 1.0
    mask = torch.ones_like(logp)
    pos = vespo_loss(logp, logp - log_w[:, None], torch.ones(len(log_w)), mask).weights[:, 0]
    neg = vespo_loss(logp, logp - log_w[:, None], -torch.ones(len(log_w)), mask).weights[:, 0]
    close(pos[0], (2 / 3) ** 2 * math.exp(3 * (1 - 2 / 3)))
    close(neg[1], (3 / 2) ** 3 * math.exp(2 * (1 - 3 / 2)))
    assert pos[0] > pos[2] == 1.0 and pos[0] > pos[1]
    assert neg[1] > neg[2] == 1.0 and neg[1] > neg[0]
    assert pos[3] == 0.0 and neg[3] == 0.0  # e^−432 and e^−279 underflow
    assert pos[4] < 1e-3 and neg[4] < 1e-5


def test_vespo_clips_each_token_log_ratio_and_the_sum_at_20():
    # A = −1, so (k, λ) = (3, 2) and log φ = 2 + 3·log W − 2·W.
    # row 0: token log ratios (30, −19.5, 0): the 30 is clipped to 20, log W = 0.5 (not 10.5); flagged
    # row 1: (−10, −10, −1.5): no token clipped but Σ = −21.5 is clipped to −20; flagged
    # row 2: (−10, −5, 0.5): log W = −14.5, nothing clipped
    log_rho = t([[30.0, -19.5, 0.0], [-10.0, -10.0, -1.5], [-10.0, -5.0, 0.5]])
    logp = torch.full((3, 3), -1.0) + torch.where(log_rho < 0, log_rho, 0.0)
    out = vespo_loss(logp, logp - log_rho, torch.full((3,), -1.0), torch.ones(3, 3))

    def phi(log_w: float) -> float:
        return math.exp(2.0 + 3.0 * log_w - 2.0 * math.exp(log_w))

    close(out.weights[:, 0], [phi(0.5), phi(-20.0), phi(-14.5)], rtol=1e-5, atol=0.0)
    assert out.clipped.tolist() == [[True] * 3, [True] * 3, [False] * 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_vespo_matches_the_reference_on_random_batches(seed):
    logp, _, behavior, advantages, mask = random_batch(seed, spread=0.6)
    out, grad = run_with_grad(vespo_loss, logp, behavior, advantages, mask)
    ref = reference.vespo(logp.tolist(), behavior.tolist(), advantages.tolist(), mask.tolist())
    assert_matches_reference(out, grad, ref, mask)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_vespo_non_default_kernel_parameters_match_the_reference(seed):
    params = {"k_pos": 1.0, "lam_pos": 0.5, "k_neg": 4.0, "lam_neg": 1.0}
    logp, _, behavior, advantages, mask = random_batch(seed)
    out, grad = run_with_grad(vespo_loss, logp, behavior, advantages, mask, **params)
    ref = reference.vespo(logp.tolist(), behavior.tolist(), advantages.tolist(), mask.tolist(), **params)
    assert_matches_reference(out, grad, ref, mask)


# ---- decoupled PPO ----------------------------------------------------------------------------------------------

def decoupled_inputs(w: list[list[float]], r: list[list[float]]):
    """logp, π_prox, μ with π_prox/μ = w and π_θ/π_prox = r, around log π_prox = −1."""
    proximal = torch.full((len(w), len(w[0])), -1.0)
    return proximal + torch.log(t(r)), proximal, proximal - torch.log(t(w))


def test_decoupled_ppo_hand_computed_example():
    # row 0, A = 1:  t0 w = 2,   r = 1.1 inside [0.8, 1.2]: loss −w·r·A = −2.2, d/dlogp = −w·r·A = −2.2
    #                t1 w = 6 > 5: masked, loss 0, grad 0
    #                t2 w = 1,   r = 1.5 > 1.2 with A > 0: min picks 1.2·A, loss −1.2, grad cut (0), clipped
    #                t3 padding
    # row 1, A = −1: t0 w = 0.5, r = 0.5 < 0.8 with A < 0: min(−0.5, −0.8) = −0.8, loss 0.4, grad 0, clipped
    #                t1 w = 1,   r = 1.5: min(−1.5, −1.2) = −1.5 (unclipped), loss 1.5, d/dlogp = −w·r·A = 1.5
    #                t2 w = 3,   r = 0.9: loss −3·0.9·(−1) = 2.7, grad 2.7;  t3 padding
    logp, proximal, behavior = decoupled_inputs([[2, 6, 1, 1], [0.5, 1, 3, 1]], [[1.1, 1, 1.5, 1], [0.5, 1.5, 0.9, 1]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 0]])
    out, grad = run_with_grad(decoupled_ppo_loss, logp, proximal, behavior, t([1.0, -1.0]), mask)
    close(out.token_loss, [[-2.2, 0.0, -1.2, 0.0], [0.4, 1.5, 2.7, 0.0]])
    close(grad, [[-2.2, 0.0, 0.0, 0.0], [0.0, 1.5, 2.7, 0.0]])
    close(out.weights[mask > 0], [2.0, 6.0, 1.0, 0.5, 1.0, 3.0])
    assert out.masked.tolist() == [[False, True, False, False], [False] * 4]
    assert out.clipped.tolist() == [[False, False, True, False], [True, False, False, False]]

    ref = reference.decoupled_ppo(logp.tolist(), proximal.tolist(), behavior.tolist(), [1.0, -1.0], mask.tolist())
    close(t(ref.token_loss), out.token_loss)


def test_decoupled_ppo_masks_tokens_whose_behaviour_weight_exceeds_5():
    logp, proximal, behavior = decoupled_inputs([[4.9, 5.1, 50.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]])
    out, grad = run_with_grad(decoupled_ppo_loss, logp, proximal, behavior, t([1.0]), torch.ones(1, 4))
    assert out.masked.tolist() == [[False, True, True, False]]
    close(out.token_loss, [[-4.9, 0.0, 0.0, -1.0]])
    close(grad, [[-4.9, 0.0, 0.0, -1.0]])
    # a lower bound moves the line: only the weights above it are excluded
    out = decoupled_ppo_loss(logp, proximal, behavior, t([1.0]), torch.ones(1, 4), max_behavior_weight=2.0)
    assert out.masked.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("seed", SEEDS)
def test_decoupled_ppo_matches_the_reference_on_random_batches(seed):
    logp, proximal, behavior, advantages, mask = random_batch(seed, spread=1.2)
    behavior[2, 0] = proximal[2, 0] - math.log(8.0)  # at least one w_t > 5
    out, grad = run_with_grad(decoupled_ppo_loss, logp, proximal, behavior, advantages, mask, clip_eps=0.05)
    ref = reference.decoupled_ppo(logp.tolist(), proximal.tolist(), behavior.tolist(), advantages.tolist(),
                                  mask.tolist(), clip_eps=0.05)
    assert_matches_reference(out, grad, ref, mask)
    assert out.masked.any() and out.clipped.any()  # both rules are exercised


# ---- truncated IS -----------------------------------------------------------------------------------------------

def test_truncated_is_token_level_hand_computed_example():
    # log ratios (ln 3, ln 0.5, 0) with cap 2: w = (min(3, 2), 0.5, 1) = (2, 0.5, 1), the first truncated.
    # A = 2, logp = (−1, −2, −0.5): loss −w·A·logp = (4, 2, 1); d/dlogp = −w·A = (−4, −1, −2).
    logp = t([[-1.0, -2.0, -0.5]])
    behavior = logp - torch.log(t([[3.0, 0.5, 1.0]]))
    out, grad = run_with_grad(truncated_is_loss, logp, behavior, t([2.0]), torch.ones(1, 3))
    close(out.weights, [[2.0, 0.5, 1.0]])
    close(out.token_loss, [[4.0, 2.0, 1.0]])
    close(grad, [[-4.0, -1.0, -2.0]])
    assert out.clipped.tolist() == [[True, False, False]]


def test_truncated_is_sequence_level_hand_computed_example():
    # row 0: ratios (3, 0.5): Π = 1.5 < cap 2, w = 1.5 on both tokens; A = 1: loss −1.5·logp = (1.5, 3)
    # row 1: ratios (2, 2) then padding: Π = 4, capped to 2, both tokens clipped; A = −1: loss 2·logp = (−2, −4)
    logp = t([[-1.0, -2.0], [-1.0, -2.0]])
    behavior = logp - torch.log(t([[3.0, 0.5], [2.0, 2.0]]))
    mask = torch.ones(2, 2)
    out, grad = run_with_grad(truncated_is_loss, logp, behavior, t([1.0, -1.0]), mask, level="sequence")
    close(out.weights, [[1.5, 1.5], [2.0, 2.0]])
    close(out.token_loss, [[1.5, 3.0], [-2.0, -4.0]])
    close(grad, [[-1.5, -1.5], [2.0, 2.0]])
    assert out.clipped.tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [1.0, 2.0, 10.0])
def test_truncated_is_weights_never_exceed_the_cap_and_capped_gradients_are_minus_cap_times_a(level, cap):
    logp, _, behavior, advantages, mask = random_batch(3, spread=2.0)
    behavior[2] = logp[2] - 3.0  # a row far above any cap tried, at both levels
    out, grad = run_with_grad(truncated_is_loss, logp, behavior, advantages, mask, cap=cap, level=level)
    valid = mask > 0
    assert (out.weights[valid] <= cap * (1 + 1e-6)).all()
    assert out.clipped.any()
    capped = out.clipped & valid
    close(grad[capped], (-cap * advantages[:, None].expand_as(grad))[capped])
    close(out.weights[capped], torch.full_like(out.weights[capped], cap))


def test_truncated_is_accepts_an_infinite_cap_and_keeps_weights_finite():
    # cap = inf is untruncated IS: below the e^20 float bound the weight is the plain ratio.
    logp = t([[-1.0, -1.0, -1.0]])
    behavior = logp - t([[3.0, 25.0, 1000.0]])
    out = truncated_is_loss(logp, behavior, t([1.0]), torch.ones(1, 3), cap=float("inf"))
    close(out.weights, [[math.exp(3.0), math.exp(20.0), math.exp(20.0)]])
    assert out.clipped.tolist() == [[False, True, True]]
    seq = truncated_is_loss(logp, behavior, t([1.0]), torch.ones(1, 3), cap=float("inf"), level="sequence")
    assert torch.isfinite(seq.weights).all() and torch.isfinite(seq.token_loss).all()


@pytest.mark.parametrize(("kwargs", "message"), [({"cap": 0.0}, "cap"), ({"cap": -1.0}, "cap"),
                                                 ({"cap": float("nan")}, "cap"), ({"level": "episode"}, "level")])
def test_truncated_is_rejects_invalid_cap_and_level(kwargs, message):
    with pytest.raises(ValueError, match=message):
        truncated_is_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), **kwargs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [2.0, float("inf")])
def test_truncated_is_matches_the_reference_on_random_batches(seed, level, cap):
    logp, _, behavior, advantages, mask = random_batch(seed, spread=0.8)
    out, grad = run_with_grad(truncated_is_loss, logp, behavior, advantages, mask, cap=cap, level=level)
    ref = reference.truncated_is(logp.tolist(), behavior.tolist(), advantages.tolist(), mask.tolist(), cap, level)
    assert_matches_reference(out, grad, ref, mask)


# ---- clipped IS -------------------------------------------------------------------------------------------------

def test_clipped_is_hand_computed_example():
    # r = π/μ = (1.1, 1.5, 0.5), ε = 0.2
    # A = 1:  min(r, clip(r)) = (1.1, 1.2, 0.5): loss (−1.1, −1.2, −0.5); grads −r·A where unclipped: (−1.1, 0, −0.5)
    # A = −1: min(−r, −clip(r)) = (−1.1, −1.5, −0.8): loss (1.1, 1.5, 0.8); grads (1.1, 1.5, 0), the last clipped
    logp = torch.full((2, 3), -1.0)
    behavior = logp - torch.log(t([[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]]))
    out, grad = run_with_grad(clipped_is_loss, logp, behavior, t([1.0, -1.0]), torch.ones(2, 3))
    close(out.token_loss, [[-1.1, -1.2, -0.5], [1.1, 1.5, 0.8]])
    close(grad, [[-1.1, 0.0, -0.5], [1.1, 1.5, 0.0]])
    close(out.weights, [[1.1, 1.5, 0.5], [1.1, 1.5, 0.5]])
    assert out.clipped.tolist() == [[False, True, False], [False, False, True]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip_eps", [0.2, 0.05])
def test_clipped_is_matches_the_reference_on_random_batches(seed, clip_eps):
    logp, _, behavior, advantages, mask = random_batch(seed, spread=0.3)
    out, grad = run_with_grad(clipped_is_loss, logp, behavior, advantages, mask, clip_eps=clip_eps)
    ref = reference.clipped_is(logp.tolist(), behavior.tolist(), advantages.tolist(), mask.tolist(), clip_eps)
    assert_matches_reference(out, grad, ref, mask)


# ---- every loss -------------------------------------------------------------------------------------------------

def loss_by_name(name: str, logp, behavior, advantages, mask, proximal=None) -> LossOutput:
    proximal = proximal if proximal is not None else logp.detach().clone()
    return compute_loss(name, logp, behavior, advantages, mask, proximal_logp=proximal)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_empty_mask_gives_zero_loss_zero_gradient_and_no_nan(name):
    logp, proximal, behavior, advantages, _ = random_batch(5)
    logp = torch.where(torch.isfinite(logp), logp, -2.0).requires_grad_(True)
    mask = torch.zeros_like(logp)
    out = loss_by_name(name, logp, behavior, advantages, mask, proximal)
    out.token_loss.sum().backward()
    assert torch.equal(out.token_loss, torch.zeros_like(logp))
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert torch.isfinite(out.weights).all()
    assert not out.clipped.any() and not out.masked.any()
    stats = importance_stats(out, mask)
    assert all(v == 0.0 for v in stats.values())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_padded_slots_never_reach_the_loss_or_the_gradient(name):
    # random_batch puts −inf in logp and NaN in μ on every padded slot; a clean copy must give the same result.
    logp, proximal, behavior, advantages, mask = random_batch(11)
    clean_logp = torch.where(mask > 0, logp, -1.0)
    clean_behavior = torch.where(mask > 0, behavior, -1.0)
    dirty_proximal = torch.where(mask > 0, proximal, torch.nan)
    dirty, dirty_grad = run_with_grad(lambda lp: loss_by_name(name, lp, behavior, advantages, mask, dirty_proximal),
                                      logp)
    clean, clean_grad = run_with_grad(lambda lp: loss_by_name(name, lp, clean_behavior, advantages, mask, proximal),
                                      clean_logp)
    assert torch.equal(dirty.token_loss, clean.token_loss)
    assert torch.equal(dirty_grad, clean_grad)
    assert torch.equal(dirty_grad[mask == 0], torch.zeros_like(dirty_grad[mask == 0]))
    valid = mask > 0
    assert torch.equal(dirty.weights[valid], clean.weights[valid])
    assert torch.isfinite(dirty.weights).all()


EXTREMES = [50.0, -50.0, 1000.0, -1000.0]


def extreme_batch():
    """One row per extreme log ratio π/μ (first token), each with A = +1 and A = −1; log-probabilities stay ≤ 0."""
    log_rho = torch.tensor([[x, 0.3, -0.2] for x in EXTREMES for _ in (1, -1)])
    advantages = torch.tensor([a for _ in EXTREMES for a in (1.0, -1.0)])
    logp = torch.where(log_rho > 0, -1.0, -1.0 + log_rho)
    behavior = logp - log_rho
    return logp, behavior, advantages, torch.ones_like(logp), log_rho


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_extreme_log_ratios_stay_finite_and_engage_clipping(name):
    logp, behavior, advantages, mask, log_rho = extreme_batch()
    # decoupled PPO: the extreme gap is between π_θ and π_prox (the r_t clip), with μ = π_prox (w = 1)
    proximal = behavior if name == "decoupled_ppo" else None
    out, grad = run_with_grad(lambda lp: loss_by_name(name, lp, behavior, advantages, mask, proximal), logp)
    for tensor in (out.token_loss, out.weights, grad):
        assert torch.isfinite(tensor).all(), tensor
    above = log_rho > 20
    assert out.clipped[above].all()  # every token far above its behaviour probability is clipped or truncated
    assert (out.weights <= math.exp(20.0) * (1 + 1e-6)).all()

    kwargs = {"tis_token": {"cap": 2.0, "level": "token"}, "tis_sequence": {"cap": 2.0, "level": "sequence"}}
    ref_fn = {"vespo": reference.vespo, "clipped_is": reference.clipped_is,
              "tis_token": reference.truncated_is, "tis_sequence": reference.truncated_is}
    if name == "decoupled_ppo":
        ref = reference.decoupled_ppo(logp.tolist(), behavior.tolist(), behavior.tolist(), advantages.tolist(),
                                      mask.tolist())
    else:
        ref = ref_fn[name](logp.tolist(), behavior.tolist(), advantages.tolist(), mask.tolist(), **kwargs.get(name, {}))
    assert_matches_reference(out, grad, ref, mask)


def test_extreme_behaviour_gaps_are_masked_by_decoupled_ppo_without_inf():
    logp, behavior, advantages, mask, log_rho = extreme_batch()
    # now the extreme gap is between π_prox and μ (the w_t rule), with π_θ = π_prox
    out, grad = run_with_grad(decoupled_ppo_loss, logp, logp.detach(), behavior, advantages, mask)
    assert torch.isfinite(out.token_loss).all() and torch.isfinite(grad).all() and torch.isfinite(out.weights).all()
    assert out.masked.tolist() == (log_rho > math.log(5.0)).tolist()


def test_vespo_at_the_extremes_gives_zero_weight_above_and_a_tiny_one_below():
    logp, behavior, advantages, mask, log_rho = extreme_batch()
    out = vespo_loss(logp, behavior, advantages, mask)
    # rows' log ratios (x, 0.3, −0.2), x clipped to ±20: log W = min(20 + 0.1, 20) = 20, log φ = λ + 20k − λe^20
    # ≈ −1.5e9 → φ = 0; or log W = −20 + 0.1 = −19.9, log φ = λ − 19.9k − λe^−19.9
    expected = []
    for x, a in zip(log_rho[:, 0].tolist(), advantages.tolist(), strict=True):
        k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
        expected.append(0.0 if x > 0 else math.exp(lam - 19.9 * k - lam * math.exp(-19.9)))
    close(out.weights[:, 0], expected, rtol=1e-5, atol=0.0)
    assert out.clipped.all()


# ---- importance statistics ----------------------------------------------------------------------------------------

def test_importance_stats_hand_computed():
    # valid weights (1, 2, 3, 4, 100); the padded 1e9 must not count. mean 110/5 = 22; linear percentiles on the
    # sorted values: p50 at position 0.5·4 = 2 → 3; p90 at 3.6 → 4 + 0.6·96 = 61.6; p99 at 3.96 → 4 + 0.96·96 = 96.16
    weights = t([[1.0, 2.0, 3.0], [4.0, 100.0, 1e9]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    clipped = torch.tensor([[False, False, False], [False, True, True]])
    masked = torch.tensor([[True, False, False], [False, False, False]])
    out = LossOutput(token_loss=torch.zeros(2, 3), weights=weights, clipped=clipped, masked=masked)
    stats = importance_stats(out, mask)
    assert stats.keys() == {"weight_mean", "weight_p50", "weight_p90", "weight_p99", "weight_max",
                            "clipped_fraction", "masked_fraction", "tokens"}
    assert stats["weight_mean"] == pytest.approx(22.0)
    assert stats["weight_p50"] == pytest.approx(3.0)
    assert stats["weight_p90"] == pytest.approx(61.6)
    assert stats["weight_p99"] == pytest.approx(96.16)
    assert stats["weight_max"] == 100.0
    assert stats["clipped_fraction"] == pytest.approx(1 / 5)
    assert stats["masked_fraction"] == pytest.approx(1 / 5)
    assert stats["tokens"] == 5.0


def test_importance_stats_of_a_single_token_are_its_weight():
    out = LossOutput(token_loss=torch.zeros(1, 2), weights=t([[7.0, 9.0]]),
                     clipped=torch.tensor([[True, False]]), masked=torch.zeros(1, 2, dtype=torch.bool))
    stats = importance_stats(out, t([[1, 0]]))
    assert [stats[k] for k in ("weight_mean", "weight_p50", "weight_p99", "weight_max")] == [7.0] * 4
    assert stats["clipped_fraction"] == 1.0 and stats["tokens"] == 1.0


# ---- dispatch by name -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "direct"), [
    ("vespo", lambda lp, px, mu, a, m: vespo_loss(lp, mu, a, m)),
    ("decoupled_ppo", lambda lp, px, mu, a, m: decoupled_ppo_loss(lp, px, mu, a, m)),
    ("tis_token", lambda lp, px, mu, a, m: truncated_is_loss(lp, mu, a, m, level="token")),
    ("tis_sequence", lambda lp, px, mu, a, m: truncated_is_loss(lp, mu, a, m, level="sequence")),
    ("clipped_is", lambda lp, px, mu, a, m: clipped_is_loss(lp, mu, a, m)),
])
def test_compute_loss_dispatches_each_config_name_to_its_loss(name, direct):
    logp, proximal, behavior, advantages, mask = random_batch(2, spread=1.0)
    by_name = compute_loss(name, logp, behavior, advantages, mask, proximal_logp=proximal)
    expected = direct(logp, proximal, behavior, advantages, mask)
    for field in ("token_loss", "weights", "clipped", "masked"):
        assert torch.equal(getattr(by_name, field), getattr(expected, field)), field


def test_compute_loss_passes_params_as_keyword_overrides():
    logp, _, behavior, advantages, mask = random_batch(2, spread=1.0)
    out = compute_loss("tis_token", logp, behavior, advantages, mask, params={"cap": 1.5})
    assert torch.equal(out.token_loss, truncated_is_loss(logp, behavior, advantages, mask, cap=1.5).token_loss)
    assert not torch.equal(out.token_loss, truncated_is_loss(logp, behavior, advantages, mask).token_loss)


def test_compute_loss_rejects_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(ValueError, match="grpo") as raised:
        compute_loss("grpo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))
    for name in ("vespo", "decoupled_ppo", "tis_token", "tis_sequence", "clipped_is"):
        assert name in str(raised.value)


def test_compute_loss_requires_proximal_logp_for_decoupled_ppo():
    with pytest.raises(ValueError, match="proximal_logp"):
        compute_loss("decoupled_ppo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))


@pytest.mark.parametrize(("name", "params"), [("vespo", {"clip_eps": 0.2}), ("tis_token", {"level": "sequence"}),
                                              ("clipped_is", {"cap": 2.0})])
def test_compute_loss_rejects_parameters_the_loss_does_not_take(name, params):
    with pytest.raises(ValueError, match=f"unknown parameter.*{next(iter(params))}"):
        compute_loss(name, torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), params=params)


@pytest.mark.parametrize(("behavior_shape", "advantages_shape"), [((2, 4), (2,)), ((2, 3), (3,)), ((2, 3), (2, 1))])
def test_losses_reject_mismatched_shapes(behavior_shape, advantages_shape):
    with pytest.raises(ValueError, match="must"):
        vespo_loss(torch.zeros(2, 3), torch.zeros(behavior_shape), torch.zeros(advantages_shape), torch.ones(2, 3))


# ---- V-trace ----------------------------------------------------------------------------------------------------

def test_vtrace_hand_computed_three_steps():
    # π/μ = (2, 0.5, 1) ⇒ ρ = c = (1, 0.5, 1) with ρ̄ = c̄ = 1; γ = 0.9; r = (1, 0, 2); V = (0.5, 1, 1.5); V(x_3) = 2.
    # δ_t = ρ_t(r_t + γV_{t+1} − V_t): δ0 = 1·(1 + 0.9 − 0.5) = 1.4; δ1 = 0.5·(0 + 1.35 − 1) = 0.175;
    #                                   δ2 = 1·(2 + 1.8 − 1.5) = 2.3
    # v_s − V_s = δ_s + γc_s(v_{s+1} − V_{s+1}): v2 = 1.5 + 2.3 = 3.8; v1 = 1 + 0.175 + 0.9·0.5·2.3 = 2.21;
    #                                             v0 = 0.5 + 1.4 + 0.9·1·1.21 = 2.989
    # pg_s = ρ_s(r_s + γv_{s+1} − V_s): pg0 = 1 + 0.9·2.21 − 0.5 = 2.489; pg1 = 0.5·(0.9·3.8 − 1) = 1.21;
    #                                   pg2 = 2 + 0.9·2 − 1.5 = 2.3
    behavior = [-1.0, -1.0, -1.0]
    target = [-1.0 + LN2, -1.0 - LN2, -1.0]
    vs, pg = reference.vtrace(behavior, target, [1.0, 0.0, 2.0], [0.5, 1.0, 1.5], 2.0, 0.9)
    assert vs == pytest.approx([2.989, 2.21, 3.8])
    assert pg == pytest.approx([2.489, 1.21, 2.3])


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_on_policy_vtrace_is_the_n_step_discounted_return(seed):
    g = torch.Generator().manual_seed(seed)
    n, gamma = 6, 0.95
    logp = (-3 * torch.rand(n, generator=g)).tolist()
    rewards = torch.randn(n, generator=g).tolist()
    values = torch.randn(n, generator=g).tolist()
    bootstrap = 1.7
    vs, pg = reference.vtrace(logp, logp, rewards, values, bootstrap, gamma)
    returns = [sum(gamma ** (k - s) * rewards[k] for k in range(s, n)) + gamma ** (n - s) * bootstrap for s in range(n)]
    assert vs == pytest.approx(returns)
    assert pg == pytest.approx([rewards[s] + gamma * (returns[s + 1] if s + 1 < n else bootstrap) - values[s]
                                for s in range(n)])


@pytest.mark.parametrize("rho_bar", [1.0, 2.0])
def test_truncated_is_token_weights_are_vtrace_rhos_for_the_same_log_ratios(rho_bar):
    # With γ = 0, V ≡ 0 and r ≡ 1, V-trace's pg advantage is exactly ρ_t = min(ρ̄, π/μ): the truncated IS weight.
    g = torch.Generator().manual_seed(9)
    behavior = -3 * torch.rand(12, generator=g)
    target = behavior + torch.randn(12, generator=g)
    _, rhos = reference.vtrace(behavior.tolist(), target.tolist(), [1.0] * 12, [0.0] * 12, 0.0, 0.0,
                               rho_bar=rho_bar, c_bar=rho_bar)
    out = truncated_is_loss(target[None], behavior[None], torch.ones(1), torch.ones(1, 12), cap=rho_bar)
    close(out.weights[0], rhos, rtol=1e-5, atol=1e-7)
    assert out.clipped[0].tolist() == (target - behavior > math.log(rho_bar)).tolist()
    assert 0 < out.clipped.sum() < 12  # both sides of the cap are exercised
