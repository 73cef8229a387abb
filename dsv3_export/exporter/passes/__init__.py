"""ONNX passes on onnx-ir: each module is one function `ir.Model -> ir.Model`.

Order in a build (pipeline.build.export_graph): plugin_attrs (custom-op contract and function
bodies) -> attach_weights (lazy tensors from the checkpoint) -> quantize (a quantized precision's
Q/DQ, MatMulNBits or fp8 forms, before cleanup: it matches the traced MatMul forms) -> cleanup
(dead code, small-constant folding, shape inference) -> lower_ort (ONNX Runtime's native kernels
in place of the portable bodies; the MLA rule in lower_ort_mla). ir_values: what the rules ask of
a value.
"""
