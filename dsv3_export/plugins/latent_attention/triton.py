"""LatentAttention on Triton: the absorbed-MLA attention of plugins/latent_attention/spec.py.

One kernel body serves decode and prefill. The S*H query rows of a sequence are
one matrix (row = s*H + h): MLA's latent is a single KV head shared by every
head (MQA), so each [BLOCK_T, C] block of the cache is loaded once per program
and multiplied against BLOCK_M rows at once (FlashMLA's form). The first r
columns of that block are also V, so K and V come from the same load. With
r = 512 the float32 [BLOCK_M, r] accumulator caps BLOCK_M at 32 rows without
register spills, so at H = 128 four neighbouring programs (adjacent in launch
order) read the same block: DRAM serves it once, L2 the other three.

- decode (S <= DECODE_MAX_S): the cache is split over programs (split-K,
  flash-decoding); each writes a normalised partial o and its log-sum-exp, and
  `_combine_kernel` merges the splits.
- prefill: one program per row tile runs the whole causal range of its batch
  row; no split, the kernel writes the output directly.

Per-row cache lengths (graph contract v2): `latent` is the cache buffer of
capacity T, row b's S new tokens already written at L_b .. L_b+S-1
(L_b = cache_lengths[b], int64 or int32); query s of row b sits at L_b + s.
A program never loads a cache row past L_b + S - 1 (nor past T), so the
unwritten rest of the buffer, NaN included, cannot reach the output.

The unsplit kernel is also what the TensorRT AOT plugin embeds (one launch):
its runtime arguments are ordered (input pointers q, latent, cache_lengths,
int32 scalars, output pointer), the convention TensorRT's AOT launcher uses;
see `aot_plan`.
Accumulation and softmax are float32 for every input dtype.
"""

import math
import os

import torch
import triton
import triton.language as tl

from dsv3_export.plugins.latent_attention import spec
from dsv3_export.plugins.triton_common import fix_interpreter_bf16_dot

DECODE_MAX_S = 4


