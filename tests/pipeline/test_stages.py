"""`dsv3-export build --stages N`: the plan in the manifest, verification of the chain, every
precision, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dsv3_export import engines
from dsv3_export.cli.main import main
from dsv3_export.core.build_options import BuildOptions
from dsv3_export.pipeline.build import build
from tests.helpers import rel_max_err


def test_manifest_records_the_plan(staged_demo_build):
    m = json.loads((staged_demo_build / "manifest.json").read_text())
    stages = m["stages"]
    assert [s["file"] for s in stages] == ["stage0.onnx", "stage1.onnx"] and "model.onnx" not in m["files"]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == m["config"]["n_layers"]
    assert stages[0]["layers"][1] == stages[1]["layers"][0] and stages[0]["embed"] and stages[1]["head"]
    for s in stages:  # each stage graph takes exactly its own layers' caches
        pasts = [i["name"] for i in m["io"][s["file"]]["inputs"] if i["name"].startswith("past_latent.")]
        assert pasts == [f"past_latent.{i}" for i in range(*s["layers"])]
    assert m["verify"]["passed"] is True  # the fixture's build verified the chained stages


def test_three_stages_continue_as_one_graph(tmp_path, demo_build):
    out = tmp_path / "demo-3"
    m = build("demo", out, BuildOptions(stages=3, verify=False))
    assert len(m.stages) == 3
    staged, whole = engines.load(out), engines.load(demo_build)
    prompt = np.random.default_rng(3).integers(2, whole.config.vocab_size, 14).tolist()
    a = staged.generate(prompt, max_new_tokens=24, add_bos=False)
    b = whole.generate(prompt, max_new_tokens=24, add_bos=False)
    assert a.ids == b.ids


@pytest.mark.parametrize("precision", ["fp8", "int8", "int8-wo", "int4-wo"])
def test_every_precision_builds_staged(tmp_path, precision):
    one = build("tiny", tmp_path / "one", BuildOptions(precision=precision, verify=False, mtp=False))
    two = build("tiny", tmp_path / "two", BuildOptions(precision=precision, stages=2, verify=False, mtp=False))
    assert len(two.stages) == 2 and one.quantization["tensors"] == two.quantization["tensors"]
    a, b = engines.load(tmp_path / "one"), engines.load(tmp_path / "two")
    ids = np.random.default_rng(4).integers(2, a.config.vocab_size, (2, 7))
    la, _, _ = a.forward(ids, a.empty_past(2))
    lb, _, _ = b.forward(ids, b.empty_past(2))
    assert rel_max_err(lb, la) <= 1e-5


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args, needle", [
    (["--stages", "99"], "--stages 99: the model has only"),
    (["--stages", "2", "--mla", "naive"], "--stages needs --mla absorbed"),
])
def test_bad_stages_are_one_line(tmp_path, args, needle):
    r = run("build", "tiny", "-o", tmp_path / "out", "--no-verify", *args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert needle in r.output.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_zero_stages_is_a_usage_error(tmp_path):
    r = run("build", "tiny", "-o", tmp_path / "out", "--stages", "0")
    assert r.exit_code == 2 and "--stages" in r.output
