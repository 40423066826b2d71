"""bm25s, imported so that it leaves the GPU alone.

bm25s runs a jax top-k on a throwaway array when it is imported and jax is installed. On a GPU machine that starts
jax's CUDA backend, which takes 75 % of the GPU's memory before a vLLM engine in the same process can start (seen on
an H200: docs/benchmarks.md, "Actors", 2026-12-04). longhaul ranks with numpy and never calls jax, so jax is kept
on the CPU unless the user chose otherwise. Every import of bm25s goes through here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bm25s  # noqa: E402
from bm25s.stopwords import STOPWORDS_EN  # noqa: E402

__all__ = ["STOPWORDS_EN", "bm25s"]
