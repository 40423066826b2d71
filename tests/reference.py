"""Plain-loop reference implementations of the losses, advantages and V-trace, written straight from DESIGN.md.

Deliberately naive: Python lists, explicit loops over sequences and tokens, `math`, float64. No torch, so a
vectorisation mistake in `longhaul.learner` cannot be shared by its reference. Each loss also returns its analytic
gradient d token_loss / d logp, to check autograd against.

The float-safety bounds of `learner/losses.py` are part of the specification and are mirrored here: VESPO's ±20 clips,
and log ratios bounded to ±20 (weights ≤ e^20) before exponentiation in the other losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Matrix = list[list[float]]

BOUND = 20.0


@dataclass
class RefLoss:
    """Per-token lists of lists, shaped like the inputs; `grad` = d token_loss[b][t] / d logp[b][t]."""

    token_loss: Matrix
    weights: Matrix
    clipped: list[list[bool]]
    masked: list[list[bool]]
    grad: Matrix


def _zeros(like: Matrix) -> Matrix:
    return [[0.0 for _ in row] for row in like]


def _falses(like: Matrix) -> list[list[bool]]:
    return [[False for _ in row] for row in like]


def _clip(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def vespo(logp: Matrix, behavior_logp: Matrix, advantages: list[float], mask: Matrix, k_pos: float = 2.0,
          lam_pos: float = 3.0, k_neg: float = 3.0, lam_neg: float = 2.0) -> RefLoss:
    out = RefLoss(_zeros(logp), _zeros(logp), _falses(logp), _falses(logp), _zeros(logp))
    for b in range(len(logp)):
        total = 0.0
        any_token_clipped = False
        for t in range(len(logp[b])):
            if mask[b][t] > 0:
                log_rho = logp[b][t] - behavior_logp[b][t]
                if abs(log_rho) > BOUND:
                    any_token_clipped = True
                total += mask[b][t] * _clip(log_rho, -BOUND, BOUND)
        log_w = _clip(total, -BOUND, BOUND)
        a = advantages[b]
        k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
        log_phi = lam + k * log_w - lam * math.exp(log_w)
        phi = math.exp(log_phi) if log_phi < 700 else 0.0  # math.exp raises on overflow; non-finite φ → 0
        for t in range(len(logp[b])):
            out.weights[b][t] = phi
            if mask[b][t] > 0:
                out.token_loss[b][t] = -phi * a * logp[b][t] * mask[b][t]
                out.grad[b][t] = -phi * a * mask[b][t]
                out.clipped[b][t] = any_token_clipped or abs(total) > BOUND
    return out


def _ppo_token(log_r: float, a: float, clip_eps: float) -> tuple[float, float, bool]:
    """min(r·A, clip(r)·A), its derivative by log π_θ, and whether the gradient was cut."""
    bounded = _clip(log_r, -BOUND, BOUND)
    r = math.exp(bounded)
    unclipped = r * a
    clipped = _clip(r, 1 - clip_eps, 1 + clip_eps) * a
    if clipped < unclipped:
        return clipped, 0.0, True
    # d(r·A)/d log π_θ = r·A, unless the ±20 bound froze r
    return unclipped, (r * a if abs(log_r) <= BOUND else 0.0), abs(log_r) > BOUND


def decoupled_ppo(logp: Matrix, proximal_logp: Matrix, behavior_logp: Matrix, advantages: list[float], mask: Matrix,
                  clip_eps: float = 0.2, max_behavior_weight: float = 5.0) -> RefLoss:
    out = RefLoss(_zeros(logp), _zeros(logp), _falses(logp), _falses(logp), _zeros(logp))
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if mask[b][t] <= 0:
                out.weights[b][t] = 1.0
                continue
            w = math.exp(min(proximal_logp[b][t] - behavior_logp[b][t], BOUND))
            out.weights[b][t] = w
            if w > max_behavior_weight:
                out.masked[b][t] = True
                continue
            objective, d_objective, cut = _ppo_token(logp[b][t] - proximal_logp[b][t], advantages[b], clip_eps)
            out.token_loss[b][t] = -w * objective * mask[b][t]
            out.grad[b][t] = -w * d_objective * mask[b][t]
            out.clipped[b][t] = cut
    return out


def truncated_is(logp: Matrix, behavior_logp: Matrix, advantages: list[float], mask: Matrix, cap: float = 2.0,
                 level: str = "token") -> RefLoss:
    out = RefLoss(_zeros(logp), _zeros(logp), _falses(logp), _falses(logp), _zeros(logp))
    log_cap = min(math.log(cap), BOUND)
    for b in range(len(logp)):
        sequence_log_w = 0.0
        for t in range(len(logp[b])):
            if mask[b][t] > 0:
                sequence_log_w += mask[b][t] * (logp[b][t] - behavior_logp[b][t])
        for t in range(len(logp[b])):
            if level == "sequence":
                log_w = sequence_log_w
            else:
                log_w = logp[b][t] - behavior_logp[b][t] if mask[b][t] > 0 else 0.0
            w = math.exp(min(log_w, log_cap))
            out.weights[b][t] = w
            if mask[b][t] > 0:
                out.token_loss[b][t] = -w * advantages[b] * logp[b][t] * mask[b][t]
                out.grad[b][t] = -w * advantages[b] * mask[b][t]
                out.clipped[b][t] = log_w > log_cap
    return out


def clipped_is(logp: Matrix, behavior_logp: Matrix, advantages: list[float], mask: Matrix,
               clip_eps: float = 0.2) -> RefLoss:
    out = RefLoss(_zeros(logp), _zeros(logp), _falses(logp), _falses(logp), _zeros(logp))
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if mask[b][t] <= 0:
                out.weights[b][t] = 1.0
                continue
            log_r = logp[b][t] - behavior_logp[b][t]
            out.weights[b][t] = math.exp(_clip(log_r, -BOUND, BOUND))
            objective, d_objective, cut = _ppo_token(log_r, advantages[b], clip_eps)
            out.token_loss[b][t] = -objective * mask[b][t]
            out.grad[b][t] = -d_objective * mask[b][t]
            out.clipped[b][t] = cut
    return out


def group_advantages(rewards: Sequence[float], group_ids: Sequence[str], method: str = "grpo",
                     eps: float = 1e-6) -> list[float]:
    out = []
    for i in range(len(rewards)):
        members = [rewards[j] for j in range(len(rewards)) if group_ids[j] == group_ids[i]]
        n = len(members)
        if n == 1 or all(m == members[0] for m in members):
            out.append(0.0)
            continue
        mean = sum(members) / n
        if method == "drgrpo":
            out.append(rewards[i] - mean)
        elif method == "grpo":
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
            out.append((rewards[i] - mean) / (std + eps))
        elif method == "rloo":
            out.append(rewards[i] - (sum(members) - rewards[i]) / (n - 1))
        else:
            raise ValueError(method)
    return out


def vtrace(behavior_logp: Sequence[float], target_logp: Sequence[float], rewards: Sequence[float],
           values: Sequence[float], bootstrap_value: float, discount: float | Sequence[float], rho_bar: float = 1.0,
           c_bar: float = 1.0) -> tuple[list[float], list[float]]:
    """V-trace targets v_s and policy-gradient advantages for one trajectory (IMPALA, Espeholt et al. 2018, eq. 1).

    ρ_t = min(ρ̄, π/μ), c_t = min(c̄, π/μ), δ_t = ρ_t(r_t + γ_t V(x_{t+1}) − V(x_t)), with V(x_n) = bootstrap_value;
    v_s − V(x_s) = δ_s + γ_s c_s (v_{s+1} − V(x_{s+1})), v_n = bootstrap_value;
    pg advantage_s = ρ_s (r_s + γ_s v_{s+1} − V(x_s)) (the pg ρ uses ρ̄ too). `discount` is γ, one or per step
    (a per-step 0 ends an episode).
    """
    n = len(rewards)
    gammas = [float(discount)] * n if isinstance(discount, (int, float)) else [float(g) for g in discount]
    ratios = [math.exp(target_logp[t] - behavior_logp[t]) for t in range(n)]
    rhos = [min(rho_bar, ratio) for ratio in ratios]
    cs = [min(c_bar, ratio) for ratio in ratios]
    next_values = [values[t + 1] for t in range(n - 1)] + [bootstrap_value]
    vs = [0.0] * n
    correction = 0.0  # v_{s+1} − V(x_{s+1}); 0 past the end, where v_n = V(x_n) = bootstrap
    for s in reversed(range(n)):
        delta = rhos[s] * (rewards[s] + gammas[s] * next_values[s] - values[s])
        correction = delta + gammas[s] * cs[s] * correction
        vs[s] = values[s] + correction
    next_vs = vs[1:] + [bootstrap_value]
    pg_advantages = [rhos[s] * (rewards[s] + gammas[s] * next_vs[s] - values[s]) for s in range(n)]
    return vs, pg_advantages
