"""LatentAttention: reference vs naive math, ONNX function body in ORT vs reference, contract.

Per-row cache lengths (contract v2): row b's buffer holds L_b past rows, its S new
rows at L_b..L_b+S-1, then unwritten capacity filled with garbage (large values,
NaN, inf) that must get exactly zero weight."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from dsv3_export.plugins import PLUGIN_NAMESPACE, PLUGIN_VERSION
from dsv3_export.plugins.latent_attention import onnx_function, spec
from dsv3_export.plugins.latent_attention.reference import latent_attention
from tests.plugins.latent_attention.cases import ragged

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(b, s, t, h, r, dr, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, r + dr, generator=g).to(dtype)
    latent = torch.randn(b, t, r + dr, generator=g).to(dtype)
    return q, latent


def full_lengths(q, latent):
    """The contract before v2: every row's new tokens end the buffer (L_b = T - S)."""
    return torch.full((q.shape[0],), latent.shape[1] - q.shape[1], dtype=torch.int64)


def build_model(scale, r, elem=TensorProto.FLOAT, *, plugin_attrs=True) -> onnx.ModelProto:
    node = onnx_function.make_node("q", "latent", "cache_lengths", "o_lat", scale=scale, kv_lora_rank=r)
    if not plugin_attrs:
        kept = [a for a in node.attribute if not a.name.startswith("plugin_")]
        del node.attribute[:]
        node.attribute.extend(kept)
    graph = helper.make_graph(
        [node], "latent_attention",
        [helper.make_tensor_value_info("q", elem, ["B", "S", "H", "C"]),
         helper.make_tensor_value_info("latent", elem, ["B", "T", "C"]),
         helper.make_tensor_value_info("cache_lengths", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("o_lat", elem, ["B", "S", "H", r])],
    )
    # ir_version 11: ORT 1.31 reads up to 13, onnx 1.23 would write 14.
    return helper.make_model(
        graph, ir_version=11, functions=[onnx_function.function_proto()],
        opset_imports=[helper.make_opsetid("", onnx_function.OPSET), helper.make_opsetid(spec.OP_DOMAIN, 1)],
    )


def run_ort(q, latent, scale, r, lengths=None, **kw):
    lengths = full_lengths(q, latent) if lengths is None else lengths
    model = build_model(scale, r, TensorProto.FLOAT16 if q.dtype == torch.float16 else TensorProto.FLOAT, **kw)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"q": q.numpy(), "latent": latent.numpy(), "cache_lengths": lengths.numpy()})
    return torch.from_numpy(out)


def naive_loops(q, latent, scale, r, lengths=None):
    """Scalar loops in float64: the definition, nothing vectorized. Only rows
    t <= L_b + s are ever read."""
    b_n, s_n, h_n, c_n = q.shape
    t_n = latent.shape[1]
    lengths = [t_n - s_n] * b_n if lengths is None else lengths.tolist()
    q, latent = q.double().tolist(), latent.double().tolist()
    out = torch.zeros(b_n, s_n, h_n, r, dtype=torch.float64)
    for b in range(b_n):
        for s in range(s_n):
            for h in range(h_n):
                keys = range(lengths[b] + s + 1)
                logits = [scale * sum(q[b][s][h][c] * latent[b][t][c] for c in range(c_n)) for t in keys]
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                for t in keys:
                    for i in range(r):
                        out[b, s, h, i] += w[t] / sum(w) * latent[b][t][i]
    return out


def sdpa_per_head(q, latent, scale, r):
    """Standard per-head attention with K = latent (all heads share it), V = latent[..., :r],
    causal with offset T-S (the whole buffer is valid)."""
    b, s, h, _ = q.shape
    t = latent.shape[1]
    k = latent[:, None].expand(b, h, t, -1)
    v = latent[:, None, :, :r].expand(b, h, t, r)
    mask = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def sdpa_rows(q, latent, scale, r, lengths):
    """Each batch row alone, its buffer cut to the L_b + S valid rows: the
    pre-v2 causal attention per row (nothing past the valid rows exists)."""
    s = q.shape[1]
    return torch.cat([sdpa_per_head(q[i:i + 1], latent[i:i + 1, :int(n) + s], scale, r)
                      for i, n in enumerate(lengths)])


