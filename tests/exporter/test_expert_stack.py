"""Expert stacks made and written one expert at a time: the same bytes as the whole stack, and a
build whose peak memory only per-expert streaming can meet."""

import io
import json
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
import torch

from dsv3_export.exporter import open_source
from dsv3_export.exporter.expert_stack import ExpertStack
from dsv3_export.exporter.precision_policy import SCHEMES
from dsv3_export.exporter.quant_numerics import quantized_expert, quantized_int
from dsv3_export.exporter.weights import expert_fp8, expert_of, expert_tensor, source_fp8, source_tensor


def _slabs(count, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(-8, 8, shape).astype(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype,np_dtype", [(ir.DataType.FLOAT, np.float32), (ir.DataType.INT8, np.int8),
                                            (ir.DataType.INT4, ml_dtypes.int4)])
def test_tofile_writes_the_whole_stack_one_slab_at_a_time(dtype, np_dtype):
    slabs = _slabs(5, (3, 6), np_dtype)
    asked = []

    def slab(i):
        asked.append(i)
        return slabs[i]

    stack = ExpertStack(5, slab, (3, 6), dtype, name="w")
    f = io.BytesIO()
    stack.tofile(f)
    assert asked == [0, 1, 2, 3, 4]  # each slab made once, in order
    assert f.getvalue() == ir.Tensor(np.stack(slabs), dtype=dtype).tobytes()
    assert np.array_equal(stack.numpy(), np.stack(slabs))
    assert tuple(stack.shape) == (5, 3, 6)


def test_a_slab_of_the_wrong_shape_or_dtype_is_refused():
    with pytest.raises(ValueError, match="slab 0 has shape"):
        ExpertStack(2, lambda i: np.zeros((3, 5), np.float32), (3, 6), ir.DataType.FLOAT, name="w").tofile(io.BytesIO())
    with pytest.raises(ValueError, match="slab 0 is float64"):
        ExpertStack(2, lambda i: np.zeros((3, 6)), (3, 6), ir.DataType.FLOAT, name="w").numpy()


@pytest.mark.parametrize("part", ["ffn.w_gate_up", "ffn.w_down"])
def test_one_expert_is_its_slice_of_the_stack(part):
    """Per-expert dequantizing, FP8 packing and integer quantization give exactly the whole stack's values."""
    src = open_source("tiny")
    src.fp8 = True  # DeepSeek's FP8 form, 128x128 blocks
    fqn = f"layers.1.{part}"
    prefix, rest = expert_of(src, fqn)
    dense = source_tensor(src, fqn, torch.float32)
    q8, s8 = source_fp8(src, fqn)
    scheme = SCHEMES["int4-wo"]
    qi, si = quantized_int(src, fqn, scheme, 16)
    for e in (0, src.config.n_routed_experts - 1):
        assert torch.equal(expert_tensor(src, prefix, rest, e, torch.float32), dense[e])
        q, s = expert_fp8(src, prefix, rest, e)
        assert torch.equal(q.view(torch.uint8), q8[e].view(torch.uint8)) and torch.equal(s, s8[e])
        q, s = quantized_expert(src, fqn, e, scheme, 16)
        assert torch.equal(q, qi[e]) and torch.equal(s, si[e])


# 192 experts of 1024 x 1024: one expert is 12.6 MB in fp32, the layer's gate/up stack 1.61 GB and
# both stacks 2.4 GB. Quantizing a stack at once held it about five times over.
WIDE = dict(vocab_size=1024, dim=1024, inter_dim=1024, moe_inter_dim=1024, n_layers=2, n_dense_layers=1, n_heads=4,
            n_routed_experts=192, n_shared_experts=1, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1,
            score_func="sigmoid", route_scale=2.5, q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, max_seq_len=512, original_seq_len=512, rope_factor=1.0, mscale=1.0,
            n_mtp_layers=0, weight_dtype="bf16")
# Measured 0.58 GiB (writing the weights: one expert at a time; whole stacks took 6.93 GiB). Below
# the fp32 gate/up stack alone, so no stack of the layer can have been held.
PEAK_BOUND = int(1.4 * 2**30)


def test_wide_moe_layer_builds_within_one_expert_not_one_layer(tmp_path):
    cfg = tmp_path / "wide.json"
    cfg.write_text(json.dumps(WIDE))
    ckpt, out = tmp_path / "ck", tmp_path / "build"
    made = subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", "make-checkpoint", "--config", str(cfg),
                           "--fp8", "--dtype", "bf16", "-o", str(ckpt)], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    child = textwrap.dedent(f"""
        from dsv3_export import BuildOptions, build
        build({str(ckpt)!r}, {str(out)!r}, BuildOptions(precision="int4-wo", verify=False))
        # VmHWM: this process's own peak. (ru_maxrss would start from the parent's, pytest's, at exec.)
        status = open("/proc/self/status").read()
        print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
    """)
    try:
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        peak = int(done.stdout.strip().splitlines()[-1])
        data = (out / "model.onnx.data").stat().st_size
    finally:  # 0.9 GB: not left for pytest's kept temporary folders
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    assert peak < PEAK_BOUND, f"peak RSS {peak / 2**30:.2f} GiB >= {PEAK_BOUND / 2**30:.2f} GiB"
    assert data > 192 * 3 * 1024 * 1024 // 2  # the int4 experts are all there
