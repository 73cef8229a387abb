"""`dsv3-export build --precision ... --keep-fp ...`: the manifest records the policy, the engine runs,
and bad input is one clear line."""

import json

import pytest
from click.testing import CliRunner

from dsv3_export.cli.main import main
from tests import helpers


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *needles, code: int = 1):
    helpers.assert_clean_error(result, *needles, one_line=False, code=code)


@pytest.fixture(scope="module")
def int4_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny-int4"
    r = run("build", "tiny", "-o", out, "--precision", "int4-wo", "--keep-fp", "none", "--no-mtp", "--no-verify")
    assert r.exit_code == 0, r.output
    return out


def test_manifest_records_the_policy(int4_build):
    m = json.loads((int4_build / "manifest.json").read_text())
    q = m["quantization"]
    assert m["precision"] == q["precision"] == "int4-wo" and q["keep_fp"] == [] and q["form"] == "ort"
    assert q["scheme"]["bits"] == 4 and q["scheme"]["block"] == 128
    t = q["tensors"]
    assert t["embed.weight"].startswith("int8 per row")
    assert t["head.weight"] == "int8 weight-only, blocks of 128 (LM head)"  # heads: 8 bits in every integer precision
    assert t["layers.1.ffn.w_down"] == "int4 blocks of 32; QMoE" and t["layers.1.ffn.gate.weight"].startswith("int4")
    assert t["layers.0.attn.w_uk"] == "int8 per row, weight-only (DequantizeLinear -> Einsum)"
    assert sum(q["counts"].values()) == len(t)


def test_quantized_engine_generates(int4_build):
    import onnx

    from dsv3_export import engines
    graph = onnx.load(str(int4_build / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert {"MatMulNBits", "QMoE"} <= ops  # the ORT engine's graph has the quantized kernels
    result = engines.load(int4_build).generate([5, 6, 7], max_new_tokens=4)
    assert len(result.ids) == 4


def test_bad_precision_and_keep_fp(tmp_path):
    assert_clean_error(run("build", "tiny", "-o", tmp_path / "a", "--precision", "int3", "--no-verify"),
                       "--precision", "int4-wo", code=2)
    assert_clean_error(run("build", "tiny", "-o", tmp_path / "b", "--precision", "int8", "--keep-fp", "none",
                           "--keep-fp", "embed.weight", "--no-verify"), "--keep-fp none")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
