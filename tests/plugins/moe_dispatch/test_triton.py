"""Triton MoEDispatch (plugins/moe_dispatch/triton.py) against the torch reference.

Without a CUDA GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
set here before triton is imported); with one they run natively. The reference
runs in float64 on the inputs as rounded to the tested dtype (FP8: on the
dequantized weights). Tolerance, absolute and relative, scaled by max|y|:
fp32 1e-5, fp16 3e-3, bf16 2e-2 (the kernel rounds SiLU(gate)*up to x's dtype
before the down projection, as a bf16 GEMM chain does).
"""

import os

import pytest
import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dsv3_export.core.fp8 import dequantize_blocks  # noqa: E402
from dsv3_export.plugins.moe_dispatch import triton as moe_triton  # noqa: E402
from dsv3_export.plugins.moe_dispatch.reference import moe_dispatch as reference  # noqa: E402

DEVICE = "cuda" if _GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EXAMPLES = int(os.environ.get("DSV3_HYPOTHESIS_EXAMPLES", 10))


def make(n, k, e, d, inter, dtype, seed=0, experts=None, replace=False):
    """Random routing over `experts` (default: all E): distinct experts per token
    unless replace=True."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(e) if experts is None else torch.as_tensor(experts)
    if replace:
        idx = pool[torch.randint(len(pool), (n, k), generator=g)]
    else:
        idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(n)]) if n else \
            torch.zeros(0, k, dtype=torch.int64)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = torch.rand(n, k, generator=g).to(dtype)
    w_gate_up = (torch.randn(e, 2 * inter, d, generator=g) / d ** 0.5)
    w_down = (torch.randn(e, d, inter, generator=g) / inter ** 0.5)
    return x, idx, w, w_gate_up, w_down


def expected(x, idx, w, w_gate_up, w_down):
    return reference(x.double(), idx, w.double(), w_gate_up.double(), w_down.double())


def assert_close(got, want, dtype):
    tol = TOL[dtype] * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=TOL[dtype])


def run(x, idx, w, w_gate_up, w_down, *scales, **kw):
    dev = [t.to(DEVICE) if t is not None else None for t in (x, idx, w, w_gate_up, w_down, *scales)]
    y = moe_triton.moe_dispatch(*dev, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    return y


def check(n, k, e, d, inter, dtype, seed=0, **kw):
    x, idx, w, wgu, wd = make(n, k, e, d, inter, dtype, seed, **kw)
    wgu, wd = wgu.to(dtype), wd.to(dtype)
    assert_close(run(x, idx, w, wgu, wd), expected(x, idx, w, wgu, wd), dtype)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 9), k=st.integers(1, 3), extra_e=st.integers(0, 4), d=st.integers(8, 72),
    inter=st.integers(4, 40), dtype=st.sampled_from(DTYPES), replace=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, k, extra_e, d, inter, dtype, replace, seed):
    # D, I rarely multiples of the tiles; with E > k some experts get no token;
    # replace=True also routes a token twice to one expert (the math allows it).
    check(n, k, k + extra_e, d, inter, dtype, seed, replace=replace)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token(dtype):
    check(1, 2, 4, 32, 24, dtype, seed=1)


def test_experts_without_tokens():
    # 8 experts, every token routed to experts 2 and 5 only.
    check(6, 2, 8, 40, 24, torch.float32, seed=2, experts=[2, 5])


def test_topk_one_many_tokens_one_expert():
    # 40 slots on one expert: several row blocks of the same expert.
    check(40, 1, 3, 24, 16, torch.bfloat16, seed=3, experts=[1])


def test_block_m_does_not_change_the_result():
    x, idx, w, wgu, wd = make(7, 3, 5, 48, 40, torch.float32, seed=4)
    a = run(x, idx, w, wgu, wd)
    b = run(x, idx, w, wgu, wd, config=dict(gate_up=dict(BLOCK_M=32), down=dict(BLOCK_M=32)))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _fp8_case(n, k, e, d, inter, dtype, seed):
    x, idx, w, wgu, wd = make(n, k, e, d, inter, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # Scales of different sizes per block, so a wrong block lookup shows.
    s_gu = torch.rand(e, -(-2 * inter // 128), -(-d // 128), generator=g) + 0.5
    s_d = torch.rand(e, -(-d // 128), -(-inter // 128), generator=g) + 0.5
    q_gu, q_d = wgu.to(torch.float8_e4m3fn), wd.to(torch.float8_e4m3fn)
    y = run(x, idx, w, q_gu, q_d, s_gu, s_d)
    want = expected(x, idx, w, dequantize_blocks(q_gu, s_gu), dequantize_blocks(q_d, s_d))
    assert_close(y, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weights_partial_blocks(dtype):
    # D = 160 and I = 136: 2I = 272 rows -> 3 scale rows, the up half starts
    # inside a 128-block; last blocks partial in both directions.
    _fp8_case(3, 2, 3, 160, 136, dtype, seed=5)


def test_fp8_dequantize_blocks():
    w = torch.ones(1, 130, 129).to(torch.float8_e4m3fn)
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    deq = dequantize_blocks(w, s)
    assert deq[0, 0, 0] == 1 and deq[0, 0, 128] == 2 and deq[0, 129, 0] == 3 and deq[0, 129, 128] == 4


def test_fp8_needs_scales():
    x, idx, w, wgu, wd = make(2, 1, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        moe_triton.moe_dispatch(x, idx, w, wgu.to(torch.float8_e4m3fn), wd.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="128x128"):
        moe_triton.moe_dispatch(x, idx, w, wgu.to(torch.float8_e4m3fn), wd.to(torch.float8_e4m3fn),
                                torch.ones(2, 2, 1), torch.ones(2, 1, 1))


def test_no_tokens():
    x, idx, w, wgu, wd = make(0, 2, 3, 16, 8, torch.float32)
    assert run(x, idx, w, wgu, wd).shape == (0, 16)


def test_out_argument():
    x, idx, w, wgu, wd = make(3, 2, 3, 16, 8, torch.bfloat16, seed=6)
    wgu, wd = wgu.bfloat16(), wd.bfloat16()
    out = torch.full((3, 16), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    y = run(x, idx, w, wgu, wd, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, expected(x, idx, w, wgu, wd), torch.bfloat16)


def test_align_slots_layout():
    idx = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 3]])  # expert 2 empty, 3 gets 5 slots
    block = 4
    sorted_ids, block_expert, num_rows = moe_triton.align_slots(idx, 5, block)
    m = idx.numel()
    live = int(num_rows)
    assert live == 4 + 4 + 8  # experts 0, 1, 3 padded to 4, 4, 8
    ids = sorted_ids[:live].tolist()
    assert sorted(i for i in ids if i < m) == list(range(m))  # every slot exactly once
    assert all(i == m for i in sorted_ids[live:].tolist())
    flat = idx.flatten()
    for blk in range(live // block):
        e = int(block_expert[blk])
        assert all(int(flat[i]) == e for i in ids[blk * block:(blk + 1) * block] if i < m)
    # slots of one expert keep token order (stable sort)
    assert [i for i in ids if i < m and flat[i] == 3] == [0, 2, 5, 6, 7]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_wider_shapes(dtype):
    check(48, 4, 16, 256, 192, dtype, seed=7)
    _fp8_case(24, 3, 8, 384, 256, dtype, seed=8)
