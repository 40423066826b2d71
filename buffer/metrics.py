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
