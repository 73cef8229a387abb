"""ONNX passes on onnx-ir: each module is one function `ir.Model -> ir.Model`.

Order in a build: plugin_attrs (custom-op contract and function bodies) -> attach_weights (lazy
tensors from the checkpoint) -> cleanup (dead code, small-constant folding, shape inference).
"""
