"""MoEDispatch on Triton: the routed SwiGLU experts of plugins/moe_dispatch/spec.py.

Three steps, no host synchronisation (the grid is sized by an upper bound and
surplus programs exit early, so the op can sit in a CUDA graph):

1. `align_slots` (torch ops on the device): the N*k token-slots are sorted by
   expert and each expert's run is padded to a multiple of BLOCK_M, so every
   row block of the grouped GEMMs belongs to exactly one expert. Padding rows
   carry the sentinel slot N*k.
2. `_gate_up_kernel`: grouped GEMM x[token] @ w_gate_up[e].T with the gate and
   up halves in two accumulators of the same program, so SiLU(gate) * up is
   applied in registers and only the [rows, I] product reaches memory.
3. `_down_kernel`: grouped GEMM h @ w_down[e].T, scaled by the routing weight
   and atomically added into a float32 y[token] (the combine over k).

FP8 (E4M3) weights carry float32 scales per 128x128 block. BLOCK_K divides 128,
so one K step sits inside one scale block: the fp8 tile is widened exactly to
the activation dtype, multiplied on the tensor cores, and the per-column scale
is applied to the float32 partial product (the same sum, without scaling the
weight tile element by element). Activations are not quantized.
"""

import os

import torch
import triton
import triton.language as tl

from dsv3_export.core.fp8 import FP8_BLOCK
from dsv3_export.plugins.moe_dispatch import spec
from dsv3_export.plugins.triton_common import fix_interpreter_bf16_dot

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if _interpreting():
    fix_interpreter_bf16_dot()


