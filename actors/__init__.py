"""Rollout actors: the inference engine, the multi-turn agent loop, the simulated search environment, and the
worker side of weight sync. Never imports `longhaul.learner`; trajectories leave through `longhaul.buffer`."""
