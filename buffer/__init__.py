"""The replay buffer on Redis Streams: trajectory store, embedded Redis, staleness admission and filtering,
samples-per-insert rate limiting and the replay history. Imports neither `longhaul.actors` nor `longhaul.learner`."""
