"""TensorRT registration of dsv3::MoEDispatch through `tensorrt.plugin`.

MoEDispatch takes several launches (routing alignment in torch ops, two grouped
GEMMs), which an AOT plugin (one kernel per plugin) cannot express, so it is a
JIT plugin: a Python callback runs plugins.moe_dispatch.triton.moe_dispatch on
TensorRT's stream, and engines holding it need this module (and `register()`)
at run time. Importing the module needs neither TensorRT nor a GPU.

FP8: a tensorrt.plugin op has a fixed number of inputs (no optional ones), so
the FP8 form with its two block-scale inputs (spec.FP8_SCALE_INPUTS) is a
second op, spec.FP8_OP_NAME, with seven inputs; the quantize pass emits that op
type for FP8 experts (exporter/passes/quantize.py).

No `from __future__ import annotations` here: tensorrt.plugin inspects the
annotations as classes.
"""

from typing import Tuple

from dsv3_export.plugins import PLUGIN_NAMESPACE
from dsv3_export.plugins.moe_dispatch import spec
from dsv3_export.plugins.trt_common import Registration, as_torch, import_trtp

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{spec.OP_NAME}"
FP8_OP_NAME = spec.FP8_OP_NAME
FP8_PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{FP8_OP_NAME}"
ATTRIBUTE_TYPES: dict = {}  # only plugin_namespace / plugin_version, which TensorRT does not forward
_state = Registration(PLUGIN_ID)


def output_dims(x_dims, topk_idx_dims, topk_weight_dims, w_gate_up_dims, w_down_dims):
    """[N, D] from x's dims (ints or TensorRT shape expressions)."""
    return tuple(spec.output_shape(tuple(x_dims), tuple(topk_idx_dims), tuple(topk_weight_dims),
                                   tuple(w_gate_up_dims), tuple(w_down_dims)))


def _run(tensors, out, stream, scales=(None, None)):
    import torch

    from dsv3_export.plugins.moe_dispatch.triton import moe_dispatch  # lazy: triton is for GPU hosts only

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        x, idx, w, wgu, wd = (as_torch(t) for t in tensors)
        s_gu, s_d = (None if s is None else as_torch(s) for s in scales)
        moe_dispatch(x, idx, w, wgu, wd, s_gu, s_d, out=as_torch(out))


def register(impl: str = "jit") -> None:
    """Define dsv3::MoEDispatch and dsv3::MoEDispatchFP8 (once per process)."""
    if impl != "jit":
        raise ValueError("MoEDispatch has only a JIT implementation (several kernel launches per call)")
    if not _state.claim(impl):
        return
    trtp = import_trtp()

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, topk_idx: trtp.TensorDesc, topk_weight: trtp.TensorDesc,
              w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr(output_dims(x.shape_expr, topk_idx.shape_expr, topk_weight.shape_expr,
                                                w_gate_up.shape_expr, w_down.shape_expr), dtype=x.dtype)

    @trtp.impl(PLUGIN_ID)
    def _impl(x: trtp.Tensor, topk_idx: trtp.Tensor, topk_weight: trtp.Tensor, w_gate_up: trtp.Tensor,
              w_down: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _run((x, topk_idx, topk_weight, w_gate_up, w_down), outputs[0], stream)

    @trtp.register(FP8_PLUGIN_ID)
    def _desc_fp8(x: trtp.TensorDesc, topk_idx: trtp.TensorDesc, topk_weight: trtp.TensorDesc,
                  w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, w_gate_up_scale: trtp.TensorDesc,
                  w_down_scale: trtp.TensorDesc) -> trtp.TensorDesc:
        return trtp.from_shape_expr(output_dims(x.shape_expr, topk_idx.shape_expr, topk_weight.shape_expr,
                                                w_gate_up.shape_expr, w_down.shape_expr), dtype=x.dtype)

    @trtp.impl(FP8_PLUGIN_ID)
    def _impl_fp8(x: trtp.Tensor, topk_idx: trtp.Tensor, topk_weight: trtp.Tensor, w_gate_up: trtp.Tensor,
                  w_down: trtp.Tensor, w_gate_up_scale: trtp.Tensor, w_down_scale: trtp.Tensor,
                  outputs: Tuple[trtp.Tensor], stream: int) -> None:
        _run((x, topk_idx, topk_weight, w_gate_up, w_down), outputs[0], stream, (w_gate_up_scale, w_down_scale))

    _state.mode = impl
