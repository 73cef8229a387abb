"""Tidy the traced graph: drop dead nodes, fold small constants (never the weights: folding a
weight would materialise it), eliminate identities and repeated subexpressions, infer shapes.
Custom-op nodes stay nodes (no inlining)."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

# Folding inputs above this many elements would read weights into memory.
FOLD_LIMIT = 4096


def cleanup(model: ir.Model) -> ir.Model:
    # The optimizer's rules look into any constant they meet; hide the weights from it so that
    # none is read (a lazy weight read here would cost a full pass over the checkpoint).
    hidden = {}
    for name, value in model.graph.initializers.items():
        # Quantized weights and scales (passes/quantize.py) too, whatever their size: folding a
        # DequantizeLinear of a small one would turn it back into floats.
        if value.const_value is not None and (value.const_value.size > FOLD_LIMIT or value.meta.get("dsv3.quantized")):
            hidden[name], value.const_value = value.const_value, None
    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)  # it warns about every hidden weight it cannot deduplicate
    try:
        onnxscript.optimizer.optimize_ir(model, num_iterations=2, input_size_limit=FOLD_LIMIT,
                                         output_size_limit=FOLD_LIMIT, inline=False)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
        for name, tensor in hidden.items():
            if name in model.graph.initializers:
                model.graph.initializers[name].const_value = tensor
    ir.passes.PassManager([
        common.IdentityEliminationPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
    ])(model)
    return model
