"""The elastic pool of rollout actors: started, health-checked, replaced, scaled, and kept in one weight-sync group.

The driver calls `reconcile` between learner steps; everything that changes the membership happens there, on the
driver's main thread, so that a change never races a weight sync. Each member moves through

    starting ──(engine up)──▶ joining ──(group re-formed, current weights received)──▶ running ──▶ draining ──▶ gone

- **Joining at a sync boundary.** A new actor starts its engine without generating. Once it is up, the learner
  re-forms the transfer group with every running and joining actor and sends the current weights; only then does the
  joiner begin episodes. It never samples with weights older than the group's.
- **Leaving.** A removed actor leaves the group at once (the group is re-formed without it) and finishes its
  episodes in flight with the weights it has; they land in the buffer like any other (the staleness filter judges
  them). After `drain_timeout_s` they are abandoned: the actor is killed and the admissions it held are returned.
- **Failure.** Every running actor is pinged every `health_interval_s`. One that is dead, or silent for
  `health_timeout_s`, is killed, the admissions of its unfinished episodes are returned (`StalenessGate.
  release_holder`), the group is re-formed without it, and a replacement starts. Trajectories it appended are in
  the buffer already; nothing acknowledged depends on an actor.

A sync can still meet a member that died after its last ping. The client pings every engine before pausing any
(`RayActorsClient.start_weight_update`), so such a sync fails before it touches an engine, and the next `reconcile`
finds the dead member. If re-forming the group fails (an engine stuck in a broken collective), every member of the
group is replaced: slower, but no engine is left half-updated.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import torch

from longhaul import metrics
from longhaul.config import LonghaulConfig

log = logging.getLogger(__name__)

MemberState = Literal["starting", "joining", "running", "draining"]


@dataclass
class Member:
    """One actor as the pool tracks it."""

    actor_id: str
    handle: Any
    state: MemberState
    since: float
    """When it entered `state` (monotonic)."""
    pending: Any = None
    """The call that ends this state: `start` while starting, `stop` while draining."""
    info: dict[str, Any] = field(default_factory=dict)
    """What `start` returned: workers, pid, metrics address."""
    ping: Any = None
    ping_sent: float = 0.0
    last_answer: float = 0.0


@dataclass
class PoolEvent:
    """What one `reconcile` changed, for the driver's log line."""

    started: list[str] = field(default_factory=list)
    joined: list[str] = field(default_factory=list)
    draining: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.started, self.joined, self.draining, self.removed, self.lost))

    def describe(self) -> str:
        parts = [f"{what} {', '.join(ids)}" for what, ids in (
            ("started", self.started), ("joined", self.joined), ("draining", self.draining),
            ("removed", self.removed), ("lost", self.lost)) if ids]
        return "; ".join(parts)


