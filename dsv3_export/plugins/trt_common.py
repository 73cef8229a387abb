"""Pure-Python pieces shared by the TensorRT registrations (plugins/*/tensorrt.py).

Nothing here imports TensorRT (tests run it without): the ONNX parser's view of
a plugin node, dtype tables, turning TensorRT's raw device buffers into torch
tensors, and the checks a Triton kernel must pass before TensorRT may launch it
ahead of time.

How TensorRT (>= 10.15) maps our ONNX nodes to `tensorrt.plugin` ops, from the
onnx-tensorrt importer and TensorRT's changelog:
- a node whose op_type is a registered plugin name is imported as that plugin
  even when the model holds a FunctionProto of the same name (plugins win over
  local functions since 10.7), so registration must happen before parsing;
- the creator is looked up by (op_type, attribute `plugin_version` default "1",
  attribute `plugin_namespace`, else the node's domain since 10.10);
- only attributes whose names the creator declares are forwarded, FLOAT as
  float32 and INT as int32 PluginFields; `tensorrt.plugin` converts them to the
  annotated Python type (float, int). plugin_namespace / plugin_version select
  the creator and are not forwarded;
- a plugin with both @trtp.impl and @trtp.aot_impl needs a preference (node
  attribute `aot`, or the network flag PREFER_AOT_PYTHON_PLUGINS /
  PREFER_JIT_PYTHON_PLUGINS); with one of them only, that one is used.
"""

import numpy as np

# TensorRT DataType names (trt.DataType.X.name) -> torch / Triton dtype names.
TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8_e4m3fn",
                "INT32": "int32", "INT64": "int64", "INT8": "int8", "BOOL": "bool"}
TRT_TO_TRITON = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
# __cuda_array_interface__ typestrs. BF16 and FP8 have none: they travel as
# same-width integers and are reinterpreted (tensorrt.plugin.Tensor refuses them).
_TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "BF16": "<i2", "FP8": "|u1", "INT32": "<i4",
            "INT64": "<i8", "INT8": "|i1", "BOOL": "|b1"}
_ONNX_FLOAT, _ONNX_INT, _ONNX_STRING = 1, 2, 3  # onnx.AttributeProto.AttributeType values


def dtype_name(dtype) -> str:
    """'BF16' for trt.DataType.BF16 (or the string itself)."""
    return str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1].upper()


def parser_view(node, declared: dict) -> tuple[str, str, dict]:
    """What TensorRT's ONNX parser asks the plugin registry for, given an ONNX
    NodeProto: (plugin id "namespace::name", version, forwarded attributes).

    `declared` maps the attribute names the plugin registers to their Python
    types. Raises ValueError where the parser would fail or TensorRT would see
    a different value than the exporter wrote.
    """
    attrs = {a.name: a for a in node.attribute}

    def string(name, default):
        a = attrs.get(name)
        return default if a is None else a.s.decode()

    namespace = string("plugin_namespace", node.domain)
    version = string("plugin_version", "1")
    fields = {}
    for name, typ in declared.items():
        a = attrs.get(name)
        if a is None:
            raise ValueError(f"{node.op_type}: attribute {name!r} is missing; the plugin has no default for it")
        if typ is float:
            if a.type != _ONNX_FLOAT:
                raise ValueError(f"{node.op_type}: attribute {name!r} must be an ONNX FLOAT")
            fields[name] = float(np.float32(a.f))  # forwarded as float32
        elif typ is int:
            if a.type != _ONNX_INT:
                raise ValueError(f"{node.op_type}: attribute {name!r} must be an ONNX INT")
            if not -(2 ** 31) <= a.i < 2 ** 31:
                raise ValueError(f"{node.op_type}: attribute {name!r}={a.i} does not fit the int32 field")
            fields[name] = int(a.i)
        elif typ is str:
            if a.type != _ONNX_STRING:
                raise ValueError(f"{node.op_type}: attribute {name!r} must be an ONNX STRING")
            fields[name] = a.s.decode()
        else:
            raise TypeError(f"unsupported plugin attribute type {typ!r}")
    return f"{namespace}::{node.op_type}", version, fields


