"""Off-policy policy-gradient losses (DESIGN.md: Algorithms), one small pure function each.

Shared conventions. Per-token inputs are padded [B, T] float tensors: `logp` = log π_θ of the sampled tokens (carries
the gradient), `behavior_logp` = log μ from the inference engine, `proximal_logp` = log π_prox, `mask` = m_t (1 on the
model-generated tokens to train, 0 on prompt, tool output and padding). `advantages` is [B], one A per sequence,
broadcast to its tokens and treated as a constant (detached: a critic must not learn through the policy loss).

Every loss returns a `LossOutput` whose `token_loss` is exactly 0 where m_t = 0 and is *not* normalised: the trainer
sums it over the batch and divides by the batch's number of valid tokens. Values in padded slots (−inf, NaN, garbage)
never reach a weight, a loss or a gradient. Metric bookkeeping lives apart, in `importance_stats`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

# Bound on a log importance ratio before it is exponentiated: e^20 ≈ 4.9e8 stays finite in float32 (overflow is at
# e^88.7) even after multiplication by an advantage and a log-probability, so no weight, loss or gradient is inf/NaN.
# It is also VESPO's own clip (DESIGN.md).
LOG_RATIO_CLIP = 20.0

LOSS_NAMES = ("vespo", "decoupled_ppo", "tis_token", "tis_sequence", "clipped_is")


@dataclass(frozen=True, slots=True)
class LossOutput:
    """What a loss returns. All four tensors are [B, T], the shape of `logp`.

    token_loss: the per-token loss, exactly 0 where the mask is 0; carries the gradient; not normalised.
    weights: the importance weight of each token, detached, for statistics (defined on padding too: read it through
        the mask). For decoupled PPO it is the raw w_t, also on the tokens that w_t > 5 excluded.
    clipped: the token's weight was clipped or truncated, or a PPO ratio clip cut its gradient (valid tokens only).
    masked: the loss itself excluded the token (decoupled PPO's w_t > 5); never set on padding.
    """

    token_loss: torch.Tensor
    weights: torch.Tensor
    clipped: torch.Tensor
    masked: torch.Tensor


def vespo_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
               k_pos: float = 2.0, lam_pos: float = 3.0, k_neg: float = 3.0, lam_neg: float = 2.0) -> LossOutput:
    """VESPO: REINFORCE weighted by a smooth kernel of the sequence importance weight W = Π_t π_θ(y_t)/μ(y_t).

    log W = clip(Σ_t m_t·clip(log π_θ − log μ, −20, 20), −20, 20), detached, with no length normalisation.
    φ(W) = W^k·exp(λ(1 − W)), computed as log φ = λ + k·log W − λ·W; a non-finite φ becomes 0.
    (k, λ) = (k_pos, lam_pos) = (2, 3) where A ≥ 0 and (k_neg, lam_neg) = (3, 2) where A < 0.
    Token loss −φ·A·log π_θ(y_t)·m_t. No ratio clip: φ(1) = 1 (on-policy it is plain REINFORCE) and φ → 0 as W
    moves far from 1 either way, which is what keeps very stale samples from dominating a step.

    `weights` is φ on every token of its sequence; `clipped` marks the valid tokens of sequences where a token's log
    ratio or the sum went past ±20; `masked` is never set.
    """
    _check_shapes(logp, behavior_logp, advantages, mask)
    valid = mask > 0
    A = advantages.detach()
    log_rho = _log_ratio(logp.detach(), behavior_logp, valid)
    log_sum = (mask * log_rho.clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)).sum(dim=1)
    log_W = log_sum.clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    positive = A >= 0
    k = torch.where(positive, k_pos, k_neg)
    lam = torch.where(positive, lam_pos, lam_neg)
    phi = torch.exp(lam + k * log_W - lam * torch.exp(log_W))
    phi = torch.where(torch.isfinite(phi), phi, 0.0)
    token_loss = torch.where(valid, -(phi * A).unsqueeze(1) * logp * mask, 0.0)
    out_of_range = (log_sum.abs() > LOG_RATIO_CLIP) | ((log_rho.abs() > LOG_RATIO_CLIP) & valid).any(dim=1)
    return LossOutput(token_loss=token_loss, weights=phi.unsqueeze(1).expand_as(logp).contiguous(),
                      clipped=out_of_range.unsqueeze(1) & valid, masked=torch.zeros_like(valid))


def decoupled_ppo_loss(logp: torch.Tensor, proximal_logp: torch.Tensor, behavior_logp: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float = 0.2,
                       max_behavior_weight: float = 5.0) -> LossOutput:
    """Decoupled PPO (AReaL): the trust region is taken around π_prox, the behaviour gap is corrected by a weight.

    w_t = π_prox(y_t)/μ(y_t), detached; tokens with w_t > max_behavior_weight (5) are masked (loss 0).
    r_t = π_θ(y_t)/π_prox(y_t); token loss −w_t·min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A)·m_t with ε = clip_eps (0.2).
    π_prox is the policy at the start of the step (one extra forward pass), so r_t stays near 1 within a step.

    Float safety: log r_t is bounded to ±20 before exp (beyond that its gradient is cut and the token counts as
    clipped), and w_t to e^20, which cannot change which tokens the w_t > 5 rule masks.
    `weights` is w_t; `clipped` marks kept tokens whose gradient a clip cut; `masked` the tokens w_t > 5 excluded.
    """
    _check_shapes(logp, behavior_logp, advantages, mask)
    _check_shapes(logp, proximal_logp, advantages, mask)
    valid = mask > 0
    A = advantages.detach().unsqueeze(1)
    proximal_logp = proximal_logp.detach()
    w = torch.exp(_log_ratio(proximal_logp, behavior_logp, valid).clamp(max=LOG_RATIO_CLIP))
    masked = valid & (w > max_behavior_weight)
    kept = valid & ~masked
    objective, cut = _clipped_objective(_log_ratio(logp, proximal_logp, valid), A, clip_eps)
    token_loss = torch.where(kept, -w * objective * mask, 0.0)
    return LossOutput(token_loss=token_loss, weights=w, clipped=cut & kept, masked=masked)


def truncated_is_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      *, cap: float = 2.0, level: Literal["token", "sequence"] = "token") -> LossOutput:
    """Truncated importance sampling: REINFORCE weighted by the importance ratio, truncated at `cap` (C = 2).

    level="token": w_t = min(π_θ(y_t)/μ(y_t), C), per token.
    level="sequence": w = min(Π_t ρ_t, C) = min(exp(Σ_t m_t(log π_θ − log μ)), C), on every token of the sequence.
    π_θ is detached inside the weight; token loss −w·A·log π_θ(y_t)·m_t.

    cap may be float("inf") (untruncated IS). Computed in log space with the log weight bounded to 20, so w ≤ e^20
    (≈ 4.9e8) stays finite; a weight cut by the cap or by that bound counts as clipped. `masked` is never set.
    """
    _check_shapes(logp, behavior_logp, advantages, mask)
    if not cap > 0:
        raise ValueError(f"cap must be > 0 (a weight cap of {cap} would zero or flip every gradient)")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    valid = mask > 0
    A = advantages.detach().unsqueeze(1)
    log_w = _log_ratio(logp.detach(), behavior_logp, valid)
    if level == "sequence":
        log_w = (mask * log_w).sum(dim=1, keepdim=True).expand_as(logp)
    log_cap = min(math.log(cap), LOG_RATIO_CLIP)
    w = torch.exp(log_w.clamp(max=log_cap))
    token_loss = torch.where(valid, -w * A * logp * mask, 0.0)
    return LossOutput(token_loss=token_loss, weights=w, clipped=valid & (log_w > log_cap),
                      masked=torch.zeros_like(valid))


def clipped_is_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                    clip_eps: float = 0.2) -> LossOutput:
    """The GRPO/PPO clipped surrogate with μ as the old policy: the baseline that collapses under staleness.

    r_t = π_θ(y_t)/μ(y_t); token loss −min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A)·m_t with ε = clip_eps (0.2).
    log r_t is bounded to ±20 before exp (its gradient is cut beyond, and the token counts as clipped).
    `weights` is r_t (detached); `clipped` marks tokens whose gradient the clip cut; `masked` is never set.
    """
    _check_shapes(logp, behavior_logp, advantages, mask)
    valid = mask > 0
    log_r = _log_ratio(logp, behavior_logp, valid)
    objective, cut = _clipped_objective(log_r, advantages.detach().unsqueeze(1), clip_eps)
    token_loss = torch.where(valid, -objective * mask, 0.0)
    weights = torch.exp(log_r.detach().clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP))
    return LossOutput(token_loss=token_loss, weights=weights, clipped=cut & valid, masked=torch.zeros_like(valid))


def compute_loss(name: str, logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, *, params: dict[str, float] | None = None,
                 proximal_logp: torch.Tensor | None = None) -> LossOutput:
    """The loss the config names (`LearnerConfig.loss`), with `params` as keyword overrides of its defaults.

    Names: "vespo", "decoupled_ppo" (needs `proximal_logp`), "tis_token", "tis_sequence", "clipped_is".
    `proximal_logp` is ignored by every loss but decoupled PPO. An unknown name or parameter is a ValueError.
    """
    if name not in _DISPATCH:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    fn, fixed = _DISPATCH[name]
    params = dict(params or {})
    accepted = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in fixed]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for loss {name!r}; it accepts {accepted}")
    if name == "decoupled_ppo":
        if proximal_logp is None:
            raise ValueError("loss 'decoupled_ppo' needs proximal_logp: log π_prox from a forward pass with the "
                             "weights at the start of the step")
        return decoupled_ppo_loss(logp, proximal_logp, behavior_logp, advantages, mask, **params)
    return fn(logp, behavior_logp, advantages, mask, **fixed, **params)


_DISPATCH: dict[str, tuple[Callable[..., LossOutput], dict[str, str]]] = {
    "vespo": (vespo_loss, {}),
    "decoupled_ppo": (decoupled_ppo_loss, {}),
    "tis_token": (truncated_is_loss, {"level": "token"}),
    "tis_sequence": (truncated_is_loss, {"level": "sequence"}),
    "clipped_is": (clipped_is_loss, {}),
}


def importance_stats(output: LossOutput, mask: torch.Tensor) -> dict[str, float]:
    """Statistics of a loss's importance weights over the valid tokens (mask > 0).

    Keys: weight_mean, weight_p50, weight_p90, weight_p99, weight_max (percentiles interpolate linearly between
    order statistics, as numpy's default), clipped_fraction, masked_fraction, tokens (the count). No valid token:
    every value is 0, never NaN.
    """
    valid = mask > 0
    tokens = int(valid.sum())
    if tokens == 0:
        return dict.fromkeys(("weight_mean", "weight_p50", "weight_p90", "weight_p99", "weight_max",
                              "clipped_fraction", "masked_fraction", "tokens"), 0.0)
    # float64: a mean over millions of tokens in float32 would drift; sort instead of torch.quantile, which refuses
    # inputs above 2^24 elements.
    w = output.weights.detach()[valid].to(torch.float64).sort().values
    return {
        "weight_mean": w.mean().item(),
        "weight_p50": _percentile(w, 0.50),
        "weight_p90": _percentile(w, 0.90),
        "weight_p99": _percentile(w, 0.99),
        "weight_max": w[-1].item(),
        "clipped_fraction": output.clipped[valid].sum().item() / tokens,
        "masked_fraction": output.masked[valid].sum().item() / tokens,
        "tokens": float(tokens),
    }


def _percentile(sorted_values: torch.Tensor, q: float) -> float:
    position = q * (len(sorted_values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(sorted_values) - 1)
    return (sorted_values[lo] + (position - lo) * (sorted_values[hi] - sorted_values[lo])).item()


def _log_ratio(numerator_logp: torch.Tensor, denominator_logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log(numerator/denominator) on valid tokens and 0 on padding, so padded garbage never reaches an exp."""
    return torch.where(valid, numerator_logp - denominator_logp, 0.0)


def _clipped_objective(log_r: torch.Tensor, A: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's min(r·A, clip(r, 1 − ε, 1 + ε)·A), and where its gradient was cut (the clip won, or |log r| > 20).

    The branch is chosen with `where`, not `torch.minimum`: minimum's backward sends 0 into the losing exp, and
    0·inf = NaN once log r is large; bounding log r to ±20 keeps the losing branch finite as well.
    """
    r = torch.exp(log_r.clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP))
    unclipped = r * A
    clipped = r.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A
    cut = clipped < unclipped
    return torch.where(cut, clipped, unclipped), cut | (log_r.detach().abs() > LOG_RATIO_CLIP)


def _check_shapes(logp: torch.Tensor, other_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if other_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, the reference logp {tuple(other_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got shape {tuple(advantages.shape)}")
