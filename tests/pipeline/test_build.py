"""`dsv3-export build`: the directory it writes, atomicity, and its errors."""

import json
import os

import pytest
from click.testing import CliRunner

from dsv3_export.cli.main import main
from tests.helpers import assert_clean_error as conftest_assert_clean_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, *needles, code: int = 1):
    conftest_assert_clean_error(result, *needles, one_line=False, code=code)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "tiny"
    r = run("build", "tiny", "-o", out, "--no-verify")
    assert r.exit_code == 0, r.output
    return out


def test_build_dir_contents_and_manifest(built):
    manifest = json.loads((built / "manifest.json").read_text())
    for f in ("model.onnx", "model.onnx.data", "mtp.onnx", "mtp.onnx.data", "tokenizer.json"):
        assert f in manifest["files"] and (built / f).is_file()
        assert len(manifest["files"][f]["sha256"]) == 64
    assert manifest["precision"] == "fp32" and manifest["backend"] == "ort" and manifest["mla"] == "absorbed"
    assert manifest["config"]["n_layers"] == 3 and manifest["source"]["kind"] == "preset"
    io = manifest["io"]["model.onnx"]
    assert [i["name"] for i in io["inputs"]][:3] == ["input_ids", "cache_lengths", "past_latent.0"]
    assert io["outputs"][2]["shape"][-1] == 40
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["tools"]) | {"onnxruntime"}
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_out_exists_is_refused_then_forced(built):
    assert_clean_error(run("build", "tiny", "-o", built, "--no-verify"), str(built), "exists")


def test_nonexistent_source(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run("build", tmp_path / "nope", "-o", out, "--no-verify"), "nope")
    assert not out.exists()


def test_unreadable_source(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{not json")
    (src / "model.safetensors").write_bytes(b"\x00" * 16)
    out = tmp_path / "out"
    assert_clean_error(run("build", src, "-o", out, "--no-verify"), "config.json")
    assert not out.exists()


def test_unknown_backend_and_precision(tmp_path):
    r = run("build", "tiny", "-o", tmp_path / "o", "--precision", "fp7")
    assert_clean_error(r, "--precision", "'fp7' is not one of", code=2)
    assert not (tmp_path / "o").exists()


def test_trt_backend_without_tensorrt(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be tested")
    except ImportError:
        pass
    r = run("build", "tiny", "-o", tmp_path / "o", "--backend", "trt")
    assert_clean_error(r, "TensorRT")
    assert not (tmp_path / "o").exists()


def test_write_failure_mid_build_leaves_nothing(tmp_path, monkeypatch):
    import dsv3_export.pipeline.build as build_mod

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "tokenizer.json"))

    monkeypatch.setattr(build_mod, "write_tokenizer", disk_full)  # after model.onnx has been written
    out = tmp_path / "out"
    assert_clean_error(run("build", "tiny", "-o", out, "--no-verify", "--no-mtp"), "No space left on device")
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary sibling either


def test_manifest_says_what_the_directory_holds(tiny_build):
    import json

    m = json.loads((tiny_build / "manifest.json").read_text())
    files, disk = m["files"], m["disk"]
    assert disk["weight_bytes"] == files["model.onnx.data"]["bytes"] + files["mtp.onnx.data"]["bytes"]
    assert disk["build_bytes"] == sum(f["bytes"] for f in files.values())  # verify off: no report files
    assert disk["ratio"] == round(disk["build_bytes"] / disk["weight_bytes"], 3)