# (b, s, t, h, r, dr): decode with past, prefill S==T, S>1 with causal offset, odd T.
CASES = [(1, 1, 13, 2, 4, 2), (2, 5, 5, 3, 6, 2), (2, 3, 11, 2, 5, 3), (1, 2, 7, 1, 3, 1)]


@pytest.mark.parametrize("shape", CASES)
def test_reference_matches_naive_loops(shape):
    q, latent = make_inputs(*shape, dtype=torch.float64)  # float64 stays float64 in the reference
    r = shape[4]
    torch.testing.assert_close(latent_attention(q, latent, 0.3, r), naive_loops(q, latent, 0.3, r), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", CASES)
def test_reference_matches_per_head_sdpa(shape):
    q, latent = make_inputs(*shape)
    r = shape[4]
    torch.testing.assert_close(latent_attention(q, latent, 0.7, r), sdpa_per_head(q, latent, 0.7, r), **FP32_TOL)


# (b, s, t, h, r, dr): capacity beyond the valid rows in some rows, S == T - L in others.
RAGGED = [(3, 1, 13, 2, 4, 2), (3, 3, 11, 2, 5, 3), (2, 5, 9, 3, 6, 2), (4, 2, 7, 1, 3, 1)]


@pytest.mark.parametrize("shape", CASES)
def test_reference_default_lengths_are_t_minus_s(shape):
    q, latent = make_inputs(*shape)
    r = shape[4]
    torch.testing.assert_close(latent_attention(q, latent, 0.3, r, full_lengths(q, latent)),
                               latent_attention(q, latent, 0.3, r), rtol=0, atol=0)


@pytest.mark.parametrize("shape", RAGGED)
def test_reference_per_row_lengths_matches_naive_loops(shape):
    q, latent = make_inputs(*shape, dtype=torch.float64)
    latent, lengths = ragged(latent, shape[1], seed=sum(shape))
    r = shape[4]
    torch.testing.assert_close(latent_attention(q, latent, 0.3, r, lengths), naive_loops(q, latent, 0.3, r, lengths),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", RAGGED)
def test_reference_per_row_lengths_matches_sdpa_on_the_valid_rows(shape):
    q, latent = make_inputs(*shape)
    latent, lengths = ragged(latent, shape[1], seed=sum(shape))
    r = shape[4]
    torch.testing.assert_close(latent_attention(q, latent, 0.7, r, lengths), sdpa_rows(q, latent, 0.7, r, lengths),
                               **FP32_TOL)


def test_reference_ignores_nan_and_inf_garbage():
    q, latent = make_inputs(3, 2, 10, 2, 4, 2)
    dirty, lengths = ragged(latent, 2, seed=5, garbage="nan")
    assert not torch.isfinite(dirty).all()
    out = latent_attention(q, dirty, 0.5, 4, lengths)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, sdpa_rows(q, latent, 0.5, 4, lengths), **FP32_TOL)


def test_reference_accepts_int32_lengths():
    q, latent = make_inputs(2, 1, 6, 2, 4, 2)
    lengths = torch.tensor([2, 5])
    torch.testing.assert_close(latent_attention(q, latent, 0.5, 4, lengths.int()),
                               latent_attention(q, latent, 0.5, 4, lengths), rtol=0, atol=0)


def test_custom_op_takes_lengths_third():
    q, latent = make_inputs(2, 2, 8, 2, 4, 2)
    latent, lengths = ragged(latent, 2, seed=3)
    out = torch.ops.dsv3.latent_attention(q, latent, lengths, 0.5, 4)
    torch.testing.assert_close(out, latent_attention(q, latent, 0.5, 4, lengths), rtol=0, atol=0)
    args = [a.name for a in torch.ops.dsv3.latent_attention.default._schema.arguments]
    assert args == ["q", "latent", "cache_lengths", "scale", "kv_lora_rank"]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.dsv3.latent_attention(mode.from_tensor(q), mode.from_tensor(latent),
                                               mode.from_tensor(lengths), 0.5, 4)
    assert fake.shape == (2, 2, 2, 4) and fake.dtype == q.dtype


@pytest.mark.parametrize("shape", CASES)
def test_onnx_function_matches_reference(shape):
    q, latent = make_inputs(*shape)
    r = shape[4]
    torch.testing.assert_close(run_ort(q, latent, 0.25, r), latent_attention(q, latent, 0.25, r), **FP32_TOL)


@pytest.mark.parametrize("garbage", ["random", "nan"])
@pytest.mark.parametrize("shape", RAGGED)
def test_onnx_function_per_row_lengths_matches_reference(shape, garbage):
    q, latent = make_inputs(*shape)
    latent, lengths = ragged(latent, shape[1], seed=sum(shape), garbage=garbage)
    r = shape[4]
    out = run_ort(q, latent, 0.25, r, lengths)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, latent_attention(q, latent, 0.25, r, lengths), **FP32_TOL)


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2), s=st.integers(1, 4), past=st.integers(0, 9), h=st.integers(1, 3),
    r=st.integers(1, 8), dr=st.integers(1, 4), scale=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
)
def test_onnx_function_matches_reference_random(b, s, past, h, r, dr, scale, seed):
    q, latent = make_inputs(b, s, s + past, h, r, dr, seed=seed)
    torch.testing.assert_close(run_ort(q, latent, scale, r), latent_attention(q, latent, scale, r), **FP32_TOL)
    latent, lengths = ragged(latent, s, seed)  # the same buffer, ragged rows with garbage
    torch.testing.assert_close(run_ort(q, latent, scale, r, lengths), latent_attention(q, latent, scale, r, lengths),
                               **FP32_TOL)


