"""longhaul: fully asynchronous reinforcement learning for long-horizon, tool-heavy LLM agents."""

__version__ = "0.1.0"