class ActorPool:
    """The run's rollout actors on Ray. Construct, `reconcile` between learner steps, `stop` at the end.

    `scale` and `members` may be called from other threads (the control plane); the rest from the driver's loop."""

    def __init__(self, config: LonghaulConfig, *, model_dir: Path, redis_url: str, tool_address: str, gate):
        from longhaul.actors.ray_actor import RolloutActorHost, config_for_ray

        self.config = config
        settings = config.train
        gpus = settings.actor_num_gpus
        gpus = (1 if torch.cuda.is_available() else 0) if gpus is None else gpus
        self._host_class = ray.remote(RolloutActorHost).options(num_cpus=settings.actor_num_cpus, num_gpus=gpus)
        self._host_args = (config_for_ray(config), str(model_dir), redis_url, tool_address)
        self._gate = gate
        self._lock = threading.Lock()
        self._members: list[Member] = []
        self._target = settings.actors
        self._next_index = 0
        self._group: list[str] = []
        """Actor ids in the learner's current transfer group, in rank order."""
        metrics.POOL_TARGET.set(self._target)

    # ---- the control plane's view (any thread) ------------------------------------------------------------------

    @property
    def target(self) -> int:
        return self._target

    def scale(self, actors: int) -> tuple[int, int]:
        """Ask for `actors` actors; they start or drain at the next `reconcile`. Returns (previous, new) targets."""
        with self._lock:
            previous, self._target = self._target, actors
        metrics.POOL_TARGET.set(actors)
        return previous, actors

    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members)

    def metrics_addresses(self) -> list[str]:
        return [m.info["metrics"] for m in self.members() if "metrics" in m.info]

    # ---- the driver's loop ----------------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> PoolEvent:
        """Start the configured actors; with `wait`, block until their engines are up (the run's bring-up)."""
        event = PoolEvent()
        self._grow(event)
        if wait:
            for member in self.members():
                ray.wait([member.pending], timeout=self.config.train.start_timeout_s)
        return event

    def reconcile(self, learner) -> PoolEvent:
        """Advance every member's state, replace the dead, follow the target, and re-form the learner's transfer
        group if its membership changed. Cheap when nothing changed (no blocking calls). `learner` is the driver's
        `RemoteLearner` (anything with its `connect_actors` and `disconnect_actors`)."""
        event = PoolEvent()
        now = time.monotonic()
        for member in self.members():
            if member.state == "starting":
                self._check_started(member, now, event)
            elif member.state == "running":
                self._check_health(member, now, event)
            elif member.state == "draining":
                self._check_drained(member, now, event)
        self._shrink(event)
        self._grow(event)
        wanted = [m.actor_id for m in self.members() if m.state in ("running", "joining")]
        if wanted != self._group:
            self._reform(learner, event)
        self._export()
        return event

    def check_now(self, learner) -> PoolEvent:
        """After a failed sync: ping every running member and wait for the answers, then reconcile."""
        for member in self.members():
            if member.state == "running":
                member.ping, member.ping_sent = member.handle.ping.remote(), time.monotonic()
        pings = [m.ping for m in self.members() if m.ping is not None]
        if pings:
            ray.wait(pings, num_returns=len(pings), timeout=self.config.train.health_timeout_s)
        return self.reconcile(learner)

    def begin_stop(self) -> None:
        """Have every running actor stop admitting groups and start draining, without waiting: `stop` waits. An
        evaluation asked of an actor before this still runs to its end on that actor's engine."""
        for member in self.members():
            if member.state == "running":
                member.state, member.since, member.pending = "draining", time.monotonic(), member.handle.stop.remote()

    def stop(self) -> int:
        """Drain every actor (episodes in flight finish and land in the buffer) and end them; returns the
        trajectories they appended in this session."""
        for member in self.members():
            if member.state in ("starting", "joining"):  # never generated: nothing to drain
                self._kill(member)
        members = self.members()
        stops = [m.pending if m.state == "draining" else m.handle.stop.remote() for m in members]
        appended = 0
        for member, ref in zip(members, stops, strict=True):
            try:
                appended += ray.get(ref, timeout=self.config.train.drain_timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as error:
                log.warning("%s did not drain cleanly (%s): its unfinished episodes are abandoned",
                            member.actor_id, error)
            self._remove(member)
        self._export()
        return appended

    # ---- transitions ------------------------------------------------------------------------------------------------

    def _grow(self, event: PoolEvent) -> None:
        with self._lock:
            missing = self._target - sum(m.state != "draining" for m in self._members)
        for _ in range(max(0, missing)):
            actor_id = f"actor-{self._next_index}"
            handle = self._host_class.remote(actor_id, *self._host_args, seed=self.config.learner.seed * 1000 +
                                             self._next_index)
            self._next_index += 1
            member = Member(actor_id, handle, "starting", time.monotonic(), pending=handle.start.remote(False))
            with self._lock:
                self._members.append(member)
            event.started.append(actor_id)
            metrics.POOL_SCALE_EVENTS.labels("up").inc()

    def _shrink(self, event: PoolEvent) -> None:
        with self._lock:
            active = [m for m in self._members if m.state != "draining"]
            excess = len(active) - self._target
        # The newest go first, and actors not yet generating before those that are.
        order = {"starting": 0, "joining": 1, "running": 2}
        for member in sorted(active, key=lambda m: (order[m.state], -m.since))[:max(0, excess)]:
            metrics.POOL_SCALE_EVENTS.labels("down").inc()
            if member.state == "running":
                member.state, member.since, member.pending = "draining", time.monotonic(), member.handle.stop.remote()
                event.draining.append(member.actor_id)
            else:
                self._kill(member)
                event.removed.append(member.actor_id)

    def _check_started(self, member: Member, now: float, event: PoolEvent) -> None:
        ready, _ = ray.wait([member.pending], timeout=0)
        if ready:
            try:
                member.info = ray.get(member.pending)
            except ray.exceptions.RayError as error:
                log.error("%s failed to start: %s", member.actor_id, error)
                self._lose(member, event)
                return
            member.state, member.since, member.pending = "joining", now, None
            member.last_answer = now
        elif now - member.since > self.config.train.start_timeout_s:
            log.error("%s has not started after %.0f s (can Ray place it? train.actor_num_cpus=%s, cluster: %s): "
                      "retrying", member.actor_id, now - member.since, self.config.train.actor_num_cpus,
                      ray.available_resources())
            self._lose(member, event)

    def _check_health(self, member: Member, now: float, event: PoolEvent) -> None:
        settings = self.config.train
        if member.ping is not None:
            ready, _ = ray.wait([member.ping], timeout=0)
            if ready:
                try:
                    ray.get(member.ping)
                    member.last_answer = now
                except ray.exceptions.RayError as error:
                    log.error("%s is dead: %s", member.actor_id, _first_line(error))
                    self._lose(member, event)
                    return
                member.ping = None
        if now - member.last_answer > settings.health_timeout_s:
            log.error("%s has not answered a health check for %.0f s: replacing it", member.actor_id,
                      now - member.last_answer)
            self._lose(member, event)
        elif member.ping is None and now - member.ping_sent >= settings.health_interval_s:
            member.ping, member.ping_sent = member.handle.ping.remote(), now

    def _check_drained(self, member: Member, now: float, event: PoolEvent) -> None:
        ready, _ = ray.wait([member.pending], timeout=0)
        if ready or now - member.since > self.config.train.drain_timeout_s:
            if not ready:
                log.warning("%s did not drain in %.0f s: its unfinished episodes are abandoned", member.actor_id,
                            self.config.train.drain_timeout_s)
            self._kill(member)
            event.removed.append(member.actor_id)

    def _reform(self, learner, event: PoolEvent) -> None:
        """Re-form the transfer group with the running and joining members and send them the current weights; then
        the joiners begin generating."""
        from longhaul.actors.engine import weight_transfer_backend
        from longhaul.actors.ray_actor import RayActorsClient

        group = [m for m in self.members() if m.state in ("running", "joining")]
        if not group:
            learner.disconnect_actors()
            self._group = []
            return
        timeout = self.config.train.sync_timeout_s
        client = RayActorsClient([m.handle for m in group], [m.info["workers"] for m in group], timeout_s=timeout,
                                 ping_timeout_s=self.config.train.health_timeout_s)
        try:
            learner.connect_actors(client, backend=weight_transfer_backend(self.config.engine),
                                   engine_dtype=self.config.engine.dtype, timeout_s=timeout)
        except Exception as error:  # noqa: BLE001 - any failure leaves engines in an unknown state: replace them all
            log.error("re-forming the weight-sync group failed (%s): replacing its %d actor(s)", error, len(group))
            learner.disconnect_actors()
            self._group = []
            for member in group:
                self._lose(member, event)
            return
        metrics.POOL_REFORMS.inc()
        self._group = [m.actor_id for m in group]
        for member in group:
            if member.state == "joining":
                member.handle.begin.remote()
                member.state, member.since = "running", time.monotonic()
                event.joined.append(member.actor_id)

    def _lose(self, member: Member, event: PoolEvent) -> None:
        """A member that died, hung or failed: kill it for sure and return what it held. `_grow` replaces it."""
        self._kill(member)
        metrics.POOL_RESTARTS.inc()
        event.lost.append(member.actor_id)

    def _kill(self, member: Member) -> None:
        with contextlib.suppress(ray.exceptions.RayError):  # already gone
            ray.kill(member.handle, no_restart=True)
        self._remove(member)

    def _remove(self, member: Member) -> None:
        # Its process is gone, so it appends nothing more: whatever admissions it still holds were for episodes that
        # will never land.
        released = self._gate.release_holder(member.actor_id)
        if released:
            log.warning("%s left %d unfinished episode(s); their admissions are returned", member.actor_id, released)
        with self._lock:
            self._members.remove(member)

    def _export(self) -> None:
        counts = {state: 0 for state in ("starting", "joining", "running", "draining")}
        for member in self.members():
            counts[member.state] += 1
        for state, count in counts.items():
            metrics.POOL_ACTORS.labels(state).set(count)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