@triton.jit
def _block_coords(num_rows_ptr, I_or_D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks (mostly of the same expert) walk the
    # column tiles together, so one expert's weight tile is read from DRAM once
    # and served to its other row blocks from L2.
    pid = tl.program_id(0)
    num_n = tl.cdiv(I_or_D, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    live = pid_m * BLOCK_M < tl.load(num_rows_ptr)
    return pid_m, pid_n, live


@triton.jit(do_not_specialize=["num_slots"])
def _gate_up_kernel(
    x_ptr, sorted_ids_ptr, block_expert_ptr, num_rows_ptr, w_ptr, ws_ptr, h_ptr,
    num_slots, D, I,
    stride_xn, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_hm,
    TOPK: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n, live = _block_coords(num_rows_ptr, I, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ids_ptr + offs_m)
    row_ok = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    # Loop-invariant int32 tile offsets and scalar 64-bit bases: keeping
    # [BLOCK, BLOCK] 64-bit pointer tensors live across the K loop costs ~100
    # registers per thread and spills.
    a_offs = (slot // TOPK)[:, None] * stride_xn + offs_k[None, :]
    w_offs = offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of gate rows n
    g_base = w_ptr + e * stride_we
    u_base = g_base + I * stride_wn  # up rows I + n
    if FP8:
        sg_ptrs = ws_ptr + e * stride_se + (offs_n // 128) * stride_sn
        su_ptrs = ws_ptr + e * stride_se + ((offs_n + I) // 128) * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k + k0 < D
        a = tl.load(x_ptr + k0 + a_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_base + k0 + w_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        wu = tl.load(u_base + k0 + w_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            kb = k0 // 128
            sg = tl.load(sg_ptrs + kb * stride_sk, mask=n_ok, other=0.0)
            su = tl.load(su_ptrs + kb * stride_sk, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, wg.to(a.dtype), input_precision=DOT_PRECISION) * sg[None, :]
            acc_u += tl.dot(a, wu.to(a.dtype), input_precision=DOT_PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, wg, acc=acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, wu, acc=acc_u, input_precision=DOT_PRECISION)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_slots"])
def _down_kernel(
    h_ptr, sorted_ids_ptr, block_expert_ptr, num_rows_ptr, w_ptr, ws_ptr, topk_w_ptr, y_ptr,
    num_slots, D, I,
    stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_sk, stride_yn,
    TOPK: tl.constexpr, FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n, live = _block_coords(num_rows_ptr, D, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ids_ptr + offs_m)
    row_ok = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)

    a_base = h_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_hm
    a_offs = tl.arange(0, BLOCK_M)[:, None] * stride_hm + offs_k[None, :]
    b_base = w_ptr + e * stride_we
    b_offs = offs_n[None, :] * stride_wn + offs_k[:, None]
    if FP8:
        s_ptrs = ws_ptr + e * stride_se + (offs_n // 128) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k + k0 < I
        a = tl.load(a_base + k0 + a_offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_base + k0 + b_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8:
            s = tl.load(s_ptrs + (k0 // 128) * stride_sk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
    weight = tl.load(topk_w_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    token = (slot // TOPK).to(tl.int64)
    # k slots of a token land in different row blocks (different experts):
    # float32 atomics do the combine without a [N*k, D] intermediate.
    tl.atomic_add(y_ptr + token[:, None] * stride_yn + offs_n[None, :], acc,
                  mask=row_ok[:, None] & n_ok[None, :], sem="relaxed")


# ---------------------------------------------------------------- routing

def align_slots(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """Sort token-slots by expert, padding each expert's run to a BLOCK_M multiple.

    Returns (sorted_ids int32 [max_rows], block_expert int32 [max_rows // BLOCK_M],
    num_rows int32 [1]). sorted_ids holds slot = token * k + j, or N*k on padding;
    only the first num_rows entries are live. Stays on the device (no .item()).
    """
    flat = topk_idx.reshape(-1).to(torch.int64)
    m = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # no bincount: it syncs on CUDA
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0)
    seg_start = seg_end - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(m, device=dev) - first_of_expert[sorted_e]
    # At most min(E, N*k) experts are busy, each wasting < BLOCK_M rows.
    max_rows = triton.cdiv(m + min(num_experts, m) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((max_rows,), m, dtype=torch.int32, device=dev)
    sorted_ids[seg_start[sorted_e] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, max_rows, block_m, device=dev)
    block_expert = torch.searchsorted(seg_end, block_start, right=True)
    block_expert = block_expert.clamp_(max=num_experts - 1).to(torch.int32)
    num_rows = seg_end[-1:].to(torch.int32)
    return sorted_ids, block_expert, num_rows


# ---------------------------------------------------------------- configuration

def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def default_config(num_slots: int, num_experts: int, d: int, inter: int, x_dtype: torch.dtype,
                   fp8: bool) -> dict:
    """Tiles for (gate_up, down). Few slots per expert (decode) -> thin row
    blocks so padding stays small; many -> wide tiles for tensor-core reuse."""
    if _interpreting():
        t = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
        return dict(gate_up=t, down=t)
    # Checked with ptxas for sm_90a (Triton 3.9, 16-divisible D/I/strides): no
    # spills, <= 164 KB shared memory. tools/gpu_check.py times them.
    per_expert = num_slots / max(1, num_experts)
    wide_k = 128 if fp8 else (32 if x_dtype == torch.float32 else 64)
    if per_expert < 32:
        t = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32 if x_dtype == torch.float32 else 128, GROUP_M=1,
                 num_warps=4, num_stages=4)
        return dict(gate_up=t, down=dict(t))
    block_m = 64 if per_expert < 256 else 128
    gate_up = dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=wide_k, GROUP_M=8, num_warps=8, num_stages=3)
    down = dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=wide_k, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(gate_up=gate_up, down=down)


def _check_fp8(w, scale, rows, cols, name):
    if scale is None:
        raise ValueError(f"MoEDispatch: {name} is float8_e4m3fn but its block scale is missing")
    want = (w.shape[0], triton.cdiv(rows, FP8_BLOCK), triton.cdiv(cols, FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"MoEDispatch: {name}_scale must be {want} (128x128 blocks), got {tuple(scale.shape)}")


# ---------------------------------------------------------------- wrapper

# Over 80 lines: the checks of every input, the routing sort and the two launches read best as one
# sequence; each piece is a few lines.
def moe_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                 w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 w_gate_up_scale: torch.Tensor | None = None, w_down_scale: torch.Tensor | None = None,
                 *, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [N,D] = sum_j topk_weight[n,j] * down_e(silu(gate_e x_n) * up_e x_n), e = topk_idx[n,j].

    Weights are x's dtype, or float8_e4m3fn with float32 scales per 128x128
    block (w_gate_up_scale [E, ceil(2I/128), ceil(D/128)], w_down_scale
    [E, ceil(D/128), ceil(I/128)]). topk_idx values must lie in [0, E) (not
    checked here: that would need a device sync). `config` overrides tiles;
    `out` ([N,D], x's dtype) receives the result in place."""
    spec.validate_shapes(*(tuple(t.shape) for t in (x, topk_idx, topk_weight, w_gate_up, w_down)))
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"MoEDispatch: x must be float32/float16/bfloat16, got {x.dtype}")
    fp8 = w_gate_up.dtype == torch.float8_e4m3fn
    if (w_down.dtype == torch.float8_e4m3fn) != fp8:
        raise ValueError("MoEDispatch: w_gate_up and w_down must both be FP8 or both be x's dtype")
    num_experts, two_i, d = w_gate_up.shape
    inter = two_i // 2
    if fp8:
        _check_fp8(w_gate_up, w_gate_up_scale, two_i, d, "w_gate_up")
        _check_fp8(w_down, w_down_scale, d, inter, "w_down")
        w_gate_up_scale = w_gate_up_scale.to(torch.float32).contiguous()
        w_down_scale = w_down_scale.to(torch.float32).contiguous()
    elif w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"MoEDispatch: weights must be x's dtype ({x.dtype}) or float8_e4m3fn")

    n_tok, topk = topk_idx.shape
    if out is not None and (tuple(out.shape) != (n_tok, d) or out.dtype != x.dtype):
        raise ValueError(f"MoEDispatch: out must be a {x.dtype} tensor of shape {(n_tok, d)}")
    # float32 atomics need a float32 target; a float32 `out` is used directly.
    if out is not None and out.dtype == torch.float32 and out.stride(-1) == 1:
        y32 = out.zero_()
    else:
        y32 = torch.zeros((n_tok, d), dtype=torch.float32, device=x.device)

    def finish():
        if out is None:
            return y32 if x.dtype == torch.float32 else y32.to(x.dtype)
        if y32 is not out:
            out.copy_(y32)
        return out

    if n_tok == 0 or topk == 0:
        return finish()
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_gate_up = w_gate_up if w_gate_up.stride(-1) == 1 else w_gate_up.contiguous()
    w_down = w_down if w_down.stride(-1) == 1 else w_down.contiguous()
    topk_w = topk_weight.reshape(-1).contiguous()
    num_slots = n_tok * topk

    cfg = default_config(num_slots, num_experts, d, inter, x.dtype, fp8)
    for part, over in (config or {}).items():
        cfg[part] = {**cfg[part], **over}
    gu, dn = cfg["gate_up"], cfg["down"]
    for c in (gu, dn):
        if fp8 and FP8_BLOCK % c["BLOCK_K"]:
            raise ValueError(f"MoEDispatch: FP8 needs BLOCK_K dividing 128, got {c['BLOCK_K']}")
    if gu["BLOCK_M"] != dn["BLOCK_M"]:
        raise ValueError("MoEDispatch: both GEMMs share the row alignment, BLOCK_M must match")

    sorted_ids, block_expert, num_rows = align_slots(topk_idx, num_experts, gu["BLOCK_M"])
    # Tile offsets inside x, h and one expert's weights are int32 (registers).
    if max(n_tok * x.stride(0), sorted_ids.numel() * inter, two_i * d) >= 2**31:
        raise ValueError("MoEDispatch: too many tokens for int32 tile offsets; split the batch")
    h = torch.empty((sorted_ids.numel(), inter), dtype=x.dtype, device=x.device)
    num_m = block_expert.numel()
    dummy = w_gate_up  # scale pointers are never read when FP8 is off
    gs = w_gate_up_scale if fp8 else dummy
    ds = w_down_scale if fp8 else dummy
    gs_strides = w_gate_up_scale.stride() if fp8 else (0, 0, 0)
    ds_strides = w_down_scale.stride() if fp8 else (0, 0, 0)
    prec = dot_precision(x.dtype)

    def launch_opts(c):
        return dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                    num_warps=c["num_warps"], num_stages=c["num_stages"])

    _gate_up_kernel[(num_m * triton.cdiv(inter, gu["BLOCK_N"]),)](
        x, sorted_ids, block_expert, num_rows, w_gate_up, gs, h,
        num_slots, d, inter,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), *gs_strides, h.stride(0),
        TOPK=topk, FP8=fp8, DOT_PRECISION=prec, **launch_opts(gu))
    _down_kernel[(num_m * triton.cdiv(d, dn["BLOCK_N"]),)](
        h, sorted_ids, block_expert, num_rows, w_down, ds, topk_w, y32,
        num_slots, d, inter,
        h.stride(0), w_down.stride(0), w_down.stride(1), *ds_strides, y32.stride(0),
        TOPK=topk, FP8=fp8, DOT_PRECISION=prec, **launch_opts(dn))
    return finish()
