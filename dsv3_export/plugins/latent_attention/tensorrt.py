"""TensorRT registration of dsv3::LatentAttention through `tensorrt.plugin`.

Importing this module needs neither TensorRT nor a GPU: `register()` imports
tensorrt.plugin when called, and must run before the ONNX parser meets the node
(see plugins/trt_common.py for how the parser maps the node to the plugin).

impl="aot" (default): the unsplit Triton kernel is compiled to PTX while the
engine is built and embedded in it, so the engine runs without Python (trtexec,
C++). One launch per call: no split-K decode, so a decode step at small batch
fills fewer SMs than the Python path. impl="jit": a Python callback runs the
Triton wrapper (split-K decode + combine) on TensorRT's stream; the engine then
needs this module at run time. impl="both" defines both; the network must then
be created with PREFER_AOT_PYTHON_PLUGINS or PREFER_JIT_PYTHON_PLUGINS.

Inputs (graph contract v2): q [B,S,H,C], latent [B,T,C] (the cache buffer),
cache_lengths [B] (INT64 from the ONNX graph; INT32 also taken). The AOT kernel
receives them as its three input pointers, in that order.

No `from __future__ import annotations` here: tensorrt.plugin inspects the
annotations as classes.
"""

from typing import Tuple, Union

from dsv3_export.plugins import PLUGIN_NAMESPACE
from dsv3_export.plugins.latent_attention import spec
from dsv3_export.plugins.trt_common import (
    TRT_TO_TRITON,
    Registration,
    as_torch,
    check_aot_metadata,
    constant_dim,
    driver_ptx_version,
    dtype_name,
    import_trtp,
)

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{spec.OP_NAME}"
# Attributes TensorRT forwards to the plugin: the exporter's names, minus the
# plugin_* ones that only select the creator.
ATTRIBUTE_TYPES = {"scale": float, "kv_lora_rank": int}
# TensorRT dtype names of cache_lengths -> Triton pointer element types.
LENGTH_TO_TRITON = {"INT64": "i64", "INT32": "i32"}
_state = Registration(PLUGIN_ID)


def _dims(dims) -> tuple:
    """Build-time constant dims as ints, the others left symbolic (as they came)."""
    out = []
    for i in range(len(dims)):  # TensorRT's ShapeExprs index, they need not iterate
        d = dims[i]
        v = constant_dim(d)
        out.append(d if v is None else v)
    return tuple(out)


def check_inputs(q_dims, latent_dims, lengths_dims, kv_lora_rank: int, q_dtype=None, latent_dtype=None,
                 lengths_dtype=None) -> None:
    """The contract's checks on what TensorRT knows at build time: ranks, the
    constant dims, dtypes (ints or TensorRT shape expressions / DataTypes)."""
    spec.validate_shapes(_dims(q_dims), _dims(latent_dims), int(kv_lora_rank), _dims(lengths_dims))
    if q_dtype is not None and latent_dtype is not None and dtype_name(q_dtype) != dtype_name(latent_dtype):
        raise TypeError(f"{PLUGIN_ID}: q ({dtype_name(q_dtype)}) and latent ({dtype_name(latent_dtype)}) "
                        "must have the same dtype")
    if lengths_dtype is not None and dtype_name(lengths_dtype) not in LENGTH_TO_TRITON:
        raise TypeError(f"{PLUGIN_ID}: cache_lengths must be INT64 or INT32, got {dtype_name(lengths_dtype)}")


def output_dims(q_dims, latent_dims, kv_lora_rank: int):
    """[B,S,H,r] from q's dims (ints or TensorRT shape expressions)."""
    return tuple(spec.output_shape(tuple(q_dims), tuple(latent_dims), kv_lora_rank))


