"""When and how the learner's optimizer steps: a batch without signal leaves the weights exactly where they are, a
step's passes in bfloat16 (autocast) update the weights as float32 passes do, and the learner scores tokens at the
temperature the rollouts sampled them at."""

from __future__ import annotations

import dataclasses

import pytest
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


def test_a_step_with_bfloat16_passes_moves_the_float32_weights_as_a_float32_step_does(
        tiny_model_dir, redis_client, run_name, tmp_path):
    from transformers import AutoModelForCausalLM

    from longhaul.buffer.store import TrajectoryStore
    from longhaul.learner.trainer import Learner
    from longhaul.synthetic import policy_trajectories

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = policy_trajectories(model, count=BATCH, group_size=GROUP_SIZE, seed=1)
    initial = [p.detach().clone() for p in model.parameters()]
    records, updates = {}, {}
    for dtype in ("float32", "bfloat16"):
        config = load_config(None, [f"learner.checkpoint_dir={tmp_path / dtype}", f"learner.compute_dtype={dtype}",
                                    f"buffer.staleness.batch_size={BATCH}", f"actor.group_size={GROUP_SIZE}",
                                    "buffer.staleness.max_staleness=100"])
        store = TrajectoryStore(redis_client, f"{run_name}-{dtype}", config.buffer)
        for trajectory in batch:
            store.append(trajectory)
        learner = Learner(config, tiny_model_dir, store)
        assert learner.compute_dtype == getattr(torch, dtype)
        records[dtype] = learner.train_step(timeout_s=10)
        assert all(p.dtype == torch.float32 for p in learner.model.parameters())  # autocast: weights stay float32
        updates[dtype] = torch.cat([(p.detach() - p0).flatten()
                                    for p, p0 in zip(learner.model.parameters(), initial, strict=True)])

    fp32, bf16 = records["float32"], records["bfloat16"]
    assert fp32["update"] == bf16["update"] == "applied"
    # bf16 micro-batches are padded to 256-token lengths; the padding is no token, trained or scored.
    assert (bf16["tokens"], bf16["trained_tokens"]) == (fp32["tokens"], fp32["trained_tokens"])
    # The loss itself is a sum of advantages that cancel within each group (its value is mostly rounding): the
    # comparison is of what it does. The behaviour log-probs are float32 passes of the same weights, so the float32
    # step's importance weights are 1 and the bf16 step's within 1 % of it.
    assert fp32["importance"]["weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert fp32["importance"]["weight_max"] == pytest.approx(1.0, abs=1e-4)
    assert 0.99 < bf16["importance"]["weight_mean"] < 1.01 and bf16["importance"]["weight_max"] < 1.01
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)
    assert torch.nn.functional.cosine_similarity(updates["bfloat16"], updates["float32"], dim=0) > 0.99


def test_the_learner_scores_at_the_rollouts_temperature_so_fresh_episodes_have_importance_weight_one(
        tiny_model_dir, redis_client, run_name, tmp_path):
    from transformers import AutoModelForCausalLM

    from longhaul.buffer.store import TrajectoryStore
    from longhaul.learner.trainer import Learner
    from longhaul.synthetic import policy_trajectories

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = policy_trajectories(model, count=BATCH, group_size=GROUP_SIZE, seed=1, temperature=0.25)
    importance = {}
    for temperature in (0.25, 1.0):  # the rollouts' temperature, and one the learner would wrongly assume
        config = load_config(None, [f"learner.checkpoint_dir={tmp_path / str(temperature)}",
                                    f"agent.temperature={temperature}", "learner.compute_dtype=float32",
                                    f"buffer.staleness.batch_size={BATCH}", f"actor.group_size={GROUP_SIZE}",
                                    "buffer.staleness.max_staleness=100"])
        store = TrajectoryStore(redis_client, f"{run_name}-{temperature}", config.buffer)
        for trajectory in batch:
            store.append(trajectory)
        importance[temperature] = Learner(config, tiny_model_dir, store).train_step(timeout_s=10)["importance"]

    # Same weights as the behaviour policy: every sequence weight is exactly 1 when π and μ are the same distribution.
    assert importance[0.25]["weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert importance[0.25]["weight_max"] == pytest.approx(1.0, abs=1e-4)
    # Scored untempered, the same fresh episodes look far off-policy.
    assert abs(importance[1.0]["weight_mean"] - 1.0) > 0.1
