"""Synthetic trajectories of realistic shape: long multi-turn tool-use episodes, deterministic from a seed.

Used where a well-formed Trajectory is needed without an engine: `longhaul doctor`, the buffer benchmark, tests."""

from __future__ import annotations

import numpy as np

from longhaul.trajectory import Trajectory


def synthetic_trajectory(seed: int = 0, *, turns: int = 44, tokens: int = 33_000, version: int = 3,
                         trajectory_id: str | None = None, group_id: str | None = None) -> Trajectory:
    """An episode of `turns` model turns, each a generation followed by a tool observation, `tokens` long in all.

    Generated spans carry negative logprobs and a policy version drifting from `version` - 2 up to `version`
    (tokens generated across weight updates); prompt and observations carry mask 0, logprob 0, version -1.
    """
    rng = np.random.default_rng(seed)
    prompt = max(16, tokens // (8 * turns))
    cuts = np.sort(rng.choice(np.arange(prompt + 1, tokens), size=turns - 1, replace=False))
    offsets = np.concatenate([[prompt], cuts, [tokens]]).astype("<u4")
    mask = np.zeros(tokens, dtype="u1")
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        generated = max(1, (end - start) // 3)  # the model's part of a turn; the rest is the tool observation
        mask[start:start + generated] = 1
    generated = mask.astype(bool)
    logprobs = np.zeros(tokens, dtype="<f4")
    logprobs[generated] = -rng.exponential(1.0, size=int(generated.sum())).astype("<f4")
    versions = np.full(tokens, -1, dtype="<i4")
    versions[generated] = np.minimum(version, np.maximum(0, version - 2 + np.arange(int(generated.sum())) // 4096))
    return Trajectory(
        trajectory_id=trajectory_id or f"traj-{seed}",
        task_id=f"task-{seed // 8}",
        group_id=group_id or f"group-{seed // 8}",
        actor_id="actor-0",
        env="search",
        token_ids=rng.integers(0, 151_000, size=tokens, dtype=np.uint32).astype("<u4"),
        loss_mask=mask,
        behavior_logprobs=logprobs,
        versions=versions,
        turn_offsets=offsets,
        reward=float(rng.random()),
        num_turns=turns,
        num_tool_calls=turns - 1,
        finish_reason="answer",
        reward_parts={"f1": float(rng.random()), "format": 1.0},
        timings={"generate_s": float(rng.random() * 30), "tool_s": float(rng.random() * 10)},
    )
