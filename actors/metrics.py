"""Prometheus metrics of the actors (`longhaul_actor_*`, `longhaul_episode_*`), in the actor's process."""

import contextlib
import itertools
import threading
import time

from prometheus_client import Counter, Gauge, Histogram

EPISODES = Counter("longhaul_actor_episodes", "Episodes finished, by finish reason", ["finish_reason"])
EPISODES_IN_FLIGHT = Gauge("longhaul_actor_episodes_in_flight", "Episodes running on this actor's engine")
GENERATED_TOKENS = Counter("longhaul_actor_generated_tokens", "Tokens sampled by the policy")
ADMISSION_WAIT = Histogram("longhaul_actor_admission_wait_seconds", "Time a group waited for the admission rule",
                           buckets=(0.01, 0.1, 0.5, 1, 5, 30, 120, 600))
EPISODE_TURNS = Histogram("longhaul_episode_turns", "Model turns per episode", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
EPISODE_TOOL_CALLS = Histogram("longhaul_episode_tool_calls", "Tool calls per episode",
                               buckets=(0, 1, 2, 4, 8, 16, 32, 40, 64, 128))
EPISODE_FAILURES = Counter("longhaul_actor_episode_failures", "Episodes that raised instead of finishing")


class _EpisodeClock:
    """Slot-seconds spent in episodes by this process: the durations of the finished ones plus the time so far of
    those running, read at scrape time. Its increase over a window, divided by the window times the actor's
    `episodes_in_flight`, is the share of episode slots that were busy; the rest is actor idle time (slots the
    admission rule kept empty while the learner was behind). Counting the running episodes' elapsed time makes the
    figure exact at any scrape, where a histogram of finished episodes would miss up to a whole episode per slot at
    each end of the window."""

    def __init__(self) -> None:
        self._finished = 0.0
        self._running: dict[int, float] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count()

    @contextlib.contextmanager
    def episode(self):
        """Time one episode (observed into `EPISODE_SECONDS` when it ends, raised or not)."""
        key, started = next(self._keys), time.monotonic()
        with self._lock:
            self._running[key] = started
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            with self._lock:
                del self._running[key]
                self._finished += seconds
            EPISODE_SECONDS.observe(seconds)

    def busy_seconds(self) -> float:
        now = time.monotonic()
        with self._lock:
            return self._finished + sum(now - started for started in self._running.values())


EPISODE_SECONDS = Histogram("longhaul_actor_episode_seconds", "Wall time of an episode, first turn to appended",
                            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 600))
EPISODE_CLOCK = _EpisodeClock()
EPISODE_BUSY_SECONDS = Gauge("longhaul_actor_episode_busy_seconds", "Slot-seconds spent in episodes (finished ones, "
                             "plus the time so far of those running); rises by episodes_in_flight per second when "
                             "every slot is busy")
EPISODE_BUSY_SECONDS.set_function(EPISODE_CLOCK.busy_seconds)