def test_onnx_function_fp16_io_computes_in_fp32():
    q, latent = make_inputs(2, 3, 9, 2, 6, 2, dtype=torch.float16)
    latent, lengths = ragged(latent, 3, seed=9)
    out = run_ort(q, latent, 0.5, 6, lengths)
    assert out.dtype == torch.float16
    expected = latent_attention(q.float(), latent.float(), 0.5, 6, lengths).half()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_ort_accepts_nodes_without_plugin_attrs():
    # The function declares them with defaults; graphs built before the plugin pass still run.
    q, latent = make_inputs(1, 2, 6, 2, 4, 2)
    torch.testing.assert_close(run_ort(q, latent, 0.5, 4, plugin_attrs=False), latent_attention(q, latent, 0.5, 4), **FP32_TOL)


def test_bf16_reference_close_to_fp32():
    q, latent = make_inputs(2, 4, 37, 3, 16, 4)
    qb, lb = q.bfloat16(), latent.bfloat16()
    out = latent_attention(qb, lb, 0.2, 16)
    assert out.dtype == torch.bfloat16
    # Softmax in fp32: exactly the fp32 math on the rounded inputs, rounded once at the end.
    torch.testing.assert_close(out, latent_attention(qb.float(), lb.float(), 0.2, 16).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), latent_attention(q, latent, 0.2, 16), rtol=2e-2, atol=2e-2)


