"""The CLI: its commands, and one clear line (no traceback, exit 1) for every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from dsv3_export.cli.main import main
from tests.helpers import ROOT, assert_clean_error


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_inspect_preset_json():
    r = run("inspect", "v3", "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)
    assert info["cache_bytes_per_token"]["latent"] == 61 * 576 * 2
    assert info["cache_bytes_per_token"]["naive"] == 61 * 40960 * 2
    assert 660e9 < info["parameters"]["total"] < 680e9 and 35e9 < info["parameters"]["activated"] < 39e9


def test_make_checkpoint_and_inspect(tmp_path):
    out = tmp_path / "ck"
    r = run("make-checkpoint", "--preset", "tiny", "-o", out, "--fp8", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    r = run("inspect", out)
    assert r.exit_code == 0 and "F8_E4M3" in r.output and "MTP" in r.output
    assert_clean_error(run("make-checkpoint", "--preset", "tiny", "-o", out), str(out), "exists")


@pytest.fixture
def broken(tmp_path, tiny_ckpt):
    def make(edit):
        d = tmp_path / "broken"
        shutil.copytree(tiny_ckpt, d)
        edit(d)
        return d
    return make


def _edit_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_tensor(broken):
    d = broken(lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight")))
    assert_clean_error(run("inspect", d), "layers.1.attn.wkv_b.weight", "missing")


def test_wrong_shape(broken):
    def edit(t):
        t["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(33, 64)
    d = broken(lambda d: _edit_tensors(d, edit))
    assert_clean_error(run("inspect", d), "model.safetensors", "layers.2.ffn.experts.3.w3.weight", "[33, 64]")


def test_truncated_safetensors(broken):
    def edit(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(run("inspect", broken(edit)), "model.safetensors")


def test_config_disagrees_with_tensors(broken):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["hidden_size"] = 96
        (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("inspect", broken(edit)), "shape", "config implies")


def test_extra_layer_in_config(broken):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_hidden_layers"] = 2  # the tensors have 3 layers (+ MTP)
        (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("inspect", broken(edit)))


def test_pickle_checkpoint_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_clean_error(run("inspect", d), "pytorch_model.bin", "pickle")


def test_invalid_config_field(broken):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["scoring_func"] = "relu"
        (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("inspect", broken(edit)), "scoring_func")


def test_console_script_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: one line on stderr, exit 1."""
    proc = subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["build", "tiny", "--precision", "int5"], ["build", "tiny", "--moe", "dense"],
                                  ["build", "tiny", "--backend", "tvm"], ["run", "--prompt", "x", "--top-p", "2"]])
def test_a_bad_flag_is_refused_before_torch_or_onnx_load(tmp_path, args):
    """Flags whose values are known are checked before any heavy import: the error costs no torch."""
    code = ("import sys\nfrom dsv3_export.cli.main import main\n"
            f"try:\n    main({[*args, '-o', str(tmp_path / 'o')] if args[0] == 'build' else args!r})\n"
            "except SystemExit as e:\n"
            "    print(e.code, sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.split("\n")[-2] in ("2 []", "1 []"), done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


def test_default_build_folder_leaves_setuptools_build_alone(tmp_path):
    """In a clone after `pip install .` (setuptools' build/ present), `build --force` writes
    ./dsv3-build, `run` finds it there, and build/ is untouched."""
    setuptools_build = tmp_path / "build" / "lib"
    setuptools_build.mkdir(parents=True)
    (setuptools_build / "x.py").write_text("x = 1\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    made = subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", "build", "tiny", "--no-verify", "--force"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (tmp_path / "dsv3-build" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "build").rglob("*")) == ["lib", "x.py"]
    ran = subprocess.run([sys.executable, "-m", "dsv3_export.cli.main", "run", "--ids", "1,2,3", "--max-tokens", "2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
