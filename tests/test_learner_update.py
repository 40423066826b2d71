"""When the learner's optimizer steps: a batch without signal leaves the weights exactly where they are."""

from __future__ import annotations

import dataclasses

import torch

from longhaul.config import load_config

BATCH, GROUP_SIZE = 8, 4


def test_a_batch_whose_advantages_are_all_zero_is_a_step_without_an_update_even_after_one_with_signal(
        tiny_model_dir, make_store, tmp_path):
    from transformers import AutoModelForCausalLM

    from longhaul.learner.trainer import Learner
    from longhaul.synthetic import policy_trajectories

    config = load_config(None, [f"learner.checkpoint_dir={tmp_path}", f"buffer.staleness.batch_size={BATCH}",
                                f"actor.group_size={GROUP_SIZE}", "buffer.staleness.max_staleness=100"])
    store = make_store(config.buffer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_signal = policy_trajectories(model, count=BATCH, group_size=GROUP_SIZE, seed=1)
    assert len({t.reward for t in with_signal}) > 1
    # Same rewards within every group: GRPO advantages are all zero, and so is the gradient.
    without_signal = [dataclasses.replace(t, reward=0.25) for t in
                      policy_trajectories(model, count=BATCH, group_size=GROUP_SIZE, seed=2)]
    learner = Learner(config, tiny_model_dir, store)

    def weights() -> list[torch.Tensor]:
        return [p.detach().clone() for p in learner.model.parameters()]

    records = []
    for batch in (with_signal, without_signal):
        before = weights()
        for trajectory in batch:
            store.append(trajectory)
        records.append(learner.train_step(timeout_s=10))
        records[-1]["changed"] = any(not torch.equal(a, b) for a, b in zip(before, weights(), strict=True))

    assert [(r["step"], r["update"], r["changed"]) for r in records] == [
        (1, "applied", True), (2, "skipped: no signal", False)]
    assert records[0]["grad_norm"] > 0 and records[1]["grad_norm"] == 0.0
    assert learner.version == 2  # the version still advances: the step happened, its batch is committed
