"""--precision fp8 from FP8 checkpoints: the checkpoint's E4M3 bytes and block scales reach the graph
unchanged (a head's W_UK/W_UV rows cut from wkv_b, experts stacked, I padded to a block), and the
graph equals the reference running those weights with DeepSeek's act_quant. Two shapes: tiny
(every dim a partial block) and one whose dims are multiples of 128. The reference's activation
quantizers quantize the graph's own QuantizeLinear inputs (checked equal to the torch ones within
float noise), because an element within float noise of an E4M3 rounding tie flips one code."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import dsv3_export.exporter.quant_numerics as qn
from dsv3_export.core.config import preset
from dsv3_export.exporter import CheckpointError, load_reference, open_source
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.checkpoint_writer import make_checkpoint
from dsv3_export.exporter.export import export_main, meta_model
from dsv3_export.exporter.passes.attach_weights import attach_weights
from dsv3_export.exporter.passes.cleanup import cleanup
from dsv3_export.exporter.passes.plugin_attrs import plugin_attrs
from dsv3_export.exporter.passes.quantize import quantize
from dsv3_export.exporter.precision_policy import Policy
from dsv3_export.exporter.weights import resolve

# dim, inter, moe_inter multiples of 128; head rows (nope 32, v 32) not aligned to wkv_b's blocks
ALIGNED = dict(dim=256, inter_dim=256, moe_inter_dim=128, n_layers=2, n_dense_layers=1, n_heads=2, q_lora_rank=128,
               kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
               n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, n_mtp_layers=0)


def _graph(source):
    cfg = source.config
    model = meta_model(cfg, has_gate_bias=f"layers.{cfg.n_dense_layers}.ffn.gate.bias" in source, mtp=False)
    graph = attach_weights(plugin_attrs(export_main(model)), source)
    policy = Policy.make("fp8")
    return cleanup(quantize(graph, source, policy)), policy


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy() if t.dtype == torch.float8_e4m3fn else t.numpy().view(np.uint8)


def _check_bytes(graph, ckpt: Checkpoint):
    """Every fp8 initializer against the checkpoint tensors it came from, byte for byte."""
    cfg = ckpt.config
    inits = graph.graph.initializers
    seen = 0
    for name, value in inits.items():
        if value.dtype != ir.DataType.FLOAT8E4M3FN:
            continue
        fqn = name.removeprefix("model.").removesuffix("_q")
        got = value.const_value.numpy().view(np.uint8)
        scale = inits[name[: -2] + "_scale"].const_value.numpy()
        p, rest = resolve(ckpt, fqn)  # checkpoint layer prefix (MTP blocks too) and the rest
        if rest in ("attn.w_uk", "attn.w_uv"):
            w = _bits(ckpt.get(f"{p}.attn.wkv_b.weight")).reshape(cfg.n_heads, -1, cfg.kv_lora_rank)
            s = ckpt.get(f"{p}.attn.wkv_b.scale").numpy()
            dn = cfg.qk_nope_head_dim
            part = slice(0, dn) if rest.endswith("uk") else slice(dn, None)
            assert np.array_equal(got, w[:, part])
            rows = np.repeat(s, 128, 0)[: cfg.n_heads * w.shape[1]].reshape(cfg.n_heads, w.shape[1], -1)[:, part]
            assert np.array_equal(scale.view(np.uint32), rows.view(np.uint32))
        elif rest in ("ffn.w_gate_up", "ffn.w_down"):
            inter = cfg.moe_inter_dim
            padded = -(-inter // 128) * 128
            for e in range(cfg.n_routed_experts):
                if rest == "ffn.w_gate_up":
                    for j, part in enumerate(("w1", "w3")):
                        w = _bits(ckpt.get(f"{p}.ffn.experts.{e}.{part}.weight"))
                        assert np.array_equal(got[e, j * padded: j * padded + inter], w)
                        assert not got[e, j * padded + inter: (j + 1) * padded].any()  # padding: +0.0
                        s = ckpt.get(f"{p}.ffn.experts.{e}.{part}.scale").numpy()
                        assert np.array_equal(scale[e, j * padded // 128: j * padded // 128 + s.shape[0]], s)
                else:
                    w = _bits(ckpt.get(f"{p}.ffn.experts.{e}.w2.weight"))
                    assert np.array_equal(got[e, :, :inter], w) and not got[e, :, inter:].any()
                    s = ckpt.get(f"{p}.ffn.experts.{e}.w2.scale").numpy()
                    assert np.array_equal(scale[e, :, : s.shape[1]], s)
        else:  # a Linear: [out, in] exactly as stored, its block scales repeated along out
            name = f"{p}.{rest}" if p else rest
            if not ckpt.is_fp8(name):  # stored in bf16 (e.g. MTP's eh_proj): quantized by the build
                continue
            w = _bits(ckpt.get(name))
            s = ckpt.get(name[: -len("weight")] + "scale").numpy()
            assert np.array_equal(got, w), fqn
            assert np.array_equal(scale[::128], s) and np.array_equal(scale, np.repeat(s, 128, 0)[: w.shape[0]])
        seen += 1
    return seen


def _run_vs_emulated(graph, source, policy):
    """Max |logits - reference| / max |reference|. ORT also returns every QuantizeLinear's input; each
    act_quant call of the reference takes the one of its shape closest to its own input, asserts they
    agree within float noise (relative max error < 1e-5), and quantizes ORT's value."""
    cfg = source.config
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 10))
    feed = {"input_ids": ids, "cache_lengths": np.zeros(2, np.int64),
            **{f"past_latent.{i}": np.zeros((2, ids.shape[1], cfg.latent_dim), np.float32) for i in range(cfg.n_layers)}}
    q_in = list(dict.fromkeys(n.inputs[0] for n in graph.graph if n.op_type == "QuantizeLinear"))
    extra = [v for v in q_in if not v.is_graph_output()]
    graph.graph.outputs.extend(extra)
    try:
        proto = ir.serde.serialize_model(graph).SerializeToString()
    finally:
        for _ in extra:
            graph.graph.outputs.pop()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    logits, *ort_in = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(
        ["logits"] + [v.name for v in q_in], feed)
    real = qn.fp8_act_quant

    def shared(x, group=qn.FP8_BLOCK):
        xn = x.float().numpy()
        errs = [(np.abs(g - xn).max() / max(np.abs(xn).max(), 1e-30), g) for g in ort_in if g.shape == xn.shape]
        assert errs, f"no QuantizeLinear input of shape {xn.shape} for act_quant"
        err, g = min(errs, key=lambda e: e[0])
        assert err < 1e-5, f"act_quant input {tuple(x.shape)}: graph's differs by {err:.3g} (relative max)"
        return real(torch.from_numpy(g), group).to(x.dtype)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(qn, "fp8_act_quant", shared)
        mp.setitem(qn.ACT_QUANT, "fp8-group128", shared)
        want = qn.emulate(load_reference(source, mtp=False), source, policy)(torch.from_numpy(ids)).logits.numpy()
    return np.abs(logits - want).max() / np.abs(want).max()


