"""MoEDispatch contract: routed SwiGLU experts, routing already done (docs/design.md, "Custom ops").

    x [N,D], topk_idx [N,k] int64, topk_weight [N,k],
    w_gate_up [E,2I,D], w_down [E,D,I]  ->  y [N,D]

    y[n] = sum_j topk_weight[n,j] * w_down[e] @ (silu(gate_e x_n) * up_e x_n),
    e = topk_idx[n,j], gate_e = w_gate_up[e,:I], up_e = w_gate_up[e,I:].

MoEDispatchFP8 (docs/precision.md): the same op with E4M3 expert weights and their float32 scales
per 128x128 block, two more inputs; a separate op type because TensorRT plugins have a fixed
number of inputs:

    ..., w_gate_up [E,2I,D] fp8, w_down [E,D,I] fp8,
    w_gate_up_scale [E,ceil(2I/128),ceil(D/128)], w_down_scale [E,ceil(D/128),ceil(I/128)]

    w[e,r,c] = float(w_fp8[e,r,c]) * scale[e, r // 128, c // 128]; activations are not quantized
    inside the op (the Triton kernel widens the weight tiles to x's dtype).
"""

from dsv3_export.core.fp8 import FP8_BLOCK
from dsv3_export.plugins import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION

OP_NAME = "MoEDispatch"
OP_DOMAIN = DOMAIN
INPUTS = ("x", "topk_idx", "topk_weight", "w_gate_up", "w_down")
# FP8 variant: the 128x128 block scales of the expert weights as inputs, in this order, after INPUTS.
FP8_OP_NAME = "MoEDispatchFP8"
FP8_SCALE_INPUTS = ("w_gate_up_scale", "w_down_scale")
FP8_INPUTS = INPUTS + FP8_SCALE_INPUTS
OUTPUTS = ("y",)
ATTRIBUTES = {
    "plugin_namespace": PLUGIN_NAMESPACE,
    "plugin_version": PLUGIN_VERSION,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def output_shape(x_shape, topk_idx_shape, topk_weight_shape, w_gate_up_shape, w_down_shape):
    """[N,D], taken from x; dims may be ints or symbolic."""
    return (x_shape[0], x_shape[1])


def _known(*dims) -> bool:
    # Symbolic dims (None, 'batch', shape expressions) are left to run time.
    return all(isinstance(d, int) for d in dims)


def _mismatch(what, a, b) -> None:
    if _known(a, b) and a != b:
        raise ValueError(f"MoEDispatch: {what} ({a} vs {b})")


def validate_shapes(x_shape, topk_idx_shape, topk_weight_shape, w_gate_up_shape, w_down_shape) -> None:
    for name, shape, rank, layout in (
        ("x", x_shape, 2, "[N,D]"),
        ("topk_idx", topk_idx_shape, 2, "[N,k]"),
        ("topk_weight", topk_weight_shape, 2, "[N,k]"),
        ("w_gate_up", w_gate_up_shape, 3, "[E,2I,D]"),
        ("w_down", w_down_shape, 3, "[E,D,I]"),
    ):
        if len(shape) != rank:
            raise ValueError(f"MoEDispatch: {name} must have rank {rank} {layout}, got shape {tuple(shape)}")
    (n, d), (e, two_i, gd), (de, dd, i) = x_shape, w_gate_up_shape, w_down_shape
    if any(_known(a, b) and a != b for a, b in zip(topk_idx_shape, topk_weight_shape)):
        raise ValueError(f"MoEDispatch: topk_idx {tuple(topk_idx_shape)} and topk_weight {tuple(topk_weight_shape)} must have the same shape")
    _mismatch("topk_idx's first dim must equal x's token count N", topk_idx_shape[0], n)
    if _known(two_i) and two_i % 2:
        raise ValueError(f"MoEDispatch: w_gate_up's second dim must be 2*I (gate rows then up rows), got odd {two_i}")
    if _known(two_i, i) and two_i != 2 * i:
        raise ValueError(f"MoEDispatch: w_gate_up's second dim ({two_i}) must be 2 * w_down's last dim I ({i})")
    _mismatch("w_gate_up's last dim must equal x's hidden size D", gd, d)
    _mismatch("w_down's second dim must equal x's hidden size D", dd, d)
    _mismatch("w_gate_up and w_down must have the same number of experts E", e, de)
    k = topk_idx_shape[1]
    if _known(k, e) and k > e:
        raise ValueError(f"MoEDispatch: top-k ({k}) cannot exceed the number of experts E ({e})")


def validate(x, topk_idx, topk_weight, w_gate_up, w_down) -> None:
    """Checks tensors (torch or numpy: anything with .shape and .dtype) against the contract."""
    validate_shapes(*(tuple(t.shape) for t in (x, topk_idx, topk_weight, w_gate_up, w_down)))
    name = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
    if name(x) not in FLOAT_DTYPES:
        raise ValueError(f"MoEDispatch: x must be a floating dtype {FLOAT_DTYPES}, got {name(x)}")
    if name(topk_idx) != "int64":
        raise ValueError(f"MoEDispatch: topk_idx must be int64, got {name(topk_idx)}")
    for label, t in (("topk_weight", topk_weight), ("w_gate_up", w_gate_up), ("w_down", w_down)):
        if name(t) != name(x):
            raise ValueError(f"MoEDispatch: {label} ({name(t)}) must have x's dtype ({name(x)})")
    e = w_gate_up.shape[0]
    if topk_idx.shape[0] * topk_idx.shape[1] and not (0 <= int(topk_idx.min()) and int(topk_idx.max()) < e):
        raise ValueError(f"MoEDispatch: topk_idx values must lie in [0, E={e}), got [{int(topk_idx.min())}, {int(topk_idx.max())}]")


def fp8_scale_shape(weight_shape) -> tuple:
    """[E, ceil(rows/128), ceil(cols/128)] for an [E, rows, cols] weight."""
    e, rows, cols = weight_shape
    return (e, -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))


def validate_fp8(x, topk_idx, topk_weight, w_gate_up, w_down, w_gate_up_scale, w_down_scale) -> None:
    """MoEDispatchFP8's inputs: the float contract with E4M3 weights and float32 block scales."""
    validate_shapes(*(tuple(t.shape) for t in (x, topk_idx, topk_weight, w_gate_up, w_down)))
    name = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
    for label, w, s in (("w_gate_up", w_gate_up, w_gate_up_scale), ("w_down", w_down, w_down_scale)):
        if name(w) != "float8_e4m3fn":
            raise ValueError(f"MoEDispatchFP8: {label} must be float8_e4m3fn, got {name(w)}")
        if name(s) != "float32":
            raise ValueError(f"MoEDispatchFP8: {label}_scale must be float32, got {name(s)}")
        want = fp8_scale_shape(tuple(w.shape))
        if tuple(s.shape) != want:
            raise ValueError(f"MoEDispatchFP8: {label}_scale must have shape {want} (128x128 blocks of "
                             f"{label} {tuple(w.shape)}), got {tuple(s.shape)}")
