"""Verification (verification/verify.py): Polygraphy's Comparator over the reference runner and the ONNX
Runtime runners, the report files, and that a wrong engine fails."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dsv3_export.cli.main import main
from dsv3_export.exporter import ExportError, load_reference, open_source
from dsv3_export.verification.verify import TOLERANCES, ReferenceRunner, tolerance_for, verify
from tests.helpers import buffered_feed, layer_pasts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def verify_build(tiny_build, tmp_path_factory):
    """A copy of the shared build: verify writes into it (verify/, manifest.json)."""
    out = tmp_path_factory.mktemp("verify") / "tiny"
    shutil.copytree(tiny_build, out)
    return out


@pytest.fixture(scope="session")
def verified(verify_build):
    return verify_build, verify(verify_build, None, decode_steps=8, greedy_tokens=32, backends=["ort", "graph"])


def test_verify_passes_on_tiny(verified):
    build, result = verified
    assert result["passed"], [c for c in result["checks"] if not c["passed"]]
    assert result["report"] == "verify/report.json"
    report = json.loads((build / "verify" / "report.json").read_text())
    assert report["passed"] and report["precision"] == "fp32"
    outputs = [c for c in report["checks"] if c["kind"] == "outputs"]
    # model.onnx: logits, hidden_states, present_latent.*; mtp.onnx: logits, present_latent.mtp; per runner
    assert {(c["graph"], c["output"], c["runner"]) for c in outputs} == {
        (g, o, r) for r in ("ort", "graph")
        for g, o in [("model.onnx", "logits"), ("model.onnx", "hidden_states"), ("model.onnx", "present_latent.*"),
                     ("mtp.onnx", "logits"), ("mtp.onnx", "present_latent.mtp")]}
    for c in outputs:
        assert len(c["steps"]) == 9 and c["steps"][0]["phase"] == "prefill" and c["steps"][0]["past"] == 0
        assert [s["past"] for s in c["steps"][1:]] == list(range(12, 20))
        assert c["rel_err"] < 1e-5 < c["tolerance"]  # fp32 on tiny: ~1e-6 measured
        for s in c["steps"]:
            assert s["rel_err"] == pytest.approx(s["max_abs_err"] / s["max_abs_ref"])
    greedy = [c for c in report["checks"] if c["kind"] == "greedy"]
    assert {c["runner"] for c in greedy} == {"ort", "graph"}
    for c in greedy:
        assert c["passed"] and c["agreement"] == 1.0 and c["tokens"] == 32
        assert c["engine_tokens"] == c["reference_tokens"] and np.array(c["reference_tokens"]).shape == (2, 32)


def test_report_files(verified):
    build, _ = verified
    png = build / "verify" / "error_per_step.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    md = (build / "verify" / "report.md").read_text()
    assert md.startswith("# Verification: PASS") and "](error_per_step.png)" in md
    assert "model logits" in md and "greedy 32 tokens" in md
    # the finished build's manifest lists the new report files with their hashes (engines.load checks them)
    manifest = json.loads((build / "manifest.json").read_text())
    assert {"verify/report.json", "verify/report.md", "verify/error_per_step.png"} <= set(manifest["files"])
    assert manifest["verify"]["passed"] is True
    from dsv3_export.core.build_dir import Manifest, check_file_hashes

    check_file_hashes(build, Manifest(manifest))


def test_wrong_source_fails(verified, tmp_path):
    """An engine that is not the reference's: the same build checked against another seed's weights."""
    build, _ = verified
    result = verify(build, open_source("tiny", seed=1), decode_steps=2, greedy_tokens=4, backends=["ort"],
                    report_dir=tmp_path)
    assert not result["passed"]
    assert all(not c["passed"] for c in result["checks"])
    assert all(c["rel_err"] > 0.1 for c in result["checks"] if c["kind"] == "outputs")
    assert (tmp_path / "report.json").is_file() and (tmp_path / "error_per_step.png").is_file()
    # the build's own report is untouched
    assert json.loads((build / "verify" / "report.json").read_text())["passed"]


def test_unloadable_engine_fails(verified, tmp_path):
    build, _ = verified
    broken = tmp_path / "broken"
    shutil.copytree(build, broken)
    (broken / "model.onnx.data").write_bytes((build / "model.onnx.data").read_bytes()[:1000])
    with pytest.raises(ExportError, match="model.onnx.data"):  # the hashes are checked first, as run does
        verify(broken, "tiny", decode_steps=1, greedy_tokens=2, backends=["ort"])
    (broken / "manifest.json").unlink()  # bare graphs: the runner that cannot load fails its checks
    result = verify(broken, "tiny", decode_steps=1, greedy_tokens=2, backends=["ort"])
    assert not result["passed"]
    failed = {c["name"] for c in result["checks"] if not c["passed"]}
    assert failed == {"model.onnx run [ort]", "greedy 2 tokens [ort]", "lm text [ort]"}
    assert all("model.onnx" in c["error"] for c in result["checks"] if not c["passed"])


def test_a_graph_that_is_not_onnx_is_named(verified, tmp_path):
    build, _ = verified
    broken = tmp_path / "broken"
    shutil.copytree(build, broken)
    (broken / "model.onnx").write_bytes((build / "model.onnx").read_bytes()[:1000])
    (broken / "manifest.json").unlink()
    with pytest.raises(ExportError, match=r"model\.onnx: not a readable ONNX graph"):
        verify(broken, "tiny", decode_steps=1, greedy_tokens=2, backends=["ort"])


def test_cli_verify_exit_codes(verified, tmp_path):
    build, _ = verified
    args = ["verify", str(build), "--decode-steps", "1", "--greedy-tokens", "2", "--backend", "ort",
            "--report-dir", str(tmp_path / "r")]
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "logits" in ok.output
    bad = CliRunner().invoke(main, args + ["--seed", "1"])
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.output and "Traceback" not in bad.output


def test_cli_verify_not_a_build(tmp_path):
    r = CliRunner().invoke(main, ["verify", str(tmp_path)])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "manifest.json" in r.output


def test_reference_runner_equals_model():
    """The runner is the model behind graph contract v2's names: cache buffers and their lengths."""
    model = load_reference("tiny")
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    past = [torch.randn(2, 3, cfg.latent_dim, generator=torch.Generator().manual_seed(i)) for i in range(cfg.n_layers)]
    feed = buffered_feed(ids.numpy(), layer_pasts(past))
    lengths = torch.from_numpy(feed["cache_lengths"])
    buffers = [torch.from_numpy(feed[f"past_latent.{i}"]) for i in range(cfg.n_layers)]
    with torch.no_grad():
        want = model(ids, buffers, lengths)
        want_mtp = model.mtp_forward(ids, want.hidden_states, buffers[0], cache_lengths=lengths)
        prefix = model(ids, past)  # the prefix form: the same numbers
    assert torch.equal(want.logits, prefix.logits) and torch.equal(want.past[0], prefix.past[0])
    with ReferenceRunner(model, "model") as runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta) == list(feed)
        got = runner.infer(feed)
    assert list(got) == ["logits", "hidden_states"] + [f"present_latent.{i}" for i in range(cfg.n_layers)]
    assert np.array_equal(got["logits"], want.logits.numpy())
    assert np.array_equal(got["hidden_states"], want.hidden_states.numpy())
    for i, p in enumerate(want.past):
        assert np.array_equal(got[f"present_latent.{i}"], p.numpy())
    mtp_feed = {"input_ids": ids.numpy(), "hidden_states": want.hidden_states.numpy(),
                "cache_lengths": feed["cache_lengths"], "past_latent.mtp": feed["past_latent.0"]}
    with ReferenceRunner(model, "mtp") as runner:
        got = runner.infer(mtp_feed)
    assert list(got) == ["logits", "present_latent.mtp"]
    assert np.array_equal(got["logits"], want_mtp[0].numpy())
    assert np.array_equal(got["present_latent.mtp"], want_mtp[1].numpy())


def test_tolerance_table():
    assert tolerance_for("fp32", "logits").metric == "rel_max"
    assert tolerance_for("fp32", "present_latent.17") == TOLERANCES["fp32"]["present_latent.*"]
    assert tolerance_for("fp32", "present_latent.mtp").limit == 1e-4
    assert tolerance_for("fp32", "greedy").metric == "greedy_prefix"
    with pytest.raises(ExportError, match="precision"):
        tolerance_for("int3", "logits")
