"""core.fp8: DeepSeek's block format round-trips within E4M3's precision, blocks are independent,
partial blocks are handled, and dequantization is exactly values times the block's multiplier."""

from __future__ import annotations

import torch

from dsv3_export.core.fp8 import FP8_BLOCK, FP8_DTYPE, FP8_MAX, dequantize_blocks, quantize_blocks


def test_round_trip_and_scale_per_block():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    w[:128, :128] *= 100  # one loud block must not cost the others their precision
    q, s = quantize_blocks(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape and s.shape == (3, 2)
    assert torch.allclose(s, w.abs().unflatten(0, (-1,)).new_tensor(
        [[w[i:i + 128, j:j + 128].abs().max() / FP8_MAX for j in (0, 128)] for i in (0, 128, 256)]))
    back = dequantize_blocks(q, s)
    for i in range(0, 300, FP8_BLOCK):
        for j in range(0, 200, FP8_BLOCK):
            blk, got = w[i:i + 128, j:j + 128], back[i:i + 128, j:j + 128]
            assert ((got - blk).norm() / blk.norm()).item() < 0.05  # E4M3: 3 mantissa bits


def test_dequantize_is_values_times_the_block_multiplier():
    q = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -448.0]]).to(FP8_DTYPE)
    s = torch.tensor([[2.0, 3.0]])
    got = dequantize_blocks(q, s, (2, 2), dtype=torch.float64)
    want = torch.tensor([[2.0, -4.0, 1.5], [8.0, 0.5, -1344.0]], dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_stacked_experts_and_zero_blocks():
    w = torch.zeros(2, 128, 256)
    w[1, :, 128:] = 1.0
    q, s = quantize_blocks(w)
    assert s.shape == (2, 1, 2) and torch.isfinite(s).all()
    assert torch.equal(dequantize_blocks(q, s), w)
