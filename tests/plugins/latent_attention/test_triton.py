"""Triton LatentAttention (plugins/latent_attention/triton.py) against the torch reference.

On a machine without a CUDA GPU the kernels run in Triton's CPU interpreter
(TRITON_INTERPRET=1, set here before triton is imported); with a GPU they run
natively (tools/gpu_check.sh). Inputs are rounded to the tested dtype and the
reference runs on them in float32, so the tolerance only covers the kernel's
own rounding: fp32 1e-5, fp16 3e-3, bf16 3e-2 (absolute, plus the same
relative; outputs are convex combinations of latent rows, |o| <~ 4).

Per-row cache lengths (contract v2): `ragged` gives each batch row its own
L_b and fills the capacity past L_b + S with garbage (large values or NaN/inf)
that must not reach the output.
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

from dsv3_export.plugins.latent_attention import triton as lat_triton  # noqa: E402
from dsv3_export.plugins.latent_attention.reference import latent_attention as reference  # noqa: E402
from tests.plugins.latent_attention.cases import ragged  # noqa: E402

DEVICE = "cuda" if _GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make(b, s, t, h, r, dr, dtype, seed=0, scale_q=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, s, h, r + dr, generator=g) * scale_q).to(dtype)
    latent = torch.randn(b, t, r + dr, generator=g).to(dtype)
    return q.to(DEVICE), latent.to(DEVICE)


def check(q, latent, scale, r, lengths=None, **kw):
    got = lat_triton.latent_attention(q, latent, scale, r, lengths, **kw)
    assert got.dtype == q.dtype and got.shape == (*q.shape[:3], r)
    want = reference(q.float().cpu(), latent.float().cpu(), scale, r, None if lengths is None else lengths.cpu())
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)
    return got


@settings(max_examples=int(os.environ.get("DSV3_HYPOTHESIS_EXAMPLES", 12)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), s=st.integers(1, 6), extra_t=st.integers(0, 40), h=st.integers(1, 5),
    r=st.sampled_from([16, 24, 32]), dr=st.sampled_from([8, 16]), dtype=st.sampled_from(DTYPES),
    scale=st.floats(0.05, 0.5), splits=st.one_of(st.none(), st.integers(1, 4)), seed=st.integers(0, 2**16),
)
def test_random_shapes(b, s, extra_t, h, r, dr, dtype, scale, splits, seed):
    # T = S + extra: caches that are not a multiple of the block, several query
    # tokens with the causal offset T-S, S == T (prefill) when extra == 0.
    q, latent = make(b, s, s + extra_t, h, r, dr, dtype, seed)
    check(q, latent, scale, r, num_splits=splits if s <= lat_triton.DECODE_MAX_S else None)


@settings(max_examples=int(os.environ.get("DSV3_HYPOTHESIS_EXAMPLES", 12)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3), s=st.integers(1, 6), extra_t=st.integers(0, 40), h=st.integers(1, 5),
    r=st.sampled_from([16, 24, 32]), dr=st.sampled_from([8, 16]), dtype=st.sampled_from(DTYPES),
    scale=st.floats(0.05, 0.5), splits=st.one_of(st.none(), st.integers(1, 4)), seed=st.integers(0, 2**16),
    int32=st.booleans(),
)
def test_random_shapes_per_row_lengths(b, s, extra_t, h, r, dr, dtype, scale, splits, seed, int32):
    # Capacity T = S + extra; each row its own L_b <= T - S, garbage past L_b + S.
    q, latent = make(b, s, s + extra_t, h, r, dr, dtype, seed)
    latent, lengths = ragged(latent, s, seed)
    check(q, latent, scale, r, lengths.int() if int32 else lengths,
          num_splits=splits if s <= lat_triton.DECODE_MAX_S else None)


@pytest.mark.parametrize("s, splits", [(1, 1), (1, 4), (3, 3), (9, None)])
def test_nan_garbage_past_the_lengths_never_leaks(s, splits):
    # The kernel never loads a row past L_b + S - 1: NaN / inf there cannot reach the output.
    q, latent = make(3, s, 70, 4, 32, 8, torch.float32, seed=11)
    latent, lengths = ragged(latent, s, seed=11, garbage="nan")
    got = check(q, latent, 0.2, 32, lengths, num_splits=splits)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_per_row_lengths_split_k(dtype):
    # L = 0 (one key), mid-buffer, T - S: the splits past a short row are empty.
    q, latent = make(3, 1, 75, 4, 32, 8, dtype, seed=12)
    latent, lengths = ragged(latent, 1, seed=12)
    one = check(q, latent, 0.2, 32, lengths, num_splits=1)
    many = check(q, latent, 0.2, 32, lengths, num_splits=4)
    tol = TOL[dtype]
    torch.testing.assert_close(one.float(), many.float(), atol=tol, rtol=tol)


def test_explicit_t_minus_s_lengths_equal_the_default():
    q, latent = make(2, 3, 20, 2, 16, 8, torch.float32, seed=13)
    lengths = torch.full((2,), 17, dtype=torch.int64, device=DEVICE)
    torch.testing.assert_close(lat_triton.latent_attention(q, latent, 0.3, 16, lengths),
                               lat_triton.latent_attention(q, latent, 0.3, 16), rtol=0, atol=0)


def test_rejects_bad_lengths():
    q, latent = make(2, 1, 8, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="int64 or int32"):
        lat_triton.latent_attention(q, latent, 0.1, 16, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="cache_lengths has 3 entries"):
        lat_triton.latent_attention(q, latent, 0.1, 16, torch.zeros(3, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_k_matches_reference(dtype):
    q, latent = make(2, 1, 75, 4, 32, 8, dtype, seed=1)
    one = check(q, latent, 0.2, 32, num_splits=1)
    many = check(q, latent, 0.2, 32, num_splits=4)
    tol = TOL[dtype]
    torch.testing.assert_close(one.float(), many.float(), atol=tol, rtol=tol)


def test_split_with_no_visible_key_for_some_rows():
    # BLOCK_T = 16 under the interpreter: splits [0,16) [16,32) [32,33). Queries
    # s = 0..2 see keys <= 29..31, so the last split is empty for them (lse = -inf).
    q, latent = make(1, 4, 33, 3, 32, 8, torch.float32, seed=2)
    check(q, latent, 0.3, 32, num_splits=3, config=dict(BLOCK_T=16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_s_equals_t(dtype):
    q, latent = make(2, 23, 23, 3, 32, 8, dtype, seed=3)
    check(q, latent, 0.25, 32)


def test_rows_span_tiles_and_heads():
    # H = 5 does not divide BLOCK_M = 16: one tile holds parts of several tokens.
    q, latent = make(1, 7, 30, 5, 16, 8, torch.float32, seed=4)
    check(q, latent, 0.3, 16, config=dict(BLOCK_M=16))


def test_full_latent_width_bf16():
    # The 671B latent (r = 512, dr = 64) with a few heads: C = 576 is padded to 512 + 64.
    q, latent = make(1, 2, 37, 4, 512, 64, torch.bfloat16, seed=5, scale_q=0.2)
    check(q, latent, 1 / 24, 512)


def test_large_scores_stay_finite():
    # Large logits: the running max must keep exp2 in range.
    q, latent = make(1, 1, 40, 2, 16, 8, torch.float32, seed=6, scale_q=30.0)
    got = check(q, latent, 1.0, 16, num_splits=3)
    assert torch.isfinite(got).all()


def test_strided_inputs_and_out():
    q_full, latent_full = make(2, 3, 20, 4, 32, 16, torch.float32, seed=7)
    q = q_full[..., :40]  # C = 40 with a row stride of 48
    latent = latent_full[:, :, :40]
    out = torch.empty(2, 3, 4, 32, device=DEVICE)
    got = check(q, latent, 0.2, 32, out=out)
    assert got.data_ptr() == out.data_ptr()


def test_empty_batch():
    q, latent = make(0, 1, 4, 2, 16, 8, torch.float32)
    assert lat_triton.latent_attention(q, latent, 0.1, 16).shape == (0, 1, 2, 16)


def test_rejects_mixed_dtypes():
    q, latent = make(1, 1, 4, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        lat_triton.latent_attention(q, latent.half(), 0.1, 16)


def test_auto_splits_fill_the_gpu():
    # 132 SMs (H200), B=1, 4 row tiles, T=4096, BLOCK_T=32: 66 splits wanted for
    # two waves, capped at 32 so that each split keeps 4 cache blocks.
    assert lat_triton.auto_splits(1, 4, 4096, 32, 132) == 32
    assert lat_triton.auto_splits(64, 4, 4096, 32, 132) == 2
    assert lat_triton.auto_splits(1, 1, 20, 32, 132) == 1  # short cache: no split


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_671b_heads_decode(dtype):
    q, latent = make(1, 2, 300, 128, 512, 64, dtype, seed=8, scale_q=0.2)
    check(q, latent, 1 / 24, 512)
