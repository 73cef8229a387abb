"""Every dsv3 node carries the plugin attributes TensorRT's parser routes on, and the model carries
each op's FunctionProto (the body in standard ONNX) so any runtime can run it."""

from __future__ import annotations

import onnx_ir as ir

from dsv3_export.plugins import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dsv3_export.plugins.latent_attention import onnx_function as la
from dsv3_export.plugins.moe_dispatch import onnx_function as moe


def _bodies() -> dict[str, "ir.Function"]:
    return {name: ir.serde.deserialize_function(mod.function_proto())
            for name, mod in (("LatentAttention", la), ("MoEDispatch", moe))}


def plugin_attrs(model: ir.Model) -> ir.Model:
    used = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != DOMAIN:
            continue
        used.add(node.op_type)
        node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE)
        node.attributes["plugin_version"] = ir.AttrString("plugin_version", PLUGIN_VERSION)
    bodies = _bodies()
    unknown = used - set(bodies)
    if unknown:
        raise ValueError(f"dsv3 nodes without a function body: {sorted(unknown)}")
    for name in sorted(used):
        fn = bodies[name]
        model.functions[fn.identifier()] = fn
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    return model
