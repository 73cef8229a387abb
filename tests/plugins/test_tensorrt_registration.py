"""TensorRT registration of the dsv3 plugins: the pure logic always, TensorRT itself where installed.

Always: how TensorRT's ONNX parser sees the exporter's nodes (plugin id,
version, forwarded attributes), output shapes, the AOT launch plan (replayed
through Triton's interpreter against the reference) and its compilation for
sm_90 (a subprocess: that needs Triton without the interpreter, not a GPU).
With TensorRT and a GPU: register, parse an ONNX model, build, run.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

from dsv3_export.plugins import PLUGIN_NAMESPACE, trt_common  # noqa: E402
from dsv3_export.plugins.latent_attention import onnx_function as la_onnx  # noqa: E402
from dsv3_export.plugins.latent_attention import spec as la_spec  # noqa: E402
from dsv3_export.plugins.latent_attention import tensorrt as la_trt  # noqa: E402
from dsv3_export.plugins.latent_attention.reference import latent_attention as la_reference  # noqa: E402
from dsv3_export.plugins.moe_dispatch import onnx_function as moe_onnx  # noqa: E402
from dsv3_export.plugins.moe_dispatch import spec as moe_spec  # noqa: E402
from dsv3_export.plugins.moe_dispatch import tensorrt as moe_trt  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
needs_trt = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="TensorRT is not installed or there is no CUDA GPU (TensorRT >= 10.15 needed)")
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- pure logic

def test_latent_attention_node_reaches_the_plugin():
    node = la_onnx.make_node("q", "latent", "cache_lengths", "o_lat", scale=0.0625, kv_lora_rank=512)
    assert list(node.input) == ["q", "latent", "cache_lengths"]
    plugin_id, version, fields = trt_common.parser_view(node, la_trt.ATTRIBUTE_TYPES)
    assert plugin_id == la_trt.PLUGIN_ID == f"{PLUGIN_NAMESPACE}::LatentAttention"
    assert version == "1"
    assert fields == {"scale": 0.0625, "kv_lora_rank": 512}
    assert isinstance(fields["scale"], float) and isinstance(fields["kv_lora_rank"], int)


def test_moe_node_reaches_the_plugin():
    node = moe_onnx.make_node("x", "idx", "w", "wgu", "wd", "y")
    assert trt_common.parser_view(node, moe_trt.ATTRIBUTE_TYPES) == (moe_trt.PLUGIN_ID, "1", {})
    assert moe_trt.PLUGIN_ID == f"{PLUGIN_NAMESPACE}::MoEDispatch"


@pytest.mark.parametrize("trt_mod, spec_mod", [(la_trt, la_spec), (moe_trt, moe_spec)])
def test_registered_attributes_are_the_exporters(trt_mod, spec_mod):
    exported = {k for k in spec_mod.ATTRIBUTES if not k.startswith("plugin_")}
    assert set(trt_mod.ATTRIBUTE_TYPES) == exported
    assert spec_mod.ATTRIBUTES["plugin_namespace"] == PLUGIN_NAMESPACE
    assert spec_mod.ATTRIBUTES["plugin_version"] == "1"


def test_scale_is_forwarded_as_float32():
    node = la_onnx.make_node("q", "latent", "cache_lengths", "o_lat", scale=0.1, kv_lora_rank=8)
    _, _, fields = trt_common.parser_view(node, la_trt.ATTRIBUTE_TYPES)
    assert fields["scale"] == pytest.approx(0.1, rel=1e-7) and fields["scale"] != 0.1


def test_parser_view_namespace_from_domain_and_errors():
    from onnx import helper

    node = helper.make_node("LatentAttention", ["q", "l", "n"], ["o"], domain="dsv3", scale=0.5, kv_lora_rank=4)
    assert trt_common.parser_view(node, la_trt.ATTRIBUTE_TYPES)[0] == "dsv3::LatentAttention"
    missing = helper.make_node("LatentAttention", ["q", "l", "n"], ["o"], domain="dsv3", scale=0.5)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        trt_common.parser_view(missing, la_trt.ATTRIBUTE_TYPES)
    wrong = helper.make_node("LatentAttention", ["q", "l", "n"], ["o"], domain="dsv3", scale=1, kv_lora_rank=4)
    with pytest.raises(ValueError, match="FLOAT"):
        trt_common.parser_view(wrong, la_trt.ATTRIBUTE_TYPES)


class Sym:
    """Stand-in for a TensorRT shape expression."""

    def __init__(self, name):
        self.name = name

    def __mul__(self, other):
        return Sym(f"({self.name}*{other})")

    __rmul__ = __mul__


def test_output_dims():
    b, s = Sym("B"), Sym("S")
    assert la_trt.output_dims((b, s, 128, 576), (b, Sym("T"), 576), 512) == (b, s, 128, 512)
    assert la_trt.output_dims((2, 3, 4, 40), (2, 9, 40), 32) == (2, 3, 4, 32)
    n = Sym("N")
    assert moe_trt.output_dims((n, 7168), (n, 8), (n, 8), (256, 4096, 7168), (256, 7168, 2048)) == (n, 7168)


def test_check_inputs():
    b, s, t = Sym("B"), Sym("S"), Sym("T")
    la_trt.check_inputs((b, s, 128, 576), (b, t, 576), (b,), 512, "BF16", "BF16", "INT64")  # symbolic: fine
    la_trt.check_inputs((2, 1, 4, 40), (2, 9, 40), (2,), 32, "FLOAT", "FLOAT", "INT32")
    with pytest.raises(ValueError, match="rank 1"):
        la_trt.check_inputs((b, s, 4, 40), (b, t, 40), (b, 1), 32)
    with pytest.raises(ValueError, match="cache_lengths has 3 entries but the batch is B=2"):
        la_trt.check_inputs((2, 1, 4, 40), (2, 9, 40), (3,), 32)
    with pytest.raises(ValueError, match="S=10.*T=9"):
        la_trt.check_inputs((2, 10, 4, 40), (2, 9, 40), (2,), 32)
    with pytest.raises(TypeError, match="INT64 or INT32"):
        la_trt.check_inputs((2, 1, 4, 40), (2, 9, 40), (2,), 32, "FLOAT", "FLOAT", "FLOAT")
    with pytest.raises(TypeError, match="same dtype"):
        la_trt.check_inputs((2, 1, 4, 40), (2, 9, 40), (2,), 32, "FLOAT", "HALF", "INT64")


def test_cuda_array_interface():
    iface, torch_dtype = trt_common.cuda_array_interface(4096, (2, 3), (3, 1), SimpleNamespace(name="BF16"))
    assert torch_dtype == "bfloat16"
    assert iface["typestr"] == "<i2" and iface["strides"] == (6, 2) and iface["data"] == (4096, False)
    iface, torch_dtype = trt_common.cuda_array_interface(0, (4,), (1,), "DataType.FP8")
    assert (iface["typestr"], torch_dtype) == ("|u1", "float8_e4m3fn")
    assert trt_common.cuda_array_interface(0, (4,), (1,), "INT64")[0]["strides"] == (8,)
    with pytest.raises(TypeError):
        trt_common.cuda_array_interface(0, (4,), (1,), "FP4")


def test_constant_dim():
    class Expr:
        is_fake = False

        def __init__(self, value):
            self.is_constant = value is not None
            self.value = value

        def constant_value(self):
            return self.value

    assert trt_common.constant_dim(Expr(576)) == 576
    assert trt_common.constant_dim(Expr(None)) is None
    assert trt_common.constant_dim(7) == 7


def test_check_aot_metadata():
    ok = SimpleNamespace(name="k", global_scratch_size=0, profile_scratch_size=0, num_ctas=1,
                         launch_cooperative_grid=False, launch_pdl=False, tmem_size=0, tensordesc_meta=[])
    trt_common.check_aot_metadata(ok)
    with pytest.raises(RuntimeError, match="global_scratch_size"):
        trt_common.check_aot_metadata(SimpleNamespace(**{**vars(ok), "global_scratch_size": 64}))


def test_registration_is_once_per_mode():
    reg = trt_common.Registration("dsv3::X")
    assert reg.claim("aot")
    reg.mode = "aot"
    assert not reg.claim("aot")
    with pytest.raises(RuntimeError, match="already registered"):
        reg.claim("jit")


def test_register_rejects_unknown_impl():
    with pytest.raises(ValueError):
        la_trt.register(impl="cuda")
    with pytest.raises(ValueError):
        moe_trt.register(impl="aot")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
def test_register_without_tensorrt_says_what_is_missing():
    with pytest.raises(ImportError, match="TensorRT"):
        la_trt.register()


def test_aot_plan_rejects_dynamic_heads():
    from dsv3_export.plugins.latent_attention.triton import aot_plan

    with pytest.raises(ValueError, match="build-time"):
        aot_plan(1, 1, 8, Sym("H"), 40, 32, 0.1, "fp32")


# ---------------------------------------------------------------- AOT kernel, no GPU

@needs_triton
def test_aot_runtime_arguments_follow_tensorrts_order():
    from dsv3_export.plugins.latent_attention import triton as lat_triton

    plan = la_trt.aot_kernel_plan((2, 1, 4, 40), (2, 9, 40), 0.125, 32, "BF16")
    runtime = [n for n in lat_triton.AOT_KERNEL.arg_names if plan["signature"][n] != "constexpr"]
    # TensorRT launches (input pointers..., extra int32 scalars..., output pointers...),
    # the inputs in the node's order: q, latent, cache_lengths.
    assert runtime == ["q_ptr", "lat_ptr", "len_ptr", *lat_triton.AOT_SCALARS, "o_ptr"]
    assert list(lat_triton.AOT_INPUTS) == runtime[:3]
    assert [n for n, _ in plan["scalars"]] == list(lat_triton.AOT_SCALARS)
    assert plan["signature"]["q_ptr"] == "*bf16" and plan["signature"]["S"] == "i32"
    assert plan["signature"]["len_ptr"] == "*i64" and "len_ptr" in plan["divisible_by_16"]
    plan32 = la_trt.aot_kernel_plan((2, 1, 4, 40), (2, 9, 40), 0.125, 32, "BF16", lengths_dtype="INT32")
    assert plan32["signature"]["len_ptr"] == "*i32"
    with pytest.raises(TypeError, match="INT64 or INT32"):
        la_trt.aot_kernel_plan((2, 1, 4, 40), (2, 9, 40), 0.125, 32, "BF16", lengths_dtype="FLOAT")


@needs_triton
@pytest.mark.parametrize("s, t, dtype, ragged, int32", [
    (1, 37, torch.float32, False, False), (3, 20, torch.bfloat16, False, False), (17, 17, torch.float16, False, False),
    (1, 37, torch.float32, True, False), (3, 20, torch.bfloat16, True, True), (5, 30, torch.float16, True, False)])
def test_aot_plan_replayed_matches_reference(s, t, dtype, ragged, int32):
    """Launch the kernel exactly as the AOT plugin would (same constexprs, scalar
    values, grid, positional arguments in TensorRT's order), with the plan's
    shape expressions evaluated as ints. ragged: per-row lengths with NaN
    garbage past L_b + S; else every row L_b = T - S."""
    from dsv3_export.plugins.latent_attention import triton as lat_triton

    b, h, r, dr = 3, 3, 32, 8
    g = torch.Generator().manual_seed(s)
    q = torch.randn(b, s, h, r + dr, generator=g).to(dtype)
    latent = torch.randn(b, t, r + dr, generator=g).to(dtype)
    lengths = torch.full((b,), t - s, dtype=torch.int64)
    if ragged:
        lengths = torch.tensor([0, (t - s) // 2, t - s - 1])
        for i, n in enumerate(lengths.tolist()):
            latent[i, n + s:] = float("nan")
    if int32:
        lengths = lengths.int()
    dev = "cuda" if _GPU else "cpu"
    q, latent, lengths = q.to(dev), latent.to(dev), lengths.to(dev)
    out = torch.full((b, s, h, r), float("nan"), dtype=dtype, device=dev)
    name = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16"}[dtype]
    plan = la_trt.aot_kernel_plan(q.shape, latent.shape, 0.2, r, name, lengths_dtype="INT32" if int32 else "INT64")
    runtime = [n for n in lat_triton.AOT_KERNEL.arg_names if plan["signature"][n] != "constexpr"]
    args = dict(zip(runtime, lat_triton.aot_launch_args(plan, q, latent, lengths, out)))
    lat_triton.AOT_KERNEL[plan["grid"]](**args, **plan["constexprs"],
                                        num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    want = la_reference(q.float().cpu(), latent.float().cpu(), 0.2, r, lengths.cpu())
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), want, atol=tol, rtol=tol)


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from dsv3_export.plugins.latent_attention import tensorrt as la_trt
    plan = la_trt.aot_kernel_plan((2, 1, 4, 40), (2, 9, 40), 0.125, 32, "BF16")
    k = la_trt.compile_aot(plan, arch=90)
    ptx = k.asm["ptx"]
    entry = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    print(json.dumps(dict(name=k.metadata.name, params=re.findall(r"\\.param \\.(\\w+)", entry),
                          target=re.search(r"\\.target (\\w+)", ptx).group(1),
                          block=k.metadata.num_warps * 32, shared=k.metadata.shared)))
""")


