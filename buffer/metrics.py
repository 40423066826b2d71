"""Prometheus metrics of the buffer (`longhaul_buffer_*`), in the process that touches Redis.

Counters count what this process did; gauges mirror server-side state and are refreshed by `TrajectoryStore.stats()`.
"""

from prometheus_client import Counter, Gauge, Histogram

APPENDED = Counter("longhaul_buffer_appended", "Trajectories appended to the stream")
APPENDED_BYTES = Counter("longhaul_buffer_appended_bytes", "Payload bytes appended to the stream")
DELIVERED = Counter(
    "longhaul_buffer_delivered", "Entries handed to training, by source", ["source"]
)  # source: new | recovered (own pending after a restart) | reclaimed (from an idle consumer)
COMMITTED = Counter("longhaul_buffer_committed", "Fresh trajectories acknowledged after a committed step")
REPLAYED = Counter("longhaul_buffer_replayed", "Replayed (history) uses committed")
DUPLICATES = Counter(
    "longhaul_buffer_duplicates", "Entries whose trajectory_id was already trained on, acknowledged unused"
)
DEAD_LETTERS = Counter("longhaul_buffer_dead_letters", "Invalid entries moved to the dead-letter stream", ["field"])
STALE = Counter("longhaul_buffer_stale", "Trajectories older than max_staleness at train time", ["action"])
ADMISSION = Counter("longhaul_buffer_admission", "Episode admission decisions of the staleness rule", ["result"])
RATE_LIMITER_WAIT = Histogram(
    "longhaul_buffer_rate_limiter_wait_seconds", "Time spent blocked by the samples-per-insert limiter", ["side"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 30, 120),
)
RATE_LIMITER_TIMEOUTS = Counter(
    "longhaul_buffer_rate_limiter_timeouts", "Limiter waits that hit their timeout", ["side"]
)
OP_SECONDS = Histogram(
    "longhaul_buffer_op_seconds", "Latency of buffer operations", ["op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)

STREAM_LENGTH = Gauge("longhaul_buffer_stream_length", "Entries in the stream (undelivered + pending + history)")
PENDING = Gauge("longhaul_buffer_pending", "Entries delivered but not yet acknowledged")
LAG = Gauge("longhaul_buffer_undelivered", "Entries appended but not yet delivered to any consumer")
HISTORY_SIZE = Gauge("longhaul_buffer_history_size", "Trajectories eligible for replay")
DEAD_LETTER_LENGTH = Gauge("longhaul_buffer_dead_letter_length", "Entries in the dead-letter stream")
POLICY_VERSION = Gauge("longhaul_buffer_policy_version", "Policy version published in Redis")

STALENESS = Histogram(
    "longhaul_buffer_staleness_versions",
    "Staleness (learner version minus the trajectory's newest token version) of each trajectory judged at delivery",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32, 64, 128),
)  # every judged trajectory, dropped or down-weighted ones included: the tail is what an operator tunes against

# The rollout scheduler (`buffer/scheduler.py`, learner.sampler: uniform | bandit), in the learner's process.
SCHEDULER_SELECTED = Counter(
    "longhaul_scheduler_selected", "Trajectories the scheduler handed to training, by source", ["source"]
)  # source: fresh (never trained) | replay (from the history)
SCHEDULER_FRESH_SHARE = Gauge("longhaul_scheduler_fresh_share", "Share of fresh trajectories in the last selection")
SCHEDULER_REUSE = Histogram(
    "longhaul_scheduler_reuse_count", "Training uses of each selected trajectory, this one included",
    buckets=(1, 2, 3, 4, 6, 8, 16),
)
SCHEDULER_RETIRED = Counter(
    "longhaul_scheduler_retired",
    "Fresh trajectories never selected within the window (or too stale), committed untrained",
)
SCHEDULER_CANDIDATES = Gauge("longhaul_scheduler_candidates", "Arms (fresh and replayable) of the last round")
SCHEDULER_PREDICTED_REWARD = Gauge(
    "longhaul_scheduler_predicted_reward", "Selection reward the scorer predicted for the last selection rewarded"
)
SCHEDULER_REALISED_REWARD = Gauge(
    "longhaul_scheduler_realised_reward", "Selection reward R realised one round later by the last selection rewarded"
)
SCHEDULER_LOSS = Gauge("longhaul_scheduler_scorer_loss", "Squared error of the scorer on its window after its last fit")
SCHEDULER_SELECT_SECONDS = Histogram(
    "longhaul_scheduler_select_seconds", "Time to build the contexts, score and select one round",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
