"""Tidy the traced graph: drop dead nodes, fold small constants (never the weights: folding a
weight would materialise it), eliminate identities and repeated subexpressions, infer shapes.
Custom-op nodes stay nodes (no inlining)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

# Folding inputs above this many elements would read weights into memory.
FOLD_LIMIT = 4096


def cleanup(model: ir.Model) -> ir.Model:
    onnxscript.optimizer.optimize_ir(model, num_iterations=2, input_size_limit=FOLD_LIMIT,
                                     output_size_limit=FOLD_LIMIT, inline=False)
    ir.passes.PassManager([
        common.IdentityEliminationPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
    ])(model)
    return model
