"""config.pbtxt: rendered from the graph contract and checked against Triton's model-config schema.

The text is written by hand (readable, in the order Triton's docs use) and then parsed with
`google.protobuf.text_format` into `inference.ModelConfig` from tritonclient's generated
model_config_pb2 (the schema Triton itself reads), so a misspelt field, a bad enum value or a
malformed list fails here, before anything is written. On top of the schema, `validate` checks what
the parser cannot: one of backend/platform, unique tensor names, dims of -1 or positive, and
`max_batch_size: 0` (the batch dim is part of our graph contract, so Triton must not add one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dsv3_export.core.errors import ExportError

# numpy dtype names of the graph contract (core.build_dir.graph_io) -> Triton's data types.
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "uint8": "TYPE_UINT8",
    "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
}


def schema():
    """tritonclient's model_config_pb2 (the inference.ModelConfig message), or one line on what to install."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # tritonclient, or its grpc extra (grpcio, protobuf), is missing
        raise ExportError(f"checking Triton model configs needs tritonclient with its grpc extra "
                          f"(pip install 'tritonclient[grpc]'): {e}") from None
    return model_config_pb2


def dims(shape: Sequence[Any]) -> list[int]:
    """A contract shape (symbolic dims "batch", "seq", "past" or sizes) as Triton dims: -1 = dynamic."""
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def triton_type(dtype: str) -> str:
    if dtype not in TRITON_TYPES:
        raise ExportError(f"dtype {dtype!r} has no Triton data type here (known: {', '.join(TRITON_TYPES)})")
    return TRITON_TYPES[dtype]


def tensor(name: str, data_type: str, shape: Sequence[int], optional: bool = False) -> str:
    """One entry of `input [...]` / `output [...]`."""
    text = f'name: {json.dumps(name)} data_type: {data_type} dims: [ {", ".join(map(str, shape))} ]'
    return "{ " + text + (" optional: true" if optional else "") + " }"


def contract_tensors(specs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The graph contract's inputs or outputs (manifest["io"][file]) as config entries."""
    return [tensor(s["name"], triton_type(s["dtype"]), dims(s["shape"])) for s in specs]


def instance_group(kind: str, *, count: int = 1, gpus: Sequence[int] | None = None,
                   profiles: Sequence[str] | None = None) -> str:
    parts = [f"kind: {kind}", f"count: {count}"]
    if gpus:
        parts.append(f"gpus: [ {', '.join(map(str, gpus))} ]")
    if profiles:
        parts.append(f"profile: [ {', '.join(json.dumps(p) for p in profiles)} ]")
    return "instance_group [ { " + " ".join(parts) + " } ]"


def render(name: str, *, inputs: Sequence[str], outputs: Sequence[str], instances: str,
           backend: str | None = None, platform: str | None = None, parameters: Mapping[str, str] | None = None,
           decoupled: bool = False, default_model_filename: str | None = None) -> str:
    """The text of one config.pbtxt, validated (ExportError naming the model when it is not valid)."""
    lines = [f"name: {json.dumps(name)}"]
    if backend:
        lines.append(f"backend: {json.dumps(backend)}")
    if platform:
        lines.append(f"platform: {json.dumps(platform)}")
    if default_model_filename:
        lines.append(f"default_model_filename: {json.dumps(default_model_filename)}")
    lines.append("max_batch_size: 0")
    for key, entries in (("input", inputs), ("output", outputs)):
        lines.append(f"{key} [\n  " + ",\n  ".join(entries) + "\n]")
    lines.append(instances)
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(str(value))} }} }}")
    text = "\n".join(lines) + "\n"
    validate(text, origin=name)
    return text


def parse(text: str, origin: str = "config.pbtxt"):
    """The text as an inference.ModelConfig message (ExportError on anything the schema rejects)."""
    from google.protobuf import text_format

    pb = schema()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"{origin}: not a valid Triton model config: {e}") from None


def validate(text: str, origin: str = "config.pbtxt"):
    """parse, then the rules the schema cannot state; returns the message."""
    cfg = parse(text, origin)
    if not cfg.name:
        raise ExportError(f"{origin}: the config has no name")
    if bool(cfg.backend) == bool(cfg.platform):
        raise ExportError(f"{origin}: give exactly one of backend and platform")
    if cfg.max_batch_size != 0:
        raise ExportError(f"{origin}: max_batch_size must be 0 (the batch dim is in the graph contract)")
    names = [t.name for t in cfg.input] + [t.name for t in cfg.output]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExportError(f"{origin}: tensor names used twice: {', '.join(dup)}")
    for t in list(cfg.input) + list(cfg.output):
        if not t.name or not t.dims or any(d == 0 or d < -1 for d in t.dims):
            raise ExportError(f"{origin}: tensor {t.name!r} needs a name and dims of -1 or > 0, got {list(t.dims)}")
    if not cfg.instance_group:
        raise ExportError(f"{origin}: no instance_group")
    return cfg
