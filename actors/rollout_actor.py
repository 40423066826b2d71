"""The rollout actor: keeps its engine saturated with episodes and ships every finished one to the buffer.

Episodes come in groups: `group_size` samples of one task share a group_id, which group-relative advantages need.
Before a group starts, the actor asks the buffer's staleness admission rule for all of its episodes at once, so a
group is never half admitted; the admissions are held in its name until its trajectories land, so the driver can
return those of an actor that dies. A refusal means the learner is behind: the actor waits and asks again, and the
episodes already running continue. An episode that raises (not a tool failure, which the agent loop turns into an
observation, but a bug or an engine death) returns its admission, is counted, and does not stop the others.

The buffer client is synchronous (redis-py); its calls run on worker threads so that the event loop keeps serving
the other episodes while Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid

from longhaul.actors import metrics
from longhaul.actors.agent_loop import ChatFormat, run_episode
from longhaul.actors.engine import InferenceEngine
from longhaul.actors.tool_service import TaskInfo, ToolClient
from longhaul.buffer.store import TrajectoryStore
from longhaul.config import ActorConfig, AgentConfig

log = logging.getLogger(__name__)


class RolloutActor:
    """Runs groups of episodes on one engine until stopped. One per engine."""

    def __init__(self, actor_id: str, *, engine: InferenceEngine, tools: ToolClient, chat: ChatFormat,
                 store: TrajectoryStore, tasks: list[TaskInfo], agent: AgentConfig, config: ActorConfig,
                 seed: int = 0):
        if not tasks:
            raise ValueError(f"actor {actor_id}: no tasks to draw from (split {config.split!r} is empty)")
        self.actor_id = actor_id
        self._engine, self._tools, self._chat, self._store = engine, tools, chat, store
        self._agent, self.config = agent, config
        self._weights = [config.hop_weights.get(t.hops, 0.0) for t in tasks] if config.hop_weights else None
        if self._weights is not None and not any(w > 0 for w in self._weights):
            raise ValueError(f"actor {actor_id}: actor.hop_weights={config.hop_weights} gives no task of split "
                             f"{config.split!r} a positive weight")
        if config.tasks is not None:
            drawable = sorted((i for i in range(len(tasks)) if self._weights is None or self._weights[i] > 0),
                              key=lambda i: tasks[i].task_id)[:config.tasks]
            tasks = [tasks[i] for i in drawable]
            self._weights = [self._weights[i] for i in drawable] if self._weights is not None else None
        self._tasks = tasks
        self._rng = random.Random(seed)
        self.appended = 0
        """Trajectories this actor has appended to the buffer."""

    async def run(self, stop: asyncio.Event) -> None:
        """Start groups while there is room and admission allows, until `stop` is set; then let the groups in
        flight finish (drain) and return."""
        groups: set[asyncio.Task] = set()
        max_groups = self.config.episodes_in_flight // self.config.group_size
        try:
            while not stop.is_set():
                if len(groups) >= max_groups:
                    await asyncio.wait(groups, return_when=asyncio.FIRST_COMPLETED)
                    groups = {g for g in groups if not g.done() or self._raise_if_failed(g)}
                    continue
                if not await self._admit(stop):
                    break
                groups.add(asyncio.create_task(self._play_group(self._draw())))
                groups = {g for g in groups if not g.done() or self._raise_if_failed(g)}
        finally:
            if groups:
                await asyncio.gather(*groups)

    def _draw(self) -> TaskInfo:
        if self._weights is None:
            return self._rng.choice(self._tasks)
        return self._rng.choices(self._tasks, self._weights)[0]

    async def _admit(self, stop: asyncio.Event) -> bool:
        """Wait until the admission rule admits a whole group; False if stopped first."""
        started = time.perf_counter()
        while not stop.is_set():
            if await asyncio.to_thread(self._store.staleness.try_admit, self.config.group_size, self.actor_id):
                metrics.ADMISSION_WAIT.observe(time.perf_counter() - started)
                return True
            with contextlib.suppress(TimeoutError):  # the usual outcome: time to ask again
                await asyncio.wait_for(stop.wait(), timeout=self.config.admission_poll_s)
        return False

    async def _play_group(self, task: TaskInfo) -> None:
        group_id = uuid.uuid4().hex
        results = await asyncio.gather(*(self._play(task, group_id) for _ in range(self.config.group_size)),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # Admission counts episodes: give back the slots of those that produced no trajectory.
            await asyncio.to_thread(self._store.staleness.release, len(failed), self.actor_id)
            metrics.EPISODE_FAILURES.inc(len(failed))
            for error in failed:
                log.error("actor %s: an episode of task %s failed", self.actor_id, task.task_id, exc_info=error)

    async def _play(self, task: TaskInfo, group_id: str) -> None:
        with metrics.EPISODE_CLOCK.episode():  # the episode's slot is busy until its trajectory is in the buffer
            metrics.EPISODES_IN_FLIGHT.inc()
            try:
                trajectory = await run_episode(task, engine=self._engine, tools=self._tools, chat=self._chat,
                                               config=self._agent, group_id=group_id, actor_id=self.actor_id)
            finally:
                metrics.EPISODES_IN_FLIGHT.dec()
            await asyncio.to_thread(self._store.append, trajectory)
        self.appended += 1
        metrics.EPISODES.labels(trajectory.finish_reason).inc()
        metrics.GENERATED_TOKENS.inc(int(trajectory.loss_mask.sum()))
        metrics.EPISODE_TURNS.observe(trajectory.num_turns)
        metrics.EPISODE_TOOL_CALLS.observe(trajectory.num_tool_calls)

    @staticmethod
    def _raise_if_failed(group: asyncio.Task) -> bool:
        """A finished group task that raised is a bug in the actor itself (episode errors are caught per episode):
        fail loudly instead of silently losing the actor's capacity."""
        group.result()
        return False