def test_tiny_fp8_checkpoint_passes_through(tiny_fp8_ckpt):
    ckpt = Checkpoint.open(tiny_fp8_ckpt)
    graph, policy = _graph(ckpt)
    cfg = ckpt.config
    # per layer: 5 attention (wq_a, wq_b, wkv_a, wo + W_UK/W_UV = 6 fp8 tensors), dense MLP 3 or 2 experts + 3 shared
    assert _check_bytes(graph, ckpt) == cfg.n_layers * 6 + 3 + (cfg.n_layers - cfg.n_dense_layers) * 5
    assert _run_vs_emulated(graph, ckpt, policy) < 1e-4


def test_aligned_fp8_checkpoint_passes_through(tmp_path):
    cfg = preset("tiny").replace(**ALIGNED)
    ckpt = Checkpoint.open(make_checkpoint(cfg, tmp_path / "fp8", fp8=True))
    graph, policy = _graph(ckpt)
    assert _check_bytes(graph, ckpt) == 2 * 6 + 3 + 5
    w = graph.graph.initializers["model.layers.1.ffn.w_gate_up_q"]
    assert list(w.shape) == [4, 256, 256]  # 2 * moe_inter: no padding needed
    assert _run_vs_emulated(graph, ckpt, policy) < 1e-4


def test_bf16_source_is_quantized_per_block():
    source = open_source("tiny")
    graph, policy = _graph(source)
    assert policy.decisions["layers.0.attn.wq_a.weight"].startswith("fp8 e4m3, 128x128 blocks")
    assert _run_vs_emulated(graph, source, policy) < 1e-4


def test_bad_fp8_checkpoints_are_refused(tiny_fp8_ckpt, tmp_path):
    """A missing or misshapen scale tensor is named, before any export work."""
    import shutil

    from safetensors.torch import load_file, save_file

    for case in ("missing", "shape"):
        bad = tmp_path / case
        shutil.copytree(tiny_fp8_ckpt, bad)
        f = next(bad.glob("*.safetensors"))
        tensors = load_file(str(f))
        key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
        if case == "missing":
            del tensors[key]
        else:
            tensors[key] = torch.ones(3, 3)
        save_file(tensors, str(f), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="o_proj|wo") as err:
            from dsv3_export.core.build_options import BuildOptions
            from dsv3_export.pipeline.build import build

            build(bad, tmp_path / f"out-{case}", BuildOptions(precision="fp8", verify=False))
        assert ("scale" in str(err.value)) and not (tmp_path / f"out-{case}").exists()
