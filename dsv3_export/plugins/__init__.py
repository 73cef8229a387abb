"""Custom ops of the exported graphs: one folder per op (see docs/design.md, "Custom ops")."""

DOMAIN = "dsv3"  # ONNX domain of every custom-op node and its FunctionProto
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "dsv3"  # TensorRT's parser routes nodes carrying these attrs to the plugin
PLUGIN_VERSION = "1"


def register_schema(name: str, inputs, outputs, type_constraints, attributes) -> None:
    """Make a dsv3 op known to onnx (once per process), so torch.onnx's translation can emit it
    as a plain node; its body is attached to the model as a FunctionProto afterwards.

    inputs/outputs: (name, type_str) pairs; attributes: name -> AttrType or default value.
    """
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(name, DOMAIN):
        return
    attrs = [OpSchema.Attribute(k, v, "") if isinstance(v, OpSchema.AttrType)
             else OpSchema.Attribute(k, onnx.helper.make_attribute(k, v), "") for k, v in attributes.items()]
    schema = OpSchema(name, DOMAIN, DOMAIN_VERSION, doc=f"dsv3::{name} (see docs/design.md)",
                      inputs=[OpSchema.FormalParameter(n, t) for n, t in inputs],
                      outputs=[OpSchema.FormalParameter(n, t) for n, t in outputs],
                      type_constraints=type_constraints, attributes=attrs)
    onnx.defs.register_schema(schema)