def cuda_array_interface(ptr: int, shape, strides, dtype) -> tuple[dict, str]:
    """(__cuda_array_interface__ dict, torch dtype name to view the result as)
    for a TensorRT buffer; `strides` are in elements, as TensorRT gives them."""
    name = dtype_name(dtype)
    if name not in _TYPESTR:
        raise TypeError(f"no torch view for TensorRT dtype {name}")
    typestr = _TYPESTR[name]
    itemsize = int(typestr[2:])
    iface = {"shape": tuple(int(s) for s in shape), "typestr": typestr, "data": (int(ptr), False),
             "strides": tuple(int(s) * itemsize for s in strides), "version": 3}
    return iface, TRT_TO_TORCH[name]


class _Buffer:
    def __init__(self, iface):
        self.__cuda_array_interface__ = iface


def as_torch(t):
    """Zero-copy torch view of a tensorrt.plugin.Tensor (any dtype, bf16/fp8 included)."""
    import torch

    iface, torch_name = cuda_array_interface(t.data_ptr, tuple(t.shape), tuple(t.strides), t.dtype)
    view = torch.as_tensor(_Buffer(iface), device="cuda")
    want = getattr(torch, torch_name)
    return view if view.dtype == want else view.view(want)


def constant_dim(expr):
    """int value of a build-time-constant TensorRT shape expression, else None.
    Plain ints pass through (tests)."""
    if isinstance(expr, int):
        return expr
    try:
        if getattr(expr, "is_fake", False) or not expr.is_constant:
            return None
        return int(expr.constant_value())
    except (AttributeError, RuntimeError):
        inner = getattr(expr, "_expr", None)  # some 11.x builds trip over _is_dummy here
        return int(inner.get_constant_value()) if inner is not None and inner.is_constant() else None


def check_aot_metadata(md) -> None:
    """Refuse kernels TensorRT's AOT launcher cannot run as Triton would: it
    passes (inputs, int32 scalars, outputs) and null for the trailing hidden
    scratch pointers Triton appends, and knows nothing of clusters,
    cooperative launches or PDL."""
    problems = []
    for field in ("global_scratch_size", "profile_scratch_size", "tmem_size"):
        if getattr(md, field, 0):
            problems.append(f"{field}={getattr(md, field)}")
    if getattr(md, "num_ctas", 1) != 1:
        problems.append(f"num_ctas={md.num_ctas}")
    for field in ("launch_cooperative_grid", "launch_pdl"):
        if getattr(md, field, False):
            problems.append(field)
    if getattr(md, "tensordesc_meta", None):
        problems.append("tensor descriptors")
    if problems:
        raise RuntimeError(f"Triton kernel {getattr(md, 'name', '?')} needs launch features TensorRT's AOT "
                           f"plugin path lacks: {', '.join(problems)}")


def driver_ptx_version():
    """Highest PTX ISA the installed CUDA driver JIT accepts (Triton's encoding,
    e.g. 88 for 8.8), or None. Triton emits the ISA of its bundled ptxas, which
    can be newer than the driver that TensorRT hands the PTX to."""
    import ctypes

    try:
        from triton.backends.nvidia.compiler import ptx_get_version

        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
        return int(ptx_get_version(f"{v.value // 1000}.{(v.value % 1000) // 10}"))
    except Exception:  # no driver, no Triton NVIDIA backend, moved internals
        return None


class Registration:
    """Registers a plugin at most once per process (tensorrt.plugin's registry
    is global and refuses a second definition)."""

    def __init__(self, plugin_id: str):
        self.plugin_id = plugin_id
        self.mode = None

    def claim(self, mode: str) -> bool:
        """True if the caller must define the plugin now."""
        if self.mode is None:
            return True
        if self.mode != mode:
            raise RuntimeError(f"{self.plugin_id} is already registered with impl={self.mode!r}; "
                               f"tensorrt.plugin cannot redefine it as {mode!r} in this process")
        return False


def import_trtp():
    try:
        import tensorrt.plugin as trtp
    except ImportError as err:
        raise ImportError("TensorRT >= 10.15 with its Python package is needed to register the dsv3 plugins "
                          "(pip install 'dsv3-export[gpu]' on a CUDA machine)") from err
    return trtp
