"""How the learner turns deliveries into training input: whole groups in FIFO order, micro-batches within a token
budget with per-token tensors aligned on predicted tokens, the learning-rate schedule, and checkpoints that exist
whole or not at all."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from longhaul.buffer.store import Delivery
from longhaul.config import BufferConfig, StalenessConfig
from longhaul.learner.batch import pack_micro_batches, policy_logprobs, token_logprobs
from longhaul.learner.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from longhaul.learner.sampler import FifoSampler
from longhaul.learner.trainer import lr_factor
from longhaul.synthetic import synthetic_trajectory


def _trajectory(seed: int, group: str, tokens: int = 64):
    return synthetic_trajectory(seed, turns=2, tokens=tokens, trajectory_id=f"t{seed}", group_id=group)


def _delivery(trajectory, weight: float = 1.0) -> Delivery:
    return Delivery(b"0-0", trajectory, "new", 0, weight)


def test_micro_batches_respect_the_token_budget_and_cover_every_sequence_once():
    lengths = [300, 40, 120, 120, 64, 500]
    deliveries = [_delivery(_trajectory(i, "g", tokens)) for i, tokens in enumerate(lengths)]
    micro = pack_micro_batches(deliveries, torch.arange(6, dtype=torch.float32), micro_batch_tokens=400)
    assert sorted(i for mb in micro for i in mb.indices) == list(range(6))
    for mb in micro:
        padded = mb.input_ids.shape[0] * mb.input_ids.shape[1]
        assert padded <= 400 or len(mb.indices) == 1  # only a sequence over the budget gets one of its own
        assert mb.advantages.tolist() == [float(i) for i in mb.indices]
    assert [mb.indices for mb in micro] == [[5], [0], [2, 3, 4], [1]]  # longest first, greedy: 3 × 120 ≤ 400


def test_a_length_multiple_rounds_every_micro_batch_up_to_it_within_the_token_budget():
    lengths = [300, 40, 120, 120, 64, 500]
    deliveries = [_delivery(_trajectory(i, "g", tokens)) for i, tokens in enumerate(lengths)]
    micro = pack_micro_batches(deliveries, torch.zeros(6), micro_batch_tokens=500, length_multiple=128)
    # Packed by the rounded length: 4 × 128 > 500, where 4 rows of 120 would have fitted.
    assert [(mb.indices, tuple(mb.input_ids.shape)) for mb in micro] == [
        ([5], (1, 512)), ([0], (1, 384)), ([2, 3, 4], (3, 128)), ([1], (1, 128))]
    for mb in micro:
        assert mb.attention_mask.sum(1).tolist() == [lengths[i] for i in mb.indices]  # padding is not a token
        for row, index in enumerate(mb.indices):
            assert not mb.loss_mask[row, lengths[index] - 1:].any() and not mb.input_ids[row, lengths[index]:].any()
    with pytest.raises(ValueError, match="length_multiple must be at least 1"):
        pack_micro_batches(deliveries, torch.zeros(6), micro_batch_tokens=500, length_multiple=0)


def test_per_token_tensors_align_on_the_predicted_token():
    trajectory = _trajectory(3, "g", tokens=50)
    [mb] = pack_micro_batches([_delivery(trajectory, weight=0.5)], torch.tensor([1.5]), micro_batch_tokens=10_000)
    assert mb.input_ids[0].tolist() == trajectory.token_ids.astype("int64").tolist()
    assert mb.loss_mask[0].tolist() == trajectory.loss_mask[1:].astype("float32").tolist()
    assert mb.behavior_logp[0].tolist() == trajectory.behavior_logprobs[1:].astype("float32").tolist()
    assert mb.sequence_weights.tolist() == [0.5]


def test_padding_is_masked_out_of_the_loss():
    short, long = _trajectory(1, "g", tokens=30), _trajectory(2, "g", tokens=60)
    [mb] = pack_micro_batches([_delivery(short), _delivery(long)], torch.zeros(2), micro_batch_tokens=10_000)
    assert mb.indices == [1, 0]
    assert mb.attention_mask[1].tolist() == [1] * 30 + [0] * 30
    assert mb.loss_mask[1, 29:].sum() == 0


def test_token_logprobs_equal_a_log_softmax_gather_and_entropy_is_exact():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 11, generator=generator)
    targets = torch.randint(0, 11, (9,), generator=generator)
    logp, entropy = token_logprobs(logits, targets)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))


def test_without_entropy_the_log_probs_are_the_same_and_no_entropy_is_computed():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 11, generator=generator)
    targets = torch.randint(0, 11, (9,), generator=generator)
    allowed = torch.rand(3, 11, generator=generator) < 0.5
    allowed[torch.arange(3), targets[[1, 4, 7]]] = True  # every sampled token is one its grammar admitted
    admitted = (torch.tensor([1, 4, 7]), allowed)

    logp, entropy = token_logprobs(logits, targets, admitted, with_entropy=False)

    torch.testing.assert_close(logp, token_logprobs(logits, targets, admitted)[0], rtol=0, atol=0)
    assert entropy is None


def test_policy_logprobs_score_exactly_the_trained_tokens_with_the_gradient_of_a_full_forward_pass():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True))
    trajectories = [_trajectory(i, "g", tokens) for i, tokens in enumerate([40, 25])]
    trajectories = [dataclasses.replace(t, token_ids=t.token_ids % 64) for t in trajectories]  # the model's vocabulary
    [mb] = pack_micro_batches([_delivery(t) for t in trajectories], torch.zeros(2), micro_batch_tokens=10_000)
    assert not mb.attention_mask[1].all()  # the shorter row is padded: scored with no mask, as if it were alone

    logp, entropy = policy_logprobs(model, mb)
    (logp * mb.loss_mask).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = torch.log_softmax(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1], -1)
    expected = full.gather(-1, mb.input_ids[:, 1:, None]).squeeze(-1) * mb.loss_mask
    expected.sum().backward()

    torch.testing.assert_close(logp, expected)
    trained = mb.loss_mask > 0
    torch.testing.assert_close(entropy[trained], -(full.exp() * full).sum(-1).detach()[trained])
    assert not entropy[~trained].any() and not logp[~trained].any()  # off the mask: 0, never computed
    for grad, parameter in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(grad, parameter.grad)


def test_fifo_sampler_hands_out_whole_groups_in_arrival_order(make_store):
    store = make_store(BufferConfig(staleness=StalenessConfig(batch_size=4, max_staleness=100)))
    # Groups a and b interleave; c is complete first but arrives last.
    order = [("a", 0), ("b", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5)]
    for group, seed in order:
        store.append(_trajectory(seed, group))
    sampler = FifoSampler(store, "learner", batch_size=4, group_size=2)
    first = sampler.next_batch(learner_version=0, timeout_s=5)
    assert [d.trajectory.trajectory_id for d in first] == ["t0", "t2", "t1", "t3"]
    assert sampler.next_batch(learner_version=0, timeout_s=0.3) is None  # c alone is half a batch
    assert sampler.held == 2


def test_fifo_sampler_releases_a_group_that_can_never_complete_after_its_wait(make_store):
    store = make_store(BufferConfig(staleness=StalenessConfig(batch_size=4, max_staleness=100)))
    store.append(_trajectory(0, "lonely"))
    sampler = FifoSampler(store, "learner", batch_size=4, group_size=4, group_wait_s=0.5)
    assert sampler.next_batch(learner_version=0, timeout_s=0.2) is None
    batch = sampler.next_batch(learner_version=0, timeout_s=2)
    assert [d.trajectory.trajectory_id for d in batch] == ["t0"]


def test_fifo_sampler_returns_unacknowledged_entries_first_after_a_restart(make_store):
    store = make_store(BufferConfig(staleness=StalenessConfig(batch_size=2, max_staleness=100)))
    for seed in range(4):
        store.append(_trajectory(seed, f"g{seed // 2}"))
    crashed = FifoSampler(store, "learner", batch_size=2, group_size=2)
    assert [d.trajectory.trajectory_id for d in crashed.next_batch(0, timeout_s=5)] == ["t0", "t1"]
    restarted = FifoSampler(store, "learner", batch_size=2, group_size=2)
    recovered = restarted.next_batch(0, timeout_s=5)
    assert [(d.trajectory.trajectory_id, d.source) for d in recovered] == [("t0", "recovered"), ("t1", "recovered")]


@pytest.mark.parametrize(("step", "expected"), [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.1), (9, 0.55)])
def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_a_tenth(step, expected):
    assert lr_factor(step, warmup_steps=4, total_steps=14, schedule="cosine") == pytest.approx(expected)


def test_a_checkpoint_is_complete_or_absent_and_only_the_newest_are_kept(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (tmp_path / "step-00000009.partial").mkdir()  # what a crash mid-save leaves behind
    assert latest_checkpoint(tmp_path) is None
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, step, model, {"step": step, "tensor": torch.ones(2)}, tokenizer_dir=tiny_model_dir,
                        keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006", "step-00000009"]
    newest = latest_checkpoint(tmp_path)
    assert newest.name == "step-00000009"
    assert load_trainer_state(newest)["step"] == 9
    reloaded = AutoModelForCausalLM.from_pretrained(newest / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(),
                                                 strict=True))
    assert (newest / "model" / "tokenizer.json").is_file()  # the engines load checkpoints as model directories


def test_replaced_fields_keep_a_trajectory_valid():
    # The benchmark copies sampled episodes under new ids; the copy must still pass the codec's checks.
    copy = dataclasses.replace(_trajectory(1, "g"), trajectory_id="t1-copy", group_id="g-copy")
    copy.validate()
