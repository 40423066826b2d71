"""The learner: off-policy losses and advantages, the training loop, the weight broadcaster and checkpoints.
Never imports `longhaul.actors`; trajectories arrive through `longhaul.buffer`."""
