"""Prometheus metrics of the learner (`longhaul_learner_*`, and `longhaul_weight_sync_seconds`)."""

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("longhaul_learner_steps", "Optimizer steps taken")
TOKENS = Counter("longhaul_learner_tokens", "Tokens scored by the learner (prompt and observations included)")
TRAINED_TOKENS = Counter("longhaul_learner_trained_tokens", "Generated tokens the loss trained on")
TRAJECTORIES = Counter("longhaul_learner_trajectories", "Trajectories trained on")
STEP_SECONDS = Histogram("longhaul_learner_step_seconds", "Wall time of one learner step (forward, backward, update)",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
BATCH_WAIT_SECONDS = Histogram("longhaul_learner_batch_wait_seconds", "Time the learner waited for a batch",
                               buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 30, 120))
POLICY_VERSION = Gauge("longhaul_learner_policy_version", "Version of the learner's current weights")
LOSS = Gauge("longhaul_learner_loss", "Loss of the last step")
GRAD_NORM = Gauge("longhaul_learner_grad_norm", "Gradient norm of the last step, before clipping")
LEARNING_RATE = Gauge("longhaul_learner_learning_rate", "Learning rate of the last step")
REWARD = Gauge("longhaul_learner_reward_mean", "Mean reward of the last step's batch")
ENTROPY = Gauge("longhaul_learner_entropy_mean", "Mean next-token entropy over the last step's generated tokens")
STALENESS = Gauge("longhaul_learner_staleness_mean", "Mean staleness (versions) of the last step's batch")
IMPORTANCE_WEIGHT = Gauge("longhaul_learner_importance_weight", "Importance weights of the last step", ["stat"])
CLIPPED_FRACTION = Gauge("longhaul_learner_clipped_fraction", "Share of trained tokens clipped or truncated")
MASKED_FRACTION = Gauge("longhaul_learner_masked_fraction", "Share of trained tokens the loss masked out")
PARTIAL_GROUPS = Counter("longhaul_learner_partial_groups",
                         "Groups trained with fewer than group_size members (a member never arrived)")
GRAMMAR_REFUSED = Counter("longhaul_learner_grammar_refused",
                          "Trajectories trained with weight 0: a generated token their turn's grammar does not admit")
CHECKPOINT_SECONDS = Histogram("longhaul_learner_checkpoint_seconds", "Time to write a checkpoint",
                               buckets=(0.1, 0.5, 1, 5, 10, 30, 120, 600))
WEIGHT_SYNC_SECONDS = Histogram("longhaul_weight_sync_seconds", "Time of one weight broadcast to the actors",
                                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120))
WEIGHT_SYNC_BYTES = Counter("longhaul_weight_sync_bytes", "Bytes broadcast to the actors")
