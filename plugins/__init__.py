"""Custom ops of the exported graphs: one folder per op (see DESIGN.md, "Custom ops")."""

DOMAIN = "dsv3"  # ONNX domain of every custom-op node and its FunctionProto
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "dsv3"  # TensorRT's parser routes nodes carrying these attrs to the plugin
PLUGIN_VERSION = "1"
