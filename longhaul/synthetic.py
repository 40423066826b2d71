"""Synthetic trajectories of realistic shape: long multi-turn tool-use episodes, deterministic from a seed.

Used where a well-formed Trajectory is needed without an engine: `longhaul doctor`, the buffer benchmark, tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from longhaul.trajectory import Trajectory


def synthetic_trajectory(seed: int = 0, *, turns: int = 44, tokens: int = 33_000, version: int = 3,
                         trajectory_id: str | None = None, group_id: str | None = None,
                         actor_id: str = "actor-0") -> Trajectory:
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
        actor_id=actor_id,
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


def policy_trajectories(model, *, count: int, group_size: int, turns: int = 3, prompt_tokens: int = 16,
                        turn_tokens: int = 16, observation_tokens: int = 16, seed: int = 0,
                        version: int = 0, temperature: float = 1.0) -> list[Trajectory]:
    """Episodes sampled from a Hugging Face causal LM, with the exact behaviour logprobs of that model: training data
    for the learner without an inference engine (tests, `bench/learner.py`).

    Prompts and observations are random token ids (mask 0); each turn samples `turn_tokens` tokens from
    softmax(z / `temperature`), the distribution the behaviour logprobs are of.
    The reward is the share of generated tokens with an even id: a signal a policy can learn, with a known optimum
    (reward 1). Deterministic given the model's weights and `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    groups = count // group_size
    # Every episode is sampled in one batch; the members of a group share their prompt.
    ids = torch.randint(0, vocab, (groups, prompt_tokens), generator=generator).repeat_interleave(group_size, 0)
    mask = torch.zeros(len(ids), prompt_tokens, dtype=torch.uint8)
    offsets = []
    with torch.no_grad():
        # Incremental decoding with the model's KV cache: `pending` holds the ids the cache has not seen yet.
        cache, pending = None, ids
        for _ in range(turns):
            offsets.append(ids.shape[1])
            for _ in range(turn_tokens):
                out = model(input_ids=pending, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                pending = torch.multinomial(torch.softmax(out.logits[:, -1].float() / temperature, -1), 1,
                                            generator=generator)
                ids = torch.cat([ids, pending], dim=1)
            mask = torch.cat([mask, torch.ones(len(ids), turn_tokens, dtype=torch.uint8)], dim=1)
            observation = torch.randint(0, vocab, (len(ids), observation_tokens), generator=generator)
            ids = torch.cat([ids, observation], dim=1)
            pending = torch.cat([pending, observation], dim=1)
            mask = torch.cat([mask, torch.zeros(len(ids), observation_tokens, dtype=torch.uint8)], dim=1)
        logprobs = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float() / temperature, -1)
        logprobs = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    logprobs = torch.cat([torch.zeros(len(ids), 1), logprobs], dim=1) * mask
    trajectories = []
    for row in range(len(ids)):
        group, member = divmod(row, group_size)
        generated = ids[row][mask[row].bool()]
        trajectories.append(Trajectory(
            trajectory_id=f"policy-{seed}-{group}-{member}", task_id=f"task-{group}",
            group_id=f"policy-{seed}-{group}", actor_id="synthetic", env="synthetic",
            token_ids=ids[row].numpy().astype("<u4"), loss_mask=mask[row].numpy().astype("u1"),
            behavior_logprobs=logprobs[row].numpy().astype("<f4"),
            versions=np.where(mask[row].numpy() > 0, version, -1).astype("<i4"),
            turn_offsets=np.asarray([*offsets, ids.shape[1]], dtype="<u4"),
            reward=float((generated % 2 == 0).float().mean()), num_turns=turns, num_tool_calls=turns,
            finish_reason="max_turns", reward_parts={}, timings={}))
    return trajectories


def renamed_copies(trajectories: list[Trajectory], count: int) -> list[Trajectory]:
    """`count` trajectories cycling through `trajectories`, every copy under new trajectory and group ids: a buffer
    trains a trajectory id once, so a benchmark that runs more steps than it sampled episodes for fills them so."""
    rounds = -(-count // len(trajectories))
    return [dataclasses.replace(t, trajectory_id=f"{t.trajectory_id}-{copy}", group_id=f"{t.group_id}-{copy}")
            for copy in range(rounds) for t in trajectories][:count]