# S, T change every decode step; specialising on them (== 1, % 16) would
# recompile the kernel as the cache grows. Over 80 lines: one kernel body is one
# program (its loop state lives in registers), and the AOT plugin embeds it whole.
@triton.jit(do_not_specialize=["S", "T", "split_len"])
def _attn_kernel(
    q_ptr, lat_ptr, len_ptr,
    S, T,
    stride_qb, stride_qs, stride_qh,
    stride_lb, stride_lt,
    stride_ob, stride_os, stride_oh,
    split_len, sm_scale,
    o_ptr, lse_ptr,
    H: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # int64: b * stride_qb overflows int32 at full size (64 x 4096 x 128 x 576).
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * H
    s_idx = rows // H
    h_idx = rows % H
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_DR)
    r_ok = offs_r < R
    p_ok = offs_p < DR

    q_rows = q_ptr + b * stride_qb + s_idx * stride_qs + h_idx * stride_qh
    # C = r + dr is rarely a power of two (576): load the two parts separately,
    # each padded to its own power of two.
    qn = tl.load(q_rows[:, None] + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    qp = tl.load(q_rows[:, None] + R + offs_p[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)

    # Query s of row b sits at position L_b + s and sees keys 0..L_b+s.
    L = tl.load(len_ptr + b).to(tl.int32)
    last_key = L + s_idx
    s_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // H, S - 1)
    # Keys past this are invisible to the whole tile; the clamp keeps lengths
    # outside the contract (L_b + S > T) inside the buffer.
    t_end = tl.minimum(L + s_hi + 1, T)
    if SPLIT:
        t_lo = split * split_len
        t_hi = tl.minimum(t_end, t_lo + split_len)
    else:
        t_lo = 0
        t_hi = t_end

    # Finite start for the running max: exp2(-inf - (-inf)) would be NaN for
    # rows whose keys in a block (or a whole split) are all masked.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 instead of exp

    lat_b = lat_ptr + b * stride_lb
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_hi
        k_rows = lat_b + offs_t[:, None] * stride_lt
        kn = tl.load(k_rows + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        kp = tl.load(k_rows + R + offs_p[None, :], mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        sc = tl.dot(qn, tl.trans(kn), input_precision=DOT_PRECISION)
        sc = tl.dot(qp, tl.trans(kp), acc=sc, input_precision=DOT_PRECISION)
        vis = (offs_t[None, :] <= last_key[:, None]) & t_ok[None, :]
        sc = tl.where(vis, sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # V = latent[:, :r] = kn: the block already loaded for the scores.
        acc = acc * alpha[:, None] + tl.dot(p.to(kn.dtype), kn, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_rows = o_ptr + b * stride_ob + s_idx * stride_os + h_idx * stride_oh
    o_mask = row_ok[:, None] & r_ok[None, :]
    if SPLIT:
        # Partials are [B, S, H, n_splits, R] float32 and lse [B, S*H, n_splits].
        tl.store(o_rows[:, None] + split * R + offs_r[None, :], o, mask=o_mask)
        lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))
        n_splits = tl.num_programs(2)
        tl.store(lse_ptr + (b * (S * H) + rows) * n_splits + split, lse, mask=row_ok)
    else:
        tl.store(o_rows[:, None] + offs_r[None, :], o.to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["n_splits"])
def _combine_kernel(
    part_ptr, lse_ptr, o_ptr, n_splits,
    R: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per query row (b, s, h); o is contiguous [B, S, H, R].
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_SPLIT)
    sp_ok = sp < n_splits
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    lse = tl.load(lse_ptr + row * n_splits + sp, mask=sp_ok, other=float("-inf"))
    # Split 0 always holds key 0, which every query sees (L_b + s >= 0): the max
    # is finite. Splits past a row's length are empty (lse = -inf, weight 0).
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(sp_ok, w, 0.0)
    w = w / tl.sum(w, 0)
    parts = tl.load(part_ptr + (row * n_splits + sp[:, None]) * R + offs_r[None, :],
                    mask=sp_ok[:, None] & r_ok[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0)
    tl.store(o_ptr + row * R + offs_r, o.to(o_ptr.dtype.element_ty), mask=r_ok)


# ---------------------------------------------------------------- interpreter, configuration

def _pow2(n: int, floor: int = 16) -> int:
    # tl.dot needs every dim >= 16 on the GPU; masks cover the padding.
    return max(floor, triton.next_power_of_2(int(n)))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if _interpreting():
    fix_interpreter_bf16_dot()


def dot_precision(dtype) -> str:
    """fp32 inputs get IEEE dots: TF32 would cost ~1e-3 against the fp32 reference."""
    return "ieee" if dtype in (torch.float32, "fp32") else "tf32"


def default_config(s_len: int, heads: int, r: int, dr: int, itemsize: int, *, decode: bool) -> dict:
    """Block sizes and launch options. Register budget decides BLOCK_M: the
    [BLOCK_M, BLOCK_R] float32 accumulator plus the q rows stay in registers.
    tools/gpu_check.py sweeps alternatives on real hardware."""
    rows = s_len * heads
    if _interpreting():
        # The interpreter is numpy per program: few, small programs run fastest.
        return dict(BLOCK_M=min(64, _pow2(rows)), BLOCK_T=16, num_warps=4, num_stages=1)
    if _pow2(r) <= 128:
        return dict(BLOCK_M=min(_pow2(rows), 64), BLOCK_T=64, num_warps=4, num_stages=2)
    # r = 512: ptxas (sm_90a, Triton 3.9) reports no spills for these and
    # spills for BLOCK_M = 64 at 8 warps (bf16) or BLOCK_M = 32 in float32.
    if itemsize == 4:
        return dict(BLOCK_M=16, BLOCK_T=16 if decode else 32, num_warps=8, num_stages=2)
    block_m = min(_pow2(rows), 32)
    return dict(BLOCK_M=block_m, BLOCK_T=32, num_warps=8 if block_m == 32 else 4, num_stages=2)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def auto_splits(batch: int, row_tiles: int, t_len: int, block_t: int, num_sms: int) -> int:
    """Enough programs for ~2 waves, but each split keeps >= 4 cache blocks so
    the combine stays cheap next to the main kernel."""
    programs = batch * row_tiles
    want = max(1, math.ceil(2 * num_sms / max(programs, 1)))
    most = max(1, t_len // (4 * block_t))
    return int(min(want, most, 64))


# ---------------------------------------------------------------- wrapper

def latent_attention(q: torch.Tensor, latent: torch.Tensor, scale: float, kv_lora_rank: int,
                     cache_lengths: torch.Tensor | None = None, *,
                     num_splits: int | None = None, config: dict | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B,S,H,r+dr], latent [B,T,r+dr], cache_lengths [B] int64/int32 (None:
    every row T - S) -> o_lat [B,S,H,r] (same contract as
    plugins.latent_attention.reference). The lengths' values are not checked
    (that would synchronise); out-of-contract ones never read outside the
    buffer. Decode (S <= 4) splits the cache over programs; `num_splits` /
    `config` override the automatic choices (tests, tuning); `out`
    (contiguous, q's dtype) receives the result in place."""
    lengths_shape = None if cache_lengths is None else tuple(cache_lengths.shape)
    spec.validate_shapes(tuple(q.shape), tuple(latent.shape), kv_lora_rank, lengths_shape)
    if q.dtype != latent.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"LatentAttention: q and latent must share a float32/float16/bfloat16 dtype, "
                         f"got {q.dtype} and {latent.dtype}")
    bsz, s_len, heads, c = q.shape
    t_len = latent.shape[1]
    if cache_lengths is None:
        cache_lengths = torch.full((bsz,), t_len - s_len, dtype=torch.int64, device=q.device)
    elif cache_lengths.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"LatentAttention: cache_lengths must be int64 or int32, got {cache_lengths.dtype}")
    elif cache_lengths.device != q.device:
        raise ValueError(f"LatentAttention: cache_lengths is on {cache_lengths.device}, q on {q.device}")
    if cache_lengths.stride(0) != 1:
        cache_lengths = cache_lengths.contiguous()
    r, dr = int(kv_lora_rank), int(c - kv_lora_rank)
    if out is None:
        out = torch.empty((bsz, s_len, heads, r), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (bsz, s_len, heads, r) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"LatentAttention: out must be a contiguous {q.dtype} tensor of shape "
                         f"{(bsz, s_len, heads, r)}")
    if out.numel() == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if latent.stride(-1) != 1:
        latent = latent.contiguous()

    decode = s_len <= DECODE_MAX_S
    cfg = dict(default_config(s_len, heads, r, dr, q.element_size(), decode=decode))
    cfg.update(config or {})
    block_m, block_t = cfg["BLOCK_M"], cfg["BLOCK_T"]
    row_tiles = triton.cdiv(s_len * heads, block_m)
    if num_splits is None:
        num_splits = auto_splits(bsz, row_tiles, t_len, block_t, _num_sms(q.device)) if decode else 1
    # Splits start on BLOCK_T boundaries; drop the ones that would be empty.
    split_len = triton.cdiv(triton.cdiv(t_len, num_splits), block_t) * block_t
    num_splits = max(1, triton.cdiv(t_len, split_len))

    common = dict(H=heads, R=r, DR=dr, BLOCK_M=block_m, BLOCK_T=block_t,
                  BLOCK_R=_pow2(r), BLOCK_DR=_pow2(dr), DOT_PRECISION=dot_precision(q.dtype),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    q_strides = (q.stride(0), q.stride(1), q.stride(2))
    l_strides = (latent.stride(0), latent.stride(1))
    if num_splits == 1:
        _attn_kernel[(row_tiles, bsz, 1)](
            q, latent, cache_lengths, s_len, t_len, *q_strides, *l_strides,
            *out.stride()[:3], t_len, float(scale), out, None, SPLIT=False, **common)
        return out

    part = torch.empty((bsz, s_len, heads, num_splits, r), dtype=torch.float32, device=q.device)
    lse = torch.empty((bsz, s_len * heads, num_splits), dtype=torch.float32, device=q.device)
    _attn_kernel[(row_tiles, bsz, num_splits)](
        q, latent, cache_lengths, s_len, t_len, *q_strides, *l_strides,
        *part.stride()[:3], split_len, float(scale), part, lse, SPLIT=True, **common)
    _combine_kernel[(bsz * s_len * heads,)](
        part, lse, out, num_splits, R=r, BLOCK_SPLIT=_pow2(num_splits, 2), BLOCK_R=_pow2(r),
        num_warps=4)
    return out


# ---------------------------------------------------------------- AOT (TensorRT)

AOT_KERNEL = _attn_kernel
# Runtime parameters TensorRT passes between the input and output pointers, in
# the kernel's declaration order. Everything else is baked in at compile time.
AOT_SCALARS = ("S", "T", "stride_qb", "stride_lb", "stride_ob")
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LENGTH_DTYPES = ("i64", "i32")  # Triton names of the cache_lengths dtypes the kernel takes
AOT_INPUTS = ("q_ptr", "lat_ptr", "len_ptr")  # input pointers, in TensorRT's input order


def aot_plan(batch, s_len, t_len, heads: int, c: int, r: int, scale: float, dtype: str, *,
             lengths_dtype: str = "i64", cdiv=None, config: dict | None = None) -> dict:
    """How the TensorRT AOT plugin compiles and launches the unsplit kernel.

    batch / s_len / t_len may be ints or TensorRT shape expressions (anything
    with * and + and a `cdiv`); heads, c, r must be build-time ints. Returns the
    Triton signature and constexprs, the int32 scalar arguments in launch order,
    the grid, and num_warps/num_stages. Runtime arguments: q_ptr, lat_ptr,
    len_ptr (cache_lengths, `lengths_dtype` "i64" or "i32"), the scalars
    (AOT_SCALARS), o_ptr. Pure Python: tests run the same plan through the
    interpreter with plain ints.
    """
    if not all(isinstance(v, int) for v in (heads, c, r)):
        raise ValueError("LatentAttention AOT: H and C must be build-time constants "
                         f"(got H={heads!r}, C={c!r}); use the JIT implementation for dynamic heads")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"LatentAttention AOT: unsupported dtype {dtype!r}")
    if lengths_dtype not in LENGTH_DTYPES:
        raise ValueError(f"LatentAttention AOT: cache_lengths must be int64 or int32, got {lengths_dtype!r}")
    cdiv = cdiv or (lambda a, b: -(-a // b))
    dr = c - r
    itemsize = 4 if dtype == "fp32" else 2
    cfg = dict(default_config(DECODE_MAX_S + 1, heads, r, dr, itemsize, decode=False))
    cfg.update(config or {})
    # Contiguous TensorRT tensors: only the batch strides depend on runtime dims.
    constexprs = dict(
        stride_qs=heads * c, stride_qh=c, stride_lt=c, stride_os=heads * r, stride_oh=r,
        split_len=1, sm_scale=float(scale), lse_ptr=None,
        H=heads, R=r, DR=dr, BLOCK_M=cfg["BLOCK_M"], BLOCK_T=cfg["BLOCK_T"],
        BLOCK_R=_pow2(r), BLOCK_DR=_pow2(dr), SPLIT=False, DOT_PRECISION=dot_precision(dtype),
    )
    scalars = dict(S=s_len, T=t_len, stride_qb=s_len * (heads * c), stride_lb=t_len * c,
                   stride_ob=s_len * (heads * r))
    signature = {}
    for name in AOT_KERNEL.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in scalars:
            signature[name] = "i32"
        elif name == "len_ptr":
            signature[name] = "*" + lengths_dtype
        else:
            signature[name] = "*" + dtype
    # Alignment facts for Triton (16-byte pointers, 16-divisible ints) turn the
    # loads into vectorised, pipelined copies. TensorRT's buffers are at least
    # 256-byte aligned; a batch stride is 16-divisible when its static factor is.
    aligned = ["q_ptr", "lat_ptr", "len_ptr", "o_ptr"]
    aligned += [name for name, factor in (("stride_qb", heads * c), ("stride_lb", c), ("stride_ob", heads * r))
                if factor % 16 == 0]
    return dict(
        signature=signature, constexprs=constexprs, divisible_by_16=aligned,
        scalars=[(name, scalars[name]) for name in AOT_SCALARS],
        grid=(cdiv(s_len * heads, cfg["BLOCK_M"]), batch, 1),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def aot_launch_args(plan: dict, q, latent, cache_lengths, out) -> list:
    """The positional arguments TensorRT's launcher passes: input pointers (q,
    latent, cache_lengths), scalars, output pointer (used by the tests to replay a plan)."""
    return [q, latent, cache_lengths, *(v for _, v in plan["scalars"]), out]
