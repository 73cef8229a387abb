"""The build pipeline: checkpoint -> ONNX -> passes -> engine -> verification -> manifest, atomically."""