@needs_triton
def test_aot_kernel_compiles_for_sm90_without_a_gpu():
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["name"] == "_attn_kernel" and info["target"].startswith("sm_90")
    # q, latent, cache_lengths, 5 int32 scalars, o; then Triton's hidden scratch
    # pointers (TensorRT passes null for those: scratch sizes are checked to be 0).
    assert info["params"][:9] == ["u64", "u64", "u64", "u32", "u32", "u32", "u32", "u32", "u64"]
    assert all(p == "u64" for p in info["params"][9:])


# ---------------------------------------------------------------- with TensorRT

def _build_and_run(model_bytes, feeds: dict, *, strongly_typed=True):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 networks are always strongly typed and drop the flag.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(flag) if strongly_typed and flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_bytes), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, tuple(feeds[name].shape))
            context.set_tensor_address(name, feeds[name].data_ptr())
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}[
                engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return outputs


@needs_trt
def test_tensorrt_latent_attention_engine():
    from onnx import TensorProto, helper

    la_trt.register()
    b, s, t, h, r, dr = 3, 2, 40, 4, 32, 16
    node = la_onnx.make_node("q", "latent", "cache_lengths", "o_lat", scale=0.2, kv_lora_rank=r)
    graph = helper.make_graph(
        [node], "la",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [b, s, h, r + dr]),
         helper.make_tensor_value_info("latent", TensorProto.FLOAT, [b, t, r + dr]),
         helper.make_tensor_value_info("cache_lengths", TensorProto.INT64, [b])],
        [helper.make_tensor_value_info("o_lat", TensorProto.FLOAT, [b, s, h, r])])
    model = helper.make_model(graph, ir_version=11, functions=[la_onnx.function_proto()], opset_imports=[
        helper.make_opsetid("", la_onnx.OPSET), helper.make_opsetid(la_spec.OP_DOMAIN, 1)])
    q = torch.randn(b, s, h, r + dr, device="cuda")
    latent = torch.randn(b, t, r + dr, device="cuda")
    lengths = torch.tensor([0, 17, t - s], device="cuda")
    for i, n in enumerate(lengths.tolist()):
        latent[i, n + s:] = float("nan")  # unwritten capacity
    out = _build_and_run(model.SerializeToString(), {"q": q, "latent": latent, "cache_lengths": lengths})["o_lat"]
    want = la_reference(q.cpu(), latent.cpu(), 0.2, r, lengths.cpu())
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


