"""Group-relative advantages (DESIGN.md: Algorithms): each sample is scored against the other samples of its task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

ADVANTAGE_METHODS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards: torch.Tensor, group_ids: Sequence[str],
                     method: Literal["grpo", "drgrpo", "rloo"] = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """One advantage per sample, [N], from its reward and the rewards of the samples sharing its group id.

    grpo:   A_i = (r_i − mean_g) / (std_g + eps), std_g the unbiased sample std (n − 1 denominator, as torch and
            TRL compute it); a group of one has no spread to normalise by and gets 0.
    drgrpo: A_i = r_i − mean_g (Dr.GRPO drops the std, which biases towards groups that are nearly solved or unsolved).
    rloo:   A_i = r_i − mean_{j≠i} r_j, the leave-one-out baseline (= n/(n − 1)·(r_i − mean_g)); a group of one gets 0.

    A group whose rewards are all equal carries no signal and gets exactly 0 under every method (a float mean need
    not reproduce equal inputs bit for bit). Groups need not be contiguous. Computed in float64; the result has the
    dtype of `rewards` (float32 for integer rewards).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if len(group_ids) != len(rewards):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"unknown advantage method {method!r}; valid: {', '.join(ADVANTAGE_METHODS)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    if len(rewards) == 0:
        return torch.zeros(0, dtype=out_dtype, device=rewards.device)

    index_of: dict[str, int] = {}
    group = torch.tensor([index_of.setdefault(g, len(index_of)) for g in group_ids], device=rewards.device)
    num_groups = len(index_of)
    r = rewards.to(torch.float64)

    def per_group_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add(0, group, values)

    counts = per_group_sum(torch.ones_like(r))
    n = counts[group]
    centered = r - (per_group_sum(r) / counts)[group]
    # clamp: a group of one divides 0 by 1 rather than 0 by 0, so no NaN reaches even a gradient.
    n_minus_1 = (n - 1).clamp(min=1)
    if method == "drgrpo":
        advantages = centered
    elif method == "grpo":
        var = per_group_sum(centered.square())[group] / n_minus_1
        # var = 0 only in constant groups (zeroed below); sqrt'(0) = inf would put NaN in a gradient
        std = torch.where(var > 0, var, 1.0).sqrt()
        advantages = torch.where(n > 1, centered / (std + eps), 0.0)
    else:
        advantages = torch.where(n > 1, centered * n / n_minus_1, 0.0)

    lowest = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=r.device)
    highest = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=r.device)
    constant = (lowest.scatter_reduce(0, group, r, "amin") == highest.scatter_reduce(0, group, r, "amax"))[group]
    return torch.where(constant, 0.0, advantages).to(out_dtype)
