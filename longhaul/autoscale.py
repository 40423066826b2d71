"""The optional autoscaling policy: size the actor pool from the learner's waiting and the buffer's backlog.

Two signals say which side is the bottleneck:
- **learner wait share** — the part of the learner's recent wall time spent waiting for a batch. A learner that
  waits is starved: more actors would feed it.
- **buffer backlog** — trajectories appended but not yet delivered, in batches. A backlog means actors outpace
  the learner; the staleness rule already stops them from running far ahead, so extra actors only sit in admission.

The policy adds one actor when the learner waited more than `wait_share_up` of the window, removes one when the
backlog exceeds `backlog_batches_down` batches while the learner barely waited, and then holds still for
`cooldown_s` (a new vllm engine needs ~20 s on CPU before it changes anything). One actor per decision keeps it
from overshooting on a noisy signal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from longhaul.config import AutoscaleConfig


@dataclass(frozen=True, slots=True)
class Decision:
    target: int
    reason: str


class Autoscaler:
    """Feed it every step record (`observe`) and ask it between steps (`decide`)."""

    def __init__(self, config: AutoscaleConfig):
        self.config = config
        self._window: deque[tuple[float, float]] = deque(maxlen=config.window_steps)
        self._last_change = float("-inf")

    def observe(self, wait_seconds: float, step_seconds: float) -> None:
        self._window.append((wait_seconds, step_seconds))

    def wait_share(self) -> float:
        waited = sum(w for w, _ in self._window)
        total = waited + sum(s for _, s in self._window)
        return waited / total if total > 0 else 0.0

    def decide(self, now: float, current: int, undelivered: int, batch_size: int) -> Decision | None:
        """A new actor target, or None to keep `current`."""
        config = self.config
        if len(self._window) < config.window_steps or now - self._last_change < config.cooldown_s:
            return None
        share, backlog = self.wait_share(), undelivered / batch_size
        decision = None
        if share > config.wait_share_up and current < config.max_actors:
            decision = Decision(current + 1, f"learner waited {share:.0%} of the last {len(self._window)} steps")
        elif backlog > config.backlog_batches_down and share < config.wait_share_down and current > config.min_actors:
            decision = Decision(current - 1, f"{backlog:.1f} batches undelivered while the learner waited {share:.0%}")
        if decision is not None:
            self._last_change = now
            self._window.clear()  # judge the new pool size on its own steps
        return decision
