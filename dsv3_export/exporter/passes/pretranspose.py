"""Store transposed weights transposed: `Transpose(W)` of a weight becomes a weight holding Wᵀ.

torch.onnx traces `F.linear(x, W)` as `MatMul(x, Transpose(W))`. ONNX Runtime's optimizer folds
each such Transpose into a new initializer when it loads the graph, so a session held a second,
transposed copy in memory of every Linear weight that the exported graph stored the other way round
(`small`: 0.42 GB of 2.33 GB). Writing Wᵀ once, in the exported graph, leaves ONNX Runtime nothing
to fold: the session reads every weight from model.onnx.data as stored. Exact: a transpose moves
values, it does not compute. The transposed tensor is
made lazily when the saver writes it (the weight is read once, as before).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _perm(node: ir.Node, rank: int) -> list[int]:
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else list(range(rank))[::-1]


def _transposed(tensor, perm: list[int], name: str) -> ir.LazyTensor:
    shape = [tensor.shape[p] for p in perm]

    def load() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)), name=name)

    return ir.LazyTensor(load, dtype=tensor.dtype, shape=ir.Shape(shape), name=name)


def pretranspose(model: ir.Model) -> ir.Model:
    """Every Transpose of the main graph whose input is an initializer used by that Transpose alone
    becomes the initializer Wᵀ (named `<W>.T`); weights with other readers are left as they are
    (transposing those would store both layouts)."""
    graph = model.graph
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):  # If branches read weights too
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source, result = node.inputs[0], node.outputs[0]
        tensor = source.const_value if source is not None and source.name in graph.initializers else None
        if tensor is None or len(source.uses()) != 1 or source.is_graph_output() or result.is_graph_output():
            continue
        perm = _perm(node, len(tensor.shape))
        name = f"{source.name}.T"
        value = ir.Value(name=name, shape=ir.Shape([tensor.shape[p] for p in perm]),
                         type=ir.TensorType(tensor.dtype), const_value=_transposed(tensor, perm, name))
        value.meta.update(source.meta)  # e.g. dsv3.quantized: the cleanup pass must keep hiding it
        graph.register_initializer(value)
        result.replace_all_uses_with(value)
        node.graph.remove(node, safe=True)
        del graph.initializers[source.name]
    return model