@needs_trt
def test_tensorrt_moe_dispatch_engine():
    from onnx import TensorProto, helper

    from dsv3_export.plugins.moe_dispatch.reference import moe_dispatch as moe_reference

    moe_trt.register()
    n, k, e, d, inter = 5, 2, 4, 64, 32
    node = moe_onnx.make_node("x", "topk_idx", "topk_weight", "w_gate_up", "w_down", "y")
    names_shapes = [("x", TensorProto.FLOAT, [n, d]), ("topk_idx", TensorProto.INT64, [n, k]),
                    ("topk_weight", TensorProto.FLOAT, [n, k]), ("w_gate_up", TensorProto.FLOAT, [e, 2 * inter, d]),
                    ("w_down", TensorProto.FLOAT, [e, d, inter])]
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info(*a) for a in names_shapes],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, d])])
    model = helper.make_model(graph, ir_version=11, functions=[moe_onnx.function_proto()], opset_imports=[
        helper.make_opsetid("", moe_onnx.OPSET), helper.make_opsetid(moe_spec.OP_DOMAIN, 1)])
    feeds = dict(x=torch.randn(n, d), topk_idx=torch.stack([torch.randperm(e)[:k] for _ in range(n)]),
                 topk_weight=torch.rand(n, k), w_gate_up=torch.randn(e, 2 * inter, d) / 8,
                 w_down=torch.randn(e, d, inter) / 6)
    out = _build_and_run(model.SerializeToString(), {k_: v.cuda() for k_, v in feeds.items()})["y"]
    torch.testing.assert_close(out.cpu(), moe_reference(**feeds), atol=1e-4, rtol=1e-4)