def aot_kernel_plan(q_dims, latent_dims, scale: float, kv_lora_rank: int, dtype, cdiv=None,
                    lengths_dtype="INT64") -> dict:
    """Compile-and-launch plan for the AOT kernel from the inputs' dims.
    H and C must be constants; B, S, T may be shape expressions."""
    from dsv3_export.plugins.latent_attention.triton import aot_plan  # lazy: triton is for GPU hosts only

    b, s, h, c = q_dims
    t = latent_dims[1]
    name = dtype_name(dtype)
    if name not in TRT_TO_TRITON:
        raise TypeError(f"{PLUGIN_ID}: unsupported input dtype {name}")
    lname = dtype_name(lengths_dtype)
    if lname not in LENGTH_TO_TRITON:
        raise TypeError(f"{PLUGIN_ID}: cache_lengths must be INT64 or INT32, got {lname}")
    return aot_plan(b, s, t, constant_dim(h), constant_dim(c), int(kv_lora_rank), float(scale),
                    TRT_TO_TRITON[name], lengths_dtype=LENGTH_TO_TRITON[lname], cdiv=cdiv)


def compile_aot(plan: dict, arch: int | None = None):
    """triton.compile the plan's kernel for `arch` (e.g. 90; default: the current
    GPU). Works without a GPU when arch is given, but not in a process running
    Triton's interpreter (TRITON_INTERPRET=1 replaces the kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from dsv3_export.plugins.latent_attention.triton import AOT_KERNEL  # lazy: triton is for GPU hosts only

    local = arch is None
    if local:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor
    names = AOT_KERNEL.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in plan["divisible_by_16"]}
    src = triton.compiler.ASTSource(fn=AOT_KERNEL, signature=plan["signature"], constexprs=plan["constexprs"],
                                    attrs=attrs)
    options = dict(num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    cap = driver_ptx_version() if local else None
    if cap is not None:
        from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

        try:
            emitted = ptx_get_version(get_ptxas(arch).version)
        except TypeError:  # Triton < 3.6 takes no arch
            emitted = ptx_get_version(get_ptxas().version)
        if emitted > cap:
            options["ptx_version"] = cap  # the driver JIT would refuse newer PTX
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    check_aot_metadata(compiled.metadata)
    return compiled


def register(impl: str = "aot") -> None:
    """Define dsv3::LatentAttention in tensorrt.plugin's registry (once per process)."""
    if impl not in ("aot", "jit", "both"):
        raise ValueError(f"impl must be 'aot', 'jit' or 'both', got {impl!r}")
    if not _state.claim(impl):
        return
    trtp = import_trtp()

    @trtp.register(PLUGIN_ID)
    def _desc(q: trtp.TensorDesc, latent: trtp.TensorDesc, cache_lengths: trtp.TensorDesc, scale: float,
              kv_lora_rank: int) -> trtp.TensorDesc:
        check_inputs(q.shape_expr, latent.shape_expr, cache_lengths.shape_expr, kv_lora_rank,
                     q.dtype, latent.dtype, cache_lengths.dtype)
        return trtp.from_shape_expr(output_dims(q.shape_expr, latent.shape_expr, kv_lora_rank), dtype=q.dtype)

    if impl in ("aot", "both"):
        @trtp.aot_impl(PLUGIN_ID)
        def _aot(q: trtp.TensorDesc, latent: trtp.TensorDesc, cache_lengths: trtp.TensorDesc, scale: float,
                 kv_lora_rank: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            # Kernel arguments: q, latent, cache_lengths (TensorRT's inputs, in order), scalars, o.
            plan = aot_kernel_plan(q.shape_expr, latent.shape_expr, scale, kv_lora_rank, q.dtype, cdiv=trtp.cdiv,
                                   lengths_dtype=cache_lengths.dtype)
            compiled = compile_aot(plan)
            launch = trtp.KernelLaunchParams()
            launch.grid_x, launch.grid_y, launch.grid_z = plan["grid"]
            launch.block_x = compiled.metadata.num_warps * 32
            launch.shared_mem = compiled.metadata.shared
            extra = trtp.SymIntExprs(len(plan["scalars"]))
            for i, (_, value) in enumerate(plan["scalars"]):
                extra[i] = trtp.SymInt32(value)
            return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    if impl in ("jit", "both"):
        @trtp.impl(PLUGIN_ID)
        def _jit(q: trtp.Tensor, latent: trtp.Tensor, cache_lengths: trtp.Tensor, scale: float, kv_lora_rank: int,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
            import torch

            from dsv3_export.plugins.latent_attention.triton import latent_attention  # lazy: GPU hosts only

            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                latent_attention(as_torch(q), as_torch(latent), scale, kv_lora_rank, as_torch(cache_lengths),
                                 out=as_torch(outputs[0]))

    _state.mode = impl
