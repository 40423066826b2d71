"""The rollout scheduler on a real Redis buffer: rounds over fresh and replayed rollouts keep their constraints, a
fresh rollout never selected is committed once it leaves the window (nothing stays pending), a resumed scheduler
picks what an uninterrupted one picks, and the learner runs it from its config."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import redis
import torch

from longhaul.buffer.scheduler import RolloutScheduler, make_scorer
from longhaul.buffer.store import GROUP, Delivery, TrajectoryStore
from longhaul.config import BufferConfig, HistoryConfig, SchedulerConfig, StalenessConfig, load_config
from longhaul.synthetic import synthetic_trajectory

CONSUMER = "learner-0"
BATCH, GROUP_SIZE, GROUPS_PER_ROUND = 8, 4, 2


def buffer_config(rounds: int, max_times: int) -> BufferConfig:
    return BufferConfig(staleness=StalenessConfig(batch_size=BATCH, max_staleness=1000),
                        history=HistoryConfig(rounds=rounds, max_times_sampled=max_times))


def scheduler(store: TrajectoryStore, kind: str, top_p: float, seed: int = 0,
              selection: str = "arms") -> RolloutScheduler:
    config = SchedulerConfig(top_p=top_p, seed=seed, selection=selection)
    return RolloutScheduler(store, CONSUMER, make_scorer(kind, config), batch_size=BATCH, group_size=GROUP_SIZE,
                            config=config)


def arrive(store: TrajectoryStore, round_: int) -> dict[bytes, str]:
    """Two whole groups for round `round_`, their members interleaved; entry id → trajectory id."""
    appended = {}
    for member in range(GROUP_SIZE):
        for group in range(GROUPS_PER_ROUND):
            tid = f"r{round_}-g{group}-m{member}"
            trajectory = synthetic_trajectory(round_ * 100 + group * 10 + member, turns=2, tokens=64,
                                              trajectory_id=tid, group_id=f"r{round_}-g{group}")
            appended[store.append(trajectory)] = tid
    return appended


def pending_ids(client: redis.Redis, store: TrajectoryStore) -> set[bytes]:
    return {p["message_id"] for p in client.xpending_range(store.keys.stream, GROUP, min="-", max="+", count=10_000)}


def checkpointed(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("commit_every", [1, 3])
@pytest.mark.parametrize("kind", ["uniform", "bandit"])
def test_rounds_keep_top_p_per_group_batch_size_and_max_times_sampled_exactly(make_store, kind, commit_every):
    max_times = 3
    store = make_store(buffer_config(rounds=4, max_times=max_times))
    sampler = scheduler(store, kind, top_p=0.5)
    uses: Counter[str] = Counter()
    uncommitted: list[Delivery] = []
    for step in range(1, 15):
        arrive(store, step)
        batch = sampler.next_batch(learner_version=step - 1, timeout_s=5)
        ids = [d.trajectory_id for d in batch]
        assert len(set(ids)) == len(ids)
        # A group has 4 members: at most ceil(0.5 · 4) = 2 of them in any round.
        assert max(Counter(d.trajectory.group_id for d in batch).values()) <= 2, f"step {step}"
        # Round 1 has 2 groups: 2 + 2 picks. From round 2 on, committed every step, the last round's groups are
        # whole again (2 held + 2 in the history): 4 groups of 4 candidates allow 8, exactly a batch. Committed
        # every 3 steps, the history lags and a round may find fewer (the new groups' 4 at least).
        if commit_every == 1:
            assert len(batch) == (4 if step == 1 else BATCH), f"step {step}"
        else:
            assert 4 <= len(batch) <= BATCH, f"step {step}"
        assert {d.source for d in batch} <= {"new", "replay"}
        uses.update(ids)
        uncommitted += batch + sampler.take_retired()
        if step % commit_every == 0:  # as the learner commits: with its checkpoint
            store.commit(CONSUMER, step, uncommitted)
            uncommitted = []
    assert max(uses.values()) == max_times  # reached ...
    assert all(n <= max_times for n in uses.values())  # ... and never exceeded, commit lag or not
    assert sampler.counters["replay"] > 0 and sampler.counters["fresh"] > 0


@pytest.mark.parametrize("kind", ["uniform", "bandit"])
def test_whole_group_selection_delivers_every_member_of_each_group_it_picks(make_store, kind):
    store = make_store(buffer_config(rounds=4, max_times=2))
    sampler = scheduler(store, kind, top_p=1.0, selection="groups")
    sources: Counter[str] = Counter()
    for step in range(1, 12):
        arrive(store, step)
        batch = sampler.next_batch(learner_version=step - 1, timeout_s=5)
        # Two fresh groups of four a round, and the history's: always two whole groups, a batch.
        assert sorted(Counter(d.trajectory.group_id for d in batch).values()) == [GROUP_SIZE, GROUP_SIZE], step
        sources.update(d.source for d in batch)
        store.commit(CONSUMER, step, batch + sampler.take_retired())
    assert sources["new"] > 0 and sources["replay"] > 0


@pytest.mark.parametrize("rounds", [0, 2])
def test_an_unselected_fresh_rollout_is_committed_once_older_than_the_window_and_none_stays_pending(
        make_store, redis_client, rounds):
    store = make_store(buffer_config(rounds=rounds, max_times=2))
    sampler = scheduler(store, "bandit", top_p=0.25)  # one of each group of four per round: most wait, then retire
    arrived_in: dict[bytes, int] = {}
    retired = 0
    for step in range(1, 9):
        arrived_in |= dict.fromkeys(arrive(store, step), step)
        batch = sampler.next_batch(learner_version=step - 1, timeout_s=5)
        leaving = sampler.take_retired()
        retired += len(leaving)
        assert all(step - arrived_in[d.entry_id] >= max(rounds, 1) for d in leaving), f"step {step}"
        store.commit(CONSUMER, step, batch + leaving)
        pending = pending_ids(redis_client, store)
        # Exactly the fresh candidates the scheduler still holds are pending, all from the last L rounds.
        assert len(pending) == sampler.held, f"step {step}"
        assert all(step - arrived_in[eid] < max(rounds, 1) for eid in pending), f"step {step}"
        stats = store.stats()
        assert stats.counters["committed"] + stats.pending == len(arrived_in)  # nothing read is lost
        assert stats.undelivered == 0
    assert retired > 0
    assert store.stats().counters.get("duplicates", 0) == 0


@pytest.mark.parametrize("kind", ["uniform", "bandit"])
def test_a_resumed_scheduler_picks_what_an_uninterrupted_one_picks(redis_client, kind):
    config = buffer_config(rounds=3, max_times=3)
    runs = {name: TrajectoryStore(redis_client, f"scheduler-resume-{kind}-{name}-{id(config)}", config)
            for name in ("uninterrupted", "resumed")}
    picks: dict[str, list[list[str]]] = {name: [] for name in runs}
    samplers = {name: scheduler(store, kind, top_p=0.5, seed=5) for name, store in runs.items()}
    for step in range(1, 13):
        if step == 7:  # the learner restarts from the checkpoint of step 6 with a fresh process
            state = checkpointed(samplers["resumed"].state_dict())
            samplers["resumed"] = scheduler(runs["resumed"], kind, top_p=0.5, seed=123)
            samplers["resumed"].load_state_dict(state)
        for name, store in runs.items():
            arrive(store, step)
            batch = samplers[name].next_batch(learner_version=step - 1, timeout_s=5)
            picks[name].append([d.trajectory_id for d in batch])
            store.commit(CONSUMER, step, batch + samplers[name].take_retired())
    assert picks["resumed"] == picks["uninterrupted"]
    # A real test: after the restart, rollouts that arrived before it (held candidates, the history) are picked.
    assert any(int(tid.split("-")[0][1:]) <= 6 for tid in picks["resumed"][6] + picks["resumed"][7])


def test_a_checkpoint_of_another_sampler_kind_is_refused(make_store):
    sampler = scheduler(make_store(buffer_config(rounds=2, max_times=2)), "bandit", top_p=0.5)
    with pytest.raises(ValueError, match="checkpoint holds a 'fifo' sampler's state; this learner runs 'bandit'"):
        sampler.load_state_dict({"kind": "fifo", "batch_size": BATCH, "group_size": GROUP_SIZE})


def test_the_learner_trains_with_the_configured_bandit_and_resumes_its_state(tiny_model_dir, make_store, tmp_path):
    from transformers import AutoModelForCausalLM

    from longhaul.learner.trainer import Learner
    from longhaul.synthetic import policy_trajectories

    config = load_config(None, [f"learner.checkpoint_dir={tmp_path}", "learner.sampler=bandit",
                                "learner.checkpoint_every=1", f"buffer.staleness.batch_size={BATCH}",
                                "buffer.staleness.max_staleness=100", "buffer.history.rounds=2",
                                "buffer.history.max_times_sampled=2", "buffer.scheduler.top_p=0.5"])
    store = make_store(config.buffer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trajectories = policy_trajectories(model, count=5 * BATCH, group_size=GROUP_SIZE, seed=4)
    learner = Learner(config, tiny_model_dir, store)
    assert isinstance(learner.sampler, RolloutScheduler) and learner.sampler.kind == "bandit"
    trained: list[str] = []
    for step in range(4):
        for trajectory in trajectories[step * BATCH:(step + 1) * BATCH]:
            store.append(trajectory)
        record = learner.train_step(timeout_s=10)
        assert record is not None and record["step"] == step + 1
        trained += record["trajectory_ids"]
    assert learner.sampler.counters["replay"] > 0  # history picks reached training
    assert len(trained) == 4 + 3 * BATCH  # round 1: half of each of its two groups; then full batches
    state = learner.sampler.state_dict()
    assert learner.step % config.learner.checkpoint_every == 0  # the checkpoint of step 4 committed everything
    assert store.stats().pending == learner.sampler.held

    resumed = Learner(config, tiny_model_dir, store)
    assert resumed.step == 4
    assert resumed.sampler.round == state["round"] == 4
    assert resumed.sampler.counters == state["counters"]
    for trajectory in trajectories[4 * BATCH:]:
        store.append(trajectory)
    assert resumed.train_step(timeout_s=10)["step"] == 5
    fifo = load_config(None, [f"learner.checkpoint_dir={tmp_path}"])  # the same checkpoints, the default sampler
    with pytest.raises(ValueError, match="'bandit' sampler's state; this learner runs 'fifo'"):
        Learner(fifo, tiny_model_dir, make_store(fifo.buffer))
    assert math.isfinite(record["loss"])
