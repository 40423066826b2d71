"""What the learner trains on next: the sampler interface, FIFO over whole groups, and the factory that builds the
configured sampler (FIFO here; uniform and the contextual bandit are rounds of `buffer/scheduler.py`).

A step trains on whole groups (the `group_size` samples of one task), because group advantages compare the samples of
a group with each other. Trajectories arrive one by one and the members of a group may be interleaved with other
groups', so the sampler holds members back until their group is complete (`GroupAssembler`). A group that can never
complete (a member was dropped as over-stale or dead-lettered) is released with the members it has once it has
waited `group_wait_s`, and counted.

Everything the sampler holds is also pending in the buffer under the learner's consumer name, so a restarted
learner gets it back through `recover`, in stream order, and FIFO batching is a function of that order alone: a
resumed learner forms exactly the batches the crashed one would have.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from longhaul.buffer.scheduler import GroupAssembler, RolloutScheduler, make_scorer
from longhaul.buffer.store import Delivery, TrajectoryStore
from longhaul.config import LonghaulConfig
from longhaul.learner import metrics


class Sampler(Protocol):
    """The learner's source of batches: `FifoSampler`, and `RolloutScheduler` (uniform or the contextual bandit)."""

    def next_batch(self, learner_version: int, timeout_s: float) -> list[Delivery] | None:
        """The next batch to train at `learner_version`, or None if none was ready within `timeout_s`."""

    def take_retired(self) -> list[Delivery]:
        """Deliveries read that will never be trained (a scheduler's unselected rollouts out of its window); the
        learner commits them with its current step, which acknowledges them. Emptied by the call."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume this sampler."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_sampler(config: LonghaulConfig, store: TrajectoryStore) -> Sampler:
    """The sampler `learner.sampler` names, reading as `learner.consumer`, `buffer.staleness.batch_size` per batch."""
    batch_size, group_size = config.buffer.staleness.batch_size, config.actor.group_size
    if config.learner.sampler == "fifo":
        return FifoSampler(store, config.learner.consumer, batch_size=batch_size, group_size=group_size)
    scheduler = config.buffer.scheduler
    return RolloutScheduler(store, config.learner.consumer, make_scorer(config.learner.sampler, scheduler),
                            batch_size=batch_size, group_size=group_size, config=scheduler,
                            commit_every=config.learner.checkpoint_every)


class FifoSampler:
    """Whole groups in the order their first member arrived, `batch_size` trajectories per batch."""

    def __init__(self, store: TrajectoryStore, consumer: str, *, batch_size: int, group_size: int,
                 group_wait_s: float = 120.0):
        if batch_size % group_size:
            raise ValueError(f"batch_size={batch_size} must be a multiple of group_size={group_size}")
        self._store = store
        self._consumer = consumer
        self.batch_size = batch_size
        self.group_size = group_size
        self.group_wait_s = group_wait_s
        self._pending = GroupAssembler(group_size, group_wait_s)
        self._recovered = False

    def next_batch(self, learner_version: int, timeout_s: float) -> list[Delivery] | None:
        if not self._recovered:
            # Entries this consumer read but never committed before a restart come first, in stream order.
            self._pending.add(self._store.recover(self._consumer, max_count=1 << 20, learner_version=learner_version))
            self._recovered = True
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self._take()
            if batch is not None:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            block_ms = max(1, int(min(remaining, 1.0) * 1000))
            self._pending.add(self._store.read(self._consumer, self.batch_size, block_ms=block_ms,
                                               learner_version=learner_version))

    def take_retired(self) -> list[Delivery]:
        return []  # FIFO hands out everything it reads

    def _take(self) -> list[Delivery] | None:
        chosen: list[str] = []
        size = 0
        for group, members in self._pending.groups.items():
            if not self._pending.ready(group):
                continue
            if size + len(members) > self.batch_size:
                break
            chosen.append(group)
            size += len(members)
            if size == self.batch_size:
                break
        if size < self.batch_size and not self._includes_partial_group(chosen):
            return None
        batch: list[Delivery] = []
        for group in chosen:
            members = self._pending.pop(group)
            if len(members) < self.group_size:
                metrics.PARTIAL_GROUPS.inc()
            batch += members
        return batch or None

    def _includes_partial_group(self, chosen: list[str]) -> bool:
        """A short batch is released only when a partial group in it has waited out `group_wait_s`: otherwise
        waiting for more complete groups gives the learner the batch size it was configured with."""
        return any(len(self._pending.groups[g]) < self.group_size for g in chosen)

    @property
    def held(self) -> int:
        """Trajectories read but not yet handed out (members of incomplete groups)."""
        return self._pending.held

    def state_dict(self) -> dict[str, Any]:
        # The held members need no saving: they are pending in the buffer and come back through `recover`.
        return {"kind": "fifo", "batch_size": self.batch_size, "group_size": self.group_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "fifo":
            raise ValueError(f"checkpoint holds a {state.get('kind')!r} sampler's state; this learner runs 'fifo'")