def test_function_proto_signature():
    fp = onnx_function.function_proto()
    assert (fp.domain, fp.name) == (spec.OP_DOMAIN, spec.OP_NAME)
    assert list(fp.input) == list(spec.INPUTS) and len(fp.output) == len(spec.OUTPUTS)
    declared = set(fp.attribute) | {a.name for a in fp.attribute_proto}
    assert declared == set(spec.ATTRIBUTES)
    defaults = {a.name: a.s.decode() for a in fp.attribute_proto}
    assert defaults == {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
    assert {o.domain: o.version for o in fp.opset_import}[""] == onnx_function.OPSET
    onnx.checker.check_model(build_model(0.5, 4), full_check=True)


def test_output_shape():
    assert spec.output_shape((2, 3, 16, 576), (2, 40, 576), 512) == (2, 3, 16, 512)
    assert spec.output_shape(("batch", "seq", 16, 576), ("batch", "total", 576), 512) == ("batch", "seq", 16, 512)


@pytest.mark.parametrize(
    "q_shape, latent_shape, r, match",
    [
        ((1, 2, 3, 8), (1, 5, 8, 1), 4, "latent must have rank 3"),
        ((1, 2, 8), (1, 5, 8), 4, "q must have rank 4"),
        ((1, 2, 3, 8), (1, 5, 9), 4, r"q's last dim \(8\) must equal latent's last dim \(9\)"),
        ((1, 2, 3, 8), (2, 5, 8), 4, "batch"),
        ((1, 2, 3, 8), (1, 5, 8), 8, r"kv_lora_rank \(8\) must be < latent's last dim \(8\)"),
        ((1, 2, 3, 8), (1, 5, 8), 0, "positive int"),
        ((1, 6, 3, 8), (1, 5, 8), 4, r"S=6.*T=5"),
    ],
)
def test_validation_errors(q_shape, latent_shape, r, match):
    with pytest.raises(ValueError, match=match):
        latent_attention(torch.zeros(q_shape), torch.zeros(latent_shape), 0.5, r)


@pytest.mark.parametrize(
    "lengths, match",
    [
        (torch.tensor([[1, 1]]), r"cache_lengths must have rank 1 \[B\]"),
        (torch.tensor([1, 1, 1]), r"cache_lengths has 3 entries but the batch is B=2"),
        (torch.tensor([1.0, 1.0]), "cache_lengths must be an integer tensor"),
        (torch.tensor([-1, 0]), r"cache_lengths must be >= 0, got -1"),
        (torch.tensor([0, 4]), r"cache_lengths\[b\] \+ S must be <= T.*4 \+ S=2 > T=5"),
    ],
)
def test_validation_errors_of_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        latent_attention(torch.zeros(2, 2, 3, 8), torch.zeros(2, 5, 8), 0.5, 4, lengths)


def test_validation_of_lengths_shapes_and_symbolic_dims():
    spec.validate_shapes(("B", "S", 16, 576), ("B", "T", 576), 512, ("B",))  # symbolic: no complaint
    with pytest.raises(ValueError, match="rank 1"):
        spec.validate_shapes(("B", "S", 16, 576), ("B", "T", 576), 512, ("B", 1))
    with pytest.raises(ValueError, match="integer tensor"):
        spec.validate(np.zeros((1, 1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32), 0.5, 2,
                      np.zeros(1, np.float32))
    spec.validate(np.zeros((1, 1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32), 0.5, 2, np.zeros(1, np.int32))
    spec.validate_length_range(0, 3, 2, 5)
    with pytest.raises(ValueError, match="<= T"):
        spec.validate_length_range(0, 4, 2, 5)


def test_validation_dtypes_and_symbolic_dims():
    with pytest.raises(ValueError, match=r"q \(float32\) and latent \(float16\)"):
        latent_attention(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 4, dtype=torch.float16), 0.5, 2)
    with pytest.raises(ValueError, match="floating dtype"):
        spec.validate(np.zeros((1, 1, 1, 4), np.int32), np.zeros((1, 1, 4), np.int32), 0.5, 2)
    spec.validate_shapes(("B", "S", 16, 576), ("B", "T", 576), 512)  # symbolic dims: no complaint
