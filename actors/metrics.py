"""Prometheus metrics of the actors (`longhaul_actor_*`, `longhaul_episode_*`), in the actor's process."""

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
