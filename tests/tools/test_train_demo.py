"""tools/train_demo.py and the demo model it made: the training form is the reference's math, the
written checkpoint reloads to the same logits, the balance rule, and the shipped model itself."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import train_demo as td  # noqa: E402

from dsv3_export.core.config import preset  # noqa: E402
from dsv3_export.exporter import demo_path, load_reference, open_source  # noqa: E402


def small_model(seed: int = 0):
    """The tiny preset's shape (group-limited routing, q compression, YaRN, MTP) made trainable, with
    weights large enough that routing and attention are not uniform."""
    model = td.make_model(preset("tiny"), seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif name.endswith("gate.bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_training_form_is_the_reference_math():
    """model.training_form() (exporter/model.py's hook, which train_demo trains under) computes the
    inference form's logits, and leaves that default form exactly as it was."""
    model = small_model()
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        ref_mtp, _ = model.mtp_forward(ids[:, 1:], ref.hidden_states[:, :-1])
        with model.training_form():
            got = model(ids)
            got_mtp, _ = model.mtp_forward(ids[:, 1:], got.hidden_states[:, :-1])
        after = model(ids)
        after_mtp, _ = model.mtp_forward(ids[:, 1:], after.hidden_states[:, :-1])
    assert torch.allclose(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got_mtp, ref_mtp, rtol=1e-4, atol=1e-4)
    assert torch.equal(after.logits, ref.logits) and torch.equal(after_mtp, ref_mtp)
    assert got.past == [None] * len(got.past) and all(p is not None for p in after.past)  # fused: no cache


def test_gradients_reach_every_trained_parameter_and_not_the_bias():
    model = small_model()
    batch = torch.randint(0, 512, (2, 41), generator=torch.Generator().manual_seed(2))
    with model.training_form():
        main, mtp, _ = td.losses(model, batch)
        (main + 0.3 * mtp).backward()
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.mtp[0].head.weight is model.head.weight  # the shared output head


def test_bias_update_is_the_sign_rule():
    model = small_model()
    meter = td.LoadMeter(model)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        out = model(ids)
        model.mtp_forward(ids[:, 1:], out.hidden_states[:, :-1])
    loads = meter.take()
    meter.close()
    assert set(loads) == {name for name, _ in td.moe_layers(model)} and len(loads) == 3  # 2 MoE + MTP
    for name, load in loads.items():
        assert load.sum() == (15 if name.startswith("mtp") else 16) * 2  # tokens × top-2
    name = next(iter(loads))
    bias = dict(td.moe_layers(model))[name].gate.bias
    before = bias.clone()
    load = torch.tensor([10.0, 0.0, 4.0, 4.0, 4.0, 4.0, 3.0, 3.0])  # mean 4
    td.update_bias(model, {name: load}, rate=0.01)
    assert torch.allclose(bias - before, 0.01 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))


def test_a_short_run_writes_a_checkpoint_that_reloads(tmp_path):
    """The whole script, small: tokenizer, training steps, held-out evaluation, the checkpoint in HF
    layout (MTP layer included, experts unstacked) reloaded by exporter.load_reference to the same
    logits, loss curve, metrics and README."""
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        metrics = td.main(["--out", str(out), "--preset", "tiny", "--steps", "3", "--batch", "2", "--seq-len", "48",
                           "--corpus-bytes", "300000", "--threads", "1", "--eval-every", "1e9"])
    finally:
        torch.set_num_threads(threads)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "metrics.json", "README.md"):
        assert (out / f).is_file(), f
    assert metrics["reload_check"]["logits_rel_err"] < 1e-4 and metrics["reload_check"]["greedy_equal"]
    assert metrics["training"]["steps"] == 3 and metrics["heldout"]["perplexity"] > 1
    src = open_source(out)
    assert src.has_mtp and src.layout == "hf"
    assert f"layers.{src.config.n_layers}.shared_head.norm.weight" in src
    assert "layers.1.ffn.experts.7.w3.weight" in src and "layers.1.ffn.gate.bias" in src
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["command"].startswith("nice -n 19 python tools/train_demo.py")
    assert "model.layers.3.*" in (out / "README.md").read_text()


# ---- the shipped model ----------------------------------------------------------------------------------
needs_demo = pytest.mark.skipif(not (demo_path() / "model.safetensors").is_file(),
                                reason="the demo model is not trained yet (tools/train_demo.py)")


@needs_demo
def test_shipped_demo_is_complete_and_small():
    files = {f.name for f in demo_path().iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "loss.png", "metrics.json", "README.md"} <= files
    weights = sum(f.stat().st_size for f in demo_path().iterdir() if f.suffix in (".safetensors", ".json"))
    assert weights <= 20 * 10**6
    src = open_source("demo")
    assert src.has_mtp and src.config.vocab_size >= 4096
    metrics = json.loads((demo_path() / "metrics.json").read_text())
    assert metrics["heldout"]["perplexity"] < src.config.vocab_size / 20
    assert metrics["reload_check"]["greedy_equal"]


@needs_demo
def test_shipped_demo_predicts_held_out_python():
    """Held-out perplexity recomputed here with the exporter's own loader (absorbed MLA, the custom
    ops), on held-out stdlib files the training never saw, the way training measured it (first
    windows of the BOS/EOS-joined stream): far below the vocabulary size (a uniform guess), and
    what metrics.json says."""
    import sysconfig

    from tokenizers import Tokenizer

    metrics = json.loads((demo_path() / "metrics.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = [stdlib / f for f in metrics["data"]["heldout_file_names"]]
    if not all(f.is_file() for f in held):
        pytest.skip("the held-out files are not in this Python's stdlib")
    tok = Tokenizer.from_file(str(demo_path() / "tokenizer.json"))
    stream = td.encode_files(tok, held)
    seq = metrics["training"]["seq_len"]
    windows = torch.from_numpy(np.stack([stream[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(4)]))
    model = load_reference("demo")
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    ppl = math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
    assert ppl < model.cfg.vocab_size / 20
    assert 0.5 < ppl / metrics["heldout"]["perplexity"] < 2.0, (ppl, metrics["heldout"]["perplexity"])


def test_demo_is_the_default_source(monkeypatch, tmp_path):
    """`dsv3-export build` / `inspect` / dsv3_export.build default to the embedded demo; a missing
    demo folder is one clear error."""
    import inspect as pyinspect

    import dsv3_export
    import dsv3_export.exporter.source
    from dsv3_export.cli.main import build as build_cmd
    from dsv3_export.cli.main import inspect as inspect_cmd
    from dsv3_export.core.errors import CheckpointError
    from dsv3_export.pipeline import build as pipeline

    assert pyinspect.signature(dsv3_export.build).parameters["source"].default == "demo"
    assert pyinspect.signature(pipeline.build).parameters["source_spec"].default == "demo"
    assert next(p for p in build_cmd.params if p.name == "source").default == "demo"
    assert next(p for p in inspect_cmd.params if p.name == "source").default == "demo"
    monkeypatch.setattr(dsv3_export.exporter.source, "demo_path", lambda: tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="embedded demo model is missing"):
        open_source("demo")


def test_demo_ships_as_package_data():
    """pyproject's package-data glob covers every file of the demo folder (so `pip install .` has it)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dsv3_export.exporter"]
    files = [f.relative_to(ROOT / "dsv3_export" / "exporter").as_posix() for f in demo_path().iterdir()] if demo_path().is_dir() else []
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f
    assert demo_path() == ROOT / "dsv3_export" / "exporter" / "data" / "demo"
